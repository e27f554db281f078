"""PPO-RLHF: GAE, the clipped value loss and the per-token rewards against values worked out by hand;
a short run on the warm-started tiny model that moves policy and critic."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.algorithms.ppo import gae, token_rewards, value_loss, whiten


def test_gae_by_hand():
    # gamma 1, lam 0.5. Row 0: rewards [0, 0, 1], values [0.5, 0.2, 0.4], every token masked in.
    #   t=2: delta = 1 + 0 - 0.4 = 0.6                     A = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2 = 0.2                   A = 0.2 + 0.5 * 0.6 = 0.5
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3                  A = -0.3 + 0.5 * 0.5 = -0.05
    #   returns = A + V = [0.45, 0.7, 1.0]
    # Row 1: a prompt column and a padding column (mask [0, 1, 1, 0]); their values (9) must not leak in.
    #   t=2: delta = 2 + 0 - 1.0 = 1.0 (the value past the end is 0)   A = 1.0
    #   t=1: delta = 0 + 1.0 - 0.5 = 0.5                               A = 0.5 + 0.5 * 1.0 = 1.0
    #   returns = [0, 1.5, 2.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 0.0], [9.0, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6, 0.0], [0.0, 1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0, 0.0], [0.0, 1.5, 2.0, 0.0]]), atol=1e-6, rtol=0)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    # gamma 0.5, lam 1, rewards [1, 1], values [0, 0]: return at t=0 is 1 + 0.5 * 1 = 1.5, at t=1 it is 1.
    adv, ret = gae(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.5, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv, ret, atol=1e-6, rtol=0)


def test_clipped_value_loss_by_hand():
    # clip 0.2. Token 0: V=1, V_old=0.5, R=2: V_clip = 0.5 + 0.2 = 0.7;
    #   max((1-2)^2, (0.7-2)^2) = max(1, 1.69) = 1.69 -> 0.845 (the clipped branch is the larger).
    # Token 1: V=0, V_old=0.5, R=0: V_clip = 0.3; max(0, 0.09) -> 0.045.
    # Token 2: V=2, V_old=2, R=1: max(1, 1) -> 0.5, but masked out -> 0.
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.5, 2.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    loss = value_loss(values, old, returns, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.845, 0.045, 0.0]]), atol=1e-6, rtol=0)


def test_value_loss_gradient_stops_past_the_clip():
    # V moved toward R (2) beyond V_old + clip: the clipped term (0.7-2)^2 dominates and is constant in V.
    values = torch.tensor([[1.0]], requires_grad=True)
    value_loss(values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2).sum().backward()
    assert values.grad.item() == 0.0


def test_token_rewards_by_hand():
    # beta 0.1, mask [0, 1, 1, 0]: KL terms logp - ref = [., 0.5, -1.0] -> rewards -0.05, +0.1;
    # the score 1.0 lands on the last masked column (2): [0, -0.05, 1.1, 0].
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    r = token_rewards(torch.tensor([1.0]), mask, logp, ref, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 1.1, 0.0]]), atol=1e-6, rtol=0)


def test_whiten_ignores_masked_entries():
    # masked-in values [1, 3]: mean 2, std (unbiased) sqrt(2) -> [-1/sqrt2, 1/sqrt2]; the 100 is masked out.
    x = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    s = 2**-0.5
    torch.testing.assert_close(x, torch.tensor([[-s, s, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ppo_run_updates_policy_and_critic(tmp_path, warm_tiny_dir):
    from grpo.cli import train_from_config
    from tests.conftest import compose

    cfg = compose(["algorithm=ppo", f"run_dir={tmp_path}", "train.max_steps=2", "train.prompts_per_step=8",
                   "task.arithmetic.num_eval=20", "task.arithmetic.num_ood=10", "tracking.progress_bar=false",
                   "tracking.plot=false", "optim.lr=1e-3", "threads=1"])
    history = train_from_config(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    # the critic's head starts at zero: step 1's values (taken before its update) are exactly 0,
    # step 2's are not, so the critic's update reached the critic that the next step uses
    assert lines[1]["train/value_mean"] == 0.0 and lines[2]["train/value_mean"] != 0.0
    assert lines[1]["train/value_loss"] > 0.0
    for key in ("eval/accuracy", "eval/ood_accuracy", "eval/generalization_gap", "train/value_loss", "train/kl"):
        assert key in history[-1], key
    state = torch.load(tmp_path / "checkpoints" / "step_2" / "state.pt", weights_only=True)
    assert "critic" in state and "critic_backend" in state


def test_critic_update_skips_a_non_finite_loss_and_keeps_the_weights(tiny_random_dir):
    """A NaN return makes the value loss NaN: the critic's step is skipped and counted, the weights and
    the optimiser's moments stay as they were, and the next finite batch updates the critic."""
    from grpo.algorithms.ppo import ValueModel, load_critic, update_critic
    from grpo.backends.torch_backend import TorchBackend
    from grpo.core.batch import layout_batch
    from tests.conftest import compose

    critic = load_critic(compose([]), str(tiny_random_dir))
    backend = TorchBackend(critic, module=ValueModel(critic), lr=1e-2)
    batch = layout_batch([[5, 6, 7], [5, 8]], [[9, 10], [11, 12, 13]], 1, pad_id=0)
    old_values = torch.zeros(batch.completion_mask.shape)  # [2, T-1]
    returns = torch.ones(batch.completion_mask.shape)
    returns[0, 3] = float("nan")  # a completion position of row 0
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    out = update_critic(backend, batch, old_values, returns, epochs=1, mini_batches=1, clip=0.2,
                        micro_batch_tokens=1024)
    assert out["optim/critic_skipped_steps"] == 1 and backend.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in critic.state_dict().items())
    assert not backend.optimizer.state  # no moments were taken from the discarded gradient
    out = update_critic(backend, batch, old_values, torch.ones_like(returns), epochs=1, mini_batches=1, clip=0.2,
                        micro_batch_tokens=1024)
    assert out["optim/critic_skipped_steps"] == 0 and out["train/value_loss"] > 0
    assert not torch.equal(before["score.weight"], critic.state_dict()["score.weight"])
