"""TRL's `GRPOTrainer` on a real-model recipe, evaluated with our evaluator: the peer as a learning anchor.

    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --seed 0 --threads 1
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --eval-only   # evaluate its checkpoints
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --eval-only --steps 30 40   # only these
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl --compare-only --ours runs/smollm2_chain_sum/seed0 \
        --plot docs/trl.png   # held-out accuracy against step and against training seconds, both trainers
    python -m scripts.experiments.smollm2_vs_trl --out runs/trl_chain_sum --resume runs/trl_chain_sum/checkpoint-20

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

Resuming (`--resume`, TRL's `resume_from_checkpoint`, to the same `max_steps`): Trainer reloads the adapters, the
step, the data position, and the optimizer, scheduler and RNG state where the checkpoint holds them; where it does
not (checkpoints saved with `save_only_model`, as this script saved before it could resume) it goes on without
them in silence, so the script refuses such a checkpoint unless `--fresh-optimizer`: AdamW's moments then restart
at the resumed step (its first update is bias-corrected as a first step's is) and the sampling stream restarts from
the seed. `resume.json` records what was missing and that the adapters training resumed from are the checkpoint's.
`wall.jsonl` keeps the lines up to the resumed step and adds the resumed part's seconds to that step's: training
time alone, without the time between the stop and the resume. Checkpoints now hold the full state.
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
from matplotlib.figure import Figure
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from grpo.config import CONFIG_DIR, register_configs, to_config
from grpo.data.loading import chat_messages
from grpo.model.loading import load_tokenizer
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


RESUME_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth")  # what Trainer reloads beside the weights


def resumed_walls(lines: list[dict], step: int) -> tuple[list[dict], float]:
    """The wall-clock lines up to `step` (kept) and the wall time at `step` (the resumed part's offset).

    A run stopped after its step-`step` checkpoint may have logged later steps before it stopped: those are
    dropped, since the resumed run trains them again.
    """
    kept = [line for line in lines if line["step"] <= step]
    at = [line["wall_s"] for line in kept if line["step"] == step]
    if not at:
        raise ValueError(f"wall.jsonl has no line for step {step}, the checkpoint resumed from")
    return kept, at[0]


def resume_check(checkpoint: Path, max_steps: int) -> dict:
    """What `Trainer.train(resume_from_checkpoint=...)` will restore from `checkpoint`, checked before training.

    Trainer skips a missing optimizer, scheduler or RNG file in silence (and reloads the weights and the step);
    this names them. The checkpoint's `max_steps` must be the run's, or a schedule would differ.
    """
    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(f"--resume {checkpoint}: no trainer_state.json (not a Trainer checkpoint)")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["max_steps"] != max_steps:
        raise ValueError(f"--resume {checkpoint}: its max_steps is {state['max_steps']}, the run's {max_steps}")
    return {"checkpoint": str(checkpoint), "step": state["global_step"], "max_steps": max_steps,
            "missing": [name for name in RESUME_STATE if not (checkpoint / name).is_file()]}


class WallClock(TrainerCallback):
    """Seconds from the trainer's start to the end of each step, one JSON line per step.

    On a resumed run the lines up to the resumed step are kept and the resumed part's seconds are added to the
    wall time at that step (`resumed_walls`): training time alone, without the time the run was stopped.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path, self.resume_step, self.start = path, resume_step, None

    def on_train_begin(self, args, state, control, **kwargs):
        kept, self.offset = [], 0.0
        if self.resume_step is not None:
            kept, self.offset = resumed_walls(read_jsonl(self.path), self.resume_step)
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, "wall_s": self.offset + time.perf_counter() - self.start})
                    + "\n")


