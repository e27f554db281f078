"""Generalised knowledge distillation (GKD): the generalised JSD to a teacher over the whole vocabulary, on a mixture
of the student's own samples and the task's reference answers.

One step, as `train_step` below reads:
1. take B prompts (this rank's share); the first round(lmbda x share) are answered by the student, G samples each
   (`algorithm.gkd.lmbda`, the on-policy share); the others by their reference answer (`algorithm.gkd.column`,
   then EOS), teacher-forced;
2. per micro-batch, the teacher's hidden states at every scored position (no gradient), then the generalised JSD
   between the student's and the teacher's next-token distributions at each position
   (`grpo.core.losses.generalized_jsd`, `algorithm.gkd.beta`: 0 forward KL(teacher || student), 1 reverse
   KL(student || teacher), TRL's GKDTrainer convention), both models' logits chunked over positions
   (`grpo.core.logprobs.sequence_jsd`, `algorithm.teacher.chunk_size`); micro-batches are planned and forwarded
   in the layout `backend.packing` names (`grpo.core.packing`: padded, sequences or groups, the same divergence);
   the teacher takes that layout too where its attention can, else padded;
3. one optimiser step on the token mean over every rank's tokens (exact over micro-batches and ranks), through the
   run's backend (DDP, ZeRO, LoRA);
4. the new weights go to the rollout engine. Evaluation, logging and checkpoints are the shared loop's.

Where this departs from GKD (Agarwal et al. 2024) and TRL's GKDTrainer:
1. The mixture is a fixed share of each step's prompts (round(lmbda x prompts per rank)) rather than a coin flip
   per batch (TRL: `random.random() <= lmbda`), so every step sees both kinds when 0 < lmbda < 1 and the
   expected share is the same.
2. The off-policy data are the task's reference answers (the paper's "fixed dataset" of outputs); no sequence-level
   KD from teacher samples (TRL's `seq_kd`).
3. Both distributions are tempered by `rollout.temperature`, the student's sampling temperature.
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.logprobs import attention_of, forward_jsd, scored_hidden
from grpo.core.packing import layout_refusal, micro_batches
from grpo.training.loop import StepResult, run_loop, sync_and_finish
from grpo.training.pipeline import InlineRollout
from grpo.training.run import Run
from grpo.training.sampling import Groups, ScoringTally, draw_rows, gather_groups, score_rows
from grpo.training.update import same_count_on_every_rank


def train(run: Run) -> list[dict]:
    """GKD steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    return run_loop(run, train_step)


def train_step(run: Run, step: int) -> StepResult:
    """One GKD step on this rank's share of B prompts: on-policy samples for the first share, reference answers
    for the rest."""
    cfg, gkd = run.cfg, run.cfg.algorithm.gkd
    rows = draw_rows(run.train_rows, run.sampler, cfg.train.prompts_per_step)  # this rank's share
    k = on_policy_count(len(rows), gkd.lmbda)  # the same on every rank: generation may be collective
    # 1. the student's samples of the first k prompts, the reference answers of the others
    groups, metrics = sample_on_policy(run, rows[:k])
    everyone, _ = gather_groups(groups)
    prompt_ids, completion_ids = mixture_rows(run, groups, rows[k:])
    batch = layout_batch(prompt_ids, completion_ids, 1, run.tokenizer.pad_token_id)
    # 2-3. the generalised JSD to the teacher at every completion position, one optimiser step
    metrics |= jsd_update(run, batch)
    metrics["gkd/on_policy_rows"] = int(dist.all_reduce_sum(torch.tensor([len(groups.completion_ids)]))[0])
    metrics["gkd/reference_rows"] = int(dist.all_reduce_sum(torch.tensor([len(rows) - k]))[0])
    # 4. the rollout engine samples from the new weights next step
    valid = torch.tensor([r is not None for r in everyone.rewards])  # [N_all]
    return sync_and_finish(run, step, InlineRollout(run), metrics, everyone, valid)


def on_policy_count(prompts: int, lmbda: float) -> int:
    """How many of a rank's `prompts` the student answers itself: round(lmbda x prompts), half to even.
    E.g. 8 prompts: lmbda 0 -> 0, 0.5 -> 4, 0.3 -> 2 (2.4), 1 -> 8."""
    return round(lmbda * prompts)


