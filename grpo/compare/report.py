"""The comparison's report: per-run summaries, each arm's mean over seeds with 95% intervals, the
differences the intervals support, the table (`compare.md`, `compare.csv`, `runs.csv`) and the plot.

Intervals are `grpo.compare.intervals`' two-level bootstrap (over seeds, and over the evaluation problems of each
seed). Differences are taken against the first arm, paired by seed, and by problem where both runs of a seed
logged which of the same problems they solved (their eval_outcomes.jsonl).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure

from grpo.compare.intervals import Interval, bootstrap_interval, paired_difference, paired_problem_difference

# The accuracies a difference is taken on, and the split of eval_outcomes.jsonl each is measured on.
DIFFERENCE_SPLITS = {"final_accuracy": "test", "final_ood_accuracy": "ood"}


def curve(metrics_path: Path, samples_per_step: int, offline: bool) -> list[dict]:
    """The evaluation points of one run: samples used, training minutes, accuracies and their problem counts.
    An offline run (DPO) spends its samples before its first step."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    generated = next((r["dpo/generated_samples"] for r in rows if "dpo/generated_samples" in r), None)
    points, seconds = [], 0.0
    for r in rows:
        seconds += r.get("time/step_s") or 0.0
        if r.get("eval/accuracy") is None:
            continue
        samples = generated if offline else r["step"] * samples_per_step
        points.append({"step": r["step"], "samples": samples, "minutes": seconds / 60,
                       "accuracy": r["eval/accuracy"], "ood_accuracy": r.get("eval/ood_accuracy"),
                       "val_accuracy": r.get("val/accuracy"),
                       "problems": r.get("eval/problems"), "ood_problems": r.get("eval/ood_problems")})
    return points


def outcomes_at(run_dir: Path, step: int) -> dict[str, tuple[str, str]]:
    """Which problems the run's evaluation at `step` solved: split -> (outcomes "0110...", prompts' digest), with
    the out-of-distribution splits pooled as "ood" (in name order, as `eval/ood_accuracy` pools them). Empty
    when the run logged none (the last record of a step wins: a resumed run may have evaluated it twice)."""
    path = run_dir / "eval_outcomes.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    record = next((r for r in reversed(records) if r["step"] == step), None)
    if record is None:
        return {}
    out = {split: (v["solved"], v["digest"]) for split, v in record.items() if split in ("test", "val")}
    ood = sorted(split for split in record if split.startswith("ood/"))
    if ood:
        out["ood"] = ("".join(record[s]["solved"] for s in ood), "+".join(record[s]["digest"] for s in ood))
    return out


def summarise_run(label: str, seed: int, points: list[dict], wall_s: float, peak_mib: float) -> dict:
    """One run's row: start, final and best held-out accuracy, final OOD accuracy and gap, cost.

    The best evaluation is chosen on the validation split (the first of equal bests) and reported on the
    test split, so choosing it does not bias it; a run without a validation split chooses on the test split."""
    on = "val_accuracy" if all(p["val_accuracy"] is not None for p in points) else "accuracy"
    best = max(points, key=lambda p: p[on])  # the first of equal bests: the earliest
    final = points[-1]
    gap = None if final["ood_accuracy"] is None else final["accuracy"] - final["ood_accuracy"]
    return {"algorithm": label, "seed": seed, "best_chosen_on": "val" if on == "val_accuracy" else "test",
            "start_accuracy": points[0]["accuracy"],
            "final_accuracy": final["accuracy"], "best_accuracy": best["accuracy"],
            "final_ood_accuracy": final["ood_accuracy"], "final_gap": gap,
            "problems": final["problems"], "ood_problems": final["ood_problems"],
            "samples_to_best": best["samples"], "minutes_to_best": best["minutes"],
            "train_minutes": final["minutes"], "wall_minutes": wall_s / 60, "peak_memory_mib": peak_mib}


def summarise_arm(label: str, runs: list[dict]) -> dict:
    """An arm's row: means over its seeds, intervals for the accuracies and the gap."""
    n, n_ood = runs[0]["problems"] or 1, runs[0]["ood_problems"]
    row = {"algorithm": label, "seeds": len(runs)}
    for key in ("start_accuracy", "samples_to_best", "minutes_to_best", "train_minutes", "wall_minutes"):
        row[key] = sum(r[key] for r in runs) / len(runs)
    row["peak_memory_mib"] = max(r["peak_memory_mib"] for r in runs)
    row["final_accuracy"] = bootstrap_interval([r["final_accuracy"] for r in runs], n)
    row["best_accuracy"] = bootstrap_interval([r["best_accuracy"] for r in runs], n)
    if n_ood and all(r["final_ood_accuracy"] is not None for r in runs):
        ood = [r["final_ood_accuracy"] for r in runs]
        row["final_ood_accuracy"] = bootstrap_interval(ood, n_ood)
        row["final_gap"] = paired_difference([r["final_accuracy"] for r in runs], ood, n, n_ood)
    else:
        row["final_ood_accuracy"] = row["final_gap"] = None
    return row


