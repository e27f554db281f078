"""``judge``: a language model, served behind an OpenAI-compatible chat-completions endpoint, scores each answer.

The reward sends one chat request per distinct (question, answer) pair, with the prompt as ``{question}``, the
completion as ``{answer}`` and, when the template asks for ``{reference}``, the row's ``answer`` column, and
maps the reply to [0, 1]: a verdict word (``yes`` -> 1, ``no`` -> 0, the first one in the reply wins) or a
number in a range (``scale: [1, 10]``: 7 -> 0.667). ``samples: n`` asks for n replies in one request and
averages the parsed ones, which gives a two-word judge a graded score. ``score_by: logprobs`` reads no text: it
asks for one token with its ``top_logprobs`` and scores the verdicts' probability mass, ``sum p(w) score(w) /
sum p(w)`` over the top tokens that are verdict words (``"Yes"``, ``" yes"`` and ``"yes"`` all count for ``yes``),
so yes 0.6, no 0.2 gives 0.75 where the greedy reply says 1; None when no verdict word is among them. This is
G-Eval's probability weighting (Liu et al. 2023) and what judges built on token log-probs do; where we differ:
a verdict word must be one token of the judge's tokenizer (we match tokens, not a word's first piece), and the
mass is renormalised over the verdicts found in the top k, not over the whole vocabulary.

What can go wrong, and what it becomes:
- the endpoint cannot be reached when the reward is built (``check_options``): ``RewardConfigError`` naming the
  URL, before training;
- a request that fails (connection refused, past ``timeout_s``, HTTP 429 or 5xx) is retried ``retries`` times
  after ``backoff_s * 2**k`` seconds (at most ``backoff_max_s``, or the server's ``Retry-After``); one that still
  fails leaves its sample None, counted in ``reward/judge_failures`` and ``reward/judge_infra_errors`` (so the
  trainer's ``reward.max_infra_error_frac`` stops a run that the judge cannot score);
- ``max_consecutive_failures`` requests failing in a row (across calls) stop the judge: the requests not yet
  sent are dropped and the call raises ``JudgeUnavailableError`` naming the URL; the scorer masks the batch and
  the trainer stops on the infrastructure share, so a dead judge costs at most one batch of deadlines;
- a reply with no verdict (or a number out of range) is None, counted in ``reward/judge_unparsed``.

Replies are cached by request (URL, model, messages, sampling), in memory and, with ``cache_dir``, on disk; a
cached or repeated request in a batch is counted in ``reward/judge_cache_hits``. With ``temperature > 0`` the
cache returns the first replies drawn for a request, not fresh ones.

``judge_pairs`` asks which of two answers is better (verdict ``A`` or ``B``), in both orders by default and
averaged, since judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-judge", MT-Bench): a preference
that flips with the order scores 0.5. Where this differs from peers: TRL's ``OpenAIPairwiseJudge`` asks once,
in one order, and reads the reply as an index; we parse verdict words as the pointwise judge does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rewards.registry import Reward, RewardConfigError, RewardCounts

POINT_TEMPLATE = ("Question: {question}\nProposed answer: {answer}\n\n"
                  "Is the proposed answer correct? Reply with one word: yes or no.")
PAIR_TEMPLATE = ("Question: {question}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}\n\n"
                 "Which answer is correct, A or B? Reply with one letter: A or B.")
POINT_VERDICTS = {"yes": 1.0, "no": 0.0}
PAIR_VERDICTS = {"A": 1.0, "B": 0.0}
POINT_FIELDS = ({"question", "answer", "reference"}, {"answer"})  # (allowed, required) in the template
PAIR_FIELDS = ({"question", "answer_a", "answer_b", "reference"}, {"answer_a", "answer_b"})

logger = logging.getLogger(__name__)
_counts = RewardCounts("requests", "seconds", "cache_hits", "failures", "unparsed", "infra_errors")


class JudgeUnavailableError(RuntimeError):
    """The judge failed ``max_consecutive_failures`` requests in a row; the message names its URL."""


@dataclass(frozen=True)
class JudgeSettings:
    """How to reach the judge and how to read it. Every field is a ``kwargs`` option of the ``judge`` reward."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)
    model: str  # the served model's name
    api_key_env: str | None = None  # environment variable holding the API key (sent as a Bearer token)
    template: str = POINT_TEMPLATE  # the user message; fields {question}, {answer}, optional {reference}
    system: str | None = None  # an optional system message
    verdicts: tuple[tuple[str, float], ...] = tuple(POINT_VERDICTS.items())  # verdict word -> score in [0, 1]
    scale: tuple[float, float] | None = None  # read a number in [lo, hi] instead of a verdict word
    samples: int = 1  # replies per request (the API's n), averaged
    score_by: str = "text"  # "text": parse the reply; "logprobs": the verdicts' probability in the first token
    top_logprobs: int = 20  # with score_by logprobs: tokens asked for (OpenAI, and vLLM by default, allow 20)
    max_tokens: int = 8
    temperature: float = 0.0
    timeout_s: float = 30.0  # httpx's deadline on connecting and on each read of one request
    retries: int = 2
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    concurrency: int = 8  # requests in flight at once
    cache_dir: str | None = None
    max_consecutive_failures: int = 8

    def connection(self) -> tuple:
        """What identifies one client: the endpoint and how requests to it are sent and retried."""
        return (self.base_url, self.model, self.api_key_env, self.timeout_s, self.retries, self.backoff_s,
                self.backoff_max_s, self.concurrency, self.cache_dir, self.max_consecutive_failures)


