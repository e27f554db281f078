"""The RLHF baseline: PPO with a critic, GAE, and the KL to the reference inside the reward.

One step, as `PPO.step` below reads:
1. take B prompts; the rollout engine samples G completions of each (the same engine, reward scorer
   and batch layout as GRPO, so both algorithms see the same number of samples per step);
2. the reward functions score them: a learned reward model (`reward_model`) for RLHF, or any other reward;
3. per-token rewards: -beta * (log pi - log pi_ref) on every completion token, plus the score on the last one;
4. the critic estimates the value of every prefix; GAE turns rewards and values into per-token advantages
   and returns;
5. the policy takes the clipped surrogate step on those advantages (`grpo.training.update.update_policy`), and
   the critic a clipped value-loss step towards the returns;
6. the weights sync; evaluation, metrics, samples and checkpoints (the critic's state included) are the
   loop every algorithm shares (`grpo.training.loop`), with its guards and crash points.

The critic is a separate value model (the policy's architecture with a one-output token head,
initialised from the policy's weights; the head starts at zero), not a value head on the policy. So the
policy stays an ordinary causal LM (its rollout engine, weight sync, DeepSpeed sharding and checkpoint
format are GRPO's, untouched) and the value regression cannot pull the policy's features toward
predicting rewards. It costs one more forward and backward pass of a model the policy's size, run in
the layout `backend.packing` names, as the policy's (`critic_values`: the values come back in the padded
columns, so GAE and the value loss see one layout).

Data parallel: the critic runs on the policy's kind of backend (`critic_backend`). Under `ddp` its gradients
are summed over ranks like the policy's; under `deepspeed_zero1|2|3` it is a DeepSpeed engine of its own over
a `ValueModel` (the critic behind a forward that returns values), sharded like the policy, so every critic
forward goes through the engine (ZeRO-3 fetches its parameters there). Every rank runs as many critic
micro-batches as the others (zero-weighted stand-ins where it has fewer rows), since under ZeRO-3 each forward
and backward is collective. Checkpoints keep the critic's weights and optimiser in `state.pt` on the torch
backends, in the checkpoint's `critic_deepspeed/` shards under DeepSpeed (resumable on the same world size).

Where this departs from PPO-RLHF as published (Ouyang et al. 2022; Stiennon et al. 2020):
1. The critic starts from the policy's weights, not the reward model's (any reward function may score,
   and a verifiable reward has no network to start from).
2. With `group_size` G > 1 several completions per prompt are sampled, to spend the budget as GRPO does;
   PPO treats them as independent episodes.
3. No pretraining-loss mix (PPO-ptx) and no adaptive KL controller: `algorithm.beta` is fixed.
4. The KL in the reward is the k1 estimate log pi_old - log pi_ref of the sampled token.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from transformers import AutoModelForTokenClassification

from grpo import distributed as dist
from grpo.backends import build_backend
from grpo.core.advantages import compute_advantages
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.logprobs import packed_forward
from grpo.core.packing import micro_batches
from grpo.faults import crash_point
from grpo.model.loading import disable_dropout
from grpo.training.checkpoint import latest_checkpoint, load_rank_state, load_state, set_rng_state, sharded_dir
from grpo.training.loop import StepResult, no_signal_reason, replica_check, run_loop
from grpo.training.run import Run, check_packing
from grpo.training.sampling import gather_groups, reward_stats, rollout_metrics, sample_groups
from grpo.training.update import mini_batch_rows, same_count_on_every_rank, score_logprobs, update_policy

log = logging.getLogger(__name__)


def train(run: Run) -> list[dict]:
    """PPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    ppo = PPO(run)
    return run_loop(run, ppo.step, ppo.state_dict, extra_backends={"critic": ppo.critic_backend})


