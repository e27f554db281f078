"""Bad input fails before any work, with one line naming the problem."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict

import pytest

from grpo.errors import ConfigError
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


# The Qwen recipes are composed, not copied: model_recipe/<model> (learning rate, per-GPU budgets),
# task/<task> (reward, completion length, run length) and scale/<n>gpu (global batch, ZeRO-2).
MODELS = {  # model: (optim.lr, backend.micro_batch_tokens, rollout.batch_size)
    "qwen2.5-0.5b-instruct": (1e-6, 16384, 512),
    "qwen2.5-1.5b-instruct": (1e-6, 16384, 256),
    "qwen2.5-7b-instruct": (5e-7, 8192, 128),
}
TASKS = {"gsm8k": 512, "math": 1024}  # task: rollout.max_new_tokens
SCALES = {"1gpu": 32, "8gpu": 128}  # scale: train.prompts_per_step, over all GPUs


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_task_and_scale_composes_and_validates(model, task, scale):
    cfg = compose([f"model={model}", f"task={task}", f"scale={scale}"])
    lr, micro_batch_tokens, rollout_batch = MODELS[model]
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (lr, 10)
    assert (cfg.backend.micro_batch_tokens, cfg.backend.gradient_checkpointing) == (micro_batch_tokens, True)
    assert cfg.rollout.batch_size == rollout_batch
    assert (cfg.task.name, cfg.rollout.max_new_tokens) == (task, TASKS[task])
    assert [f.name for f in cfg.reward.functions] == ["math_accuracy", "format"]
    assert (cfg.train.max_steps, cfg.train.eval_every) == (500, 50)
    assert (cfg.train.prompts_per_step, cfg.backend.name) == (SCALES[scale], "deepspeed_zero2")
    # the algorithm is still its group's: a recipe does not restate it
    assert (cfg.algorithm.name, cfg.algorithm.loss_agg, cfg.algorithm.group_size) == ("grpo", "token_mean", 8)


# What an experiment adds to its three parts: the one setting that depends on model size and GPU count.
COMBINATIONS = {("7b", "1gpu"): ["backend.offload_optimizer=true"], ("7b", "8gpu"): ["backend=deepspeed_zero3"]}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", ["0.5b", "1.5b", "7b"])
def test_each_qwen_experiment_is_its_model_task_and_scale(size, task, scale):
    by_parts = compose([f"model=qwen2.5-{size}-instruct", f"task={task}", f"scale={scale}",
                        *COMBINATIONS.get((size, scale), [])])
    assert compose([f"experiment=qwen2.5-{size}_{task}_{scale}"]) == by_parts


def test_the_7b_experiments_shard_more():
    assert compose(["experiment=qwen2.5-7b_gsm8k_1gpu"]).backend.offload_optimizer
    assert compose(["experiment=qwen2.5-7b_gsm8k_8gpu"]).backend.name == "deepspeed_zero3"


def test_the_command_line_beats_what_a_task_or_recipe_chooses():
    # task=gsm8k picks reward=math, but reward=rm on the command line wins; a recipe leaves
    # the algorithm to its group (Dr. GRPO keeps its loss aggregation; the old copied recipes pinned token_mean)
    assert compose(["task=gsm8k", "reward=rm"]).reward.functions[0].name == "reward_model"
    cfg = compose(["experiment=qwen2.5-1.5b_gsm8k_8gpu", "algorithm=dr_grpo", "reward=rm"])
    assert cfg.algorithm.loss_agg == "seq_mean_token_sum_norm"
    assert cfg.reward.functions[0].name == "reward_model"


def test_the_cpu_benchmark_is_its_own_group():
    cfg = compose(["bench=cpu"])
    assert (cfg.threads, cfg.model.builtin, cfg.train.prompts_per_step, cfg.algorithm.group_size) == (2, "tiny", 8, 8)
    assert cfg.rollout.min_new_tokens == cfg.rollout.max_new_tokens == 32
    # its figures were measured padded: a run's default (auto) would time groups instead
    assert cfg.backend.packing == "padded"


# Each policy-loss recipe: its loss and the options it sets (the papers' defaults, as configs/algorithm/<name>.yaml).
POLICY_LOSS_RECIPES = {
    "cispo": ("token_mean", {"eps_low": 1.0, "eps_high": 4.0}),
    "gmpo": ("seq_mean_token_mean", {"eps_low": 0.4, "eps_high": 0.4}),
    "sapo": ("seq_mean_token_mean", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "clip_cov": ("token_mean", {"fraction": 2e-4, "cov_low": 1.0, "cov_high": 5.0}),
    "kl_cov": ("token_mean", {"fraction": 2e-3, "coef": 1.0}),
}


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", *POLICY_LOSS_RECIPES])
def test_every_algorithm_group_validates(algo):
    assert compose([f"algorithm={algo}"]).algorithm.name == algo


@pytest.mark.parametrize("name", POLICY_LOSS_RECIPES)
def test_every_policy_loss_recipe_composes_and_selects_its_loss(name):
    # Mutation caught: a recipe that does not select its loss (policy_loss left at ppo_clip), or options that
    # do not reach the loss (policy_loss_options handing it another group's or none).
    algo = compose([f"algorithm={name}"]).algorithm
    agg, options = POLICY_LOSS_RECIPES[name]
    assert (algo.name, algo.loop, algo.policy_loss, algo.loss_agg, algo.mini_batches) == (name, "grpo", name, agg, 4)
    assert asdict(getattr(algo, name)) == options == algo.policy_loss_options()
    # the schema's defaults are the recipe's: the paper's values also hold when the loss is picked on its own
    assert compose([f"algorithm.policy_loss={name}"]).algorithm.policy_loss_options() == options


def test_ppo_clip_is_the_default_and_takes_the_clip_fields():
    algo = compose([]).algorithm
    assert algo.policy_loss == "ppo_clip"
    assert algo.policy_loss_options() == {"clip_low": 0.2, "clip_high": 0.2, "ratio_level": "token", "dual_clip": None}


@pytest.mark.parametrize(
    "overrides, words",
    [
        # an unknown loss lists the registered ones
        (["algorithm.policy_loss=ppo"],
         ["algorithm.policy_loss", "'ppo'", "cispo, clip_cov, gmpo, kl_cov, ppo_clip, sapo"]),
        (["algorithm=cispo", "algorithm.cispo.eps_low=1.5"], ["algorithm.cispo.eps_low", "[0, 1]"]),
        (["algorithm=cispo", "algorithm.cispo.eps_high=-1"], ["algorithm.cispo.eps_high"]),
        (["algorithm=gmpo", "algorithm.gmpo.eps_low=-0.4"], ["algorithm.gmpo.eps_low"]),
        (["algorithm=gmpo", "algorithm.gmpo.eps_high=-0.4"], ["algorithm.gmpo.eps_high"]),
        (["algorithm=sapo", "algorithm.sapo.tau_pos=0"], ["algorithm.sapo.tau_pos", "> 0"]),
        (["algorithm=sapo", "algorithm.sapo.tau_neg=-1"], ["algorithm.sapo.tau_neg"]),
        (["algorithm=clip_cov", "algorithm.clip_cov.fraction=0"], ["algorithm.clip_cov.fraction", "(0, 1]"]),
        (["algorithm=clip_cov", "algorithm.clip_cov.cov_high=0.5"], ["algorithm.clip_cov.cov_high", "cov_low=1.0"]),
        (["algorithm=kl_cov", "algorithm.kl_cov.fraction=2"], ["algorithm.kl_cov.fraction"]),
        (["algorithm=kl_cov", "algorithm.kl_cov.coef=-1"], ["algorithm.kl_cov.coef"]),
        # a loss's options are checked even when another loss is chosen
        (["algorithm.sapo.tau_neg=0"], ["algorithm.sapo.tau_neg"]),
        # ppo_clip's own options under another loss, and a loss a loop cannot take
        (["algorithm=gmpo", "algorithm.ratio_level=sequence"], ["algorithm.ratio_level", "ppo_clip"]),
        (["algorithm=sapo", "algorithm.dual_clip=3"], ["algorithm.dual_clip", "ppo_clip"]),
        (["algorithm=ppo", "algorithm.policy_loss=gmpo"], ["algorithm.policy_loss", "per sequence"]),
        (["algorithm=dpo", "algorithm.policy_loss=cispo"], ["algorithm.policy_loss", "dpo loop"]),
    ],
)
def test_bad_policy_loss_options_name_the_field(overrides, words):
    # Mutation caught (each seen failing): a check removed, or a loss's group left out of POLICY_LOSS_GROUPS
    # (its options then never checked).
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    for word in words:
        assert word in str(err.value)


def test_other_losses_run_in_the_ppo_loop():
    assert compose(["algorithm=ppo", "algorithm.policy_loss=cispo"]).algorithm.policy_loss == "cispo"


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


def test_each_group_checks_its_own_fields_and_validate_the_ones_across_groups():
    from grpo.config import (
        AlgorithmConfig,
        BackendConfig,
        Config,
        ModelConfig,
        RewardConfig,
        RewardItem,
        TrainLoopConfig,
        WarmStartConfig,
        validate,
    )

    with pytest.raises(ConfigError, match=r"^algorithm\.dual_clip: must be > 1 \(or null\), got 0\.5$"):
        AlgorithmConfig(dual_clip=0.5).validate()
    with pytest.raises(ConfigError, match=r"^backend\.offload_params: needs backend=deepspeed_zero3, got torch$"):
        BackendConfig(offload_params=True).validate()
    with pytest.raises(ConfigError, match=r"^model\.warm_start\.target: must be in \[0, 1\], got 1\.5$"):
        ModelConfig(builtin="tiny", warm_start=WarmStartConfig(target=1.5)).validate()
    # 5 mini-batches are fine for the algorithm alone, not for a step of 32 prompts
    AlgorithmConfig(mini_batches=5).validate()
    cfg = Config(run_dir="r", model=ModelConfig(builtin="tiny"), algorithm=AlgorithmConfig(mini_batches=5),
                 reward=RewardConfig(functions=[RewardItem(name="math_accuracy")]),
                 train=TrainLoopConfig(prompts_per_step=32))
    with pytest.raises(ConfigError, match=r"^algorithm\.mini_batches: 5 does not divide train\.prompts_per_step=32$"):
        validate(cfg)
    cfg.train.prompts_per_step = 40
    assert validate(cfg) is cfg


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
    # A fresh `python -m grpo.train`: what a shell sees, every warning of the imports included.
    out = _cli(f"run_dir={tmp_path}/r", "algorithm.loss_agg=mean", cwd=tmp_path)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["error: algorithm.loss_agg: 'mean' is not one of token_mean, seq_mean_token_mean, "
                     "seq_mean_token_sum_norm"]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _cli_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """grpo-train's exit status and stderr, run in this process: the path above from its Hydra entry on,
    without a new interpreter importing torch and transformers again (about 20 s a launch on 2 cores)."""
    from grpo.cli import train_main

    monkeypatch.setattr(sys, "argv", ["grpo-train", *args])
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_main()
    finally:  # Hydra's job logging (a console handler on this test's captured stdout, a file in run_dir) goes
        for handler in set(root.handlers) - set(handlers):  # with it, not into the tests after it
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_missing_model_path(tmp_path, monkeypatch, capsys):
    code, err = _cli_in_process(monkeypatch, capsys, f"run_dir={tmp_path}/r", "model=hf",
                                f"model.path={tmp_path}/nowhere")
    assert code == 2
    assert f"model.path: {tmp_path}/nowhere does not exist" in err


def test_cli_missing_column_and_empty_dataset(tmp_path, tiny_random_dir, monkeypatch, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n")
    common = [f"run_dir={tmp_path}/r", "task=jsonl", f"task.train_file={data}", "model=hf",
              f"model.path={tiny_random_dir}"]
    code, err = _cli_in_process(monkeypatch, capsys, *common)
    assert code == 2 and "lacks column(s) answer" in err and str(data) in err
    data.write_text("")
    code, err = _cli_in_process(monkeypatch, capsys, *common)
    assert code == 2 and f"task: {data} has no rows" in err


@pytest.mark.parametrize("override, line", [
    ("reward.functions=[{name:math_acuracy}]",
     "error: reward.functions: unknown reward 'math_acuracy'. Known: code_tests, format, "),
    ("reward.functions=[{name:no_such_module:fn}]",
     "error: reward.functions: reward 'no_such_module:fn': cannot import module 'no_such_module'"),
    ("reward.functions=[{name:math_accuracy,kwargs:{tolerance:0.1}}]",
     "error: reward.functions: reward 'math_accuracy' takes no option ['tolerance']"),
    ("reward.accuracy=exact_match", "error: reward.accuracy: unknown reward 'exact_match'"),
    ("env.name=calculater", "error: env.name: unknown environment 'calculater'. Known: calculator, python, routed. "
                            "Your own environment can also be given as 'package.module:attr'."),
])
def test_cli_a_reward_or_environment_that_does_not_resolve_is_one_line_naming_the_field(
        tmp_path, monkeypatch, capsys, override, line):
    # Caught while the run is built, before the model loads: once a traceback ending in a bare ValueError
    code, err = _cli_in_process(monkeypatch, capsys, f"run_dir={tmp_path}/r", override)
    assert code == 2 and err.strip().splitlines()[-1].startswith(line), err[-2000:]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from grpo.data.loading import read_rows

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=f"{data}:2"):
        read_rows(str(data))


def test_import_grpo_pulls_in_none_of_the_packages_a_config_chooses():
    """peft (and bitsandbytes under it) was about half of `import grpo.cli` (~5 s of ~9 s), and datasets,
    reasoning_gym and wandb another 2-4 s, paid by every launch of a run and every rank: each loads when a run
    uses it (LoRA adapters, a hub dataset, a reasoning_gym task, wandb logging), not before."""
    lazy = ("vllm", "deepspeed", "peft", "datasets", "reasoning_gym", "wandb")
    code = ("import sys, grpo, grpo.algorithms.grpo, grpo.train, grpo.cli, grpo.rollout, grpo.backends, rewards; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {lazy}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("overrides", [
    [f"algorithm={a}", f"backend={b}"] for a in ("grpo", "ppo", "dpo", "online_dpo", "rft", "sft")
    for b in ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")])
def test_every_loop_runs_on_several_ranks_under_every_data_parallel_backend(overrides):
    from grpo.config import validate_world

    validate_world(compose([*overrides, "train.prompts_per_step=8"]), 2, 100)


def test_every_loop_the_config_accepts_is_one_the_command_line_runs():
    """`algorithm.loop` is validated in grpo.config, which cannot import the algorithms above it; grpo.cli holds
    the functions. A loop added to one and not the other fails here, not in a user's run."""
    from grpo.cli import LOOPS as RUNNABLE
    from grpo.config import LOOPS

    assert set(LOOPS) == set(RUNNABLE)


def test_the_format_figure_names_one_of_the_rewards():
    # reward=math has math_accuracy and format; reward=arithmetic has math_accuracy alone
    assert compose(["reward=math", "reward.format=format"]).reward.format == "format"
    with pytest.raises(ConfigError, match=r"^reward.format: 'format' is not one of reward.functions \(math_accuracy\)"):
        compose(["reward=arithmetic", "reward.format=format"])
