"""``reasoning_gym``: each row of a reasoning-gym task scored by its own dataset's ``score_answer``, in a sandbox.

The row carries what the scorer needs (grpo/data/reasoning_gym.py): the dataset's name (``rg_dataset``), the
generated entry (``rg_entry``, written by ``dump_entry``) and the dataset's config (``rg_options``). The
scorer is the dataset built with that config, so a dataset whose check depends on its settings scores
as it would in reasoning-gym. Scores are the dataset's: 1.0 right, 0.0 wrong, and some datasets give
partial credit (a near answer, a right answer in the wrong form); ``eval/accuracy`` counts only 1.0.

The answer is what reasoning-gym's own evaluation reads: the text inside the completion's last
``<answer>...</answer>`` (``answer_tag``), and no answer (scored by the dataset, 0.0 for most) when there is
none. ``answer_tag=null`` scores the whole completion, stripped, for models not asked for the tag.

Where this differs from reasoning-gym's own evaluation: its scorers run the answer as code (``eval`` in
spiral_matrix, binary_matrix, string_insertion, n_queens; sympy's ``parse_expr``, itself an ``eval``, in
countdown, puzzle24, polynomial_multiplication and the integration datasets), so here they never run in the
trainer's process. Each call of the reward starts one sandboxed interpreter (``rewards.sandbox.PythonSession``,
with the installed packages read-only) that imports reasoning-gym and then scores the batch's answers one by
one, each handed over as plain data (string literals) with a deadline of ``timeout_s``. What an answer can
cause scores 0.0, like a wrong answer: running past its deadline, printing into the reply, a memory or
recursion error, a score outside [0, 1], or killing the interpreter twice (it is restarted after each kill, so
a kill that a retry does not repeat was not the answer's doing). What it cannot cause is an infrastructure
failure: the interpreter not starting, or the dataset's scorer raising. That sample is None (masked), and
counted in ``reward/reasoning_gym_infra_errors``. An answer that could change the interpreter for the answers
after it (it names ``setattr``, ``exec``, ``open``, a dunder, ...: ``CODE_LIKE``) is scored, then the
interpreter is replaced; and each call of the reward starts a fresh one (about 2 s, docs/rewards.md), so
what slips past that list stays within its batch.

Entries are JSON with tuples kept as tuples (``{"__tuple__": [...]}``): some datasets compare the answer
with tuples in the metadata (arc_agi's grids), which plain JSON would turn into lists that never match;
dicts with integer keys are kept the same way (``{"__items__": [[k, v], ...]}``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import secrets
import sysconfig
from typing import Any

from reasoning_gym.utils import extract_answer

from rewards.registry import Reward, RewardConfigError, RewardCounts
from rewards.sandbox import SANDBOX_KINDS, Limits, PythonSession, resolve_sandbox

TUPLE, ITEMS = "__tuple__", "__items__"  # tags of a tuple, and of a dict whose keys are not all text
STARTUP_TIMEOUT_S = 120.0  # importing reasoning-gym in the sandbox: about 2 s alone, many times that on a busy machine
# What an answer, not the scorer, causes: resources it ran out of, and exits that eval() let it raise.
ANSWER_ERRORS = ("MemoryError", "RecursionError", "OverflowError", "SystemExit", "KeyboardInterrupt")

# Names an answer needs to change the interpreter for the answers after it (an attribute set on a module, a
# dunder walk to the scorer's globals, a file written): an answer that has one is scored, then the
# interpreter is replaced. A cost for such answers only; the sandbox, not this list, keeps the host safe.
# English words among them ("open") cost a word task's answer a restart now and then; "type" or "object" would
# cost more, and need a dunder or one of these to change anything.
CODE_LIKE = re.compile(r"__|\b(setattr|delattr|getattr|exec|eval|compile|globals|locals|vars|open|breakpoint)\b")
logger = logging.getLogger(__name__)
_counts = RewardCounts("infra_errors")


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


# Read once, at import: inspect reads the file on disk, which may change under a running trainer (an update).
_UNTAG_SOURCE = inspect.getsource(_untag)


def reasoning_gym_reward(prompts: list[str], completions: list[str], rg_dataset: list[str], rg_entry: list[str],
                         rg_options: list[str] | None = None, answer_tag: str | None = "answer",
                         timeout_s: float = 5.0, memory_mb: int = 1024, max_answer_chars: int = 10_000,
                         sandbox: str = "auto") -> list[float | None]:
    """The dataset's score of each completion's answer; None for a row that is not a reasoning-gym row, and
    for a sample the sandbox could not score (counted as ``infra_errors``).

    Options: ``timeout_s`` (deadline of one answer's check), ``memory_mb`` (the sandboxed interpreter's address
    space), ``max_answer_chars`` (longer answers score 0.0 unread), ``sandbox`` (``rewards.sandbox`` kinds).
    """
    _check_options(answer_tag, timeout_s, memory_mb, max_answer_chars, sandbox)
    options = rg_options or ["{}"] * len(completions)
    scores: list[float | None] = [None] * len(completions)
    todo = []
    for i, (completion, name, entry, opts) in enumerate(zip(completions, rg_dataset, rg_entry, options)):
        if not name or not entry:
            continue
        answer = extract_answer(completion, tag_name=answer_tag) if answer_tag else completion.strip()
        if answer is not None and len(answer) > max_answer_chars:
            _counts.add("too_long")
            scores[i] = 0.0
            continue
        todo.append((i, [name, opts or "{}", answer, entry]))
    if todo:
        checker = _SandboxedScorer(resolve_sandbox(sandbox), timeout_s, memory_mb, len(todo))
        try:
            for i, request in todo:
                scores[i] = checker.score(*request)
        finally:
            checker.close()
    return scores


class _SandboxedScorer:
    """One sandboxed interpreter with reasoning-gym imported; `score` hands it one answer at a time."""

    def __init__(self, kind: str, timeout_s: float, memory_mb: int, n: int):
        self.timeout_s = timeout_s
        self.limits = Limits(timeout_s=STARTUP_TIMEOUT_S, memory_mb=memory_mb)
        # The interpreter's CPU limit covers the whole batch: its start and every answer's deadline.
        self.session = PythonSession(kind=kind, limits=self.limits, site_packages=True,
                                     cpu_budget_s=STARTUP_TIMEOUT_S + timeout_s * (n + 1))
        self.started = False
        self.broken: str | None = None  # why the interpreter cannot start; every later sample is then None

    def score(self, name: str, options: str, answer: str | None, entry: str) -> float | None:
        """The score, 0.0 for what the answer caused, None (counted) for an infrastructure failure."""
        for _attempt in range(2):
            if not self._ready():
                _counts.add("infra_errors")
                return None
            verdict, value = self._ask(name, options, answer, entry)
            if answer is not None and CODE_LIKE.search(answer) and self.started:
                _counts.add("restarts_after_code")
                self._restart()
            if verdict == "score":
                return value
            if verdict == "infra":
                _counts.add("infra_errors")
                return None
            if verdict != "crashed":  # timeout, an answer error, interference: the answer's doing
                _counts.add(verdict)
                return 0.0
        _counts.add("crashed")  # killed the interpreter twice: the answer's doing
        return 0.0

    def _ready(self) -> bool:
        """Whether an interpreter with reasoning-gym imported is up; a failed start is tried once more."""
        for attempt in range(2):
            if self.broken is not None or self.started:
                break
            self.session.limits = self.limits  # the start has its own, longer deadline
            run = self.session.run(_setup_program())
            self.session.limits = Limits(timeout_s=self.timeout_s, memory_mb=self.limits.memory_mb)
            if run.error is None and run.output.endswith("ready\n"):
                self.started = True
                _counts.add("sandbox_starts")
                break
            self.session.close()
            _counts.add("sandbox_start_failures")
            if attempt == 1:
                self.broken = f"{run.error or run.output[-500:]}"
                logger.error("reasoning_gym: the sandboxed scorer did not start (%s); this batch's samples are None, "
                             "counted as reward/reasoning_gym_infra_errors", self.broken)
        return self.broken is None

    def _ask(self, name: str, options: str, answer: str | None, entry: str) -> tuple[str, float]:
        """(what happened, the score): "score", "infra", "crashed", "timeouts", "answer_errors", "interference"."""
        nonce = secrets.token_hex(16)
        run = self.session.run(f"_rg_reply({nonce!r}, {name!r}, {options!r}, {answer!r}, {entry!r})")
        head, _, body = run.output.partition(" ")
        reply = _reply(body) if run.error is None and head == nonce and "\n" not in body[:-1] else {}
        if reply:
            if "score" in reply and isinstance(reply["score"], (int, float)) and 0.0 <= reply["score"] <= 1.0:
                return "score", float(reply["score"])
            if str(reply.get("error", "")).split(":")[0] in ANSWER_ERRORS:
                self._restart()
                return "answer_errors", 0.0
            if "error" in reply:
                logger.warning("reasoning_gym: the scorer of %r raised %s; the sample is None", name, reply["error"])
                return "infra", 0.0
        self._restart()  # whatever the answer did to the interpreter must not reach the next answer
        if run.error is not None and run.error.startswith("timeout"):
            return "timeouts", 0.0
        if run.error is not None and not run.output:
            return "crashed", 0.0
        return "interference", 0.0  # printed into the reply, raised past the scorer, or a score out of range

    def _restart(self) -> None:
        self.session.close()
        self.started = False

    def close(self) -> None:
        self.session.close()


def _reply(line: str) -> dict:
    """The interpreter's reply on `line`, or {} for anything else (an answer that printed into it)."""
    try:
        reply = json.loads(line)
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def _setup_program() -> str:
    """What the sandboxed interpreter runs first: reasoning-gym from this interpreter's (read-only) site
    directories, and `_rg_reply`, which prints `<nonce> {"score": s}` or `<nonce> {"error": "..."}`."""
    sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return f"""
import json, os, site
from typing import Any
os.environ["MPLCONFIGDIR"] = "/tmp"  # matplotlib, imported by reasoning-gym, wants a writable home
for _site in {sites!r}:
    site.addsitedir(_site)  # a virtualenv's packages: the sandbox's interpreter is its base interpreter
import reasoning_gym
TUPLE, ITEMS = {TUPLE!r}, {ITEMS!r}
{_UNTAG_SOURCE}
_rg_scorers = {{}}
def _rg_reply(nonce, name, options, answer, entry):
    try:
        if (name, options) not in _rg_scorers:
            _rg_scorers[name, options] = reasoning_gym.create_dataset(
                name, size=1, seed=0, **json.loads(options)).score_answer
        reply = {{"score": float(_rg_scorers[name, options](answer, json.loads(entry, object_hook=_untag)))}}
    except BaseException as e:
        reply = {{"error": (type(e).__name__ + ": " + str(e))[:300]}}
    print(nonce, json.dumps(reply))
print("ready")
"""




def _check_options(answer_tag: str | None = "answer", timeout_s: float = 5.0, memory_mb: int = 1024,
                   max_answer_chars: int = 10_000, sandbox: str = "auto") -> None:
    if answer_tag is not None and (not isinstance(answer_tag, str) or not answer_tag.isidentifier()):
        raise RewardConfigError(f"reasoning_gym: answer_tag must be a tag name (e.g. 'answer') or null, "
                                f"got {answer_tag!r}")
    for field, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_answer_chars", max_answer_chars)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
            raise RewardConfigError(f"reasoning_gym: {field} must be a positive number, got {value!r}")
    if sandbox not in SANDBOX_KINDS:
        raise RewardConfigError(f"reasoning_gym: sandbox must be one of {SANDBOX_KINDS}, got {sandbox!r}")


def _check_sandbox(sandbox: str = "auto", **options: Any) -> None:
    """Refuse bad options, and a machine with no sandbox, before training starts."""
    _check_options(sandbox=sandbox, **options)
    resolve_sandbox(sandbox)


REASONING_GYM = Reward(reasoning_gym_reward, check_options=_check_sandbox, metrics=_counts.pop)
"""What rewards.catalog registers as `reasoning_gym`."""
