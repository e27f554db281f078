"""TRL's `GRPOTrainer` on a real-model recipe, evaluated with our evaluator: the peer as a learning anchor.

    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --seed 0 --threads 1
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --eval-only   # evaluate its checkpoints
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl --compare-only --ours runs/smollm2_chain_sum/seed0

TRL trains on what `grpo-train experiment=smollm2_chain_sum` trains on (the experiment's Hydra config, read here):
the converted model directory, the same training rows after the same decontamination, given as chat messages
(the task's system prompt, then the question) that TRL renders through the same chat template with the
generation prompt; the same reward (the experiment's weighted reward functions: the last number against the
answer); the same group size, prompts per step, completion length, temperature, LoRA adapters (rank, alpha,
every linear layer but the output head), AdamW (learning rate, betas, epsilon, no weight decay, clipping at 1.0,
constant schedule), loss (token mean over the batch: TRL's `loss_type="dapo"`), clip range, one pass per batch,
no KL term, dropout off and steps. It saves its adapters every `--save-every` steps (our `train.eval_every`),
and each is scored by `grpo.training.run.evaluate_from_config` (what `grpo-eval` runs) on our held-out split,
greedy, with `eval/accuracy` (any layout) and `eval/format` (a bare number).

Where the two differ: TRL samples with transformers' `generate`, ours with its own loop (the same sampling
distribution, different random draws); TRL's group std has eps 1e-4, ours 1e-6; TRL draws the LoRA A matrices
from its own seeded stream. Wall time: TRL's from its trainer's start to each `on_step_end` (evaluation runs
after training, apart); ours from the run's `metrics.jsonl` (`time/step_s` summed; it includes the run's own
evaluations, which `--ours` subtracts to compare training time alone, and reports both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from hydra import compose, initialize_config_dir
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from grpo.config import CONFIG_DIR, register_configs, to_config
from grpo.data.loading import chat_messages
from grpo.training.run import build_scorers, evaluate_from_config, load_rows, resolve_model_path
from grpo.training.tracking import read_metrics
from rewards import RewardScorer, RewardSpec


def experiment_config(experiment: str, seed: int, overrides: list[str]):
    """The validated Config that `grpo-train experiment=<experiment> seed=<seed> <overrides>` runs."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=[
            f"experiment={experiment}", f"seed={seed}", "run_dir=unused", *overrides]))


def trl_dataset(cfg) -> Dataset:
    """Our training rows (decontaminated as our run's are), as TRL's conversational prompts."""
    scorer, eval_scorer = build_scorers(cfg)
    train_rows, _, _, _, _ = load_rows(cfg, scorer, eval_scorer)
    return Dataset.from_list([{"prompt": chat_messages(r, cfg.task), "answer": r["answer"]} for r in train_rows])


def trl_reward(cfg):
    """The experiment's weighted reward under TRL's convention (conversational completions: message lists)."""
    scorer = RewardScorer([RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in cfg.reward.functions])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return scorer([str(p) for p in prompts], texts, {"answer": answer}).total

    reward.__name__ = cfg.reward.accuracy
    return reward


class WallClock(TrainerCallback):
    """Seconds from the trainer's start to the end of each step, one JSON line per step."""

    def __init__(self, path: Path):
        self.path, self.start = path, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.path.write_text("")

    def on_step_end(self, args, state, control, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, "wall_s": time.perf_counter() - self.start}) + "\n")


def train_trl(cfg, model_path: str, out: Path, save_every: int, micro: int) -> None:
    """TRL's GRPOTrainer with the experiment's settings (module docstring); adapters saved every `save_every`."""
    r, a, o, lora = cfg.rollout, cfg.algorithm, cfg.optim, cfg.model.lora
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
    args = GRPOConfig(
        output_dir=str(out), max_steps=cfg.train.max_steps, seed=cfg.seed,
        # B*G completions per optimiser step, in `micro` micro-batches: TRL holds the [rows, T, V] float32 logits of
        # a micro-batch at once (12 GB at 64 rows here, which the OOM killer took); one generation batch per step
        per_device_train_batch_size=cfg.train.prompts_per_step * a.group_size // micro,
        gradient_accumulation_steps=micro,
        num_generations=a.group_size, num_iterations=a.epochs, beta=a.beta, loss_type="dapo",
        epsilon=a.clip_low, epsilon_high=a.clip_high, scale_rewards="group",
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps, optim="adamw_torch",
        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="steps", save_steps=save_every, save_only_model=True, report_to="none",
        disable_tqdm=True, use_cpu=True, bf16=False, dataloader_num_workers=0, disable_dropout=True,
        gradient_checkpointing=cfg.backend.gradient_checkpointing,  # TRL's default is on; ours off
    )
    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules=list(lora.target_modules) or "all-linear")
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(cfg)], args=args, train_dataset=trl_dataset(cfg),
                          processing_class=tokenizer, peft_config=peft, callbacks=[WallClock(out / "wall.jsonl")])
    trainer.train()
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