def sample_on_policy(run: Run, rows: list[dict]) -> tuple[Groups, dict]:
    """G scored samples of each of `rows` from the student (no rows: an empty Groups, nothing generated)."""
    if not rows:
        return Groups([], [], [], [], [], None, {}, []), {"time/generate_s": 0.0}
    tally = ScoringTally()
    groups, seconds = score_rows(run, rows, tally)
    return groups, {"time/generate_s": seconds, **tally.metrics()}


def mixture_rows(run: Run, groups: Groups, reference_rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """One prompt and one completion per training row: the student's samples (`groups`, G per prompt), then each
    of `reference_rows` with its reference answer (`algorithm.gkd.column`) and EOS."""
    tok, G, column = run.tokenizer, run.cfg.algorithm.group_size, run.cfg.algorithm.gkd.column
    missing = [r for r in reference_rows if not isinstance(r.get(column), str)]
    if missing:
        raise ValueError(f"algorithm.gkd.column: a training row has no text column {column!r} "
                         f"(its prompt: {missing[0].get('prompt')!r})")
    prompt_ids = [groups.prompt_ids[i // G] for i in range(len(groups.completion_ids))]
    completion_ids = list(groups.completion_ids)
    for r in reference_rows:
        prompt_ids.append(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        completion_ids.append(tok(r[column], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return prompt_ids, completion_ids


def jsd_update(run: Run, batch: RolloutBatch) -> dict:
    """One optimiser step on the token mean of the generalised JSD over every rank's completion tokens: each
    micro-batch's sum is divided by all ranks' tokens, so the gradient summed over ranks is the whole batch's.
    Micro-batches are planned, and the student forwarded, in the layout `backend.packing` names."""
    cfg, packing = run.cfg, run.cfg.backend.packing
    tokens = float(dist.all_reduce_sum(batch.completion_mask.sum().reshape(1).double())[0])
    device = next(run.backend.model.parameters()).device
    teacher_device = next(run.teacher.parameters()).device
    options = dict(beta=cfg.algorithm.gkd.beta, temperature=cfg.rollout.temperature,
                   chunk_size=cfg.algorithm.teacher.chunk_size or None,
                   teacher_head=run.teacher.get_output_embeddings(), packing=packing)
    total = 0.0
    for rows in same_count_on_every_rank(micro_batches(batch, cfg.backend.micro_batch_tokens, packing)):
        micro = batch.select(rows or [0])  # an empty micro-batch keeps ZeRO-3's collective forwards in step
        k = micro.prompt_width - 1
        teacher_rows = scored_hidden(run.teacher, micro.input_ids.to(teacher_device),
                                     micro.attention_mask.to(teacher_device), logits_to_keep_from=k,
                                     packing=teacher_packing(run.teacher, packing))  # [M, H_t]
        micro = micro.to(device)
        jsd = forward_jsd(run.backend.model, micro.input_ids, micro.attention_mask, teacher_rows=teacher_rows,
                          logits_to_keep_from=k, **options)  # [n, T-1]
        loss = (jsd * micro.completion_mask).sum() / max(tokens, 1.0) * (1.0 if rows else 0.0)
        run.backend.backward(loss)
        total += float(loss.detach())
    result = run.backend.step()
    loss = float(dist.all_reduce_sum(torch.tensor([total], dtype=torch.float64))[0])
    return {"train/loss": loss, "gkd/jsd": loss, "gkd/tokens": tokens, "optim/grad_norm": result["grad_norm"],
            "optim/lr": result["lr"], "optim/skipped_steps": int(result["skipped"]),
            "optim/skipped_total": getattr(run.backend, "skipped_steps", 0)}


def teacher_packing(teacher: torch.nn.Module, packing: str) -> str:
    """The layout the teacher forwards in: the student's (`backend.packing`) where the teacher's attention can keep
    its sequences apart, else padded; its hidden states come back in the same order either way."""
    return packing if layout_refusal(*attention_of(teacher), packing) is None else "padded"
