"""``reasoning_gym``: each row of a reasoning-gym task scored by its own dataset's ``score_answer``.

The row carries what the scorer needs (grpo/data/reasoning_gym.py): the dataset's name (``rg_dataset``), the
generated entry (``rg_entry``, written by ``dump_entry``) and the dataset's config (``rg_options``). The
scorer is the dataset built with that config, so a dataset whose check depends on its settings scores
as it would in reasoning-gym. Scores are the dataset's: 1.0 right, 0.0 wrong, and some datasets give
partial credit (a near answer, a right answer in the wrong form); ``eval/accuracy`` counts only 1.0.

The answer is what reasoning-gym's own evaluation reads: the text inside the completion's last
``<answer>...</answer>`` (``answer_tag``), and no answer (scored by the dataset, 0.0 for most) when there is
none. ``answer_tag=null`` scores the whole completion, stripped, for models not asked for the tag.

Entries are JSON with tuples kept as tuples (``{"__tuple__": [...]}``): some datasets compare the answer
with tuples in the metadata (arc_agi's grids), which plain JSON would turn into lists that never match;
dicts with integer keys are kept the same way (``{"__items__": [[k, v], ...]}``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import reasoning_gym
from reasoning_gym.utils import extract_answer

from rewards.registry import Reward, RewardConfigError

TUPLE, ITEMS = "__tuple__", "__items__"  # tags of a tuple, and of a dict whose keys are not all text


def dump_entry(entry: dict) -> str:
    """A generated entry as JSON, tuples and dicts with non-text keys (graph_color's colourings) tagged so
    that `load_entry` gives them back as they were; TypeError for what JSON cannot hold (sets, objects)."""
    return json.dumps(_tag(entry))


def load_entry(text: str) -> dict:
    return json.loads(text, object_hook=_untag)


def _tag(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {TUPLE: [_tag(x) for x in obj]}
    if isinstance(obj, list):
        return [_tag(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _tag(v) for k, v in obj.items()}
        return {ITEMS: [[_tag(k), _tag(v)] for k, v in obj.items()]}
    return obj


def _untag(d: dict) -> Any:
    if d.keys() == {TUPLE}:
        return tuple(d[TUPLE])
    if d.keys() == {ITEMS}:
        return {k: v for k, v in d[ITEMS]}
    return d


@lru_cache(maxsize=256)
def scorer(name: str, options: str):
    """The `score_answer` of dataset `name` built with its config `options` (JSON)."""
    return reasoning_gym.create_dataset(name, size=1, seed=0, **json.loads(options)).score_answer


def reasoning_gym_reward(prompts: list[str], completions: list[str], rg_dataset: list[str], rg_entry: list[str],
                         rg_options: list[str] | None = None, answer_tag: str | None = "answer") -> list[float | None]:
    """The dataset's score of each completion's answer; None for a row that is not a reasoning-gym row."""
    options = rg_options or ["{}"] * len(completions)
    scores: list[float | None] = []
    for completion, name, entry, opts in zip(completions, rg_dataset, rg_entry, options):
        if not name or not entry:
            scores.append(None)
            continue
        answer = extract_answer(completion, tag_name=answer_tag) if answer_tag else completion.strip()
        scores.append(float(scorer(name, opts or "{}")(answer, load_entry(entry))))
    return scores


def _check_options(answer_tag: str | None = "answer") -> None:
    if answer_tag is not None and (not isinstance(answer_tag, str) or not answer_tag.isidentifier()):
        raise RewardConfigError(f"reasoning_gym: answer_tag must be a tag name (e.g. 'answer') or null, "
                                f"got {answer_tag!r}")


REASONING_GYM = Reward(reasoning_gym_reward, check_options=_check_options)  # rewards.catalog: reasoning_gym
