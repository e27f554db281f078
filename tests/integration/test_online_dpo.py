"""Online DPO: pairs from each group, the loss by hand, exact micro-batching, and real steps that learn."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from grpo.algorithms.online_dpo import best_and_worst
from grpo.algorithms.preference import dpo_update
from grpo.core.batch import layout_batch
from grpo.core.losses import dpo_loss
from grpo.training.update import score_logprobs
from tests.conftest import compose
from tests.integration.test_supervised import spy_on_packing
from tests.integration.test_trainer import RecordingBackend, load


def test_each_group_pairs_its_best_against_its_worst():
    rewards = [1.0, 0.0, None, 1.0,      # best 1.0 first at row 0, worst 0.0 at row 1
               0.5, 0.5, 0.5, 0.5,       # equal: no pair
               None, None, None, 1.0,    # one scored completion: no pair
               0.2, 0.9, 0.1, 0.9]       # best 0.9 first at row 13, worst 0.1 at row 14
    assert best_and_worst(rewards, 4) == [(0, 1), (13, 14)]


def test_dpo_loss_by_hand():
    # log-ratios to the reference: chosen +1, rejected -1; beta 0.5: margin 0.5 x (1 - (-1)) = 1,
    # loss -log sigmoid(1) = log(1 + e^-1) = 0.31326
    policy, ref = torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -5.0])
    loss, margin = dpo_loss(policy, ref, beta=0.5)
    assert margin.tolist() == [1.0]
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


@pytest.mark.parametrize("packing", ["padded", "groups"])
def test_the_update_is_the_mean_over_pairs_whatever_the_micro_batches_and_layout(tiny_random_dir, monkeypatch,
                                                                                 packing):
    model, tok = load(tiny_random_dir)
    layouts = spy_on_packing(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in (3, 5, 2)]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in (4, 2, 6, 1, 3, 5)]
    batch = layout_batch(prompts, completions, 2, tok.pad_token_id)
    batch.ref_logprobs = torch.randn(batch.completion_mask.shape, generator=g) * batch.completion_mask - 3.0
    width = batch.input_ids.shape[1]
    with torch.no_grad():  # the loss and the share of pairs ranked right, from the whole batch at once
        logp = score_logprobs(model, batch, temperature=1.0, micro_batch_tokens=100_000)  # [6, T-1]
    mask = batch.completion_mask
    loss, margin = dpo_loss((logp * mask).sum(1), (batch.ref_logprobs * mask).sum(1),
                            beta=compose(["algorithm=online_dpo"]).algorithm.dpo.beta)  # [3] each
    grads = []
    for pairs_per_micro, layout in ((3, "padded"), (1, packing)):
        cfg = compose(["algorithm=online_dpo", f"backend.micro_batch_tokens={pairs_per_micro * 2 * width}",
                       "rollout.temperature=1.0", f"backend.packing={layout}"])
        backend = RecordingBackend(model)
        run = SimpleNamespace(cfg=cfg, backend=backend)
        metrics = dpo_update(run, batch, total_pairs=3)
        grads.append(backend.grads[0])
        assert metrics["train/loss"] == pytest.approx(float(loss.mean()), abs=1e-5)
        assert metrics["train/dpo_pair_accuracy"] == pytest.approx(float((margin > 0).double().mean()), abs=1e-9)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=0, msg=name)
    assert layouts == ([] if packing == "padded" else [packing] * 3)  # the second update's 3 micro-batches


def distinct_reward(prompts, completions, **_):
    """Rewards that differ within every group (so every group gives a pair): 1 on even rows, plus a length term."""
    return [float(i % 2 == 0) + 0.01 * len(c) for i, c in enumerate(completions)]


def test_online_dpo_steps_start_at_log_2_and_move_the_margin(tmp_path, tiny_random_dir):
    from grpo.cli import train_from_config

    cfg = compose(["algorithm=online_dpo", "model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32",
                   "train.max_steps=3", "train.eval_every=0", "train.eval_before=false", "train.prompts_per_step=4",
                   "algorithm.group_size=4", "rollout.max_new_tokens=6", "optim.lr=1e-3", "optim.warmup_steps=0",
                   "tracking.progress_bar=false", "tracking.plot=false", "task.arithmetic.num_eval=8",
                   "reward.functions=[{name: 'tests.integration.test_online_dpo:distinct_reward'}]"])
    cfg.run_dir = str(tmp_path / "run")
    history = [h for h in train_from_config(cfg) if h["step"] > 0]
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["train/dpo_pairs"] == 4 for h in history)
    # step 1: the policy is the reference, so every margin is 0 and the loss is log 2
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["train/dpo_margin"] == 0
    assert history[-1]["train/dpo_margin"] != 0 and history[-1]["optim/grad_norm"] > 0


def preference_margins(model, prompt_ids, chosen_ids, rejected_ids, temperature: float) -> torch.Tensor:
    """[P] log pi(chosen | prompt) - log pi(rejected | prompt), summed over each completion's tokens."""
    rows = [ids for pair in zip(chosen_ids, rejected_ids) for ids in pair]
    batch = layout_batch(prompt_ids, rows, 2, 0)
    with torch.no_grad():
        logp = score_logprobs(model, batch, temperature=temperature, micro_batch_tokens=100_000)  # [2P, T-1]
    seq = (logp * batch.completion_mask).sum(1)  # [2P]
    return seq[0::2] - seq[1::2]


