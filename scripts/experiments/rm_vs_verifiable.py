"""GRPO with the learned reward model as its only reward, next to the same run with the verifiable reward.

    python -m scripts.experiments.rm_vs_verifiable --out runs/rm_vs_verifiable  # train the RM, then both GRPO runs
    python -m scripts.experiments.rm_vs_verifiable --out runs/x --rm runs/rm/reward_model --steps 100 --threads 1

Both GRPO runs are `experiment=demo` with the same seed and steps; only the reward differs (`reward=rm`, which
also logs the true accuracy of the training samples at weight 0, against `reward=arithmetic`). Held-out
`eval/accuracy` is exact match in both. The table says, for each run, held-out accuracy before and after and the
mean of each logged reward over the first and the last `--window` steps. A reward model that is exploited shows
as `reward/reward_model_mean` rising while `reward/math_accuracy_mean` and `eval/accuracy` stay flat.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from grpo.training.tracking import read_metrics


def run(args: list[str], threads: int) -> None:
    env_threads = [f"threads={threads}"] if threads else []
    cmd = [sys.executable, "-m", *args, *env_threads]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def window_mean(lines: list[dict], key: str, first: bool, window: int) -> float | None:
    vals = [line[key] for line in lines if line.get(key) is not None and line["step"] > 0]
    vals = vals[:window] if first else vals[-window:]
    return sum(vals) / len(vals) if vals else None


def summary(run_dir: Path, window: int) -> dict[str, float | None]:
    lines = read_metrics(run_dir / "metrics.jsonl")
    evals = [line for line in lines if "eval/accuracy" in line]
    out = {"eval/accuracy before": evals[0]["eval/accuracy"], "eval/accuracy after": evals[-1]["eval/accuracy"],
           "eval/accuracy best": max(e["eval/accuracy"] for e in evals)}
    for key in ("reward/reward_model_mean", "reward/math_accuracy_mean"):
        out[f"{key} first {window}"] = window_mean(lines, key, True, window)
        out[f"{key} last {window}"] = window_mean(lines, key, False, window)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the RM and both GRPO runs")
    p.add_argument("--rm", help="a trained reward model directory; default: train one into OUT/rm")
    p.add_argument("--steps", type=int, default=200, help="GRPO steps of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)")
    p.add_argument("--window", type=int, default=20, help="steps averaged at the start and the end")
    p.add_argument("--runs", default="rm,verifiable", help="which GRPO runs: rm, verifiable or both")
    a = p.parse_args()
    out = Path(a.out)
    rm = a.rm
    if not rm:
        run(["reward_models.train", f"run_dir={out / 'rm'}", f"seed={a.seed}", "progress_bar=false"], a.threads)
        rm = str(out / "rm" / "reward_model")
    common = ["grpo.train", "experiment=demo", f"train.max_steps={a.steps}", f"seed={a.seed}",
              "tracking.progress_bar=false", "tracking.plot=false", "checkpoint.every_steps=0"]
    rewards = {"rm": ["reward=rm", f"reward.functions.0.kwargs.path={Path(rm).resolve()}"],
               "verifiable": ["reward=arithmetic"]}
    chosen = a.runs.split(",")
    for name in chosen:
        run([*common, f"run_dir={out / name}", *rewards[name]], a.threads)
    rows = {name: summary(out / name, a.window) for name in chosen}
    keys = list(next(iter(rows.values())))
    print(f"\n{'':44s}" + "".join(f"{name:>12s}" for name in chosen))
    for key in keys:
        cells = "".join(f"{'-' if rows[n][key] is None else format(rows[n][key], '.3f'):>12s}" for n in chosen)
        print(f"{key:44s}{cells}")


if __name__ == "__main__":
    main()
