"""Prompt datasets: a built-in task, local JSONL/Parquet files, or a Hugging Face dataset.

Every source becomes a list of rows (dicts). The prompt column is formatted into the prompt
text; every other column travels with it to the reward functions (e.g. `answer`, `tests`).
Every row has a `problem_key` (`problem_key`): the same problem keeps it in every split and phrasing, so
evaluations of different splits can be paired by problem.
`PromptSampler` walks the rows in a seeded shuffled order, epoch after epoch, and its position
is part of every checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from grpo.builtin.arithmetic import Arithmetic
from grpo.config import EnvConfig, TaskConfig
from grpo.data.contamination import text_digest
from grpo.envs import environment_rows
from grpo.errors import ConfigError


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL or Parquet file; a malformed line is an error naming the file and line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"task: data file {path} does not exist")
    if p.suffix == ".parquet":
        return pq.read_table(p).to_pylist()
    if p.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"task: data file {path}: expected .jsonl or .parquet")
    rows = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _hf_rows(name: str, split: str) -> list[dict]:
    import datasets  # about a second at import (pandas, its arrow tables): paid by a run that reads a hub dataset

    return list(datasets.load_dataset(name, split=split))


def arithmetic(task: TaskConfig) -> Arithmetic:
    """The built-in arithmetic task that `task.arithmetic` describes."""
    a = task.arithmetic
    return Arithmetic(digits=a.digits, reverse=a.reverse, num_eval=a.num_eval, op=a.op, digits_b=a.digits_b,
                      style=a.style, max_carries=a.max_carries)


def load_task(task: TaskConfig, required_columns: set[str],
              env: EnvConfig | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), each row with a formatted `prompt`; checks columns before training. `env`: the
    run's environment, whose own rows `task.builtin=env` takes."""
    if task.builtin == "env":
        splits = env_splits(env)
        train, evals, where = splits["train"], splits.get("test", []), f"env {env.name}"
    elif task.builtin == "arithmetic":
        gen = arithmetic(task)
        train, evals, where = gen.train_rows(), gen.eval_rows(), "task arithmetic"
    elif task.builtin == "reasoning_gym":
        splits = reasoning_gym_splits(task)
        train, evals, where = splits["train"], splits["test"], "task reasoning_gym"
    elif task.train_file:
        train, where = read_rows(task.train_file), task.train_file
        evals = read_rows(task.eval_file) if task.eval_file else []
    else:
        train, where = _hf_rows(task.hf_dataset, task.hf_train_split), task.hf_dataset
        evals = _hf_rows(task.hf_dataset, task.hf_eval_split) if task.hf_eval_split else []
    if not train:
        raise ConfigError(f"task: {where} has no rows")
    train = [format_row(r, task, where, i) for i, r in enumerate(train)]
    evals = [format_row(r, task, task.eval_file or where, i) for i, r in enumerate(evals)]
    for rows, name in ((train, where), (evals, task.eval_file or where)):
        for i, row in enumerate(rows):
            missing = required_columns - row.keys()
            if missing:
                raise ConfigError(
                    f"{name}: row {i} lacks column(s) {', '.join(sorted(missing))} that the rewards need"
                )
        check_column_types(rows, name)
    return train, evals


def env_splits(env: EnvConfig | None) -> dict[str, list[dict]]:
    """The rows of the environment `env` names (grpo.envs.environment_rows); ConfigError naming the field."""
    if env is None or not env.name:
        raise ConfigError("task.builtin=env: the rows come from the environment; set env.name")
    try:
        return environment_rows(env.name, dict(env.kwargs))
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(f"task.builtin=env: {e}") from e


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"  # JSON does not tell 1 from 1.0
    return type(value).__name__


def check_column_types(rows: list[dict], where: str) -> None:
    """Each column holds one kind of value in every row (nulls allowed): a row whose `answer` is a list
    where the others hold text is an error naming the row, not a reward that fails mid-run."""
    first: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            kind = _kind(value)
            if kind == "null":
                continue
            seen = first.setdefault(key, (i, kind))
            if seen[1] != kind:
                raise ConfigError(f"{where}: row {i}, column {key!r}: {kind} {value!r:.60}, "
                                  f"but row {seen[0]} holds a {seen[1]}")