class AdapterCheck(TrainerCallback):
    """Largest difference between the adapters training starts from and the resumed checkpoint's (0: reloaded),
    written with the resume's record to `path` as training starts (a run stopped again keeps it)."""

    def __init__(self, checkpoint: Path, record: dict, path: Path):
        self.checkpoint, self.record, self.path = checkpoint, record, path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = load_file(str(self.checkpoint / "adapter_model.safetensors"))
        live = get_peft_model_state_dict(model)
        common = set(saved) & set(live)
        self.record["adapter_keys"] = {"saved": len(saved), "live": len(live), "common": len(common)}
        self.record["adapter_max_abs_diff"] = max(
            ((saved[k] - live[k].detach().cpu()).abs().max().item() for k in common), default=float("nan"))
        self.record["global_step_at_start"] = state.global_step
        self.path.write_text(json.dumps(self.record, indent=1) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_trl(cfg, model_path: str, out: Path, save_every: int, micro: int, resume: Path | None = None,
              fresh_optimizer: bool = False) -> None:
    """TRL's GRPOTrainer with the experiment's settings (module docstring); checkpoints every `save_every`.

    `resume`: a checkpoint of the same run to go on from (TRL's `resume_from_checkpoint`); one without its
    optimizer, scheduler or RNG file is refused unless `fresh_optimizer` (then what was missing is recorded in
    `resume.json`, beside the check that the adapters training starts from are the checkpoint's).
    """
    record = None
    if resume is not None:
        record = resume_check(resume, cfg.train.max_steps)
        if record["missing"] and not fresh_optimizer:
            raise ValueError(f"--resume {resume}: no {', '.join(record['missing'])} (saved with save_only_model); "
                             f"--fresh-optimizer goes on from its weights with AdamW's moments restarted")
    r, a, o, lora = cfg.rollout, cfg.algorithm, cfg.optim, cfg.model.lora
    tokenizer = load_tokenizer(model_path)
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
        logging_steps=1, save_strategy="steps", save_steps=save_every, save_only_model=False, report_to="none",
        disable_tqdm=True, use_cpu=True, bf16=False, dataloader_num_workers=0, disable_dropout=True,
        gradient_checkpointing=cfg.backend.gradient_checkpointing,  # TRL's default is on; ours off
    )
    peft = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules=list(lora.target_modules) or "all-linear")
    callbacks = [WallClock(out / "wall.jsonl", None if record is None else record["step"])]
    if record is not None:
        callbacks.append(AdapterCheck(resume, record, out / "resume.json"))
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(cfg)], args=args, train_dataset=trl_dataset(cfg),
                          processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


def evaluate_checkpoints(experiment: str, seed: int, overrides: list[str], model_path: str, out: Path,
                         steps: list[int] | None = None) -> list[dict]:
    """Our evaluator (greedy, the experiment's held-out split) on the base model and every saved checkpoint.

    `steps`: only these (0 is the base model), merged into `eval.jsonl`'s earlier rows (`merge_evals`).
    """
    walls = {line["step"]: line["wall_s"] for line in read_jsonl(out / "wall.jsonl")}
    points = [(0, model_path)] + sorted((int(d.name.split("-")[1]), str(d)) for d in out.glob("checkpoint-*"))
    if steps is not None:
        if unknown := set(steps) - {step for step, _ in points}:
            raise ValueError(f"--steps {sorted(unknown)}: no such checkpoint in {out}")
        points = [(step, path) for step, path in points if step in steps]
    results = []
    for step, path in points:
        cfg = experiment_config(experiment, seed, [*overrides, "model.gguf_file=null", "model.package=null",
                                                   f"model.path={path}", "train.eval_pass_k=0"])
        metrics = evaluate_from_config(cfg)
        results.append({"step": step, "wall_s": walls.get(step, 0.0), **{
            k: metrics[k] for k in ("eval/accuracy", "eval/format", "eval/completion_len") if k in metrics}})
    if steps is not None and (out / "eval.jsonl").is_file():
        results = merge_evals(read_jsonl(out / "eval.jsonl"), results, walls)
    (out / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in results))
    return results


