"""The comparison's report: per-run summaries, each arm's mean over seeds with 95% intervals, the
differences the intervals support under Holm's family-wise rule, the table (`compare.md`, `compare.csv`,
`runs.csv`) and the plot.

Intervals are `grpo.compare.intervals`' (its docstring gives the method): every seed of every arm is evaluated on
the same problems, so an arm's accuracy and a difference between arms are taken over the crossed seeds x problems
outcomes of the runs' eval_outcomes.jsonl, paired by seed and by problem; runs that logged no outcomes fall back
to their per-seed accuracies with a bounded problem part. Differences are taken against the first arm and
judged together (Holm over the table's differences at 5%).

Out of distribution, only splits of new problems are pooled (`eval/ood_accuracy` pools every split, which counts
a paraphrase's problems twice); the paraphrase splits (`paraphrases`: the held-out problems rephrased, on the
built-in task `spaced` and `question`) are reported apart, each its own accuracy. The generalisation gap is the
test split against that pool of new problems, which shares none of the test split's, so it is paired by seed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure

from grpo.compare.intervals import (
    Interval,
    accuracy_interval,
    difference_interval,
    holm,
    rates_accuracy,
    rates_difference,
)

FAMILY_LEVEL = 0.05  # Holm's family-wise error rate over a table's differences


def curve(metrics_path: Path, samples_per_step: int, offline: bool, paraphrases: tuple[str, ...] = ()) -> list[dict]:
    """The evaluation points of one run: samples used, training minutes, accuracies and their problem counts.
    An offline run (DPO) spends its samples before its first step. The OOD accuracy is the table's: pooled over
    the splits of new problems, the `paraphrases` left out (`new_problem_accuracy`)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    generated = next((r["dpo/generated_samples"] for r in rows if "dpo/generated_samples" in r), None)
    sizes = {key.split("/")[1]: value for r in rows for key, value in r.items()
             if key.startswith("data/") and key.endswith("/rows")}  # each split's rows, logged at step 0
    points, seconds = [], 0.0
    for r in rows:
        seconds += r.get("time/step_s") or 0.0
        if r.get("eval/accuracy") is None:
            continue
        samples = generated if offline else r["step"] * samples_per_step
        ood, ood_problems = new_problem_accuracy(r, sizes, paraphrases)
        points.append({"step": r["step"], "samples": samples, "minutes": seconds / 60,
                       "accuracy": r["eval/accuracy"], "ood_accuracy": ood, "val_accuracy": r.get("val/accuracy"),
                       "problems": r.get("eval/problems"), "ood_problems": ood_problems})
    return points


def new_problem_accuracy(row: dict, sizes: dict[str, float], paraphrases: tuple[str, ...]) -> tuple:
    """(accuracy, problems) of an evaluation's OOD splits of new problems, each weighted by its rows (`sizes`);
    (None, None) when it has none. `eval/ood_accuracy` pools the paraphrases too, which the table leaves out."""
    prefix, suffix = "eval/ood/", "_accuracy"
    accuracy = {k[len(prefix):-len(suffix)]: v for k, v in row.items() if k.startswith(prefix) and k.endswith(suffix)}
    new = {name: value for name, value in accuracy.items() if name not in paraphrases}
    if not new:
        return None, None
    weight = {name: sizes.get(name, 1.0) for name in new}
    return sum(value * weight[name] for name, value in new.items()) / sum(weight.values()), sum(weight.values())


def outcomes_at(run_dir: Path, step: int) -> dict[str, tuple[str, str]]:
    """Which problems the run's evaluation at `step` solved: split (`test`, `val`, `ood/<name>`) -> (outcomes
    "0110...", prompts' digest). Empty when the run logged none (the last record of a step wins: a resumed run
    may have evaluated it twice)."""
    path = run_dir / "eval_outcomes.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    record = next((r for r in reversed(records) if r["step"] == step), None)
    if record is None:
        return {}
    return {split: (v["solved"], v["digest"]) for split, v in record.items() if split != "step"}


def new_problem_splits(outcomes: dict, paraphrases: tuple[str, ...]) -> list[str]:
    """The out-of-distribution splits of new problems (not paraphrases), in name order."""
    return sorted(s for s in outcomes if s.startswith("ood/") and s.removeprefix("ood/") not in paraphrases)


def shared_outcomes(per_seed: list[dict], splits: list[str]) -> list[str] | None:
    """Each seed's outcomes on `splits`, concatenated: [S] strings over the same problems, or None unless every
    seed logged every split on the same prompts (their digests agree)."""
    if not splits or not per_seed or any(any(s not in o for s in splits) for o in per_seed):
        return None
    if any(o[s][1] != per_seed[0][s][1] for o in per_seed for s in splits):
        return None
    return ["".join(o[s][0] for s in splits) for o in per_seed]


