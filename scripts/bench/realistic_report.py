"""The headline figures and the markdown tables of `scripts.bench.realistic`, from the JSON of one or more runs.

    python -m scripts.bench.realistic_report realistic_1.json realistic_2.json realistic_3.json

Each run is read alone (its ratios set arms of one process against each other, so load that varies between runs
cancels); across runs the report gives the median and the range of each figure.

The headline figures, per run, each against a target (`TARGETS`):

- `training_speedup_default`: TRL's best training arm's time / ours in the default layout (`backend.packing`'s
  default, `auto`). TRL's best is its fastest arm that a user can configure (never the diagnostic one).
- `step_speedup`: TRL's best whole-step arm / ours.
- `training_memory_default`: ours' peak in the default layout / TRL's lowest peak among its arms *without*
  activation checkpointing (equal checkpointing: neither side recomputes), whatever their micro-batches.
  `training_memory_default_matched`: the same at equal micro-batching too: against TRL's arm without
  checkpointing whose largest forward (rows x width) is nearest ours' (a smaller micro-batch holds fewer
  activations at any speed; `training_memory_matched_arm` names it). `training_memory_checkpointing` sets ours with
  checkpointing against `trl_checkpointing`.
- `gpu_flop_ratio_<layout>`: the FLOP model's ratio on a GPU, where TRL's head scores completion positions only:
  the least matmul FLOPs of any of TRL's configurable arms, its head FLOPs counted for the completion tokens only,
  over ours in that layout. Given for `sequences` (what `auto` resolves to under flash attention, a GPU's usual
  attention) and `groups` (what it resolves to under sdpa). FLOPs are model FLOPs (`scripts.bench.flops`): a
  bound on what the layouts change, not a time.

`training_speedup_best` and `training_memory_best` (ours' best arm, whatever its layout) are given beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from grpo.config import BackendConfig

# What the benchmark reports as met or missed; `<=` for the memory ratios, `>=` for the rest.
TARGETS = {"training_speedup_default": 2.0, "step_speedup": 1.5, "training_memory_default": 0.6,
           "training_memory_default_matched": 0.6, "gpu_flop_ratio_sequences": 1.5}
DEFAULT_ARM = f"ours_{BackendConfig().packing}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _configurable_trl(arms: dict) -> dict:
    return {n: a for n, a in arms.items() if a["side"] == "trl" and not a.get("diagnostic")}


def gpu_path_flops(arm: dict, completion_tokens: int) -> float:
    """A TRL arm's FLOPs with its head on the completion tokens only, as on its GPU path: the head FLOPs per
    position it ran, times the completion tokens."""
    per_position = _ratio(arm["head_flops"], arm["head_positions"])
    return arm["flops"] - arm["head_flops"] + per_position * completion_tokens


def training_headline(training: dict) -> dict:
    """The training phase's headline figures (module docstring)."""
    arms = training["arms"]
    ours = {n: a for n, a in arms.items() if a["side"] == "ours"}
    theirs = _configurable_trl(arms)
    out = {}
    if not ours or not theirs:
        return out
    trl_best = min(theirs.values(), key=lambda a: a["step_s"])
    best = min(ours, key=lambda n: ours[n]["step_s"])
    out["training_speedup_best"] = _ratio(trl_best["step_s"], ours[best]["step_s"])
    out["training_arms"] = f"{best} against {min(theirs, key=lambda n: theirs[n]['step_s'])}"
    if DEFAULT_ARM in ours:
        out["training_speedup_default"] = _ratio(trl_best["step_s"], ours[DEFAULT_ARM]["step_s"])
    out |= _memory_headline(ours, theirs)
    fewest = min(gpu_path_flops(a, training["completion_tokens"]) for a in theirs.values())
    for layout in ("sequences", "groups"):
        if f"ours_{layout}" in ours:
            out[f"gpu_flop_ratio_{layout}"] = _ratio(fewest, ours[f"ours_{layout}"]["flops"])
    return out


def largest_forward(arm: dict) -> int:
    """The most positions (rows x width) one forward of the arm ran: its micro-batch's size."""
    return max(rows * width for rows, width in arm["forwards"])


def _memory_headline(ours: dict, theirs: dict) -> dict:
    out = {}
    plain = {n: a for n, a in theirs.items() if "checkpointing" not in n and a.get("peak_mb")}
    default = ours.get(DEFAULT_ARM, {})
    if plain and default.get("peak_mb"):
        out["training_memory_default"] = _ratio(default["peak_mb"], min(a["peak_mb"] for a in plain.values()))
        size = largest_forward(default)
        matched = min(plain, key=lambda n: (abs(largest_forward(plain[n]) - size), -largest_forward(plain[n])))
        out["training_memory_default_matched"] = _ratio(default["peak_mb"], plain[matched]["peak_mb"])
        out["training_memory_matched_arm"] = (f"{matched} ({largest_forward(plain[matched]):,} positions a forward, "
                                              f"ours {size:,})")
    recomputing = [a for n, a in ours.items() if n.endswith("_checkpointing") and a.get("peak_mb")]
    if recomputing and theirs.get("trl_checkpointing", {}).get("peak_mb"):
        out["training_memory_checkpointing"] = _ratio(recomputing[0]["peak_mb"], theirs["trl_checkpointing"]["peak_mb"])
    peaks = [a["peak_mb"] for a in ours.values() if a.get("peak_mb")]
    all_trl = [a["peak_mb"] for a in theirs.values() if a.get("peak_mb")]
    if peaks and all_trl:
        out["training_memory_best"] = _ratio(min(peaks), min(all_trl))
    return out


