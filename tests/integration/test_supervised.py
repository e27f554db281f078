"""The supervised arms: RFT trains on exactly the samples that reach the reward bar, SFT on demonstrations;
both take the exact token-mean NLL step whatever the micro-batches, and SFT learns the task."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo.algorithms.supervised import nll_update
from grpo.core.batch import layout_batch
from tests.conftest import compose
from tests.integration.test_trainer import RecordingBackend, load

RUN = ["model.dtype=float32", "train.eval_every=0", "train.eval_before=false", "train.prompts_per_step=4",
       "algorithm.group_size=4", "rollout.max_new_tokens=6", "optim.warmup_steps=0", "tracking.progress_bar=false",
       "tracking.plot=false", "task.arithmetic.num_eval=8", "task.arithmetic.num_val=0", "task.arithmetic.num_ood=0"]


@pytest.mark.parametrize("packing", ["padded", "sequences", "groups"])
def test_the_nll_step_is_the_token_mean_whatever_the_micro_batches_and_layout(tiny_random_dir, monkeypatch, packing):
    model, tok = load(tiny_random_dir)
    layouts = spy_on_packing(monkeypatch)
    batch = layout_batch([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]], 1, tok.pad_token_id)
    # the reference: -mean over the 6 completion tokens of log p at temperature 1, in one forward
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    model.zero_grad(set_to_none=True)
    (-(logp * batch.completion_mask).sum() / 6).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    width = batch.input_ids.shape[1]
    for rows_per_micro in (1, 2):
        backend = RecordingBackend(model)
        cfg = compose([f"backend.micro_batch_tokens={rows_per_micro * width}", f"backend.packing={packing}"])
        metrics = nll_update(SimpleNamespace(cfg=cfg, backend=backend), batch)
        assert metrics["train/sft_tokens"] == 6
        for name, g in expected.items():
            torch.testing.assert_close(backend.grads[0][name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert layouts == ([] if packing == "padded" else [packing] * 3)  # 1 + 2 micro-batches, in that layout


def spy_on_packing(monkeypatch) -> list[str]:
    """The layouts `grpo.core.logprobs` packs forwards in, as they happen (the real `pack` still runs)."""
    from grpo.core import logprobs

    seen, real = [], logprobs.pack
    monkeypatch.setattr(logprobs, "pack", lambda ids, mask, start, packing, **kw: seen.append(packing) or
                        real(ids, mask, start, packing, **kw))
    return seen


def test_rft_trains_on_exactly_the_samples_that_reach_the_bar(tmp_path, tiny_random_dir, monkeypatch):
    import grpo.algorithms.supervised as supervised
    from grpo.training.run import build_run

    cfg = compose(["algorithm=rft", "model=hf", f"model.path={tiny_random_dir}", *RUN,
                   "reward.functions=[{name: 'tests.integration.test_options:parity_reward'}]"])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    seen = []
    real = supervised.nll_update
    monkeypatch.setattr(supervised, "nll_update", lambda run, batch, **kw: seen.append(batch) or real(run, batch, **kw))
    result = supervised.rft_step(run, 1)
    right = [i for i, r in enumerate(result.groups.rewards) if r == 1.0]  # even-length completions
    assert 0 < len(right) < 16 and result.metrics["train/sft_rows"] == len(right)
    completions = [ids[P:][m[P:].bool()].tolist() for ids, m, P in
                   zip(seen[0].input_ids, seen[0].attention_mask, [seen[0].prompt_width] * len(right))]
    assert completions == [result.groups.completion_ids[i] for i in right]
    run.tracker.close(plot=False)


def test_sft_on_the_gold_answers_learns_them(tmp_path, tiny_random_dir):
    from grpo.cli import train_from_config

    cfg = compose(["algorithm=sft", "model=hf", f"model.path={tiny_random_dir}", *RUN, "train.max_steps=40",
                   "optim.lr=3e-3"])
    cfg.run_dir = str(tmp_path / "run")
    history = [h for h in train_from_config(cfg) if h["step"] > 0]
    assert len(history) == 40 and all(h["train/sft_rows"] == 16 for h in history)
    first, last = (sum(h["train/loss"] for h in part) / 5 for part in (history[:5], history[-5:]))
    assert last < 0.5 * first, (first, last)  # the NLL of the demonstrations halves in 40 steps