class PPO:
    """The PPO step, and the critic it keeps (saved with the run's checkpoints)."""

    def __init__(self, run: Run):
        self.critic, self.critic_backend = build_critic(run, run.cfg.model.path)
        if run.start_step:
            checkpoint = latest_checkpoint(run.cfg.run_dir)
            state = load_state(checkpoint)
            if hasattr(self.critic_backend, "load_sharded"):  # DeepSpeed: weights and optimiser from its shards
                self.critic_backend.load_sharded(sharded_dir(checkpoint, "critic"))
            else:
                self.critic.load_state_dict(state["critic"])
            self.critic_backend.load_state_dict(state["critic_backend"])
            # `restore` set the RNG streams before the critic was built, and building it draws from them (the
            # head's random init before it is zeroed): set them back, or the resumed run samples differently
            set_rng_state(load_rank_state(checkpoint, dist.rank())["rng"])

    def state_dict(self) -> dict:
        """The critic's share of a checkpoint's `state.pt`; under DeepSpeed its weights and optimiser are
        in the checkpoint's `critic_deepspeed/` shards instead (`run_loop`'s `extra_backends`)."""
        state = {"critic_backend": self.critic_backend.state_dict()}
        if not hasattr(self.critic_backend, "save_sharded"):
            state["critic"] = self.critic.state_dict()
        return state

    def step(self, run: Run, step: int) -> StepResult:
        """One PPO step on a fresh rollout batch (evaluation, logging and checkpoints are the loop's)."""
        cfg, G = run.cfg, run.cfg.algorithm.group_size
        # 1-2. sample completions and score them with the reward functions (the RM for RLHF); each rank its
        #      share of the prompts, gathered for the metrics
        groups, metrics = sample_groups(run, cfg.train.prompts_per_step)
        everyone, offset = gather_groups(groups)
        metrics |= reward_stats(everyone)
        skipped = no_signal_reason(run, offset >= 0, metrics["train/reward_masked_frac"], step)
        if skipped:
            return StepResult(metrics, everyone, skipped)
        _, valid, scores = compute_advantages(groups.rewards, G, "grpo")  # None rewards: masked out
        batch = layout_batch(groups.prompt_ids, groups.completion_ids, G, run.tokenizer.pad_token_id,
                             groups.sampler_logprobs)
        batch.completion_mask *= valid[:, None].float()
        # 3-5. per-token rewards, critic values, GAE, the policy's and the critic's steps
        metrics |= self.update(run, batch, scores.nan_to_num(0.0))
        crash_point("mid_step", step)
        # 6. the rollout engine samples from the new weights next step
        metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
        with self.critic_backend.gathered_for_rollout():  # ZeRO-3: the critic's full weights
            metrics |= replica_check(run, step, critic=self.critic)
        _, valid_all, _ = compute_advantages(everyone.rewards, G, "grpo")
        metrics |= rollout_metrics(everyone, valid_all)
        return StepResult(metrics, everyone)

    def update(self, run: Run, batch: RolloutBatch, scores: torch.Tensor) -> dict:
        """PPO's update of this rank's rows (scores [N], 0 where masked): returns, advantages whitened over
        every rank's tokens, one policy and one critic update, each normalised by the whole batch's counts."""
        cfg, algo = run.cfg, run.cfg.algorithm
        T, mbt = cfg.rollout.temperature, cfg.backend.micro_batch_tokens
        mask = batch.completion_mask  # [N, T-1]
        # 3. per-token rewards: the score at the end, the KL to the reference on every token
        score = functools.partial(score_logprobs, batch=batch, temperature=T, micro_batch_tokens=mbt,
                                  packing=cfg.backend.packing)
        batch.old_logprobs = score(run.backend.model)
        ref = score(run.ref_model) if algo.beta > 0 else None
        rewards = token_rewards(scores, mask, batch.old_logprobs, ref, algo.beta)  # [N, T-1]
        # 4. critic values and GAE
        values = self.values(batch, mbt, cfg.backend.packing)  # [N, T-1]
        advantages, returns = gae(rewards, values, mask, algo.ppo.gamma, algo.ppo.lam)  # [N, T-1] each
        batch.advantages = whiten(advantages, mask) if algo.ppo.whiten_advantages else advantages
        # 5. policy step on the clipped surrogate (the KL is in the reward, not the loss), critic step on
        #    the clipped value loss
        metrics = update_policy(run.backend, batch, dataclasses.replace(algo, beta=0.0), temperature=T,
                                micro_batch_tokens=mbt, max_new_tokens=cfg.rollout.max_new_tokens,
                                packing=cfg.backend.packing)
        metrics |= update_critic(self.critic_backend, batch, values, returns, epochs=algo.epochs,
                                 mini_batches=algo.mini_batches, clip=algo.ppo.value_clip, micro_batch_tokens=mbt,
                                 packing=cfg.backend.packing)
        sums = [mask.sum(), (values * mask).sum()]
        if ref is not None:
            sums.append(((batch.old_logprobs - ref) * mask).sum())
        sums = dist.all_reduce_sum(torch.stack(sums).double())  # over every rank's tokens
        tokens = max(float(sums[0]), 1.0)
        metrics["train/value_mean"] = float(sums[1]) / tokens
        if ref is not None:
            metrics["train/kl"] = float(sums[2]) / tokens
        return metrics

    @torch.no_grad()
    def values(self, batch, micro_batch_tokens: int, packing: str = "padded") -> torch.Tensor:
        """The critic's values [N, T-1] of the batch's prefixes, through its backend's module in the layout
        `packing` names (as many micro-batches on every rank: under ZeRO-3 each forward is collective)."""
        values = torch.zeros_like(batch.completion_mask)  # [N, T-1]
        for rows in critic_micro_batches(batch, list(range(len(batch))), micro_batch_tokens, packing):
            # an empty micro-batch runs row 0 and keeps nothing: it only keeps ZeRO-3's forwards in step
            out = self.critic_backend.model(batch.input_ids[rows or [0]], batch.attention_mask[rows or [0]],
                                            prompt_width=batch.prompt_width, packing=packing)
            if rows:
                values[rows] = out.cpu()  # [n, T-1]
        return values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the critic's regression target)

    `rewards`, `values`, `mask` are [N, T]; each row's masked tokens are one contiguous episode.
    Returns (advantages, returns), both [N, T] and 0 where the mask is 0.
    """
    mask = mask.float()
    values = values * mask  # [N, T]
    N, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # [N, T]
    next_adv = torch.zeros(N)  # [N]
    next_value = torch.zeros(N)  # [N]
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [N]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]  # [N]
        advantages[:, t] = adv
        # Past the episode's end (mask 0) the carried value and advantage reset to 0.
        next_adv, next_value = adv, values[:, t]
    return advantages, (advantages + values) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss per token [N, T] (PPO2 as in OpenAI baselines), to be minimised:

        V_clip = V_old + clip(V - V_old, -clip, clip)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

    The clip keeps one batch from moving the critic's estimates far from those the advantages were
    computed with. Masked positions get loss 0.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # [N, T]
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)  # [N, T]
    return torch.where(mask.bool(), loss, 0.0)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                  beta: float) -> torch.Tensor:
    """Per-token rewards [N, T]: -beta * (logp - ref_logp) on every masked token, plus the sequence's
    score [N] on its last masked token."""
    rewards = torch.zeros_like(logp)  # [N, T]
    if beta > 0 and ref_logp is not None:
        rewards = -beta * (logp - ref_logp) * mask  # [N, T]
    last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)  # [N] column of each row's last token
    has_tokens = mask.sum(1) > 0  # [N]
    rewards[torch.arange(len(scores)), last] += scores * has_tokens  # [N]
    return rewards


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (unbiased) std over the masked entries of every rank; masked-out entries stay 0."""
    m = mask.bool()
    count, total, squares = dist.all_reduce_sum(torch.stack([m.sum(), x[m].sum(), (x[m] ** 2).sum()]).double())
    mean = total / count.clamp(min=1)
    var = (squares - count * mean**2) / (count - 1) if count > 1 else torch.tensor(1.0, dtype=torch.float64)
    return torch.where(m, (x - mean.float()) / (var.clamp(min=0).sqrt().float() + eps), 0.0)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, T] left padding: the first real token is at 0


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prompt_width: int | None = None,
                  packing: str = "padded") -> torch.Tensor:
    """V [n, T-1]: column t is the value of the prefix ending at token t, before token t+1 is emitted
    (the column layout of the trainer's log-probs).

    With `packing` `sequences` or `groups` (`backend.packing`; completions start at column `prompt_width`)
    the critic runs on that padding-free layout, as the policy's log-prob forward does
    (`grpo.core.logprobs.packed_forward`), and only the columns that score a completion token get a value;
    the others are 0 (the padded forward's values there, over the prompt and padding, are masked out of GAE
    and the value loss anyway)."""
    if packing == "padded":
        out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask))
        return out.logits[:, :-1, 0].float()  # [n, T-1]
    if prompt_width is None:
        raise ValueError(f"critic_values: packing={packing!r} needs prompt_width (where the completions start)")
    out, packed = packed_forward(critic, critic, input_ids, attention_mask, prompt_width, packing, critic.dtype)
    values = out.logits.reshape(-1)[packed.source].float()  # [M]: logits [R, W, 1], one value per position
    return packed.to_padded(values, input_ids.shape[0], input_ids.shape[1] - 1)  # [n, T-1]