def evaluate_checkpoints(experiment: str, seed: int, overrides: list[str], model_path: str, out: Path) -> list[dict]:
    """Our evaluator (greedy, the experiment's held-out split) on the base model and every saved checkpoint."""
    walls = {line["step"]: line["wall_s"] for line in map(json.loads, (out / "wall.jsonl").read_text().splitlines())}
    points = [(0, model_path)] + sorted((int(d.name.split("-")[1]), str(d)) for d in out.glob("checkpoint-*"))
    results = []
    for step, path in points:
        cfg = experiment_config(experiment, seed, [*overrides, "model.gguf_file=null", "model.package=null",
                                                   f"model.path={path}", "train.eval_pass_k=0"])
        metrics = evaluate_from_config(cfg)
        results.append({"step": step, "wall_s": walls.get(step, 0.0), **{
            k: metrics[k] for k in ("eval/accuracy", "eval/format", "eval/completion_len") if k in metrics}})
    (out / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in results))
    return results


def ours_curve(run_dir: Path) -> list[dict]:
    """Held-out accuracy of our run against step and wall time (with and without its own evaluations)."""
    wall = train_only = 0.0
    points = []
    for line in read_metrics(run_dir / "metrics.jsonl"):
        wall += line.get("time/step_s", 0.0) + (line.get("time/eval_s", 0.0) if line["step"] == 0 else 0.0)
        train_only += line.get("time/step_s", 0.0) - (line.get("time/eval_s", 0.0) if line["step"] else 0.0)
        if "eval/accuracy" in line:
            points.append({"step": line["step"], "wall_s": wall, "train_s": train_only,
                           "eval/accuracy": line["eval/accuracy"], "eval/format": line.get("eval/format")})
    return points


def compare(trl: list[dict], ours: list[dict]) -> None:
    """Both curves, and the wall time at which ours first reaches TRL's final held-out accuracy."""
    print("step  TRL acc  TRL fmt  TRL s   | ours acc  ours fmt  ours train s  ours s (with evals)")
    by_step = {p["step"]: p for p in ours}
    for t in trl:
        o = by_step.get(t["step"], {})
        print(f"{t['step']:4d}  {t['eval/accuracy']:.3f}    {t.get('eval/format', 0):.3f}    {t['wall_s']:6.0f}  | "
              f"{o.get('eval/accuracy', float('nan')):.3f}     {nan_if_none(o.get('eval/format')):.3f}     "
              f"{o.get('train_s', float('nan')):8.0f}      {o.get('wall_s', float('nan')):8.0f}")
    target, trl_s = trl[-1]["eval/accuracy"], trl[-1]["wall_s"]
    if target <= trl[0]["eval/accuracy"]:
        print(f"TRL gained nothing by step {trl[-1]['step']} ({trl[0]['eval/accuracy']:.3f} -> {target:.3f}): "
              f"no time to reach it to compare")
        return
    reached = next((o for o in ours if o["eval/accuracy"] >= target), None)
    if reached is None:
        print(f"ours never reaches TRL's final {target:.3f} (TRL: {trl_s:.0f} s)")
    else:
        print(f"ours reaches TRL's final {target:.3f} at step {reached['step']}: {reached['train_s']:.0f} s of "
              f"training = {reached['train_s'] / trl_s:.2f}x TRL's {trl_s:.0f} s")


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="TRL's output directory (checkpoints, wall.jsonl, eval.jsonl)")
    p.add_argument("--experiment", default="smollm2_chain_sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--override", action="append", default=[], help="Hydra override of the experiment, repeatable")
    p.add_argument("--micro-batches", type=int, default=4, help="TRL's gradient accumulation per step (memory)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints already in --out")
    p.add_argument("--compare-only", action="store_true", help="compare --out's eval.jsonl with --ours, no evaluation")
    p.add_argument("--ours", help="our run directory of the same experiment and seed, to compare with")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.compare_only:
        trl = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    else:
        cfg = experiment_config(a.experiment, a.seed, a.override)
        model_path = resolve_model_path(cfg)
        if not a.eval_only:
            train_trl(cfg, model_path, out, cfg.train.eval_every, a.micro_batches)
        trl = evaluate_checkpoints(a.experiment, a.seed, a.override, model_path, out)
    if a.ours:
        compare(trl, ours_curve(Path(a.ours)))
    else:
        print("\n".join(json.dumps(x) for x in trl))


if __name__ == "__main__":
    main()