def summarise_run(label: str, seed: int, points: list[dict], wall_s: float, peak_mib: float,
                  final_outcomes: dict | None = None, paraphrases: tuple[str, ...] = ()) -> dict:
    """One run's row: start, final and best held-out accuracy, final OOD accuracy and gap, cost. With the
    final evaluation's outcomes, the OOD accuracy is over the splits of new problems only (paraphrases apart).

    The best evaluation is chosen on the validation split (the first of equal bests) and reported on the
    test split, so choosing it does not bias it; a run without a validation split chooses on the test split."""
    on = "val_accuracy" if all(p["val_accuracy"] is not None for p in points) else "accuracy"
    best = max(points, key=lambda p: p[on])  # the first of equal bests: the earliest
    final = points[-1]
    ood, ood_problems = final["ood_accuracy"], final["ood_problems"]
    new = shared_outcomes([final_outcomes or {}], new_problem_splits(final_outcomes or {}, paraphrases))
    if new:
        ood, ood_problems = new[0].count("1") / len(new[0]), len(new[0])
    gap = None if ood is None else final["accuracy"] - ood
    return {"algorithm": label, "seed": seed, "best_chosen_on": "val" if on == "val_accuracy" else "test",
            "final_step": final["step"], "best_step": best["step"],
            "start_accuracy": points[0]["accuracy"],
            "final_accuracy": final["accuracy"], "best_accuracy": best["accuracy"],
            "final_ood_accuracy": ood, "final_gap": gap,
            "problems": final["problems"], "ood_problems": ood_problems,
            "samples_to_best": best["samples"], "minutes_to_best": best["minutes"],
            "train_minutes": final["minutes"], "wall_minutes": wall_s / 60, "peak_memory_mib": peak_mib}


def summarise_arm(label: str, runs: list[dict], outcomes: list[dict] | None = None,
                  paraphrases: tuple[str, ...] = ()) -> dict:
    """An arm's row: means over its seeds, intervals for the accuracies, the gap and each paraphrase split.
    `outcomes`: per seed, {"final": outcomes_at(final step), "best": outcomes_at(best step)}."""
    n, n_ood = runs[0]["problems"] or 1, runs[0]["ood_problems"]
    final = [o.get("final", {}) for o in outcomes] if outcomes and len(outcomes) == len(runs) else [{}] * len(runs)
    best = [o.get("best", {}) for o in outcomes] if outcomes and len(outcomes) == len(runs) else [{}] * len(runs)
    row = {"algorithm": label, "seeds": len(runs)}
    for key in ("start_accuracy", "samples_to_best", "minutes_to_best", "train_minutes", "wall_minutes"):
        row[key] = sum(r[key] for r in runs) / len(runs)
    row["peak_memory_mib"] = max(r["peak_memory_mib"] for r in runs)
    test, best_test = shared_outcomes(final, ["test"]), shared_outcomes(best, ["test"])
    row["final_accuracy"] = accuracy_interval(test) if test else rates_accuracy([r["final_accuracy"] for r in runs], n)
    row["best_accuracy"] = (accuracy_interval(best_test) if best_test
                            else rates_accuracy([r["best_accuracy"] for r in runs], n))
    new = shared_outcomes(final, new_problem_splits(final[0], paraphrases))
    row["final_ood_accuracy"] = row["final_gap"] = None
    if new:
        row["final_ood_accuracy"] = accuracy_interval(new)
        row["final_gap"] = difference_interval(test, new, same_problems=False) if test else None
    elif n_ood and all(r["final_ood_accuracy"] is not None for r in runs):
        ood = [r["final_ood_accuracy"] for r in runs]
        row["final_ood_accuracy"] = rates_accuracy(ood, n_ood)
        row["final_gap"] = rates_difference([r["final_accuracy"] for r in runs], ood, n, n_ood)
    row["paraphrases"] = {name: accuracy_interval(bits) for name in paraphrases
                          if (bits := shared_outcomes(final, [f"ood/{name}"]))}
    return row


