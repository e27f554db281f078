"""`grpo-rm-train` (`python -m reward_models.train`): a Bradley-Terry reward model from preference pairs.

    grpo-rm-train run_dir=runs/rm                          # built-in arithmetic preference set, tiny model
    grpo-rm-train run_dir=runs/rm data.builtin=null data.train_file=prefs.jsonl model=hf model.path=/models/x
    grpo-rm-train run_dir=runs/rm data.builtin=null data.hf_dataset=name data.hf_eval_split=test

The model is a sequence classifier with one output (`AutoModelForSequenceClassification`, num_labels=1)
initialised from the base causal LM; it reads the score at the last token of ``prompt + completion + eos``.
Training is TRL's `RewardTrainer`, which minimises the Bradley-Terry loss

    loss = -mean log sigmoid(r(prompt, chosen) - r(prompt, rejected))

Where this differs from a plain `RewardTrainer` run:

1. held-out metrics are computed over *all* held-out pairs with the same scoring code as the `reward_model`
   reward (`reward_models.scorer.score_texts`), not averaged over evaluation batches;
2. the final held-out figures come from the model *reloaded* from `<run_dir>/reward_model/`, so they
   describe the artefact a GRPO run will load;
3. without an eval file or split, held-out pairs are split off by prompt, never by pair.

The run directory holds `config.yaml`, `metrics.jsonl` (`rm/loss`, `rm/train_pair_accuracy`,
`rm/train_margin`, `rm/lr`, and on evaluation steps `rm/eval_loss`, `rm/eval_pair_accuracy`, `rm/eval_margin`)
and `reward_model/` (a transformers directory: weights, config, tokenizer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from grpo.builtin.arithmetic_preferences import ArithmeticPreferences, arithmetic_preferences
from grpo.builtin.warmstart import WarmStart, warm_started_tiny
from grpo.cli import run_cli
from grpo.errors import ConfigError
from reward_models.config import RMConfig, register_rm_configs, validate_rm
from reward_models.data import check_preferences, read_preference_file, read_preference_hf, split_by_prompt
from reward_models.scorer import LikelihoodRewardModel, completion_logprobs, read_reward_model, score_texts

log = logging.getLogger("grpo.rm")

# TRL's log keys -> ours.
_TRAIN_KEYS = {"loss": "rm/loss", "accuracy": "rm/train_pair_accuracy", "margin": "rm/train_margin",
               "learning_rate": "rm/lr", "grad_norm": "rm/grad_norm"}


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-mean(log sigmoid(chosen - rejected)) over pairs; `chosen`, `rejected`: [N] scores."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def pair_metrics(chosen: list[float], rejected: list[float], prefix: str = "rm/eval") -> dict[str, float]:
    """Bradley-Terry loss, pair accuracy (chosen scored strictly higher) and mean margin r_c - r_r."""
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)  # [N]
    return {
        f"{prefix}_loss": bradley_terry_loss(c, r).item(),
        f"{prefix}_pair_accuracy": (c > r).double().mean().item(),
        f"{prefix}_margin": (c - r).mean().item(),
    }


def evaluate_pairs(model, tokenizer, pairs: list[dict], *, max_length: int, batch_tokens: int) -> dict[str, float]:
    """Held-out metrics of `model` over every pair, scored as the `reward_model` reward scores."""
    was_training = model.training
    model.eval()
    try:
        n = len(pairs)
        prompts = [p["prompt"] for p in pairs] * 2
        scores = score_texts(model, tokenizer, prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                             batch_tokens=batch_tokens, max_length=max_length)
    finally:
        model.train(was_training)
    return pair_metrics(scores[:n], scores[n:])


def base_model_path(cfg: RMConfig) -> str:
    """The causal LM the reward model starts from; builds (once) the warm-started tiny model for `model=tiny`."""
    if cfg.model.builtin == "tiny":
        a = cfg.data.arithmetic
        spec = WarmStart.from_config(cfg.model.warm_start, a.digits, a.reverse, max_carries=a.max_carries)
        return str(warm_started_tiny(spec, log=log.info))
    return cfg.model.path


def load_pairs(cfg: RMConfig) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs), every row checked (see `reward_models.data`).

    The built-in set is sampled from `data.arithmetic.policy_path`, else from the base model."""
    d = cfg.data
    columns = dict(prompt_column=d.prompt_column, chosen_column=d.chosen_column, rejected_column=d.rejected_column)
    if d.builtin == "arithmetic":
        a = d.arithmetic
        spec = ArithmeticPreferences(num_prompts=a.num_prompts, samples_per_prompt=a.samples_per_prompt,
                                     pairs_per_prompt=a.pairs_per_prompt, temperature=a.temperature,
                                     digits=a.digits, reverse=a.reverse, max_carries=a.max_carries, seed=a.seed)
        path = arithmetic_preferences(a.policy_path or base_model_path(cfg), spec, log=log.info)
        log.info("built-in preference set: %s", path)
        rows = check_preferences(read_preference_file(str(path)), str(path))
        return split_by_prompt(rows, d.eval_fraction, cfg.seed)
    if d.train_file:
        train = check_preferences(read_preference_file(d.train_file), d.train_file, **columns)
        if d.eval_file:
            return train, check_preferences(read_preference_file(d.eval_file), d.eval_file, **columns)
        return split_by_prompt(train, d.eval_fraction, cfg.seed)
    where = f"{d.hf_dataset}[{d.hf_train_split}]"
    train = check_preferences(read_preference_hf(d.hf_dataset, d.hf_train_split), where, **columns)
    if d.hf_eval_split:
        where = f"{d.hf_dataset}[{d.hf_eval_split}]"
        return train, check_preferences(read_preference_hf(d.hf_dataset, d.hf_eval_split), where, **columns)
    return split_by_prompt(train, d.eval_fraction, cfg.seed)