def check_prompt_lengths(train: list[dict], evals: list[dict], tokenizer, *, context: int | None,
                         max_new_tokens: int, where: str) -> None:
    """Every prompt plus `rollout.max_new_tokens` fits the model's context; else an error naming the row."""
    if not context:
        return
    budget = context - max_new_tokens
    for rows, name in ((train, where), (evals, f"{where} (eval)")):
        if not rows:
            continue
        lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > budget:
                raise ConfigError(f"{name}: row {i}: the prompt is {n} tokens; with rollout.max_new_tokens="
                                  f"{max_new_tokens} it exceeds the model's context of {context} tokens")


def load_val_split(task: TaskConfig, required_columns: set[str]) -> list[dict]:
    """The validation split (`val/accuracy`: best checkpoint, early stopping), apart from the test split:
    the built-in task's `num_val` problems after its test problems, or `task.val_file`; [] if neither."""
    if task.val_file:
        where = task.val_file
        rows = [format_row(r, task, where, i) for i, r in enumerate(read_rows(where))]
    elif task.builtin == "arithmetic" and task.arithmetic.num_val:
        gen = arithmetic(task)
        where = "task.arithmetic.num_val"
        try:
            rows = gen.val_rows(task.arithmetic.num_val)
        except ValueError as e:
            raise ConfigError(f"task.arithmetic.num_val: {e}") from None
    elif task.builtin == "reasoning_gym" and task.reasoning_gym.num_val:
        where = "task.reasoning_gym.num_val"
        rows = [format_row(r, task, where, i) for i, r in enumerate(reasoning_gym_splits(task)["val"])]
    else:
        return []
    for i, row in enumerate(rows):
        missing = required_columns - row.keys()
        if missing:
            raise ConfigError(f"{where}: row {i} lacks column(s) {', '.join(sorted(missing))} that the rewards need")
    return rows


def reasoning_gym_splits(task: TaskConfig) -> dict[str, list[dict]]:
    """The `train`, `test` and `val` rows of `task.reasoning_gym` (grpo.data.reasoning_gym)."""
    from grpo.data.reasoning_gym import ReasoningGym  # its package imports its ~100 generators (and sympy): 1-2 s

    rg = task.reasoning_gym
    gen = ReasoningGym(names=list(rg.names), size=rg.size, num_eval=rg.num_eval, num_val=rg.num_val, seed=rg.seed,
                       options={name: dict(opts) for name, opts in rg.options.items()})
    try:
        return gen.splits()
    except ValueError as e:  # an unknown name, or a dataset's own check of its options
        raise ConfigError(f"task.reasoning_gym: {e}") from None


def load_ood_splits(task: TaskConfig, required_columns: set[str]) -> dict[str, list[dict]]:
    """Out-of-distribution evaluation splits: the built-in task's own, or `task.ood_files` (name -> file)."""
    splits: dict[str, list[dict]] = {}
    if task.builtin == "arithmetic" and task.arithmetic.num_ood:
        gen = arithmetic(task)
        names = tuple(task.arithmetic.ood_splits) if task.arithmetic.ood_splits is not None else None
        splits.update(gen.ood_splits(task.arithmetic.num_ood, names))
    for name, path in task.ood_files.items():
        rows = [format_row(r, task, path, i) for i, r in enumerate(read_rows(path))]
        for i, row in enumerate(rows):
            missing = required_columns - row.keys()
            if missing:
                raise ConfigError(f"{path}: row {i} lacks column(s) {', '.join(sorted(missing))} that the rewards need")
        splits[name] = rows
    return splits


def problem_key(row: dict) -> str:
    """The row's `problem_key` column: the built-in task's operands ("37+50"), a reasoning-gym row's dataset and
    question digest, or a data file's own column; a row without one is keyed by its prompt ("prompt:" and a digest
    of its normalised text), so only identical prompts share a key."""
    return row.get("problem_key") or f"prompt:{text_digest(row['prompt'])}"


