"""Rerun a demo over CPU kernel paths and seeds and print the table the README shows.

    python -m scripts.experiments.demo_matrix  # avx2, default (+ avx512 where the CPU has it) x seeds 0 1 2
    python -m scripts.experiments.demo_matrix --paths default --seeds 0 --extra train.max_steps=50
    python -m scripts.experiments.demo_matrix --experiment tools_demo --control tools_demo_no_tools \\
        --paths avx2 default --plot docs/tools_demo.png

Each run of the built-in demo is `bash scripts/demo.sh` (install, then `grpo-train experiment=demo`);
another `--experiment` runs `python -m grpo.train experiment=<name>`. Every run gets
`ATEN_CPU_CAPABILITY=<path>`, `seed=S model.warm_start.seed=S`, and a cache of its own per path and
seed, so its warm start is built on that kernel path. A `--control` experiment runs after it with the
same seed and cache, so on the same warm-started model.

A run whose held-out gain (end - step 0) falls short of `--min-gain`, or a control that moves more than
`--control-band` from its start, is marked FAIL and the script exits 1. `--plot` draws every run's
held-out accuracy against step (thin) and the mean over runs (thick), the control in grey.

Runs go one at a time (`--jobs 1`): their wall times are comparable only when nothing else shares the
cores. With `--jobs 2`, give each run one thread (`--extra threads=1`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[2]  # the repository, where scripts/demo.sh runs


def available_paths() -> list[str]:
    """`avx2` and `default` run on every x86-64 CPU here; `avx512` where torch would pick it."""
    paths = ["avx2", "default"]
    if torch.backends.cpu.get_cpu_capability().lower().startswith("avx512"):
        paths.append("avx512")
    return paths


def run_demo(experiment: str, path: str, seed: int, extra: list[str], workdir: Path) -> dict:
    """One run of `experiment` on kernel path `path` with `seed`; its figures from metrics.jsonl."""
    run_dir = workdir / f"{experiment}_{path}_seed{seed}"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "GRPO_CACHE": str(workdir / f"cache_{path}_seed{seed}")}
    launch = (["bash", str(ROOT / "scripts" / "demo.sh")] if experiment == "demo"
              else [sys.executable, "-m", "grpo.train", f"experiment={experiment}"])
    cmd = [*launch, f"run_dir={run_dir}", f"seed={seed}", f"model.warm_start.seed={seed}",
           "tracking.progress_bar=false", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    row = {"experiment": experiment, "path": path, "seed": seed, "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/accuracy" in x]
    first = lines[0]
    return {**row, "ws_anneal_step": first.get("warm_start/anneal_step"),
            "ws_met_step": first.get("warm_start/met_step"), "ws_wall_s": first.get("warm_start/wall_s"),
            "curve": [(x["step"], x["eval/accuracy"]) for x in evals],
            "start": evals[0]["eval/accuracy"], "end": evals[-1]["eval/accuracy"],
            "best": max(x["eval/accuracy"] for x in evals),
            "grpo_s": sum(x.get("time/step_s", 0.0) for x in lines)}


def run_pair(args, path: str, seed: int, workdir: Path) -> list[dict]:
    """The experiment on (path, seed), then its control on the same warm start if there is one."""
    rows = [run_demo(args.experiment, path, seed, args.extra, workdir)]
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), file=sys.stderr, flush=True)
    if args.control:
        rows.append(run_demo(args.control, path, seed, args.extra, workdir))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), file=sys.stderr, flush=True)
    return rows


def verdict(row: dict, args) -> str:
    """"" if the row passes, else " FAIL": the experiment gains `--min-gain`, the control stays in its band."""
    gain = row["end"] - row["start"]
    ok = abs(gain) <= args.control_band if row["experiment"] == args.control else gain >= args.min_gain
    return "" if ok else " FAIL"


def plot(rows: list[dict], file: Path, args) -> None:
    """Held-out accuracy against GRPO step: each run thin, the mean over runs thick; the control in grey."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for experiment, colour in ((args.experiment, "tab:blue"), (args.control, "tab:gray")):
        curves = [r["curve"] for r in rows if r["experiment"] == experiment and "curve" in r]
        if not curves:
            continue
        for curve in curves:
            ax.plot(*zip(*curve), color=colour, alpha=0.3, linewidth=0.8)
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, color=colour, linewidth=2.2, marker="o",
                label=f"{experiment} (mean of {len(curves)}: {' '.join(args.paths)} x seeds "
                      f"{' '.join(map(str, args.seeds))})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="demo", help="the experiment config to run (configs/experiment/)")
    ap.add_argument("--control", help="an experiment to run after each run, on the same warm start")
    ap.add_argument("--paths", nargs="+", default=available_paths(), help="ATEN_CPU_CAPABILITY values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--min-gain", type=float, default=0.25, help="least held-out gain (end - step 0) that passes")
    ap.add_argument("--control-band", type=float, default=0.05, help="most a control may move from its start")
    ap.add_argument("--jobs", type=int, default=1, help="(path, seed) pairs run at once")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--plot", type=Path, help="draw the held-out curves here")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--from-json", nargs="+", type=Path, help="run nothing: the table and plot of rows that "
                    "earlier --json files hold (e.g. one per kernel path, run apart)")
    args = ap.parse_args()
    if args.from_json:
        rows = [r for file in args.from_json for r in json.loads(file.read_text())]
        args.paths = list(dict.fromkeys(r["path"] for r in rows))
        args.seeds = list(dict.fromkeys(r["seed"] for r in rows))
    else:
        with tempfile.TemporaryDirectory(prefix="demo_matrix_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
            pairs = [(path, seed) for path in args.paths for seed in args.seeds]
            rows = [r for rs in pool.map(lambda p: run_pair(args, *p, Path(tmp)), pairs) for r in rs]
    print("| experiment | kernel path | seed | warm start: plateau left / kept, step | warm start s | "
          "held-out step 0 | held-out end | gain | GRPO s | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for r in rows:
        head = f"| {r['experiment']} | {r['path']} | {r['seed']} |"
        if "error" in r:
            failed = True
            print(f"{head} FAIL: {r['error']} | | | | | | {r['wall_s'] / 60:.1f} min |")
            continue
        mark = verdict(r, args)
        failed |= bool(mark)
        built = ("- | -" if r["ws_wall_s"] is None
                 else f"{r['ws_anneal_step']} / {r['ws_met_step']} | {r['ws_wall_s']:.0f}")
        print(f"{head} {built} | {r['start']:.3f} | {r['end']:.3f} | {r['end'] - r['start']:+.3f}{mark} | "
              f"{r['grpo_s']:.0f} | {r['wall_s'] / 60:.1f} min |")
    for experiment in filter(None, (args.experiment, args.control)):
        gains = [r["end"] - r["start"] for r in rows if r["experiment"] == experiment and "error" not in r]
        if gains:
            print(f"\n{experiment}: median gain {statistics.median(gains):+.3f}, smallest {min(gains):+.3f}, "
                  f"largest {max(gains):+.3f} over {len(gains)} runs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot, args)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