def differences(runs_by_arm: dict[str, list[dict]], outcomes_by_arm: dict[str, list[dict]] | None = None
                ) -> list[dict]:
    """Each arm against the first on final held-out and final OOD accuracy, paired by seed, and by problem
    where every seed's two runs logged their outcomes on the same problems (`outcomes_by_arm`: per arm, per
    seed, `outcomes_at`'s dict)."""
    arms, outcomes_by_arm = list(runs_by_arm), outcomes_by_arm or {}
    base, out = arms[0], []
    for other in arms[1:]:
        a, b = runs_by_arm[other], runs_by_arm[base]
        for key, size in (("final_accuracy", "problems"), ("final_ood_accuracy", "ood_problems")):
            if a[0][size] is None or any(r[key] is None for r in a + b):
                continue
            split = DIFFERENCE_SPLITS[key]
            pairs = [(x.get(split), y.get(split)) for x, y in zip(outcomes_by_arm.get(other, []),
                                                                 outcomes_by_arm.get(base, []))]
            if len(pairs) == len(a) and all(x and y and x[1] == y[1] for x, y in pairs):  # the same problems
                paired = "seed and problem"
                interval = paired_problem_difference([x[0] for x, _ in pairs], [y[0] for _, y in pairs])
            else:
                interval, paired = paired_difference([r[key] for r in a], [r[key] for r in b], a[0][size]), "seed"
            out.append({"arm": other, "against": base, "metric": key, "difference": interval,
                        "supported": interval.excludes_zero(), "paired_by": paired})
    return out


COLUMNS = [("algorithm", "algorithm", "{}"), ("seeds", "seeds", "{}"), ("start_accuracy", "start acc", "{:.3f}"),
           ("final_accuracy", "final acc [95% CI]", "{}"), ("best_accuracy", "best acc [95% CI]", "{}"),
           ("final_ood_accuracy", "final OOD acc [95% CI]", "{}"), ("final_gap", "gap ID - OOD [95% CI]", "{}"),
           ("samples_to_best", "samples to best", "{:,.0f}"), ("minutes_to_best", "min to best", "{:.2f}"),
           ("train_minutes", "train min", "{:.2f}"), ("wall_minutes", "wall min", "{:.2f}"),
           ("peak_memory_mib", "peak RSS MiB", "{:.0f}")]


def cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def difference_lines(diffs: list[dict]) -> list[str]:
    """One sentence per difference, saying whether its interval excludes zero."""
    lines = []
    for d in diffs:
        what = "held-out" if d["metric"] == "final_accuracy" else "out-of-distribution"
        verdict = "supported (the interval excludes 0)" if d["supported"] else "not supported (the interval includes 0)"
        lines.append(f"{d['arm']} - {d['against']}, final {what} accuracy: {d['difference']}: {verdict}; "
                     f"paired by {d['paired_by']}")
    return lines


def write_report(arms: list[dict], runs: list[dict], diffs: list[dict], out_dir: Path, notes: list[str]) -> Path:
    """`compare.md` (the arms' table, the differences, the notes), `compare.csv` (the arms) and `runs.csv`
    (every run); returns the markdown's path."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[k], f) for k, _, f in COLUMNS) + " |" for r in arms]
    lines += ["", "Differences (the first arm is the reference):", ""]
    lines += [f"- {line}" for line in difference_lines(diffs)] or ["- none (one arm)"]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    md = out_dir / "compare.md"
    md.write_text("\n".join(lines) + "\n")
    with (out_dir / "compare.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        header = []
        for key, _, _ in COLUMNS:
            header += [key, f"{key}_low", f"{key}_high"] if isinstance(arms[0][key], Interval) else [key]
        writer.writerow(header)
        for r in arms:
            row = []
            for key, _, _ in COLUMNS:
                value = r[key]
                row += [value.mean, value.low, value.high] if isinstance(value, Interval) else [value]
            writer.writerow(row)
    with (out_dir / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    return md


def plot(curves: dict[str, list[list[dict]]], path: Path) -> Path:
    """Each arm's mean held-out accuracy (solid) and OOD accuracy (dashed) over its seeds, against samples
    and against minutes, with a band from the lowest to the highest seed."""
    fig = Figure(figsize=(11, 4))  # no pyplot: no GUI backend, no global state
    axes = fig.subplots(1, 2, sharey=True)
    for i, (label, seeds) in enumerate(curves.items()):
        length = min(len(points) for points in seeds)  # evaluation points every seed reached
        for ax, x in zip(axes, ("samples", "minutes")):
            xs = [sum(p[k][x] for p in seeds) / len(seeds) for k in range(length)]
            acc = [[p[k]["accuracy"] for p in seeds] for k in range(length)]
            ax.plot(xs, [sum(a) / len(a) for a in acc], "-o", ms=3, color=f"C{i}", label=label)
            ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc], color=f"C{i}", alpha=0.15)
            if all(p[k]["ood_accuracy"] is not None for p in seeds for k in range(length)):
                ood = [sum(p[k]["ood_accuracy"] for p in seeds) / len(seeds) for k in range(length)]
                ax.plot(xs, ood, "--", color=f"C{i}", alpha=0.6)
    axes[0].set_xlabel("generated samples")
    axes[1].set_xlabel("training minutes")
    axes[0].set_ylabel("greedy accuracy, mean over seeds (solid: held-out, dashed: OOD; band: seed range)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
