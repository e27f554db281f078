"""Train/eval hygiene: duplicate prompts and overlap between training and evaluation prompts.

Two checks, reported for every evaluation split (`contamination.json` in the run directory and
`data/...` metrics at step 0):
- exact: an evaluation prompt equals a training prompt after normalisation (lower case, one space
  between words, spaces around symbols ignored);
- n-gram: an evaluation prompt shares a word n-gram with some training prompt (GPT-3's decontamination
  check, there with 13-grams over documents). A prompt shorter than n words counts as one n-gram.
Duplicates within a split are dropped, and so are evaluation prompts that occur exactly in training:
an accuracy measured on them would be memorisation. N-gram overlap is reported, not removed: for short
templated prompts (arithmetic) it says the template is shared, which is the point of an in-distribution set.
A held-out split that dropping empties, or leaves under `task.min_eval_rows`, is an error (`check_held_out`):
an accuracy over a handful of rows, or none, is not a measurement.
"""

from __future__ import annotations

import hashlib
import re

from grpo.errors import ConfigError

_TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and single symbols: '37 + 52=' and '37+52 =' give the same words."""
    return _TOKEN.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def text_digest(text: str) -> str:
    """16 hex digits of the SHA-256 of `text` as normalised here: texts that count as the same prompt (case and
    spacing aside) share it, on every machine and Python."""
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of `text`; the whole prompt as one gram when it has fewer than n words."""
    w = words(text)
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def deduplicate(rows: list[dict]) -> tuple[list[dict], int]:
    """Rows with the first occurrence of each normalised prompt kept; and how many were dropped."""
    seen, out = set(), []
    for row in rows:
        key = normalise(row["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


def overlap(train_rows: list[dict], eval_rows: list[dict], n: int) -> dict[str, float]:
    """Share of `eval_rows` whose prompt occurs exactly in training, and share sharing a word n-gram."""
    exact_train = {normalise(r["prompt"]) for r in train_rows}
    grams_train: set = set()
    for r in train_rows:
        grams_train |= ngrams(r["prompt"], n)
    exact = sum(normalise(r["prompt"]) in exact_train for r in eval_rows)
    gram = sum(not ngrams(r["prompt"], n).isdisjoint(grams_train) for r in eval_rows)
    total = max(len(eval_rows), 1)
    return {"exact_overlap": exact / total, "ngram_overlap": gram / total}


def decontaminate(train_rows: list[dict], splits: dict[str, list[dict]], n: int,
                  drop: bool = True) -> tuple[list[dict], dict, dict]:
    """Deduplicate every split, drop evaluation prompts seen exactly in training (unless `drop` is
    false: evaluating on training prompts on purpose); returns (train rows, evaluation splits, report).
    The report holds, per split, the overlap measured before anything was dropped, so a contaminated
    source is visible, not silently repaired."""
    train_rows, train_dupes = deduplicate(train_rows)
    exact_train = {normalise(r["prompt"]) for r in train_rows}
    report: dict = {"ngram": n, "train": {"rows": len(train_rows), "duplicates_dropped": train_dupes}}
    clean = {}
    for name, rows in splits.items():
        rows, dupes = deduplicate(rows)
        stats = overlap(train_rows, rows, n)
        kept = [r for r in rows if not drop or normalise(r["prompt"]) not in exact_train]
        report[name] = {"rows": len(kept), "duplicates_dropped": dupes, "exact_dropped": len(rows) - len(kept), **stats}
        clean[name] = kept
    return train_rows, clean, report


def report_metrics(report: dict) -> dict[str, float]:
    """The report as flat `data/<split>/<stat>` metrics."""
    return {f"data/{split}/{k}": float(v) for split, stats in report.items() if isinstance(stats, dict)
            for k, v in stats.items()}


def check_held_out(report: dict, minimum: int) -> None:
    """Refuse a held-out split of the `decontaminate` report from which rows were dropped and fewer than
    `minimum` (`task.min_eval_rows`) are left, naming the counts and the options that change it."""
    for name, stats in report.items():
        if name == "train" or not isinstance(stats, dict):
            continue
        dropped, kept = stats["duplicates_dropped"] + stats["exact_dropped"], stats["rows"]
        if dropped and kept < minimum:
            raise ConfigError(
                f"task: decontamination left {kept} of {kept + dropped} rows in the held-out split {name!r} "
                f"({stats['exact_dropped']} seen exactly in training, {stats['duplicates_dropped']} duplicates), "
                f"under task.min_eval_rows={minimum}; hold out problems that training does not have, lower "
                f"task.min_eval_rows, or set task.drop_contaminated=false to evaluate on training prompts")