class ValueModel(torch.nn.Module):
    """The critic behind a forward that returns its values [n, T-1] (`critic_values`): the module its
    backend runs. Under DeepSpeed the engine wraps it, so every critic forward goes through the engine
    and ZeRO-3's parameter hooks see it start (as `grpo.backends.LogProbModel` does for the policy)."""

    def __init__(self, critic: torch.nn.Module, device: torch.device | None = None):
        super().__init__()
        self.critic = critic
        self.device = device  # where the critic runs; inputs go there, values come back

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prompt_width: int | None = None,
                packing: str = "padded") -> torch.Tensor:
        home = input_ids.device
        device = self.device or home
        return critic_values(self.critic, input_ids.to(device), attention_mask.to(device), prompt_width=prompt_width,
                             packing=packing).to(home)  # [n, T-1]


def build_critic(run: Run, path: str):
    """The value model and its backend (`critic_backend`): the policy's weights under a one-output token
    head that starts at zero."""
    critic = load_critic(run.cfg, path)
    check_packing(run.cfg, critic)  # its attention against backend.packing, as the policy's
    return critic, critic_backend(run.cfg, critic)


def load_critic(cfg, path: str) -> torch.nn.Module:
    """The bare value model: `path`'s weights under a zero-initialised one-output token head, no dropout."""
    critic = AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, cfg.model.dtype))
    disable_dropout(critic)  # the classifier head's dropout would noise GAE, the returns and the value clip
    torch.nn.init.zeros_(critic.score.weight)
    if getattr(critic.score, "bias", None) is not None:
        torch.nn.init.zeros_(critic.score.bias)
    return critic


