"""Rerun the demo over CPU kernel paths and seeds and print the table the README shows.

    python -m scripts.experiments.demo_matrix  # avx2, default (+ avx512 where the CPU has it) x seeds 0 1 2
    python -m scripts.experiments.demo_matrix --paths default --seeds 0 --extra train.max_steps=50

Each run is `bash scripts/demo.sh` (install, then `grpo-train experiment=demo`) with
`ATEN_CPU_CAPABILITY=<path>`, `seed=S model.warm_start.seed=S`, and a cache of its own, so its warm
start is built on that kernel path. Runs go one at a time: their wall times are comparable only
when nothing else shares the cores. A run whose gain falls short of `--min-gain` is marked FAIL and
the script exits 1.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository, where scripts/demo.sh runs


def available_paths() -> list[str]:
    """`avx2` and `default` run on every x86-64 CPU here; `avx512` where torch would pick it."""
    paths = ["avx2", "default"]
    if torch.backends.cpu.get_cpu_capability().lower().startswith("avx512"):
        paths.append("avx512")
    return paths


def run_demo(path: str, seed: int, extra: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{path}_seed{seed}"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": path, "GRPO_CACHE": str(workdir / f"cache_{path}_seed{seed}")}
    cmd = ["bash", str(ROOT / "scripts" / "demo.sh"), f"run_dir={run_dir}", f"seed={seed}",
           f"model.warm_start.seed={seed}", "tracking.progress_bar=false", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"path": path, "seed": seed, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/accuracy" in x]
    first = lines[0]
    return {"path": path, "seed": seed, "ws_anneal_step": first.get("warm_start/anneal_step"),
            "ws_met_step": first.get("warm_start/met_step"),
            "ws_wall_s": first.get("warm_start/wall_s"), "start": evals[0]["eval/accuracy"],
            "end": evals[-1]["eval/accuracy"], "best": max(x["eval/accuracy"] for x in evals),
            "grpo_s": sum(x.get("time/step_s", 0.0) for x in lines), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", nargs="+", default=available_paths(), help="ATEN_CPU_CAPABILITY values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--min-gain", type=float, default=0.25, help="least held-out gain (end - step 0) that passes")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo_matrix_") as tmp:
        for path in args.paths:
            for seed in args.seeds:
                rows.append(run_demo(path, seed, args.extra, Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| kernel path | seed | warm start: plateau left / criterion met, step | warm start s | "
          "held-out step 0 | held-out end | gain | GRPO s | wall (install + warm start + GRPO) |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for r in rows:
        if "error" in r:
            failed = True
            print(f"| {r['path']} | {r['seed']} | FAIL: {r['error']} | | | | | | {r['wall_s'] / 60:.1f} min |")
            continue
        gain = r["end"] - r["start"]
        failed |= gain < args.min_gain
        mark = "" if gain >= args.min_gain else " FAIL"
        print(f"| {r['path']} | {r['seed']} | {r['ws_anneal_step']} / {r['ws_met_step']} | {r['ws_wall_s']:.0f} | "
              f"{r['start']:.3f} | "
              f"{r['end']:.3f} | {gain:+.3f}{mark} | {r['grpo_s']:.0f} | {r['wall_s'] / 60:.1f} min |")
    gains = [r["end"] - r["start"] for r in rows if "error" not in r]
    if gains:
        print(f"\nmedian gain {statistics.median(gains):+.3f}, smallest {min(gains):+.3f} over {len(gains)} runs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
