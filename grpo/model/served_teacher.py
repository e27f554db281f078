"""The distillation teacher behind an OpenAI-compatible vLLM server (`algorithm.teacher.url`), as a user runs
`vllm serve <teacher> --served-model-name <model>` on another GPU: the log-probs of the student's sampled tokens.

Each (prompt + completion) sequence is sent as token ids to `/v1/completions` with `max_tokens: 1` and vLLM's extra
sampling parameter `prompt_logprobs: 0`, which returns, for every prompt token after the first, its log-prob given
the tokens before it (the first is `null`); the completion positions' entries are the teacher's log-probs of the
sampled tokens, laid out in the batch's columns as the local teacher's are (column t scores token t+1). Sequences go
`batch_size` to a request, `concurrency` requests at once, each retried as the `judge` reward's are
(`rewards.judge.post_with_retries`).

Where this differs from the local teacher (`algorithm.teacher.path`):
1. Temperature 1 only: vLLM computes prompt log-probs from the raw logits, before any sampling processor, so a
   run with `rollout.temperature` != 1 is refused (grpo.config) rather than scored at another temperature than
   the student's.
2. The server's numerics: its dtype, kernels and batching, so the same weights give log-probs equal to the local
   teacher's within the dtype's rounding, not bit for bit (tests/vllm/test_judge_vllm.py states the tolerance).
3. The tokenizer is checked by what a server shows: `/tokenize` of a probe text (with the policy's EOS token in it)
   must give the policy tokenizer's ids; a local teacher's whole vocabulary is compared instead.

What can go wrong, and what it becomes: a server that cannot be reached, does not serve `model`, serves it with a
context (`max_model_len`) shorter than the run's longest sequence, tokenizes otherwise or returns no prompt
log-probs when the run is built: `ConfigError` naming the URL, before training; a request that still fails after its
retries, or a reply without prompt log-probs, during training: `TeacherUnavailableError` naming the URL, which stops
the run (a step without its teacher has no advantage).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch

from grpo.core.batch import RolloutBatch
from grpo.errors import ConfigError, TeacherUnavailableError
from rewards.judge import RequestFailed, post_with_retries

PROBE_TEXT = "Distillation probe: 12 + 34 = 46; naïve café, Straße, 東京 🙂\n\tdef f(x): return x ** 2\n"
LOGPROB_SLACK = 1e-4  # a log-prob above this is no log-prob (e.g. a server started with --logprobs-mode raw_logits)


class ServedTeacher:
    """Log-probs of token sequences from the teacher served at `url` (`algorithm.teacher`'s url options)."""

    def __init__(self, url: str, model: str, *, timeout_s: float = 120.0, retries: int = 2, concurrency: int = 4,
                 batch_size: int = 16, api_key_env: str | None = None):
        self.base_url = url.rstrip("/")
        self.url = f"{self.base_url}/completions"
        self.model, self.retries, self.concurrency, self.batch_size = model, retries, concurrency, batch_size
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"algorithm.teacher.api_key_env: names {api_key_env!r}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(headers=headers, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency))

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """The teacher's log-probs [N, T-1] of the batch's completion tokens (column t scores token t+1; 0 in the
        prompt's and the padding's columns)."""
        rows = row_sequences(batch)
        chunks = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher") as pool:
            replies = list(pool.map(lambda chunk: self.sequence_logprobs([seq for _, _, seq in chunk]), chunks))
        out = torch.zeros(batch.completion_mask.shape)  # [N, T-1]
        for chunk, logprobs in zip(chunks, replies):
            for (row, start, _), lp in zip(chunk, logprobs):
                place_logprobs(out, row, start, batch.prompt_width, lp)
        return out

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, the log-prob of each token after the first given those before it (one request)."""
        try:
            response = post_with_retries(self._http, self.url, completions_payload(self.model, sequences),
                                         self.retries, backoff_s=0.5, backoff_max_s=8.0)
            return parse_prompt_logprobs(response.json(), sequences, self.url)
        except (RequestFailed, ValueError) as e:
            raise TeacherUnavailableError(f"algorithm.teacher.url: the teacher at {self.url} could not score "
                                          f"{len(sequences)} sequences: {e}") from None

    def check(self, tokenizer, longest: int | None = None) -> None:
        """Fail now, naming the URL, when the server cannot be reached, does not serve `model`, serves it with a
        context shorter than `longest` tokens (the run's longest prompt plus its completion budget: vLLM refuses a
        longer sequence with HTTP 400, which would stop the run at the step that first samples one), tokenizes the
        probe text otherwise than `tokenizer`, or returns no prompt log-probs."""
        served = self._get_json(f"{self.base_url}/models")
        cards = {m.get("id"): m for m in served.get("data", []) if isinstance(m, dict)}
        if self.model not in cards:
            raise ConfigError(f"algorithm.teacher.model: {self.base_url} does not serve {self.model!r}; it serves "
                              f"{list(cards)}")
        context = cards[self.model].get("max_model_len")
        if longest is not None and isinstance(context, int) and longest > context:
            raise ConfigError(f"algorithm.teacher.url: the teacher at {self.base_url} serves {self.model!r} with "
                              f"max_model_len={context}, and this run's sequences reach {longest} tokens (its "
                              "longest prompt plus its completion budget); serve it with a longer --max-model-len "
                              "or shorten rollout.max_new_tokens")
        text = PROBE_TEXT + (tokenizer.eos_token or "")
        theirs = self._post_probe(f"{server_root(self.base_url)}/tokenize",
                                  {"model": self.model, "prompt": text, "add_special_tokens": False}).get("tokens")
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            raise ConfigError(f"algorithm.teacher.url: the teacher at {self.base_url} tokenizes a probe text "
                              f"otherwise than the policy ({theirs} against {ours}); distillation compares the two "
                              "models' log-probs of the same token ids, so the server must serve the policy's "
                              "tokenizer")
        try:
            self.sequence_logprobs([ours])
        except TeacherUnavailableError as e:
            raise ConfigError(str(e)) from None

    def close(self) -> None:
        self._http.close()

    def _get_json(self, url: str) -> dict:
        try:
            response = self._http.get(url)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ConfigError(f"algorithm.teacher.url: cannot reach the teacher at {url}: "
                              f"{type(e).__name__}: {e}") from None

    def _post_probe(self, url: str, body: dict) -> dict:
        try:
            return post_with_retries(self._http, url, body, retries=0, backoff_s=0.0, backoff_max_s=0.0).json()
        except (RequestFailed, ValueError) as e:
            raise ConfigError(f"algorithm.teacher.url: the teacher at {url} did not answer the tokenizer check "
                              f"({e}); it must be vLLM's OpenAI-compatible server") from None


def server_root(base_url: str) -> str:
    """Where vLLM serves /tokenize: the server's root, the part of the API's base URL before `/v1`."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def row_sequences(batch: RolloutBatch) -> list[tuple[int, int, list[int]]]:
    """(row, first column, token ids) of every row with a completion token: its prompt then its completion,
    the padding on both sides left out."""
    out = []
    for row in range(len(batch)):
        columns = batch.attention_mask[row].nonzero().squeeze(-1)  # [L] contiguous: prompt then completion
        start, end = int(columns[0]), int(columns[-1]) + 1
        if end > batch.prompt_width:
            out.append((row, start, batch.input_ids[row, start:end].tolist()))
    return out


def completions_payload(model: str, sequences: list[list[int]]) -> dict[str, Any]:
    """One /v1/completions request scoring `sequences` (token ids): each prompt token's log-prob, one greedy token
    generated since the API generates at least one."""
    return {"model": model, "prompt": sequences, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}


def parse_prompt_logprobs(reply: dict[str, Any], sequences: list[list[int]], url: str) -> list[list[float]]:
    """Per sequence of the request, the log-prob of each token after the first, read from the reply's choices
    (matched by `index`): entry j of a choice's `prompt_logprobs` maps token ids (as strings) to
    `{"logprob": ...}` and must hold sequence[j]; entry 0 is null. ValueError naming `url` otherwise."""
    try:
        choices = {int(c["index"]): c.get("prompt_logprobs") for c in reply["choices"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{url} answered 200 but not in the completions format ({e!r})") from None
    out = []
    for i, seq in enumerate(sequences):
        entries = choices.get(i)
        if not isinstance(entries, list) or len(entries) != len(seq):
            raise ValueError(f"{url} answered without the prompt's log-probs (sequence {i}: "
                             f"{'none' if entries is None else f'{len(entries)} entries for {len(seq)} tokens'}); "
                             "a served teacher needs vLLM's prompt_logprobs")
        out.append([token_logprob(entries[j], token, url) for j, token in enumerate(seq) if j > 0])
    return out


def token_logprob(entry: Any, token: int, url: str) -> float:
    """The log-prob of `token` in one position's entry {token id: {"logprob": ...}}."""
    try:
        value = float(entry[str(token)]["logprob"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{url} answered a position without the log-prob of its token {token} "
                         f"(got {str(entry)[:120]})") from None
    if not value <= LOGPROB_SLACK:  # NaN too
        raise ValueError(f"{url} answered {value} for token {token}, which is no log-prob; serve the teacher "
                         "with vLLM's default --logprobs-mode raw_logprobs")
    return value


def place_logprobs(out: torch.Tensor, row: int, start: int, prompt_width: int, logprobs: list[float]) -> None:
    """Write a sequence's completion log-probs into `out` [N, T-1]: `logprobs[j]` scores the token in column
    start + j + 1, which column start + j holds; only the completion's columns (from P - 1) are kept, as the
    local teacher computes them."""
    first = prompt_width - 1 - start  # index in `logprobs` of the first completion token
    values = torch.tensor(logprobs[first:], dtype=out.dtype)
    out[row, prompt_width - 1: prompt_width - 1 + len(values)] = values
