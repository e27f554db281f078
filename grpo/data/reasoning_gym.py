"""reasoning-gym's procedural tasks (about a hundred: arithmetic, algebra, logic, puzzles, games) as
single-turn rows, generated in code, each scored by its own dataset's verifier (the `reasoning_gym`
reward, rewards/reasoning_tasks.py).

A row is `{"prompt": question, "answer": gold or None, "rg_dataset": name, "rg_entry": JSON,
"rg_options": JSON, "problem_key": "name:digest of the question"}`: `rg_entry` is the generated entry (question,
answer, metadata; written by `rewards.reasoning_tasks.dump_entry`) and `rg_options` the dataset's config, so the
reward rebuilds the scorer that made the row, and a row written to a JSONL file still scores the same.

Splits. reasoning_gym draws item i of a dataset from `Random(seed + i)`, so two splits with neighbouring
seeds would share almost every item. Each split draws from its own range of seeds (`SPLIT_OFFSETS`, 2**40
apart), and so does each value of `seed` (`SEED_STRIDE`): seeds 0 and 1 give unrelated rows. A question
already in an earlier split (compared as grpo.data.contamination compares prompts) is left out of the later
ones, in the order test, validation, training: small problem spaces (one-digit sums) repeat across seeds.
The training split may so hold a few rows fewer than `size`; the held-out splits hold what was asked
where the space allows (each draws up to `MAX_DRAWS` times its size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import reasoning_gym
from reasoning_gym.factory import DATASETS

from grpo.data.contamination import normalise, text_digest
from rewards.reasoning_tasks import dump_entry

SPLIT_OFFSETS = {"test": 2**40, "val": 2**41, "train": 0}  # seed ranges; generated in this order
SEED_STRIDE = 2**44  # task.reasoning_gym.seed s draws from [s * SEED_STRIDE, (s + 1) * SEED_STRIDE)
MAX_DRAWS = 4  # a held-out split draws up to this many times its size to find unseen questions


def check_names(names: list[str]) -> None:
    """Every name is a registered reasoning_gym dataset; ValueError naming the unknown ones."""
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} not among reasoning_gym's {len(DATASETS)} datasets "
                         f"(e.g. {', '.join(sorted(DATASETS)[:6])}, ...)")


def to_row(name: str, entry: dict, options: dict) -> dict:
    """One generated entry as a row whose columns are all text (JSON where structured)."""
    record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
    try:
        text = dump_entry(record)
    except TypeError as e:
        raise ValueError(f"{name}: its entries cannot be written as JSON ({e}); not supported") from None
    answer = entry["answer"]
    return {"prompt": entry["question"], "answer": None if answer is None else str(answer),
            "rg_dataset": name, "rg_entry": text, "rg_options": json.dumps(options, sort_keys=True),
            "problem_key": f"{name}:{text_digest(entry['question'])}"}


@dataclass
class ReasoningGym:
    """Rows of the named datasets, `size` training, `num_eval` test and `num_val` validation rows of each."""

    names: list[str]
    size: int = 1000
    num_eval: int = 100
    num_val: int = 100
    seed: int = 0
    options: dict[str, dict] = field(default_factory=dict)

    def splits(self) -> dict[str, list[dict]]:
        """{"train", "test", "val"} -> rows; no question stands in two splits."""
        check_names(self.names)
        out: dict[str, list[dict]] = {split: [] for split in SPLIT_OFFSETS}
        for name in self.names:
            seen: set[str] = set()
            wanted = {"test": self.num_eval, "val": self.num_val, "train": self.size}
            for split, offset in SPLIT_OFFSETS.items():
                draws = wanted[split] if split == "train" else wanted[split] * MAX_DRAWS
                rows = self.generate(name, draws, self.seed * SEED_STRIDE + offset, unseen=seen)[: wanted[split]]
                seen.update(normalise(r["prompt"]) for r in rows)
                out[split].extend(rows)
        return out

    def generate(self, name: str, size: int, seed: int, *, unseen: set[str]) -> list[dict]:
        """`size` entries of dataset `name` from `seed`, less repeats and those whose question is in `unseen`
        (compared as grpo.data.contamination compares prompts: lower case, spaces collapsed)."""
        if size == 0:
            return []
        options = dict(self.options.get(name, {}))
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
        rows, questions = [], set(unseen)
        for entry in dataset:
            key = normalise(entry["question"])
            if key not in questions:
                questions.add(key)
                rows.append(to_row(name, entry, options))
        return rows