def differences(runs_by_arm: dict[str, list[dict]], outcomes_by_arm: dict[str, list[dict]] | None = None,
                paraphrases: tuple[str, ...] = ()) -> list[dict]:
    """Each arm against the first on final held-out and final OOD accuracy (new problems only), paired by seed,
    and by problem where every seed's two runs logged their outcomes on the same problems (`outcomes_by_arm`:
    per arm, per seed, {"final": outcomes_at(...)}); judged together by Holm's rule (`supported`)."""
    arms, outcomes_by_arm = list(runs_by_arm), outcomes_by_arm or {}
    base, out = arms[0], []
    finals = {arm: [o.get("final", {}) for o in outcomes_by_arm.get(arm, [])] for arm in arms}
    for other in arms[1:]:
        a, b = runs_by_arm[other], runs_by_arm[base]
        for key, size in (("final_accuracy", "problems"), ("final_ood_accuracy", "ood_problems")):
            if a[0][size] is None or any(r[key] is None for r in a + b):
                continue
            splits = ["test"] if key == "final_accuracy" else new_problem_splits(
                finals[other][0] if finals[other] else {}, paraphrases)
            x, y = shared_outcomes(finals[other], splits), shared_outcomes(finals[base], splits)
            if x and y and len(x) == len(a) == len(y) and all(finals[other][0][s][1] == finals[base][0][s][1]
                                                              for s in splits):
                interval, paired = difference_interval(x, y), "seed and problem"
            else:
                interval = rates_difference([r[key] for r in a], [r[key] for r in b], a[0][size])
                paired = "seed"
            out.append({"arm": other, "against": base, "metric": key, "difference": interval,
                        "p_value": interval.p_value, "paired_by": paired})
    for d, adjusted in zip(out, holm([d["p_value"] for d in out])):
        d["p_holm"], d["supported"] = adjusted, adjusted < FAMILY_LEVEL
    return out


COLUMNS = [("algorithm", "algorithm", "{}"), ("seeds", "seeds", "{}"), ("start_accuracy", "start acc", "{:.3f}"),
           ("final_accuracy", "final acc [95% CI]", "{}"), ("best_accuracy", "best acc [95% CI]", "{}"),
           ("final_ood_accuracy", "final OOD acc [95% CI]", "{}"), ("final_gap", "gap ID - OOD [95% CI]", "{}"),
           ("samples_to_best", "samples to best", "{:,.0f}"), ("minutes_to_best", "min to best", "{:.2f}"),
           ("train_minutes", "train min", "{:.2f}"), ("wall_minutes", "wall min", "{:.2f}"),
           ("peak_memory_mib", "peak RSS MiB", "{:.0f}")]


def cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def family_rule(diffs: list[dict]) -> str:
    """The family-wise rule, as printed with the table."""
    return (f"Family-wise rule: Holm's step-down procedure over these {len(diffs)} differences at "
            f"{FAMILY_LEVEL:.0%}: a difference is supported when its Holm-adjusted p-value is below "
            f"{FAMILY_LEVEL}, which bounds the chance of any false \"supported\" in this table by "
            f"{FAMILY_LEVEL:.0%}. Each interval is a 95% interval on its own (not adjusted).")


def difference_lines(diffs: list[dict]) -> list[str]:
    """One sentence per difference: its interval and its verdict under the family-wise rule."""
    lines = []
    for d in diffs:
        what = "held-out" if d["metric"] == "final_accuracy" else "out-of-distribution (new problems)"
        p = f"Holm-adjusted p = {d['p_holm']:.3g}"
        verdict = f"supported ({p} < {FAMILY_LEVEL})" if d["supported"] else f"not supported ({p})"
        lines.append(f"{d['arm']} - {d['against']}, final {what} accuracy: {d['difference']}: {verdict}; "
                     f"paired by {d['paired_by']}")
    return lines


def paraphrase_lines(arms: list[dict]) -> list[str]:
    """Each paraphrase split's accuracy per arm: the held-out problems rephrased, not new problems."""
    names = sorted({name for r in arms for name in r.get("paraphrases", {})})
    return [f"{name}: " + "; ".join(f"{r['algorithm']} {r['paraphrases'][name]}" for r in arms
                                    if name in r.get("paraphrases", {})) for name in names]


def write_report(arms: list[dict], runs: list[dict], diffs: list[dict], out_dir: Path, notes: list[str]) -> Path:
    """`compare.md` (the arms' table, the differences, the notes), `compare.csv` (the arms) and `runs.csv`
    (every run); returns the markdown's path."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[k], f) for k, _, f in COLUMNS) + " |" for r in arms]
    lines += ["", "Differences (the first arm is the reference):", ""]
    lines += [f"- {line}" for line in difference_lines(diffs)] or ["- none (one arm)"]
    if diffs:
        lines += ["", family_rule(diffs)]
    paraphrase = paraphrase_lines(arms)
    if paraphrase:
        lines += ["", "Paraphrase splits (held-out problems rephrased: not new problems, so not in the OOD "
                  "column; final accuracy [95% CI]):", ""] + [f"- {line}" for line in paraphrase]
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