def settings_from(options: dict[str, Any], fields: tuple[set[str], set[str]] = POINT_FIELDS) -> JudgeSettings:
    """Checked settings from the reward's options; ``RewardConfigError`` naming the option otherwise."""
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - {f.name for f in dataclasses.fields(JudgeSettings)}
    if unknown:
        raise RewardConfigError(f"judge: unknown option(s) {sorted(unknown)}")
    for key in ("base_url", "model"):
        if not isinstance(options.get(key), str) or not options[key]:
            raise RewardConfigError(f"judge: give {key} (a string), got {options.get(key)!r}")
    options["base_url"] = options["base_url"].rstrip("/")
    if "verdicts" in options:
        options["verdicts"] = _verdicts(options["verdicts"])
    if "scale" in options:
        options["scale"] = _scale(options["scale"])
    _check_score_by(options)
    for key, low in (("samples", 1), ("max_tokens", 1), ("concurrency", 1), ("max_consecutive_failures", 1),
                     ("retries", 0), ("top_logprobs", 1)):
        value = options.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RewardConfigError(f"judge: {key} must be an integer >= {low}, got {value!r}")
    for key in ("timeout_s", "backoff_s", "backoff_max_s", "temperature"):
        value = options.get(key, 1.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                key == "timeout_s" and value == 0):
            raise RewardConfigError(f"judge: {key} must be a {'positive' if key == 'timeout_s' else 'non-negative'} "
                                    f"number, got {value!r}")
    settings = JudgeSettings(**options)
    check_template(settings.template, *fields)
    return settings


def _check_score_by(options: dict[str, Any]) -> None:
    score_by = options.get("score_by", "text")
    if score_by not in ("text", "logprobs"):
        raise RewardConfigError(f"judge: score_by must be 'text' or 'logprobs', got {score_by!r}")
    if score_by == "logprobs" and "scale" in options:
        raise RewardConfigError("judge: scale reads a number from the text; score_by: logprobs reads verdict words")
    if score_by == "logprobs" and options.get("samples", 1) != 1:
        # every sample's first token has the same distribution: more samples would repeat one score
        raise RewardConfigError(f"judge: samples must be 1 with score_by: logprobs, got {options['samples']!r}")


def _verdicts(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict) or not value:
        raise RewardConfigError(f"judge: verdicts must map verdict words to scores, got {value!r}")
    out = []
    for word, score in value.items():
        if not isinstance(word, str) or not re.fullmatch(r"\w+", word):
            raise RewardConfigError(f"judge: verdict {word!r} must be one word")
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise RewardConfigError(f"judge: verdict {word!r} must score in [0, 1], got {score!r}")
        out.append((word, float(score)))
    return tuple(out)


