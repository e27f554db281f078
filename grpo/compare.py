"""`grpo-compare`: several algorithms on the same task, model, seed and sampling budget, one table and one plot.

    grpo-compare out_dir=runs/compare                       # GRPO, Dr. GRPO, PPO-RLHF, DPO on the built-in task
    grpo-compare algorithms='[grpo,ppo]' budget_samples=25600 run_overrides='[optim.lr=1e-4]'

Each algorithm is an ordinary `grpo-train` run (`<out_dir>/<name>/`, its own process, so its peak memory is
its own), given the same `run_overrides`, seed, prompts per step and group size. The budget is counted in
generated completions: GRPO and PPO sample `prompts_per_step x group_size` per step and run
`budget_samples / (prompts_per_step x group_size)` steps; DPO spends the whole budget up front, sampling
`budget_samples / samples_per_prompt` training problems to build its preference pairs, then trains one
epoch on them. Every run is evaluated by the same harness (`grpo.evaluate.evaluate_splits`: greedy,
the same held-out and out-of-distribution rows) every `eval_every_samples` samples (DPO: every `dpo_eval_every`
optimiser steps). PPO-RLHF scores with a reward model: `reward_model_path`, or one trained first by
`grpo-rm-train` on the built-in preference set (its cost is reported beside the table, not in PPO's row).

Outputs in `out_dir`: `compare.md` and `compare.csv` (final and best in-distribution accuracy, final
out-of-distribution accuracy and the gap, samples and minutes to reach the best, wall minutes, peak memory)
and `compare.png` (accuracy against samples and against minutes). Minutes to the best are training time:
the sum of the run's step times (sampling, updates, evaluation; DPO's includes building its pairs), which
leaves out process start and model loading; the wall column has everything.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from grpo.config import CONFIG_DIR, ConfigError, register_configs, validate
from grpo.run import train_from_config

log = logging.getLogger("grpo.compare")

# What each name runs: grpo-train overrides. `{rm}` is the reward model directory.
ALGORITHMS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "dr_grpo": ["algorithm=dr_grpo"],
    "ppo_rlhf": ["algorithm=ppo", "reward.functions=[{name:reward_model,weight:1.0,kwargs:{path:'{rm}'}}]"],
    "ppo": ["algorithm=ppo"],  # PPO on the task's own (verifiable) reward
    "dpo": ["algorithm=dpo"],
}
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "ppo_rlhf": "PPO-RLHF (learned RM)", "ppo": "PPO (verifiable reward)",
          "dpo": "DPO (offline pairs)"}


@dataclass
class CompareConfig:
    out_dir: str = field(default="runs/compare", metadata={"help": "directory of the comparison"})
    algorithms: list[str] = field(default_factory=lambda: ["grpo", "dr_grpo", "ppo_rlhf", "dpo"],
                                  metadata={"help": "names from grpo.compare.ALGORITHMS, run in this order"})
    budget_samples: int = field(default=51200, metadata={"help": "generated completions each algorithm may use"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step of the online algorithms"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (DPO: samples per problem)"})
    eval_every_samples: int = field(default=6400, metadata={"help": "samples between evaluations (online algorithms)"})
    dpo_eval_every: int = field(default=10, metadata={"help": "DPO optimiser steps between evaluations"})
    seed: int = field(default=0, metadata={"help": "seed of every run"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads per run; 0 = torch's default"})
    run_overrides: list[str] = field(default_factory=list, metadata={"help": "grpo-train overrides given to every run"})
    reward_model_path: str | None = field(default=None, metadata={"help": "ppo_rlhf's RM; null: train one first"})
    rm_overrides: list[str] = field(default_factory=list, metadata={"help": "grpo-rm-train overrides when training it"})
    in_process: bool = field(default=False, metadata={"help": "run the training runs in this process (tests): faster, "
                                                              "shared peak memory; the reward model trains in its own"})


def validate_compare(cfg: CompareConfig) -> CompareConfig:
    unknown = [a for a in cfg.algorithms if a not in ALGORITHMS]
    if unknown or not cfg.algorithms:
        raise ConfigError(f"algorithms: {unknown or '[]'} not among {', '.join(ALGORITHMS)}")
    per_step = cfg.prompts_per_step * cfg.group_size
    if cfg.budget_samples < per_step:
        raise ConfigError(f"budget_samples: {cfg.budget_samples} is less than one step ({per_step} samples)")
    if cfg.eval_every_samples <= 0 or cfg.dpo_eval_every <= 0:
        raise ConfigError("eval_every_samples, dpo_eval_every: must be > 0")
    return cfg


def run_overrides(cfg: CompareConfig, name: str, rm_path: str | None) -> list[str]:
    """The grpo-train overrides of one algorithm's run."""
    per_step = cfg.prompts_per_step * cfg.group_size
    steps = cfg.budget_samples // per_step
    common = [f"run_dir={Path(cfg.out_dir) / name}", f"seed={cfg.seed}", f"threads={cfg.threads}",
              "tracking.progress_bar=false", "tracking.plot=false", *cfg.run_overrides]
    algo = [o.replace("{rm}", str(rm_path)) for o in ALGORITHMS[name]]
    if name == "dpo":
        sizing = [f"algorithm.dpo.num_prompts={cfg.budget_samples // cfg.group_size}",
                  f"algorithm.dpo.samples_per_prompt={cfg.group_size}", f"train.eval_every={cfg.dpo_eval_every}"]
    else:
        sizing = [f"train.max_steps={steps}", f"train.prompts_per_step={cfg.prompts_per_step}",
                  f"algorithm.group_size={cfg.group_size}",
                  f"train.eval_every={max(1, cfg.eval_every_samples // per_step)}"]
    return algo[:1] + common + algo[1:] + sizing  # the algorithm group first, so experiment overrides apply on top


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name=config_name, overrides=overrides))