def test_an_online_dpo_step_raises_the_preferred_completions_margin(tmp_path, tiny_random_dir):
    from grpo.algorithms import online_dpo
    from grpo.training.run import build_run

    cfg = compose(["algorithm=online_dpo", "model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32",
                   "train.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=6", "optim.lr=1e-3",
                   "optim.warmup_steps=0", "tracking.progress_bar=false", "task.arithmetic.num_eval=8",
                   "reward.functions=[{name: 'tests.integration.test_online_dpo:distinct_reward'}]"])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    result = online_dpo.train_step(run, 1)
    run.tracker.close(plot=False)
    groups, G = result.groups, cfg.algorithm.group_size
    # the reward's own preference, worked out here and not read from the batch the update built: in each group
    # the completion with the highest reward against the one with the lowest
    best = [max(range(g, g + G), key=lambda i: groups.rewards[i]) for g in range(0, len(groups.rewards), G)]
    worst = [min(range(g, g + G), key=lambda i: groups.rewards[i]) for g in range(0, len(groups.rewards), G)]
    chosen, rejected = [groups.completion_ids[i] for i in best], [groups.completion_ids[i] for i in worst]
    before = preference_margins(run.ref_model, groups.prompt_ids, chosen, rejected, cfg.rollout.temperature)
    after = preference_margins(run.policy, groups.prompt_ids, chosen, rejected, cfg.rollout.temperature)
    # At step 1 the policy is the reference, every h is 0 and each pair's loss -log sigmoid(beta h) has slope
    # -beta/2 in h: the step's gradient is -beta/(2P) times that of the summed margins, so a descent step raises
    # them. With chosen and rejected swapped it lowers them by as much.
    assert result.metrics["train/dpo_pairs"] == 4
    assert float((after - before).mean()) > 1e-3, (after - before).tolist()


def equal_reward(prompts, completions, **_):
    """The same reward for every completion: the rewards alone give online DPO no pair."""
    return [1.0] * len(completions)


@pytest.mark.slow
def test_a_pairwise_judge_picks_online_dpos_pairs(tmp_path, tiny_random_dir):
    """`algorithm.dpo.pair_judge` over a real HTTP server answering in the chat-completions format: the rewards
    are all equal (no pair of their own), so every pair trained on is one the judge decided."""
    import re

    from grpo.cli import train_from_config
    from rewards import judge as judge_module
    from tests.unit.test_rewards_judge import ChatServer, user_text

    def longer_wins(body):  # A when answer A is the longer, else B: consistent in both orders
        a, b = re.search(r"Answer A: (.*)\n\nAnswer B: (.*)\n\nWhich", user_text(body), re.DOTALL).groups()
        return 200, "A" if (len(a), a) > (len(b), b) else "B"

    server = ChatServer(longer_wins)
    judge_module._clients.clear()
    try:
        cfg = compose(["algorithm=online_dpo", "model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32",
                       "train.max_steps=2", "train.eval_every=0", "train.eval_before=false",
                       "train.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=6",
                       "optim.warmup_steps=0", "tracking.progress_bar=false", "tracking.plot=false",
                       "task.arithmetic.num_eval=8",
                       "reward.functions=[{name: 'tests.integration.test_online_dpo:equal_reward'}]",
                       f"+algorithm.dpo.pair_judge={{base_url: '{server.url}', model: m}}"])
        cfg.run_dir = str(tmp_path / "run")
        history = [h for h in train_from_config(cfg) if h["step"] > 0]
    finally:
        server.close()
        judge_module._clients.clear()
    # a random tiny model's 4 completions of a prompt differ: each group has a candidate pair, decided both ways
    assert [h["train/dpo_pairs"] for h in history] == [4, 4]
    assert [h["train/dpo_pairs_undecided"] for h in history] == [0, 0]
    assert len(server.requests) == 2 * 4 * 2  # steps x groups x orders