def merge_evals(old: list[dict], new: list[dict], walls: dict[int, float]) -> list[dict]:
    """Earlier evaluation rows with the new ones (a new row replaces its step's), in step order, each row's
    wall time read again from `walls` (wall.jsonl now: a resumed run rewrites it)."""
    rows = {row["step"]: row for row in old} | {row["step"]: row for row in new}
    return [{**rows[step], "wall_s": walls.get(step, 0.0)} for step in sorted(rows)]


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


def plot_series(trl: list[dict], ours: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Each curve's steps, training seconds and held-out accuracy, in step order.

    Training seconds without evaluations for both (TRL's evaluations run apart; ours' `train_s` subtracts them),
    and ours with its evaluations beside them, as its run spent them.
    """
    trl, ours = sorted(trl, key=lambda x: x["step"]), sorted(ours, key=lambda x: x["step"])
    return {
        "TRL GRPOTrainer": {"step": [p["step"] for p in trl], "seconds": [p["wall_s"] for p in trl],
                            "accuracy": [p["eval/accuracy"] for p in trl]},
        "ours": {"step": [p["step"] for p in ours], "seconds": [p["train_s"] for p in ours],
                 "accuracy": [p["eval/accuracy"] for p in ours]},
        "ours, with its evaluations": {"step": [p["step"] for p in ours], "seconds": [p["wall_s"] for p in ours],
                                       "accuracy": [p["eval/accuracy"] for p in ours]},
    }


def plot(series: dict[str, dict[str, list[float]]], file: Path, resumed_at: int | None) -> None:
    """Held-out accuracy against step (left) and against training seconds (right), both trainers."""
    fig = Figure(figsize=(10.0, 4.0))
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    styles = {"TRL GRPOTrainer": ("tab:orange", "-"), "ours": ("tab:blue", "-"),
              "ours, with its evaluations": ("tab:blue", ":")}
    for label, curve in series.items():
        colour, line = styles[label]
        if line == "-":
            by_step.plot(curve["step"], curve["accuracy"], color=colour, marker="o", label=label)
        by_time.plot(curve["seconds"], curve["accuracy"], color=colour, linestyle=line, marker="o", label=label)
    if resumed_at is not None:
        by_step.axvline(resumed_at, color="tab:orange", linestyle="--", linewidth=0.8,
                        label=f"TRL resumed at step {resumed_at}")
    by_step.set_xlabel("GRPO step")
    by_time.set_xlabel("training wall time, s (1 torch thread, shared 2-core machine)")
    by_step.set_ylabel("held-out accuracy (greedy)")
    for ax in (by_step, by_time):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


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
    p.add_argument("--resume", type=Path, help="a checkpoint in --out to go on from, to the experiment's max_steps")
    p.add_argument("--fresh-optimizer", action="store_true",
                   help="resume from a checkpoint without optimizer/scheduler/RNG state (AdamW's moments restart)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints already in --out")
    p.add_argument("--steps", type=int, nargs="+", help="evaluate only these steps' checkpoints (0: the base model), "
                   "keeping eval.jsonl's other rows")
    p.add_argument("--compare-only", action="store_true", help="compare --out's eval.jsonl with --ours, no evaluation")
    p.add_argument("--ours", help="our run directory of the same experiment and seed, to compare with")
    p.add_argument("--plot", type=Path, help="with --ours: write both curves here (against step and seconds)")
    a = p.parse_args()
    if a.plot and not a.ours:
        p.error("--plot needs --ours (the run to draw beside TRL's)")
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
            train_trl(cfg, model_path, out, cfg.train.eval_every, a.micro_batches, a.resume, a.fresh_optimizer)
        trl = evaluate_checkpoints(a.experiment, a.seed, a.override, model_path, out, a.steps)
    if a.ours:
        compare(trl, ours_curve(Path(a.ours)))
        if a.plot:
            resumed = json.loads((out / "resume.json").read_text())["step"] if (out / "resume.json").is_file() else None
            plot(plot_series(trl, ours_curve(Path(a.ours))), a.plot, resumed)
    else:
        print("\n".join(json.dumps(x) for x in trl))


if __name__ == "__main__":
    main()
