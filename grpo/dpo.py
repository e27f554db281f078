"""The offline preference baseline: DPO on (prompt, chosen, rejected) pairs, trained by TRL's `DPOTrainer`.

One run:
1. the pairs: a JSONL/Parquet file (`algorithm.dpo.pairs_file`), or, for the built-in task, the policy's own
   samples ranked by the verifiable reward (`grpo.tasks.arithmetic_preferences`: `num_prompts` training
   problems x `samples_per_prompt` completions, a right answer against a wrong one). Those generated samples
   are DPO's whole sampling budget, spent before the first step;
2. TRL's `DPOTrainer` optimises the DPO loss against a frozen copy of the starting policy,
   per pair, with summed completion log-probs:
       loss = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))));
3. every `train.eval_every` optimiser steps the same evaluation as GRPO and PPO runs on the policy being
   trained (`grpo.evaluate.evaluate_run`), into the same metrics.jsonl; the final policy is saved as a
   checkpoint in the same layout.

Where this departs from DPO as published (Rafailov et al. 2023): the pairs are the policy's own samples
labelled by a verifiable reward rather than human preferences over a fine-tuned model's samples (as in
"on-policy"/"self-rewarding" variants); the loss is the paper's (`loss_type=sigmoid`) unless configured.
Resuming an unfinished DPO run is not supported: it restarts from the start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

from grpo.checkpoint import save_checkpoint
from grpo.config import Config, ConfigError
from grpo.contamination import normalise
from grpo.data import read_rows
from grpo.evaluate import evaluate_run
from grpo.loop import training_state
from grpo.run import Run
from grpo.tasks.arithmetic_preferences import ArithmeticPreferences, arithmetic_preferences

log = logging.getLogger(__name__)


def load_pairs(run: Run) -> tuple[list[dict], int, float]:
    """(pairs, samples generated to build them, seconds spent) for the run's config."""
    cfg, opts = run.cfg, run.cfg.algorithm.dpo
    start = time.perf_counter()
    if opts.pairs_file:
        pairs = read_rows(opts.pairs_file)
        for i, row in enumerate(pairs):
            for col in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(col), str):
                    raise ConfigError(
                        f"{opts.pairs_file}: row {i} has no text column {col!r} (algorithm.dpo.pairs_file)"
                    )
        return pairs, 0, time.perf_counter() - start
    spec = ArithmeticPreferences(
        num_prompts=opts.num_prompts, samples_per_prompt=opts.samples_per_prompt,
        pairs_per_prompt=opts.pairs_per_prompt,
        temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
        digits=cfg.task.arithmetic.digits, reverse=cfg.task.arithmetic.reverse, seed=cfg.seed,
    )
    # Built inside the run directory, never taken from a cache: its sampling time is part of DPO's cost.
    path = arithmetic_preferences(cfg.model.path, spec, cache_dir=Path(cfg.run_dir) / "pairs", log=log.info)
    num_prompts = min(opts.num_prompts or len(run.train_rows), len(run.train_rows))
    return read_rows(str(path)), num_prompts * opts.samples_per_prompt, time.perf_counter() - start


def drop_eval_prompts(pairs: list[dict], run: Run) -> tuple[list[dict], int]:
    """Pairs whose prompt is not an evaluation prompt (exact match after normalisation)."""
    held = {normalise(r["prompt"]) for rows in (run.eval_rows, *run.ood_rows.values()) for r in rows}
    kept = [p for p in pairs if normalise(p["prompt"]) not in held]
    return kept, len(pairs) - len(kept)


def train(run: Run) -> list[dict]:
    """Build or read the pairs, run `DPOTrainer` with evaluation callbacks; returns the logged metrics."""
    cfg = run.cfg
    if run.start_step:
        log.warning("dpo: %s already holds a final checkpoint (step %d); nothing to do", cfg.run_dir, run.start_step)
        return []
    history: list[dict] = []
    first = {"step": 0, **run.setup_metrics}
    pairs, generated, pairs_s = load_pairs(run)
    pairs, dropped = drop_eval_prompts(pairs, run)
    if not pairs:
        raise ConfigError(
            "algorithm.dpo: no preference pairs (the policy had no prompt with a right and a wrong answer)"
        )
    first |= {"dpo/pairs": len(pairs), "dpo/pairs_dropped_eval_overlap": dropped, "dpo/generated_samples": generated,
              "time/generate_s": pairs_s, "time/step_s": pairs_s}
    if cfg.train.eval_before and run.eval_rows:
        first |= evaluate_run(run)
    run.tracker.log(0, first)
    history.append(first)

    args = dpo_arguments(cfg)
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    run.tokenizer.padding_side = "left"
    trainer = DPOTrainer(model=run.policy, args=args, train_dataset=dataset, processing_class=run.tokenizer,
                         callbacks=[LogAndEvaluate(run, history)])
    trainer.remove_callback(PrinterCallback)  # our tracker prints; TRL's would repeat every line
    trainer.train()
    run.tokenizer.padding_side = "left"
    step = trainer.state.global_step
    save_checkpoint(cfg.run_dir, step, policy=run.policy, tokenizer=run.tokenizer,
                    state=training_state(run), keep_last=cfg.checkpoint.keep_last)
    return history


class LogAndEvaluate(TrainerCallback):
    """Our metrics line per optimiser step (TRL's loss and reward margins), our evaluation when due.
    TRL logs every step (`logging_steps=1`) after the step ends, so the line is written there."""

    def __init__(self, run: Run, history: list[dict]):
        self.run, self.history, self.last = run, history, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # the summary TRL logs at the end of training
            return
        names = {"loss": "train/loss", "rewards/margins": "train/dpo_margin",
                 "rewards/accuracies": "train/dpo_pair_accuracy", "learning_rate": "optim/lr",
                 "grad_norm": "optim/grad_norm", "entropy": "train/entropy"}
        metrics = {ours: float(logs[theirs]) for theirs, ours in names.items() if theirs in logs}
        step, every = state.global_step, self.run.cfg.train.eval_every
        if every and step % every == 0 or step == state.max_steps:
            metrics |= evaluate_run(self.run)
        now = time.perf_counter()
        metrics["time/step_s"], self.last = now - self.last, now
        self.run.tracker.log(step, metrics)
        self.history.append({"step": step, **metrics})


def dpo_arguments(cfg: Config) -> DPOConfig:
    """TRL's DPO settings from the run's config (`algorithm.dpo.*` and `optim.*`)."""
    opts = cfg.algorithm.dpo
    return DPOConfig(
        output_dir=str(Path(cfg.run_dir) / "trainer"), per_device_train_batch_size=opts.batch_size,
        num_train_epochs=opts.epochs, learning_rate=cfg.optim.lr, lr_scheduler_type=cfg.optim.schedule,
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.optim.max_grad_norm or 1e9,
        beta=opts.beta, loss_type=[opts.loss_type], logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not cfg.tracking.progress_bar,
        bf16=cfg.model.dtype == "bfloat16", dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