def format_row(row: dict, task: TaskConfig, where: str, index: int) -> dict:
    """The row with its `prompt`: `task.prompt_template` filled from its columns, or, for a row that carries
    chat `messages` instead, the text of those messages (what decontamination compares; the chat template
    renders the messages themselves, `chat_prompts`)."""
    key = row.get("problem_key")
    if key is not None and not (isinstance(key, str) and key):
        raise ConfigError(f"{where}: row {index}, column 'problem_key': expected non-empty text, got {key!r:.60}")
    out = messages_row(row, task, where, index) if "messages" in row else prompt_row(row, task, where, index)
    return out | {"problem_key": problem_key(out)}


def prompt_row(row: dict, task: TaskConfig, where: str, index: int) -> dict:
    """A row given by its prompt column, `task.prompt_template` filled from its columns into `prompt`."""
    if task.prompt_column not in row:
        raise ConfigError(f"{where}: row {index} has no column {task.prompt_column!r} (task.prompt_column)")
    if not isinstance(row[task.prompt_column], str):
        raise ConfigError(f"{where}: row {index}, column {task.prompt_column!r}: expected text")
    out = dict(row)
    try:  # `{prompt}` is the prompt column's text, whatever the column is called
        out["prompt"] = task.prompt_template.format(**{**row, "prompt": row[task.prompt_column]})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where}: row {index}: task.prompt_template {task.prompt_template!r} "
                          f"cannot be filled from it ({type(e).__name__}: {e})") from None
    return out


def messages_row(row: dict, task: TaskConfig, where: str, index: int) -> dict:
    """A row given as chat `messages` ([{"role", "content"}, ...]), its `prompt` the text of every message but
    the system's (a system message that every row shares would make every row overlap every other)."""
    messages = row["messages"]
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ConfigError(f"{where}: row {index}, column 'messages': expected a list of "
                          f"{{\"role\": ..., \"content\": text}} objects")
    if task.prompt_column in row:
        raise ConfigError(f"{where}: row {index} has both 'messages' and {task.prompt_column!r} "
                          f"(task.prompt_column); give one")
    if task.prompt_template != "{prompt}":
        raise ConfigError(f"{where}: row {index} carries messages, which are used as written; "
                          f"task.prompt_template applies to task.prompt_column rows: leave it at '{{prompt}}'")
    return {**row, "prompt": "\n".join(m["content"] for m in messages if m["role"] != "system")}


def chat_prompts(rows: list[dict], tokenizer, task: TaskConfig, where: str) -> list[dict]:
    """The rows with `prompt` replaced by what the model is given: the chat template's rendering of the row's
    messages (a row without them: one user message, its prompt), generation prompt added, when chat is on
    (`task.chat`; by default when the tokenizer has a template). Every engine encodes a prompt text with no
    special tokens added (`grpo.rollout.encode_prompts`), which is how `apply_chat_template` tokenises its own
    rendering: the ids sampled after are the template's, token for token."""
    if not chat_on(task, tokenizer):
        carrying = next((i for i, r in enumerate(rows) if "messages" in r), None)
        if carrying is not None:
            raise ConfigError(f"{where}: row {carrying} carries messages, which need a chat template; the tokenizer "
                              f"has none or task.chat=false")
        return rows
    return [{**r, "prompt": tokenizer.apply_chat_template(chat_messages(r, task), tokenize=False,
                                                          add_generation_prompt=True)} for r in rows]


def chat_on(task: TaskConfig, tokenizer) -> bool:
    """Whether prompts go through the chat template: `task.chat`, or, when null, whether the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if task.chat and not has_template:
        raise ConfigError("task.chat: the model's tokenizer has no chat template; set task.chat=false (or null)")
    return has_template if task.chat is None else task.chat


def chat_messages(row: dict, task: TaskConfig) -> list[dict]:
    """The row's messages (or its prompt as one user message), after `task.system_prompt` unless the row
    has a system message of its own."""
    messages = list(row["messages"]) if "messages" in row else [{"role": "user", "content": row["prompt"]}]
    if task.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": task.system_prompt})
    return messages


@dataclass
class PromptSampler:
    """Seeded shuffled passes over the rows; `state()` / `load_state()` resume mid-epoch."""

    num_rows: int
    seed: int
    epoch: int = 0
    index: int = 0

    def _order(self) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_indices(self, count: int) -> list[int]:
        out: list[int] = []
        order = self._order()
        while len(out) < count:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            take = min(count - len(out), self.num_rows - self.index)
            out.extend(order[self.index : self.index + take])
            self.index += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