def headline(results: dict) -> dict:
    """Every headline figure one run's results hold (module docstring)."""
    out = training_headline(results["training"]) if results.get("training") else {}
    g = results.get("generation")
    if g and "vs_trl_best" in g.get("ours", {}):
        out["generation_speedup"] = g["ours"]["vs_trl_best"]
    s = results.get("step")
    if s:
        theirs = _configurable_trl(s["arms"])
        if theirs and "ours" in s["arms"]:
            out["step_speedup"] = _ratio(min(a["step_s"] for a in theirs.values()), s["arms"]["ours"]["step_s"])
    return out


def met(key: str, value: float) -> str:
    target = TARGETS.get(key)
    if target is None:
        return ""
    ok = value <= target if "memory" in key else value >= target
    return f"{'<=' if 'memory' in key else '>='} {target}: {'met' if ok else 'NOT met'}"


# ---------------------------------------------------------------- markdown

def _spread(values: list[float], digits: int) -> str:
    """The median of `values`, with their range where there is more than one."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mid = f"{statistics.median(values):,.{digits}f}"
    return mid if len(values) == 1 else f"{mid} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def _seconds(per_run: list[dict]) -> str:
    """An arm's time: the median of its runs' medians, with the range of every timed step of every run (of the
    runs' medians where the steps are not recorded)."""
    medians = [p.get("step_s") for p in per_run if p.get("step_s") is not None]
    if not medians:
        return "-"
    steps = [s for p in per_run for s in p.get("steps", [])] or medians
    mid = f"{statistics.median(medians):,.2f}"
    return mid if len(steps) == 1 else f"{mid} ({min(steps):,.2f}-{max(steps):,.2f})"


def training_table(runs: list[dict]) -> list[str]:
    arms = runs[0]["training"]["arms"]
    lines = ["| arm | step s, median (range of steps) | vs TRL's best | forward positions | head positions | GFLOP | "
             "peak MiB | memory vs TRL's lowest |", "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        per_run = [r["training"]["arms"].get(name, {}) for r in runs]
        label = f"{name} (DIAGNOSTIC)" if a.get("diagnostic") else name
        lines.append(f"| {label} | {_seconds(per_run)} | "
                     f"{_spread([p.get('vs_trl_best') for p in per_run], 2)} | {a['positions']:,} | "
                     f"{a['head_positions']:,} | {a['flops'] / 1e9:,.0f} | "
                     f"{_spread([p.get('peak_mb') for p in per_run], 0)} | "
                     f"{_spread([p.get('memory_vs_trl_best') for p in per_run], 2)} |")
    return lines


def generation_table(runs: list[dict]) -> list[str]:
    lines = ["| sampler | tokens/s | vs TRL's best |", "|---|---|---|"]
    for name in runs[0]["generation"]:
        per_run = [r["generation"].get(name, {}) for r in runs]
        lines.append(f"| {name} | {_spread([p.get('tokens_per_s') for p in per_run], 1)} | "
                     f"{_spread([p.get('vs_trl_best') for p in per_run], 2)} |")
    return lines


def step_table(runs: list[dict]) -> list[str]:
    lines = ["| arm | step s, median (range of steps) | vs TRL's best | generation s | ms per generated token |",
             "|---|---|---|---|---|"]
    for name in runs[0]["step"]["arms"]:
        per_run = [r["step"]["arms"].get(name, {}) for r in runs]
        lines.append(f"| {name} | {_seconds(per_run)} | "
                     f"{_spread([p.get('vs_trl_best') for p in per_run], 2)} | "
                     f"{_spread([p.get('generation') for p in per_run], 2)} | "
                     f"{_spread([p.get('ms_per_generated_token') for p in per_run], 2)} |")
    return lines


def headline_table(runs: list[dict]) -> list[str]:
    figures = [headline(r) for r in runs]
    keys = [k for k in figures[0] if not isinstance(figures[0][k], str)]
    lines = ["| figure | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | target |",
             "|---|" + "---|" * len(runs) + "---|"]
    for key in keys:
        values = [f.get(key) for f in figures]
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in values)
        verdicts = {met(key, v) for v in values if v is not None}
        lines.append(f"| `{key}` | {cells} | {' / '.join(sorted(verdicts))} |")
    for key in [k for k in figures[0] if isinstance(figures[0][k], str)]:  # which arms the figures set against
        lines.append(f"\n`{key}`: " + "; ".join(f"run {i + 1}: {f.get(key, '-')}" for i, f in enumerate(figures)))
    return lines


def environment_line(runs: list[dict]) -> str:
    """Where each run was measured: runs read together may come from other machines, libraries or code (ratios
    within a run are comparable; absolute times across runs are not)."""
    def one(i: int, env: dict) -> str:
        end = env.get("load_average_end", [float("nan")])[0]
        return (f"run {i + 1}: {env['cpu']}, {env['cpu_capability']}, {env['torch_threads']} torch thread(s), "
                f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, code "
                f"{env.get('commit', 'not recorded')}, load average (1 min) {env['load_average_start'][0]:.1f} at "
                f"the start, {end:.1f} at the end")
    return "\n".join(one(i, r["environment"]) for i, r in enumerate(runs))


def markdown(runs: list[dict]) -> str:
    parts = [environment_line(runs), "", *headline_table(runs)]
    for key, table in (("training", training_table), ("generation", generation_table), ("step", step_table)):
        if all(r.get(key) for r in runs):
            parts += ["", f"{key}:", "", *table(runs)]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.realistic_report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="JSON files written by scripts.bench.realistic --out")
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: not a benchmark result ({e})") from e
    print(markdown(runs))


if __name__ == "__main__":
    main()
