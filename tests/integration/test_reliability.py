"""Guards and bad input: non-finite updates, failing or slow rewards, bad rows, broken checkpoints,
a full disk, and loading that never runs code it was not told to trust."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.config import AlgorithmConfig, TaskConfig
from grpo.core.batch import layout_batch
from grpo.errors import CheckpointError, ConfigError
from grpo.training.checkpoint import latest_checkpoint, load_rank_state, load_state, save_checkpoint, verify_checkpoint
from grpo.training.update import update_policy
from rewards import RewardScorer, RewardSpec
from tests.conftest import compose, requires


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _batch(tok):
    batch = layout_batch([[10, 11, 12], [13, 14]], [[20, 21, 1], [30, 31, 1], [22, 1], [23, 24, 25]],
                         group_size=2, pad_id=tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return batch


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- non-finite loss or gradient: the step is skipped and counted, the weights stay as they were ----

@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_update_is_skipped_and_counted(tiny_random_dir, poison):
    from grpo.backends.torch_backend import TorchBackend

    model, tok = load(tiny_random_dir)
    backend = TorchBackend(model, lr=1e-2)
    batch = _batch(tok)
    if poison == "loss":
        batch.advantages = torch.tensor([float("inf"), -1.0, 0.5, -0.5])  # inf * ratio: the loss is inf or nan
    else:  # a finite loss whose gradient comes out NaN in one tensor
        model.model.norm.weight.register_hook(lambda g: g * float("nan"))
    before = _snapshot(model)
    out = update_policy(backend, batch, AlgorithmConfig(group_size=2), temperature=1.0, micro_batch_tokens=1000,
                        max_new_tokens=8)
    assert out["optim/skipped_steps"] == 1 and out["optim/skipped_total"] == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert backend.optimizer.state == {}  # no moment saw the bad gradient
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step

    # the next, healthy step trains as usual and the count is kept
    out = update_policy(backend, _batch(tok), AlgorithmConfig(group_size=2), temperature=1.0,
                        micro_batch_tokens=1000, max_new_tokens=8) if poison == "loss" else None
    if out is not None:
        assert out["optim/skipped_steps"] == 0 and out["optim/skipped_total"] == 1
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path, tiny_random_dir):
    model, tok = load(tiny_random_dir)
    save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"step 2: parameter \S+weight is not finite; refusing"):
        save_checkpoint(tmp_path, 2, policy=model, tokenizer=tok, state={})
    assert latest_checkpoint(tmp_path).name == "step_1"
    assert not (tmp_path / "checkpoints" / "step_2").exists()


# ---- rewards that raise or run past their deadline are masked and counted ----

def test_reward_that_raises_or_misses_its_deadline_is_masked_and_counted():
    release = threading.Event()

    def slow(prompts, completions, **_):
        release.wait(30)
        return [1.0] * len(completions)

    def broken(prompts, completions, **_):
        raise ZeroDivisionError("bug in the reward")

    def fine(prompts, completions, **_):
        return [0.5] * len(completions)

    from rewards import register_reward

    for name, fn in (("test_slow", slow), ("test_broken", broken), ("test_fine", fine)):
        register_reward(name)(fn)
    try:
        scorer = RewardScorer([RewardSpec("test_slow", timeout_s=0.2), RewardSpec("test_broken"),
                               RewardSpec("test_fine")])
        out = scorer(["p"] * 3, ["a", "b", "c"])
        assert out.per_reward["test_slow"] == [None] * 3 and out.errors["test_slow"] == [True] * 3
        assert out.per_reward["test_broken"] == [None] * 3 and out.errors["test_broken"] == [True] * 3
        assert out.total == [0.5] * 3  # the step completes on the reward that worked
        metrics = out.metrics()
        assert metrics["reward/test_slow_deadline_misses"] == 1.0
        assert metrics["reward/test_slow_error_frac"] == metrics["reward/test_broken_error_frac"] == 1.0
    finally:
        release.set()
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        RewardScorer([RewardSpec("test_fine", timeout_s=0)])


def always_raises(prompts, completions, **_):
    """A reward that is broken for every sample (used by name from the config below)."""
    raise RuntimeError("reward service unreachable")


@pytest.mark.parametrize("dynamic_sampling", ["false", "true"])
def test_too_many_masked_steps_in_a_row_stop_the_run(tmp_path, tiny_random_dir, dynamic_sampling):
    from grpo.cli import train_from_config
    from grpo.errors import MaskedRewardsError

    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32", "threads=1",
                   "tracking.progress_bar=false", "tracking.plot=false", "train.max_steps=10",
                   "train.prompts_per_step=2", "algorithm.group_size=2", "train.eval_before=false",
                   "task.arithmetic.num_eval=2", "train.max_masked_steps=3",
                   f"algorithm.dynamic_sampling={dynamic_sampling}",  # masked groups look equal: still counted
                   "algorithm.dynamic_sampling_on=total",  # reward.accuracy is not among the functions
                   "reward.functions=[{name: 'tests.integration.test_reliability:always_raises'}]",
                   # a reward that raises is also an infrastructure failure: off here, to reach the masked steps
                   "reward.max_infra_error_frac=1.0", "reward.accuracy=math_accuracy"])
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(MaskedRewardsError, match=r"step 3: every reward was masked .* 3 steps in a row"):
        train_from_config(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "eval/accuracy" not in lines[0]  # the data report, no evaluation
    steps = lines[1:]
    assert [s["step"] for s in steps] == [1, 2]  # steps 1-2 logged (masked, no update), the run stopped at 3
    assert all(s["train/reward_error_frac"] == s["train/reward_masked_frac"] == 1.0 for s in steps)


# ---- bad dataset rows ----

def _task(tmp_path, rows, **kw):
    path = tmp_path / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return TaskConfig(builtin=None, train_file=str(path), **kw), path


def test_malformed_row_names_file_and_line(tmp_path):
    from grpo.data.loading import load_task

    task, path = _task(tmp_path, [{"prompt": "1+1=", "answer": "2"}, '{"prompt": "2+2=", "answer": '])
    with pytest.raises(ConfigError, match=rf"{path}:2: not valid JSON"):
        load_task(task, {"answer"})


def test_wrong_column_type_names_row_and_column(tmp_path):
    from grpo.data.loading import load_task

    task, path = _task(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": ["4"]}])
    with pytest.raises(ConfigError, match=rf"{path}: row 1, column 'answer': list \['4'\], but row 0 holds a str"):
        load_task(task, {"answer"})
    task, path = _task(tmp_path, [{"prompt": 12, "answer": "2"}])
    with pytest.raises(ConfigError, match=rf"{path}: row 0, column 'prompt': expected text"):
        load_task(task, {"answer"})
    task, path = _task(tmp_path, [{"prompt": "1+1=", "answer": "2"}], prompt_template="{question}")
    with pytest.raises(ConfigError, match=r"row 0: task.prompt_template '\{question\}' cannot be filled"):
        load_task(task, {"answer"})


def test_prompt_longer_than_the_context_names_the_row(tiny_random_dir):
    from grpo.data.loading import check_prompt_lengths

    _, tok = load(tiny_random_dir)
    rows = [{"prompt": "1+1="}, {"prompt": "1" * 60}]
    # 60 characters of a character-level tokenizer = 60 tokens; 60 + 8 new tokens > 64
    with pytest.raises(ConfigError, match=r"data.jsonl: row 1: the prompt is 60 tokens; with rollout.max_new_tokens=8 "
                                          r"it exceeds the model's context of 64 tokens"):
        check_prompt_lengths(rows, [], tok, context=64, max_new_tokens=8, where="data.jsonl")
    check_prompt_lengths(rows, [], tok, context=68, max_new_tokens=8, where="data.jsonl")  # 60 + 8 fits exactly


# ---- broken checkpoints and a full disk ----

def test_truncated_checkpoint_file_is_named(tmp_path, tiny_random_dir):
    model, tok = load(tiny_random_dir)
    path = save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    verify_checkpoint(path)
    weights = path / "policy" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError,
                       match=rf"policy/model.safetensors is {size // 2} bytes, the manifest says {size}"):
        verify_checkpoint(path)
    (path / "rank_0.pt").unlink()
    with pytest.raises(CheckpointError, match="no rank_0.pt"):
        load_rank_state(path, 0)


def test_resume_from_a_truncated_checkpoint_is_a_one_line_error(tmp_path, tiny_random_dir):
    import subprocess
    import sys
    from pathlib import Path

    model, tok = load(tiny_random_dir)
    path = save_checkpoint(tmp_path / "run", 2, policy=model, tokenizer=tok, state={})
    (path / "state.pt").write_bytes(b"\x00" * 10)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", f"run_dir={tmp_path / 'run'}", "model=hf", f"model.path={tiny_random_dir}",
         "resume=auto", "threads=1"], capture_output=True, text=True, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: checkpoint {path}: state.pt is 10 bytes, the manifest says" in proc.stderr


def test_full_disk_during_a_checkpoint_loses_nothing(tmp_path, tiny_random_dir, monkeypatch):
    import grpo.training.checkpoint as ckpt

    model, tok = load(tiny_random_dir)
    save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={"x": torch.tensor([1])}, keep_last=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    full = (r"checkpoint step 2: writing .*\.tmp_step_2/rank_0\.pt failed \(the disk is full: \d+ bytes free on "
            r"the disk of .*\); the last complete checkpoint .*step_1 is intact")
    with pytest.raises(CheckpointError, match=full):
        save_checkpoint(tmp_path, 2, policy=model, tokenizer=tok, state={"x": torch.tensor([2])}, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]  # no half-written step_2 left behind
    assert latest_checkpoint(tmp_path).name == "step_1"
    verify_checkpoint(root / "step_1")
    assert load_state(root / "step_1")["x"].item() == 1


def private_tmpfs_works() -> bool:
    """Can this user mount a tmpfs in a mount namespace of its own (unprivileged: in a user namespace)?"""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'], capture_output=True)
    return probe.returncode == 0


@requires(shutil.which("unshare") is not None and private_tmpfs_works(), "no unshare, or no unprivileged mounts")
@pytest.mark.slow
def test_a_run_on_a_full_disk_fails_at_its_first_checkpoint_naming_it_and_leaves_no_partial_checkpoint(
        tmp_path, tiny_random_dir):
    # A 1 MiB tmpfs (the tiny model's checkpoint is about 4 MiB), private to this process: the run's config and
    # metrics fit, its first checkpoint does not. torch.save and safetensors report this as RuntimeError or
    # SafetensorError, not OSError. The tmpfs lives only in the namespace, so what is left is listed there.
    disk = tmp_path / "disk"
    disk.mkdir()
    train = [sys.executable, "-m", "grpo.train", f"run_dir={disk / 'run'}", "model=hf", f"model.path={tiny_random_dir}",
             "threads=1", "tracking.progress_bar=false", "train.eval_before=false", "train.eval_every=0",
             "train.max_steps=3", "checkpoint.every_steps=1", "train.prompts_per_step=2", "algorithm.group_size=2",
             "rollout.max_new_tokens=4", "task.arithmetic.num_eval=2", "task.arithmetic.num_ood=0"]
    script = ('mount -t tmpfs -o size=1m tmpfs "$1" && shift && "$@"; echo "exit status $?"; '
              'ls -A "$RUN/checkpoints" "$RUN"')
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(disk),
                           *train], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root), "RUN": str(disk / "run")})
    assert "exit status 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert re.search(rf"error: checkpoint step 1: writing {disk}/run/checkpoints/\.tmp_step_1/policy\S* failed "
                     r"\(\w+Error: .*\); no earlier checkpoint exists", proc.stderr), proc.stderr[-3000:]
    listing = proc.stdout.split("exit status 2\n", 1)[1].split()
    assert not any(name.startswith(".tmp_step") or name.startswith("step_") for name in listing), listing
    assert "metrics.jsonl" in listing and "config.yaml" in listing  # the run itself was written there


def test_killed_metrics_write_leaves_no_half_line(tmp_path):
    from grpo.training.tracking import read_metrics, truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    truncate_after(path, 2)
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]


# ---- safe loading ----

class _Payload:
    def __reduce__(self):
        import os

        return (os.mkdir, ("/tmp/grpo_pickle_payload_ran",))


def test_checkpoint_state_is_unpickled_without_running_code(tmp_path, tiny_random_dir):
    import os

    model, tok = load(tiny_random_dir)
    path = save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    torch.save({"step": 1, "evil": _Payload()}, path / "state.pt")
    shutil.rmtree("/tmp/grpo_pickle_payload_ran", ignore_errors=True)
    with pytest.raises(CheckpointError, match="state.pt is unreadable"):
        load_state(path)
    assert not os.path.exists("/tmp/grpo_pickle_payload_ran")


def test_checkpoints_hold_safetensors_and_pickled_weights_are_refused(tmp_path, tiny_random_dir):
    from grpo.model.loading import load_policy

    model, tok = load(tiny_random_dir)
    path = save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    assert {p.suffix for p in (path / "policy").iterdir()} <= {".json", ".safetensors"}
    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32"])
    load_policy(str(path / "policy"), cfg, checkpoint=True)
    (path / "policy" / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "policy" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path / 'policy'} is unreadable"):
        load_policy(str(path / "policy"), cfg, checkpoint=True)


def _model_with_code(tmp_path, tiny_random_dir, model_type):
    d = tmp_path / f"remote_{model_type}"
    shutil.copytree(tiny_random_dir, d)
    marker = tmp_path / f"code_ran_{model_type}"
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_modeling.CustomModel",
                          "AutoConfig": "custom_modeling.CustomConfig"}
    config["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(config))
    (d / "custom_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        f"class CustomConfig(Qwen2Config):\n    model_type = {model_type!r}\n"
        "class CustomModel(Qwen2ForCausalLM):\n    config_class = CustomConfig\n"
    )
    return d, marker


def test_model_code_runs_only_when_trusted(tmp_path, tiny_random_dir):
    from grpo.model.loading import load_policy

    # an architecture transformers does not know: refused with the switch named, its code never runs
    d, marker = _model_with_code(tmp_path, tiny_random_dir, "custom_qwen")
    cfg = compose(["model=hf", f"model.path={d}", "model.dtype=float32"])
    assert cfg.model.trust_remote_code is False  # the default
    with pytest.raises(ConfigError, match="ships its own code; set model.trust_remote_code=true"):
        load_policy(str(d), cfg)
    assert not marker.exists()
    cfg.model.trust_remote_code = True
    model, _ = load_policy(str(d), cfg)
    assert type(model).__name__ == "CustomModel" and marker.exists()


def test_renamed_prompt_column_fills_the_default_template(tmp_path):
    from grpo.data.loading import load_task

    task, _ = _task(tmp_path, [{"question": "1+1=", "answer": "2"}], prompt_column="question")
    rows, _ = load_task(task, {"answer"})
    assert rows[0]["prompt"] == "1+1="  # the default '{prompt}' is the renamed column's text
    task, _ = _task(tmp_path, [{"question": "1+1=", "answer": "2"}], prompt_column="question",
                    prompt_template="Q: {question} A ({prompt})")
    assert load_task(task, {"answer"})[0][0]["prompt"] == "Q: 1+1= A (1+1=)"


def test_prompt_template_with_braces_on_the_command_line_as_the_readme_writes_it(tmp_path):
    """Hydra's grammar refuses `task.prompt_template='{question}'` unquoted as a whole; the README's form
    (the whole override in double quotes, the value in single quotes) parses."""
    from hydra.errors import OverrideParseException

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    readme_form = "task.prompt_template='Question: {question} Answer:'"  # what the shell passes on
    cfg = compose(["task=jsonl", f"task.train_file={path}", "task.prompt_column=question", readme_form])
    assert cfg.task.prompt_template == "Question: {question} Answer:"
    with pytest.raises(OverrideParseException):
        compose(["task=jsonl", f"task.train_file={path}", "task.prompt_template={question}"])