def _scale(value: Any) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) for v in value) or not value[0] < value[1]):
        raise RewardConfigError(f"judge: scale must be [low, high] with low < high, got {value!r}")
    return float(value[0]), float(value[1])


def check_template(template: str, allowed: set[str], required: set[str]) -> None:
    """Refuse a template with a field it cannot fill, or without the answer(s) to judge."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise RewardConfigError(f"judge: template does not parse ({e}); write a literal brace twice") from None
    unknown = fields - allowed
    if unknown:
        raise RewardConfigError(f"judge: template field(s) {sorted(unknown)} unknown; it may use {sorted(allowed)}")
    if not required <= fields:
        raise RewardConfigError(f"judge: template must contain {sorted('{' + f + '}' for f in required)}")


# --- reading a reply ---------------------------------------------------------------------------------------------

def parse_score(reply: str, verdicts: Sequence[tuple[str, float]], scale: tuple[float, float] | None = None
                ) -> float | None:
    """The score in [0, 1] a reply gives, or None when it is out of format.

    With ``scale = (lo, hi)``: the first number in the reply, ``(x - lo) / (hi - lo)``, None outside [lo, hi].
    Otherwise the first verdict word in the reply, as a whole word: case-insensitive, except a one-letter verdict
    (``A``, ``B``), which is matched as written so that the article "a" is not read as a verdict.
    """
    if scale is not None:
        match = re.search(r"-?\d+(?:\.\d+)?", reply)
        if match is None:
            return None
        x = float(match.group())
        lo, hi = scale
        return (x - lo) / (hi - lo) if lo <= x <= hi else None
    best: tuple[int, float] | None = None
    for word, score in verdicts:
        flags = 0 if len(word) == 1 else re.IGNORECASE
        match = re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", reply, flags)
        if match is not None and (best is None or match.start() < best[0]):
            best = (match.start(), score)
    return None if best is None else best[1]


def verdict_prob_score(top: Sequence[Sequence[Any]], verdicts: Sequence[tuple[str, float]]) -> float | None:
    """The verdicts' probability-weighted score from one position's ``[token, logprob]`` pairs; None without any.

    A token counts for a verdict when it equals the word once stripped and casefolded (a one-letter verdict is
    matched as written, as in ``parse_score``); the variants of a word add up.
    """
    mass = [0.0] * len(verdicts)
    for token, logprob in top:
        word = str(token).strip()
        for i, (verdict, _) in enumerate(verdicts):
            if word == verdict if len(verdict) == 1 else word.casefold() == verdict.casefold():
                mass[i] += math.exp(logprob)
    total = math.fsum(mass)
    if total == 0.0:
        return None
    return math.fsum(p * score for p, (_, score) in zip(mass, verdicts)) / total


def mean_score(replies: Sequence[Any], settings: JudgeSettings) -> float | None:
    """The mean parsed score of a request's replies (texts, or top log-probs with ``score_by: logprobs``); None
    when none parses."""
    if settings.score_by == "logprobs":
        parsed = (verdict_prob_score(r, settings.verdicts) for r in replies)
    else:
        parsed = (parse_score(r, settings.verdicts, settings.scale) for r in replies)
    scores = [s for s in parsed if s is not None]
    return math.fsum(scores) / len(scores) if scores else None


# --- sending requests --------------------------------------------------------------------------------------------

def backoff_delays(retries: int, base_s: float, max_s: float) -> list[float]:
    """Seconds to wait before each retry: ``min(max_s, base_s * 2**k)`` for k = 0 .. retries - 1."""
    return [min(max_s, base_s * 2.0**k) for k in range(retries)]


def cache_key(payload: dict[str, Any]) -> str:
    """sha256 of the request as canonical JSON (sorted keys): equal requests, equal keys, whatever the dict order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RequestFailed(Exception):
    """One request that failed after its retries (or at once, for an answer that a retry cannot change)."""