class _MetricsWriter(TrainerCallback):
    """One metrics.jsonl line per logged step, held-out evaluation every `eval_every` steps.
    Lines for the same step are merged before they are written."""

    def __init__(self, path: Path, tokenizer, eval_pairs: list[dict], cfg: RMConfig):
        self.path, self.tokenizer, self.eval_pairs, self.cfg = path, tokenizer, eval_pairs, cfg
        self.pending: dict | None = None
        self.last_eval = 0
        self.start = time.perf_counter()
        path.write_text("")

    def write(self, step: int, metrics: dict) -> None:
        if self.pending is not None and self.pending["step"] != step:
            self.flush()
        self.pending = {**(self.pending or {"step": step}), **metrics}

    def flush(self) -> None:
        if self.pending is not None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in self.pending.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
            self.pending = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        step = state.global_step
        metrics = {ours: float(logs[theirs]) for theirs, ours in _TRAIN_KEYS.items() if theirs in (logs or {})}
        if not metrics:  # the trainer's end-of-run summary: nothing of ours in it
            return control
        metrics["time/elapsed_s"] = time.perf_counter() - self.start
        if self.eval_pairs and step - self.last_eval >= self.cfg.train.eval_every:
            self.last_eval = step
            metrics.update(evaluate_pairs(model, self.tokenizer, self.eval_pairs, max_length=self.cfg.train.max_length,
                                          batch_tokens=self.cfg.train.eval_batch_tokens))
            log.info("step %d: held-out pair accuracy %.3f, margin %.3f", step,
                     metrics["rm/eval_pair_accuracy"], metrics["rm/eval_margin"])
        self.write(step, metrics)
        return control


def supervised_start(cfg: RMConfig, base: str, train_pairs: list[dict], out: Path) -> str:
    """Fine-tune the causal LM at `base` on the chosen completions of the training pairs (TRL's `SFTTrainer`,
    loss on the completion and its end token only); save it to `out` and return that path.

    The reward model then starts from a network that has been taught the preferred answers, as InstructGPT's
    reward model starts from the supervised policy. Each distinct (prompt, chosen) is one example; held-out
    pairs are never seen.
    """
    t = cfg.train
    examples = sorted({(p["prompt"], p["chosen"]) for p in train_pairs})
    log.info("supervised stage: %d steps on %d chosen completions", t.sft_steps, len(examples))
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, cfg.model.dtype),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    args = SFTConfig(
        output_dir=str(out.parent / "sft_trainer"), max_steps=t.sft_steps, per_device_train_batch_size=t.sft_batch_size,
        learning_rate=t.sft_lr, warmup_steps=max(1, t.sft_steps // 20), lr_scheduler_type="cosine",
        adam_beta2=0.98, weight_decay=0.0, completion_only_loss=True, max_length=t.max_length,
        logging_steps=t.log_every,
        save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not cfg.progress_bar,
        bf16=cfg.model.dtype == "bfloat16", dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in examples])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def train_reward_model(cfg: RMConfig) -> dict[str, float]:
    """Train, save `<run_dir>/reward_model/`, evaluate the saved model; returns the final held-out metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    train_pairs, eval_pairs = load_pairs(cfg)  # a bad row fails before any model is loaded
    base = base_model_path(cfg)
    cfg.model.path = base  # recorded in config.yaml
    log.info("%d training pairs, %d held-out pairs", len(train_pairs), len(eval_pairs))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    start = time.perf_counter()
    if cfg.train.sft_steps:
        base = supervised_start(cfg, base, train_pairs, run_dir / "sft")

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.path: cannot load {base!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if cfg.train.head == "likelihood":
        return likelihood_reward_model(cfg, base, tokenizer, train_pairs, eval_pairs, start)
    torch.manual_seed(cfg.seed)  # the score head is initialised here
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=getattr(torch, cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id

    args = reward_arguments(cfg, run_dir)
    columns = ("prompt", "chosen", "rejected")
    dataset = Dataset.from_list([{k: p[k] for k in columns} for p in train_pairs])
    writer = _MetricsWriter(run_dir / "metrics.jsonl", tokenizer, eval_pairs, cfg)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[writer])
    trainer.train()
    train_s = time.perf_counter() - start

    out = run_dir / "reward_model"
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    final = {"time/train_s": train_s} | evaluate_saved(out, eval_pairs, cfg, train_s)
    writer.write(trainer.state.global_step, final)
    writer.flush()
    log.info("reward model: %s", out)
    return final


def reward_arguments(cfg: RMConfig, run_dir: Path) -> RewardConfig:
    """TRL's reward-model settings from `cfg.train`."""
    t = cfg.train
    return RewardConfig(
        output_dir=str(run_dir / "trainer"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type="linear",
        max_length=t.max_length, center_rewards_coefficient=t.center_rewards, logging_steps=t.log_every,
        eval_strategy="no", save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        disable_tqdm=not cfg.progress_bar, bf16=cfg.model.dtype == "bfloat16", dataloader_num_workers=0,
    )


def evaluate_saved(out: Path, eval_pairs: list[dict], cfg: RMConfig, train_s: float) -> dict[str, float]:
    """Held-out pair accuracy and margin of the reward model saved at `out` ({} without held-out pairs)."""
    if not eval_pairs:
        return {}
    saved, saved_tokenizer = read_reward_model(out, "cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_pairs(saved, saved_tokenizer, eval_pairs, max_length=cfg.train.max_length,
                             batch_tokens=cfg.train.eval_batch_tokens)
    log.info("held-out pair accuracy %.3f (%d pairs), margin %.3f; trained in %.0fs",
             metrics["rm/eval_pair_accuracy"], len(eval_pairs), metrics["rm/eval_margin"], train_s)
    return metrics


def fit_bradley_terry_scale(differences: list[float], steps: int = 100) -> float:
    """The scale s > 0 minimising -mean log sigmoid(s * d) over the pairs' score differences d (chosen - rejected).

    One parameter, convex in s: Newton's method on log s would do; LBFGS is simpler to read. When every d is
    positive the loss keeps falling as s grows, so s is capped at 100 / max|d| (a margin of 100 nats).
    """
    d = torch.tensor(differences, dtype=torch.float64)  # [N]
    cap = math.log(100.0 / max(float(d.abs().max()), 1e-12))
    if bool((d > 0).all()):  # every pair ranked right: the loss has no minimum, take the cap
        return math.exp(cap)
    log_s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_s], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bradley_terry_loss(log_s.clamp(max=cap).exp() * d, torch.zeros_like(d))
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_s.detach().clamp(max=cap).exp())


