"""Preference pairs: rows of (`prompt`, `chosen`, `rejected`) text from JSONL, Parquet or a Hugging Face dataset.

Every row is checked before training: a missing column, a value that is not text, or an empty `chosen` /
`rejected` is an error naming the source and the row (0-based, blank JSONL lines not counted, as in
`grpo.data.loading`). An empty prompt is allowed (some sets put everything in the responses). Conversational rows
(lists of messages) are not supported: flatten them to text first.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from grpo.data.loading import read_rows
from grpo.errors import ConfigError

FIELDS = ("prompt", "chosen", "rejected")


def read_preference_file(path: str) -> list[dict]:
    """Rows of a JSONL or Parquet file, unchecked; a missing file or a malformed line names the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"preference file {path} does not exist")
    if p.suffix not in (".jsonl", ".json", ".parquet"):
        raise ConfigError(f"preference file {path}: expected .jsonl or .parquet")
    return read_rows(path)


def read_preference_hf(name: str, split: str) -> list[dict]:
    """Rows of a Hugging Face dataset split (from the local cache when the machine is offline)."""
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as e:  # datasets raises many types for a missing name, split or cache entry
        raise ConfigError(f"hf dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from None


def check_preferences(
    rows: list[dict], where: str, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> list[dict]:
    """Rows as ``{"prompt", "chosen", "rejected", **other columns}``; raises ConfigError naming the first bad row."""
    if not rows:
        raise ConfigError(f"{where}: no preference rows")
    columns = dict(zip(FIELDS, (prompt_column, chosen_column, rejected_column)))
    out = []
    for i, row in enumerate(rows):
        clean = {k: v for k, v in row.items() if k not in columns.values()}
        for field, column in columns.items():
            if column not in row:
                raise ConfigError(f"{where}: row {i} has no column {column!r} (the {field} text)")
            value = row[column]
            if not isinstance(value, str):
                raise ConfigError(f"{where}: row {i}, column {column!r}: expected text, got {type(value).__name__}")
            if field != "prompt" and not value.strip():
                raise ConfigError(f"{where}: row {i}, column {column!r}: empty {field} text")
            clean[field] = value
        out.append(clean)
    return out


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded `eval_fraction` of the distinct prompts, with all their pairs, goes to eval.

    Splitting by prompt, not by pair, keeps every held-out prompt unseen in training.
    """
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {eval_fraction}")
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: round(eval_fraction * len(prompts))])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]