class JudgeClient:
    """Chat-completion requests to one endpoint: retries, a cache, concurrency, and a count of failures in a row."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.url = f"{settings.base_url}/chat/completions"
        headers = {}
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise RewardConfigError(f"judge: api_key_env names {settings.api_key_env!r}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(headers=headers, timeout=settings.timeout_s,
                                  limits=httpx.Limits(max_connections=settings.concurrency))
        self._cache: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.failures_in_a_row = 0
        self.last_error = ""

    def probe(self) -> None:
        """Fail now, naming the URL, when the endpoint cannot be reached or does not serve the model."""
        url = f"{self.settings.base_url}/models"
        try:
            response = self._http.get(url)
            response.raise_for_status()
            served = [m.get("id") for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            raise RewardConfigError(f"judge: cannot reach the judge at {url}: {type(e).__name__}: {e}") from None
        if served and self.settings.model not in served:
            raise RewardConfigError(f"judge: {self.settings.base_url} does not serve model {self.settings.model!r}; "
                                    f"it serves {served}")

    def payload(self, user: str, settings: JudgeSettings) -> dict[str, Any]:
        """The request body for one user message."""
        messages = [{"role": "system", "content": settings.system}] if settings.system else []
        body = {"model": settings.model, "messages": [*messages, {"role": "user", "content": user}],
                "max_tokens": settings.max_tokens, "temperature": settings.temperature, "n": settings.samples}
        if settings.score_by == "logprobs":
            body.update(max_tokens=1, logprobs=True, top_logprobs=settings.top_logprobs)
        return body

    def replies(self, payloads: list[dict[str, Any]], counts: Counter[str]) -> list[list[str] | None]:
        """Each payload's reply texts (None where it failed), distinct requests sent ``concurrency`` at a time.

        Raises ``JudgeUnavailableError`` once ``max_consecutive_failures`` requests have failed in a row.
        """
        keys = [cache_key({"url": self.url, **p}) for p in payloads]
        found: dict[str, list[str] | None] = {}
        for key in keys:
            if key in found:
                counts["cache_hits"] += 1
            else:
                found[key] = self._cached(key)
                counts["cache_hits"] += found[key] is not None
        first = dict(zip(reversed(keys), reversed(payloads)))  # key -> its payload
        todo = [(key, first[key]) for key, texts in found.items() if texts is None]
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="judge") as pool:
            for key, texts in zip([k for k, _ in todo], pool.map(lambda kp: self._send(kp[1], stop, counts), todo)):
                found[key] = texts
                if texts is not None:
                    self._store(key, texts)
        if stop.is_set():
            raise JudgeUnavailableError(
                f"judge at {self.url}: {self.failures_in_a_row} requests failed in a row (max_consecutive_failures="
                f"{self.settings.max_consecutive_failures}); last error: {self.last_error}")
        return [found[key] for key in keys]

    def _send(self, payload: dict[str, Any], stop: threading.Event, counts: Counter[str]) -> list[str] | None:
        if stop.is_set():  # the judge stopped before this request's turn: never sent, not a failure of its own
            return None
        try:
            texts = self._post_with_retries(payload, stop, counts)
        except RequestFailed as e:
            with self._lock:
                counts["failures"] += 1
                self.failures_in_a_row += 1
                self.last_error = str(e)
                if self.failures_in_a_row >= self.settings.max_consecutive_failures:
                    stop.set()
            return None
        with self._lock:
            self.failures_in_a_row = 0
        return texts

    def _post_with_retries(self, payload: dict[str, Any], stop: threading.Event, counts: Counter[str]) -> list[str]:
        def count_attempt() -> None:
            with self._lock:
                counts["requests"] += 1

        response = post_with_retries(self._http, self.url, payload, self.settings.retries, self.settings.backoff_s,
                                     self.settings.backoff_max_s, stop=stop, on_attempt=count_attempt)
        return _reply_texts(response, self.url, payload.get("logprobs", False))

    def _cached(self, key: str) -> list[str] | None:
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        if self.settings.cache_dir is None:
            return None
        path = Path(self.settings.cache_dir) / f"{key}.json"
        try:
            texts = json.loads(path.read_text())["replies"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with self._lock:
            self._cache[key] = texts
        return texts

    def _store(self, key: str, texts: list[str]) -> None:
        with self._lock:
            self._cache[key] = texts
        if self.settings.cache_dir is not None:
            path = Path(self.settings.cache_dir) / f"{key}.json"
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps({"replies": texts}))
                os.replace(tmp, path)  # a reader never sees half a file
            except OSError as e:  # a full or read-only disk costs the cache, not the scores
                logger.warning("judge: cannot write the cache file %s: %s", path, e)


def post_with_retries(http: httpx.Client, url: str, payload: dict[str, Any], retries: int, backoff_s: float,
                      backoff_max_s: float, *, stop: threading.Event | None = None,
                      on_attempt: Callable[[], None] | None = None) -> httpx.Response:
    """POST ``payload`` as JSON until a 200 answers, retrying a refused, reset or timed-out connection and an HTTP
    429 or 5xx ``retries`` times after ``backoff_delays`` (or the server's ``Retry-After``, at most
    ``backoff_max_s``); ``RequestFailed`` with the last error otherwise, at once for another 4xx (a bad request
    stays bad) or once ``stop`` is set. ``on_attempt`` is called before each attempt (a count of requests)."""
    stop = stop or threading.Event()
    delays = backoff_delays(retries, backoff_s, backoff_max_s)
    error = ""
    for attempt in range(len(delays) + 1):
        if attempt and stop.is_set():
            raise RequestFailed(f"{error} (not retried: the server had stopped answering)")
        if on_attempt is not None:
            on_attempt()
        try:
            response = http.post(url, json=payload)
        except httpx.TransportError as e:  # refused, reset, past the deadline: worth another try
            error, wait = f"{type(e).__name__}: {e}", None
        else:
            if response.status_code == 200:
                return response
            error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code != 429 and response.status_code < 500:
                raise RequestFailed(error)  # a bad request stays bad
            wait = _retry_after(response)
        if attempt < len(delays):
            stop.wait(min(backoff_max_s, wait) if wait is not None else delays[attempt])
    raise RequestFailed(f"{error} (after {len(delays) + 1} attempts)")


def _reply_texts(response: httpx.Response, url: str, logprobs: bool = False) -> list[Any]:
    """Each choice's text or, with ``logprobs``, its first token's top ``[token, logprob]`` pairs."""
    try:
        choices = response.json()["choices"]
        if not logprobs:
            return [str(choice["message"]["content"] or "") for choice in choices]
        firsts = [(choice.get("logprobs") or {}).get("content") for choice in choices]
    except (ValueError, KeyError, TypeError) as e:
        raise RequestFailed(f"{url} answered 200 but not in the chat-completions format ({e!r})") from None
    if any(content is None for content in firsts):
        raise RequestFailed(f"{url} answered without logprobs; score_by: logprobs needs an endpoint that returns them")
    try:  # no token at all (the judge ended at once) is an empty list: out of format, not a failure
        return [[[t["token"], float(t["logprob"])] for t in content[0]["top_logprobs"]] if content else []
                for content in firsts]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RequestFailed(f"{url} answered 200 but its logprobs are not in the chat-completions format ({e!r})"
                            ) from None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


_clients: dict[tuple, JudgeClient] = {}
_clients_lock = threading.Lock()


def client_for(settings: JudgeSettings) -> JudgeClient:
    """The one client of these connection settings in this process (its cache and failure count live on)."""
    with _clients_lock:
        if settings.connection() not in _clients:
            _clients[settings.connection()] = JudgeClient(settings)
        return _clients[settings.connection()]


# --- the rewards ---------------------------------------------------------------------------------------------------

def judge(prompts: list[str], completions: list[str], answer: list[Any] | None = None, *,
          base_url: str | None = None, model: str | None = None, api_key_env: str | None = None,
          template: str | None = None, system: str | None = None, verdicts: dict[str, float] | None = None,
          scale: list[float] | None = None, samples: int | None = None, score_by: str | None = None,
          top_logprobs: int | None = None, max_tokens: int | None = None,
          temperature: float | None = None, timeout_s: float | None = None, retries: int | None = None,
          backoff_s: float | None = None, backoff_max_s: float | None = None, concurrency: int | None = None,
          cache_dir: str | None = None, max_consecutive_failures: int | None = None) -> list[float | None]:
    """The judge's score in [0, 1] of each completion as an answer to its prompt; options in ``JudgeSettings``.

    ``answer`` (optional column) fills the template's ``{reference}``.
    """
    options = {k: v for k, v in locals().items() if k not in ("prompts", "completions", "answer")}
    settings = settings_from(options)
    if "{reference}" in settings.template and answer is None:
        raise RewardConfigError("judge: the template uses {reference}, but the batch has no `answer` column")
    client = client_for(settings)
    users = [settings.template.format(question=p, answer=c, reference=answer[i] if answer is not None else "")
             for i, (p, c) in enumerate(zip(prompts, completions))]
    return _score(client, settings, [client.payload(u, settings) for u in users])


def judge_pairs(questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                references: Sequence[Any] | None = None, *, both_orders: bool = True,
                **options: Any) -> list[float | None]:
    """How much the judge prefers ``answers_a[i]`` over ``answers_b[i]``, in [0, 1] (1: A better, 0: B better).

    Options are the ``judge`` reward's; ``template`` defaults to ``PAIR_TEMPLATE`` and ``verdicts`` to
    ``{A: 1, B: 0}``. With ``both_orders``, each pair is also asked with the answers swapped, and the two
    readings averaged: ``(s(a, b) + 1 - s(b, a)) / 2`` (the one that parsed, if only one did).
    """
    settings = pair_settings(options)
    client = client_for(settings)
    refs = list(references) if references is not None else [""] * len(questions)

    def user(q: str, a: str, b: str, ref: Any) -> str:
        return settings.template.format(question=q, answer_a=a, answer_b=b, reference=ref)

    rows = list(zip(questions, answers_a, answers_b, refs))
    forward = [client.payload(user(q, a, b, r), settings) for q, a, b, r in rows]
    swapped = [client.payload(user(q, b, a, r), settings) for q, a, b, r in rows] if both_orders else []
    scores = _score(client, settings, forward + swapped)
    out: list[float | None] = []
    for i in range(len(rows)):
        readings = [scores[i]] + ([None if scores[len(rows) + i] is None else 1.0 - scores[len(rows) + i]]
                                  if both_orders else [])
        parsed = [s for s in readings if s is not None]
        out.append(math.fsum(parsed) / len(parsed) if parsed else None)
    return out


def pair_settings(options: dict[str, Any]) -> JudgeSettings:
    """Checked settings of ``judge_pairs`` (``both_orders`` aside): the pairwise template and verdicts by default."""
    options = {k: v for k, v in options.items() if k != "both_orders"}
    return settings_from({"template": PAIR_TEMPLATE, "verdicts": PAIR_VERDICTS, **options}, PAIR_FIELDS)


def probe_pairs(options: dict[str, Any]) -> None:
    """Fail now, naming the URL, when the pairwise judge these options name cannot be reached."""
    client_for(pair_settings(options)).probe()


def _score(client: JudgeClient, settings: JudgeSettings, payloads: list[dict[str, Any]]) -> list[float | None]:
    """Scores of the payloads' replies; the call's counters added to the reward's metrics."""
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    try:
        replies = client.replies(payloads, counts)
    finally:
        counts["seconds"] += time.perf_counter() - start
        _counts.update(counts)  # on a raise the scorer counts the whole batch as infra errors itself
    scores: list[float | None] = []
    for texts in replies:
        score = None if texts is None else mean_score(texts, settings)
        counts["infra_errors" if texts is None else "unparsed"] += score is None
        scores.append(score)
    _counts.update({k: counts[k] for k in ("infra_errors", "unparsed")})
    return scores


def check_options(**options: Any) -> None:
    """Refuse bad options and an unreachable judge when the reward is built, before training."""
    client_for(settings_from(options)).probe()


JUDGE = Reward(judge, check_options=check_options, metrics=_counts.pop)  # rewards.catalog: judge

