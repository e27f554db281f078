"""Bad input fails before any work, with one line naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo.config import ConfigError
from tests.conftest import compose


def test_defaults_compose_and_validate():
    cfg = compose([])
    assert cfg.algorithm.advantage == "grpo" and cfg.model.builtin == "tiny"
    assert cfg.reward.functions[0].name == "math_accuracy"


def test_experiment_overrides_every_value_it_sets_and_the_command_line_overrides_it():
    # The demo recipe sets optim.lr, which config.yaml also sets: the recipe must win (it once did not),
    # and a command-line override must beat the recipe.
    from omegaconf import OmegaConf

    from tests.conftest import CONFIGS

    recipe = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / "demo.yaml"))
    cfg = compose(["experiment=demo"])
    for group, values in recipe.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, group), key) == pytest.approx(value), f"{group}.{key}"
    assert compose(["experiment=demo", "optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"])
def test_every_algorithm_group_validates(algo):
    assert compose([f"algorithm={algo}"]).algorithm.name == algo


@pytest.mark.parametrize(
    "override, words",
    [
        ("algorithm.loss_agg=mean", ["algorithm.loss_agg", "'mean'", "token_mean"]),
        ("algorithm.advantage=ppo_gae", ["algorithm.advantage", "dr_grpo", "rloo"]),
        ("algorithm.ratio_level=word", ["algorithm.ratio_level", "sequence"]),
        ("algorithm.kl_estimator=k4", ["algorithm.kl_estimator", "k3"]),
        ("algorithm.group_size=1", ["algorithm.group_size"]),
        ("algorithm.clip_low=1.5", ["algorithm.clip_low"]),
        ("algorithm.dual_clip=0.5", ["algorithm.dual_clip"]),
        ("rollout.top_p=0", ["rollout.top_p"]),
        ("model.dtype=float8", ["model.dtype", "bfloat16"]),
        ("optim.schedule=step", ["optim.schedule", "cosine"]),
        ("resume=sometimes", ["resume", "auto"]),
        ("algorithm.mini_batches=5", ["algorithm.mini_batches", "train.prompts_per_step"]),
    ],
)
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        compose([override])
    for word in words:
        assert word in str(err.value)


def test_wrong_type_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="lr"):
        compose(["optim.lr=fast"])


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="not_a_key"):
        compose(["algorithm.not_a_key=1"])


def test_unknown_group_option_lists_the_options():
    with pytest.raises(Exception) as err:
        compose(["algorithm=ppo_v9"])
    assert "dr_grpo" in str(err.value)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "grpo.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    out = _cli(f"run_dir={tmp_path}/r", "algorithm.loss_agg=mean", cwd=tmp_path)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["error: algorithm.loss_agg: 'mean' is not one of token_mean, seq_mean_token_mean, "
                     "seq_mean_token_sum_norm"]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cli_missing_model_path(tmp_path):
    out = _cli(f"run_dir={tmp_path}/r", "model=hf", f"model.path={tmp_path}/nowhere", cwd=tmp_path)
    assert out.returncode == 2
    assert f"model.path: {tmp_path}/nowhere does not exist" in out.stderr


def test_cli_missing_column_and_empty_dataset(tmp_path, tiny_random_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n")
    common = [f"run_dir={tmp_path}/r", "task=jsonl", f"task.train_file={data}", "model=hf",
              f"model.path={tiny_random_dir}"]
    out = _cli(*common, cwd=tmp_path)
    assert out.returncode == 2 and "lacks column(s) answer" in out.stderr and str(data) in out.stderr
    data.write_text("")
    out = _cli(*common, cwd=tmp_path)
    assert out.returncode == 2 and f"task: {data} has no rows" in out.stderr


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from grpo.data import read_rows

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=f"{data}:2"):
        read_rows(str(data))


def test_import_grpo_pulls_in_neither_vllm_nor_deepspeed():
    code = ("import sys, grpo, grpo.trainer, grpo.train, grpo.rollout, grpo.backends, rewards; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