def launch(module: str, overrides: list[str], log_path: Path, in_process: bool) -> tuple[float, float]:
    """Run `python -m module overrides`, or with `in_process` a grpo.train run in this process; returns
    (wall seconds, peak RSS MiB). The reward model is always trained in its own process (`reward_models`
    builds on `grpo`, not the other way round)."""
    start = time.perf_counter()
    if in_process and module == "grpo.train":
        register_configs()
        train_from_config(validate(_compose("config", overrides)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return time.perf_counter() - start, peak
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *overrides], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over all children
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{module} {' '.join(overrides)} failed; see {log_path}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def curve(metrics_path: Path, samples_per_step: int, name: str) -> list[dict]:
    """The evaluation points of one run: samples used, training minutes, accuracies."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    generated = next((r["dpo/generated_samples"] for r in rows if "dpo/generated_samples" in r), None)
    points, seconds = [], 0.0
    for r in rows:
        seconds += r.get("time/step_s") or 0.0
        if r.get("eval/accuracy") is None:
            continue
        samples = generated if name == "dpo" else r["step"] * samples_per_step
        points.append({"step": r["step"], "samples": samples, "minutes": seconds / 60,
                       "accuracy": r["eval/accuracy"], "ood_accuracy": r.get("eval/ood_accuracy")})
    return points


def summarise(name: str, points: list[dict], wall_s: float, peak_mib: float) -> dict:
    best = max(points, key=lambda p: p["accuracy"])  # the first of equal bests: the earliest
    final = points[-1]
    gap = None if final["ood_accuracy"] is None else final["accuracy"] - final["ood_accuracy"]
    return {"algorithm": LABELS[name], "start_accuracy": points[0]["accuracy"], "final_accuracy": final["accuracy"],
            "best_accuracy": best["accuracy"], "final_ood_accuracy": final["ood_accuracy"], "final_gap": gap,
            "samples_to_best": best["samples"], "minutes_to_best": best["minutes"],
            "train_minutes": final["minutes"], "wall_minutes": wall_s / 60, "peak_memory_mib": peak_mib}


COLUMNS = [("algorithm", "algorithm", "{}"), ("start_accuracy", "start acc", "{:.3f}"),
           ("final_accuracy", "final acc", "{:.3f}"), ("best_accuracy", "best acc", "{:.3f}"),
           ("final_ood_accuracy", "final OOD acc", "{:.3f}"), ("final_gap", "gap (ID - OOD)", "{:.3f}"),
           ("samples_to_best", "samples to best", "{:,}"), ("minutes_to_best", "min to best", "{:.2f}"),
           ("train_minutes", "train min", "{:.2f}"), ("wall_minutes", "wall min", "{:.2f}"),
           ("peak_memory_mib", "peak RSS MiB", "{:.0f}")]


def write_table(rows: list[dict], out_dir: Path, notes: list[str]) -> tuple[Path, Path]:
    md, csv_path = out_dir / "compare.md", out_dir / "compare.csv"
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[k], f) for k, _, f in COLUMNS) + " |" for r in rows]
    md.write_text("\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path


def plot(curves: dict[str, list[dict]], path: Path) -> Path:
    """Held-out accuracy (solid) and out-of-distribution accuracy (dashed) against samples and against minutes."""
    fig = Figure(figsize=(11, 4))  # no pyplot: no GUI backend, no global state
    axes = fig.subplots(1, 2, sharey=True)
    for i, (name, points) in enumerate(curves.items()):
        color = f"C{i}"
        for ax, x in zip(axes, ("samples", "minutes")):
            xs = [p[x] for p in points]
            ax.plot(xs, [p["accuracy"] for p in points], "-o", ms=3, color=color, label=LABELS[name])
            if points[0]["ood_accuracy"] is not None:
                ax.plot(xs, [p["ood_accuracy"] for p in points], "--", color=color, alpha=0.6)
    axes[0].set_xlabel("generated samples")
    axes[1].set_xlabel("training minutes")
    axes[0].set_ylabel("greedy accuracy (solid: held-out, dashed: OOD)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def reward_model_for(cfg: CompareConfig) -> tuple[str | None, list[str]]:
    """The RM directory ppo_rlhf scores with (trained here unless given) and notes for the table."""
    if "ppo_rlhf" not in cfg.algorithms:
        return None, []
    if cfg.reward_model_path:
        return cfg.reward_model_path, [f"PPO-RLHF reward model: {cfg.reward_model_path} (given)"]
    run_dir = Path(cfg.out_dir) / "reward_model_run"
    overrides = [f"run_dir={run_dir}", f"seed={cfg.seed}", f"threads={cfg.threads}", "progress_bar=false",
                 *cfg.rm_overrides]
    wall, _ = launch("reward_models.train", overrides, Path(cfg.out_dir) / "logs" / "reward_model.log", cfg.in_process)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    acc = next((r["rm/eval_pair_accuracy"] for r in reversed(rows) if "rm/eval_pair_accuracy" in r), None)
    note = (f"PPO-RLHF reward model: trained by grpo-rm-train on the built-in preference set in {wall / 60:.1f} min "
            f"(not counted in PPO-RLHF's row), held-out pair accuracy {'n/a' if acc is None else f'{acc:.3f}'}")
    return str(run_dir / "reward_model"), [note]


def compare(cfg: CompareConfig) -> list[dict]:
    """Run every algorithm, then write the table and the plot; returns the table rows."""
    validate_compare(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rm_path, notes = reward_model_for(cfg)
    per_step = cfg.prompts_per_step * cfg.group_size
    rows, curves = [], {}
    for name in cfg.algorithms:
        overrides = run_overrides(cfg, name, rm_path)
        log.info("%s: grpo-train %s", name, " ".join(overrides))
        wall, peak = launch("grpo.train", overrides, out / "logs" / f"{name}.log", cfg.in_process)
        curves[name] = curve(out / name / "metrics.jsonl", per_step, name)
        rows.append(summarise(name, curves[name], wall, peak))
        log.info("%s: best held-out accuracy %.3f, %.1f min", name, rows[-1]["best_accuracy"], wall / 60)
    total = time.perf_counter() - start
    notes += [f"budget {cfg.budget_samples:,} generated samples per algorithm, seed {cfg.seed}; "
              f"whole comparison {total / 60:.1f} min wall",
              "OOD: longer operands, spaced and question phrasings (eval/ood_accuracy, pooled)"]
    if cfg.in_process:
        notes.append("in_process: peak memory is the comparison process's, not each run's")
    write_table(rows, out, notes)
    plot(curves, out / "compare.png")
    (out / "compare.json").write_text(json.dumps({"rows": rows, "curves": curves, "notes": notes}, indent=2))
    log.info("table: %s; plot: %s", out / "compare.md", out / "compare.png")
    return rows


def main() -> None:
    ConfigStore.instance().store(name="compare_schema", node=CompareConfig)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare/config")
    def _main(dict_cfg) -> None:
        try:
            compare(OmegaConf.to_object(dict_cfg))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