def likelihood_reward_model(cfg: RMConfig, base: str, tokenizer, train_pairs: list[dict], eval_pairs: list[dict],
                            start: float) -> dict[str, float]:
    """`train.head=likelihood`: the reward is `scale * log p(completion + eos | prompt)` under the causal LM at
    `base` (with `train.sft_steps`, the LM fine-tuned on the training pairs' chosen completions), and `scale`
    is fitted by Bradley-Terry on the training pairs. Saved and evaluated like the classifier.

    Why: on the built-in task a last-token classifier must learn to check an addition from one bit per pair
    and stayed near chance (held-out pair accuracy 0.50-0.61), while the supervised LM's own likelihood of an
    answer already separates right from wrong; this head keeps that knowledge instead of training it away.
    """
    t, run_dir = cfg.train, Path(cfg.run_dir)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, cfg.model.dtype),
                                              trust_remote_code=cfg.model.trust_remote_code)
    model = LikelihoodRewardModel(lm, 1.0).eval()
    n = len(train_pairs)
    logp = completion_logprobs(model, tokenizer, [p["prompt"] for p in train_pairs] * 2,
                               [p["chosen"] for p in train_pairs] + [p["rejected"] for p in train_pairs],
                               batch_tokens=t.eval_batch_tokens, max_length=t.max_length)
    model.scale = fit_bradley_terry_scale([c - r for c, r in zip(logp[:n], logp[n:])])
    train_s = time.perf_counter() - start
    writer = _MetricsWriter(run_dir / "metrics.jsonl", tokenizer, eval_pairs, cfg)
    final: dict[str, float] = {"rm/scale": model.scale, "time/train_s": train_s,
                               **pair_metrics([model.scale * v for v in logp[:n]], [model.scale * v for v in logp[n:]],
                                              prefix="rm/train")}
    out = run_dir / "reward_model"
    model.save(out, tokenizer)
    if eval_pairs:
        saved, saved_tokenizer = read_reward_model(out, "cuda" if torch.cuda.is_available() else "cpu")
        final.update(evaluate_pairs(saved, saved_tokenizer, eval_pairs, max_length=t.max_length,
                                    batch_tokens=t.eval_batch_tokens))
        log.info("held-out pair accuracy %.3f (%d pairs), margin %.3f; likelihood head, scale %.3f; trained in %.0fs",
                 final["rm/eval_pair_accuracy"], len(eval_pairs), final["rm/eval_margin"], model.scale, train_s)
    writer.write(t.sft_steps, final)
    writer.flush()
    log.info("reward model: %s", out)
    return final


def main() -> None:
    """`grpo-rm-train`: train a reward model with the composed `configs/rm/config.yaml`."""
    run_cli(train_reward_model, config_name="rm/config", register=register_rm_configs,
            load=lambda dict_cfg: validate_rm(OmegaConf.to_object(dict_cfg)))


if __name__ == "__main__":
    main()