def critic_backend(cfg, critic: torch.nn.Module):
    """The critic's optimiser on the policy's kind of backend: one process (`torch`), `ddp`, or its own
    DeepSpeed engine over a `ValueModel` (sharded like the policy: same ZeRO stage, offload and overrides)."""
    name = cfg.backend.name
    b = cfg.backend
    return build_backend(
        name, policy=critic, module=ValueModel(critic, None if name == "torch" else dist.device()),
        lr=cfg.algorithm.ppo.value_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
        total_steps=cfg.train.max_steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches,
        max_grad_norm=cfg.optim.max_grad_norm, offload_optimizer=b.offload_optimizer,
        offload_params=b.offload_params, deepspeed_overrides=dict(b.deepspeed),
    )


def update_critic(backend, batch, old_values: torch.Tensor, returns: torch.Tensor, *, epochs: int, mini_batches: int,
                  clip: float, micro_batch_tokens: int, packing: str = "padded") -> dict:
    """`epochs` passes of `mini_batches` optimiser steps on the clipped value loss: the token mean over the
    mini-batch's tokens on every rank, so the gradients summed over ranks are the whole batch's. The critic
    runs through `backend.model` (its `ValueModel`, inside the DeepSpeed engine there), as many
    micro-batches on every rank (a rank short of rows runs zero-weighted stand-ins: ZeRO-3's forwards and
    backwards are collective). `packing`: the layout of its forward (`backend.packing`)."""
    total, updates, skipped = 0.0, 0, 0
    for _ in range(epochs):
        for rows in mini_batch_rows(len(batch), mini_batches):
            local = batch.completion_mask[rows].sum() if rows else torch.tensor(0.0)
            num_tokens = float(dist.all_reduce_sum(local.reshape(1).double())[0])
            if num_tokens == 0:
                continue  # nothing to fit in this mini-batch on any rank: no step anywhere
            finite = True
            for micro in critic_micro_batches(batch, rows, micro_batch_tokens, packing):
                idx = [rows[i] for i in micro] or [0]  # [0]: a stand-in row, weighted 0
                weight = 1.0 if micro else 0.0
                values = backend.model(batch.input_ids[idx], batch.attention_mask[idx],
                                       prompt_width=batch.prompt_width, packing=packing)  # [n, T-1]
                mask = batch.completion_mask[idx] * weight  # [n, T-1]
                per_token = value_loss(values, old_values[idx], returns[idx], mask, clip)  # [n, T-1]
                loss = per_token.sum() / num_tokens * weight
                if not torch.isfinite(loss):  # as the policy's update: a NaN/inf never reaches the weights
                    finite = False
                    if dist.world_size() == 1:
                        continue
                backend.backward(loss)  # with several ranks, take part in ZeRO's collectives, then skip
                total += float(loss.detach()) if finite else 0.0
            finite = not dist.all_reduce_max(float(not finite))  # every rank skips, or none
            skipped += int(bool(backend.step(skip=not finite)["skipped"]))
            updates += 1
    total = float(dist.all_reduce_sum(torch.tensor([total]))[0])
    return {"train/value_loss": total / max(updates, 1), "optim/critic_skipped_steps": skipped}


def critic_micro_batches(batch: RolloutBatch, rows: list[int], micro_batch_tokens: int, packing: str
                        ) -> list[list[int]]:
    """Micro-batches of `rows` (positions in `rows`) within the token budget, costed in the layout `packing`
    forwards (as the policy's), as many on every rank (`same_count_on_every_rank`)."""
    return same_count_on_every_rank(micro_batches(batch.select(rows) if rows else None, micro_batch_tokens, packing))
