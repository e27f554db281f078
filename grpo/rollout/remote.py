"""Rollout in server mode (`rollout.mode=server`): the trainer's side of `grpo-vllm-serve`.

`ServerRolloutEngine` has the methods of the other engines (generate, generate_from_ids,
sync_weights, close). It sends token-id prompts over HTTP to one or more servers (one per
data-parallel engine: `rollout.server_urls`), splitting each call's prompts into contiguous shares,
one per server, sent at once; it decodes the completions with the trainer's tokenizer. Sampler
log-probs come back with the completions.

After each optimiser step `sync_weights` pushes the policy to every server: trainer rank 0 and the
servers share a process group of their own (grpo.rollout.weight_channel), and each bucket of
`rollout.sync_bucket_mb` is gathered (ZeRO-3: on every rank, as the colocated engine does), broadcast by
rank 0 as one flat tensor, and loaded by each server with the model's `load_weights`. The other
trainer ranks wait at a barrier, so none samples before the push is complete.

Failures are bounded: every HTTP request and every process-group operation waits at most
`rollout.timeout_s`; servers are checked for liveness at start (an unreachable URL fails at once)
and before each push; the error names the server's URL.

Every request carries the shared secret of `GRPO_SERVER_TOKEN` from the trainer's environment (an environment
variable, not a config field, so that it is not written to the run's config.yaml), as `Authorization: Bearer`;
a server that refuses it (403) fails the run at start, naming the variable.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from grpo import distributed as dist
from grpo.rollout import Completions, decode_completion, encode_prompts, weight_channel
from grpo.rollout.vllm import RolloutEngineError, gathered, parameter_buckets

log = logging.getLogger(__name__)
TOKEN_ENV = "GRPO_SERVER_TOKEN"  # grpo.rollout.serve's: the shared secret, sent with every request
HEALTH_TIMEOUT_S = 10.0  # a start-up or liveness check needs no more, whatever rollout.timeout_s is


class ServerRolloutEngine:
    """Generation and weight sync through `grpo-vllm-serve` engines at `server_urls`."""

    holds_own_weights = True  # generate needs no gathered policy weights (see grpo.rollout.WithFullWeights)

    def __init__(self, model, tokenizer, *, server_urls: list[str], timeout_s: float = 600.0, temperature=1.0,
                 top_p=1.0, top_k=0, max_new_tokens=8, min_new_tokens=0, stop=(), batch_size=512,
                 sync_bucket_mb=256.0, token: str | None = None):
        del batch_size  # the servers schedule their own batches
        self.tokenizer = tokenizer
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.urls = [u.rstrip("/") for u in server_urls]
        self.timeout_s = timeout_s
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.min_new_tokens, self.stop = max_new_tokens, min_new_tokens, list(stop)
        self.sync_bucket_bytes = int(sync_bucket_mb * 2**20)
        self.pool = ThreadPoolExecutor(max_workers=len(self.urls) + 1, thread_name_prefix="rollout-server")
        self.channel = None
        self.closed = False
        self.max_model_len = min(self._check_alive(HEALTH_TIMEOUT_S))
        self._on_servers("/check", [{}] * len(self.urls))  # a wrong or missing token fails here, not mid-run
        if model is not None:  # the servers start from the model directory; the policy may be a checkpoint's
            self.sync_weights(model)

    # --- the RolloutEngine protocol ------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        return self.generate_from_ids(encode_prompts(self.tokenizer, prompts), n, greedy=greedy)

    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        """`generate` from token-id contexts; each server samples a contiguous share of them."""
        self._usable()
        start = time.perf_counter()
        settings = dict(n=n, greedy=greedy, max_new_tokens=max_new_tokens or self.max_new_tokens,
                        temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_new_tokens=self.min_new_tokens, stop=self.stop)
        shares = split_evenly(prompt_ids, len(self.urls))
        replies = self._on_servers("/generate", [dict(settings, prompt_ids=share) if share else None
                                                 for share in shares])
        out = Completions(prompt_ids=prompt_ids, completion_ids=[], texts=[], truncated=[],
                          logprobs=None if greedy else [])
        cached = 0
        for reply in replies:
            if reply is None:
                continue
            out.completion_ids += reply["completion_ids"]
            out.truncated += reply["truncated"]
            if out.logprobs is not None:
                out.logprobs += reply["logprobs"]
            cached += reply["metrics"].get("rollout/prefix_cached_tokens", 0)
        out.texts = [decode_completion(self.tokenizer, ids, self.stop) for ids in out.completion_ids]
        out.metrics["time/generate_s"] = time.perf_counter() - start
        out.metrics["rollout/prefix_cached_tokens"] = cached
        return out

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        """Push `model`'s parameters to every server, bucket by bucket; returns the seconds it took.

        Collective over the trainer's ranks (ZeRO-3 gathers each bucket on all of them); rank 0 sends.
        """
        self._usable()
        start = time.perf_counter()
        sender = dist.is_main()
        if sender:
            self._check_alive(HEALTH_TIMEOUT_S)
            if self.channel is None:
                self._open_channel()
        for bucket in parameter_buckets(model.named_parameters(), self.sync_bucket_bytes):
            with gathered([p for _, p in bucket]):
                if sender:
                    self._push_bucket([(name, p.detach()) for name, p in bucket])
        if sender:
            self._on_servers("/weights/done", [{}] * len(self.urls))
        dist.barrier()  # no rank samples before every server holds the new weights
        return time.perf_counter() - start

    def close(self) -> None:
        """Leave the weight channel (the servers keep running); `generate` afterwards raises."""
        if self.closed:
            return
        self.closed = True
        if self.channel is not None:
            self.channel = None
            for url in self.urls:
                try:
                    _http(url, "/weights/close", {}, HEALTH_TIMEOUT_S, token=self.token)
                except RolloutEngineError as e:
                    log.warning("%s", e)
        self.pool.shutdown(wait=False)

    # --- helpers -------------------------------------------------------------------------------
    def _usable(self) -> None:
        if self.closed:
            raise RolloutEngineError("server rollout engine is closed (close() was called); build a new one")

    def _check_alive(self, timeout_s: float) -> list[int]:
        """Each server's max_model_len, from its /health; an unreachable one raises, naming it."""
        replies = [self.pool.submit(_http, url, "/health", None, timeout_s, "GET", token=self.token)
                   for url in self.urls]
        return [f.result()["max_model_len"] for f in replies]

    def _on_servers(self, path: str, bodies: list[dict | None]) -> list[dict | None]:
        """POST bodies[i] to server i, all at once (None: nothing to that server); their replies in order."""
        futures = [self.pool.submit(_http, url, path, body, self.timeout_s, token=self.token) if body is not None
                   else None
                   for url, body in zip(self.urls, bodies)]
        return [f.result() if f is not None else None for f in futures]

    def _open_channel(self) -> None:
        host = _address_towards(self.urls[0])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        size, secret = len(self.urls) + 1, weight_channel.new_secret()
        with weight_channel.listen(host) as listener:  # the store serves on host only, never on 0.0.0.0
            port = listener.getsockname()[1]
            joins = [self.pool.submit(_http, url, "/weights/open",
                                      dict(host=host, port=port, rank=i + 1, world_size=size, backend=backend,
                                           timeout_s=self.timeout_s, secret=secret),
                                      self.timeout_s, token=self.token) for i, url in enumerate(self.urls)]
            try:
                self.channel = weight_channel.open_group(host, port, 0, size, secret=secret, backend=backend,
                                                         timeout_s=self.timeout_s, listener=listener)
            except weight_channel.ChannelAuthError as e:
                raise RolloutEngineError(f"rollout servers {', '.join(self.urls)}: {e}") from e
            except Exception as e:  # noqa: BLE001
                for f in joins:
                    f.result()  # a server's own error names it
                raise RolloutEngineError(f"rollout servers {', '.join(self.urls)}: the weight channel at {host}:{port} "
                                         f"did not form within rollout.timeout_s={self.timeout_s:g} s: {e}") from e
        for f in joins:
            f.result()
        log.info("weight channel to %s open (%s, %s:%d)", ", ".join(self.urls), backend, host, port)

    def _push_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Announce the bucket to every server, broadcast its bytes, wait for each to say it loaded them."""
        meta, flat = weight_channel.pack_bucket(bucket)
        loads = [self.pool.submit(_http, url, "/weights/bucket", {"params": meta}, self.timeout_s, token=self.token)
                 for url in self.urls]
        try:
            weight_channel.broadcast(self.channel, flat, timeout_s=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a peer died or hung: find which
            self.channel = None
            dead = [url for url in self.urls if not _answers(url)]
            raise RolloutEngineError(f"rollout server {', '.join(dead or self.urls)}: the weight push failed "
                                     f"({'no answer to /health' if dead else type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
        for f in loads:
            f.result()


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous shares whose sizes differ by at most one (the first ones larger)."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def _http(url: str, path: str, body: dict | None, timeout_s: float, method: str = "POST", *,
          token: str = "") -> dict:
    """One JSON request (with the shared secret `token`, if any); any failure (refused, timed out, an error
    status) raises naming the server."""
    data = None if method == "GET" else json.dumps(body or {}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        if e.code == 403:
            sent = "a wrong one was sent" if token else "none was sent"
            raise RolloutEngineError(f"rollout server {url} refused {path} (403): set {TOKEN_ENV} in the trainer's "
                                     f"environment to the server's token ({sent})") from e
        raise RolloutEngineError(f"rollout server {url} failed {path}: {detail}") from e
    except TimeoutError as e:
        raise RolloutEngineError(f"rollout server {url}: no answer to {path} within "
                                 f"{timeout_s:g} s (rollout.timeout_s); is it hung?") from e
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise RolloutEngineError(f"rollout server {url}: no answer to {path} within "
                                     f"{timeout_s:g} s (rollout.timeout_s); is it hung?") from e
        raise RolloutEngineError(f"rollout server {url} is unreachable ({path}: {reason}); is grpo-vllm-serve "
                                 f"running there (rollout.server_urls)?") from e


def _answers(url: str) -> bool:
    try:
        _http(url, "/health", None, HEALTH_TIMEOUT_S, "GET")  # /health needs no token
        return True
    except RolloutEngineError:
        return False


def _address_towards(url: str) -> str:
    """This machine's address on the route to the server at `url` (where the server can reach the channel)."""
    parsed = urllib.parse.urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parsed.hostname, parsed.port or 80))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]
