"""`grpo-vllm-serve`: vLLM rollout engines in their own processes, on their own devices, serving the
trainer of `rollout.mode=server` (grpo.rollout.remote).

Each engine is the colocated `VLLMRolloutEngine` (grpo.rollout.vllm: the CPU oneDNN workaround,
`load_weights` through `apply_model`, kernels rebuilt and prefix cache reset after each update), hosted
in a process of its own behind a small HTTP server. `--data-parallel-size N` starts N such processes,
engine i on port `--port + i` and on its own `--tensor-parallel-size` devices (a slice of
CUDA_VISIBLE_DEVICES); the trainer lists their URLs and splits its prompts across them.

Endpoints (JSON bodies):
  GET  /health          the engine is up: its model and max_model_len (the one route open without the token)
  POST /check           nothing: the request's token is accepted (the trainer asks at start)
  POST /generate        token-id prompts and sampling settings -> completion ids, truncation, log-probs
  POST /weights/open    join the trainer's weight channel (grpo.rollout.weight_channel) as rank `rank`,
                        with the channel's one-time `secret` (a body without one is refused)
  POST /weights/bucket  receive one bucket by broadcast from the trainer and load it
  POST /weights/done    the update is complete: rebuild kernels, reset the prefix cache
  POST /weights/close   leave the channel (a new trainer may open another)

Choices:
1. The standard library's threaded HTTP server, not an async framework: engine calls block, and all of
   them run one at a time on one worker thread (the thread that built the engine), so requests from
   several trainer ranks queue rather than interleave inside vLLM.
2. Weights do not travel over HTTP: the request names the bucket's tensors, the bytes come over the
   process group (gloo on CPU, NCCL on GPU), and the reply says the bucket was loaded.
3. Only token ids cross the wire; the trainer tokenises and decodes with its own tokenizer.
4. It listens on 127.0.0.1 unless `--host` names another address. With a shared secret in the environment
   variable `GRPO_SERVER_TOKEN` (required for any address but a loopback one), every request but
   `GET /health` must carry it as `Authorization: Bearer <token>`; one without it is refused (403) and
   logged with its sender. Whoever holds the token can generate and replace the weights: it is a password.
   The token travels in clear HTTP: on a network you do not trust, put TLS in front (an SSH tunnel, a proxy).
"""

from __future__ import annotations

import argparse
import ctypes
import hmac
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from grpo.model.loading import load_tokenizer
from grpo.rollout import weight_channel
from grpo.rollout.remote import TOKEN_ENV
from grpo.rollout.vllm import VLLMRolloutEngine

log = logging.getLogger("grpo-vllm-serve")

OPEN_ROUTES = {("GET", "/health")}  # what a request without the token may ask: liveness, the model's length


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grpo-vllm-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (the policy's starting weights and tokenizer)")
    p.add_argument("--host", default="127.0.0.1",
                   help=f"address to listen on; any but a loopback one needs a shared secret in ${TOKEN_ENV}")
    p.add_argument("--port", type=int, default=8000, help="port of engine 0; engine i listens on port + i")
    p.add_argument("--data-parallel-size", type=int, default=1, help="engines, each in its own process")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices one engine is split over")
    p.add_argument("--dtype", default="bfloat16", help="the engine's weight dtype (float32, bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of engine 0; engine i uses seed + i")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="memory fraction (CPU: of RAM)")
    p.add_argument("--kv-cache-gb", type=float, default=0.0, help="KV cache GiB; 0 = from the fraction above")
    p.add_argument("--max-model-len", type=int, default=0, help="longest prompt + completion; 0 = the model's")
    p.add_argument("--block-size", type=int, default=0, help="KV-cache block tokens; 0 = vLLM's")
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="allow CUDA graphs / compilation (slower start, faster decoding)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    for name in ("data_parallel_size", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            sys.exit(f"grpo-vllm-serve: --{name.replace('_', '-')} must be >= 1")
    problem = token_problem(args.host, os.environ.get(TOKEN_ENV, ""))
    if problem:
        sys.exit(f"grpo-vllm-serve: {problem}")
    if args.data_parallel_size == 1:
        serve(args)
    else:
        launch_engines(args)


def token_problem(host: str, token: str) -> str | None:
    """Why the server must not start on `host` with `token` (empty: none), or None."""
    if token and len(token) < 16:
        return f"${TOKEN_ENV} is {len(token)} characters long; use at least 16 (e.g. `openssl rand -hex 32`)"
    if not token and not is_loopback(host):
        return (f"--host {host} accepts connections from other machines: set a shared secret in ${TOKEN_ENV} "
                f"(e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`), and the same in the trainer's environment")
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def launch_engines(args) -> None:
    """One process per data-parallel engine, each on its own devices; if one exits, stop them all."""
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if not devices and torch.cuda.is_available():
        devices = [str(i) for i in range(torch.cuda.device_count())]
    tp = args.tensor_parallel_size
    if devices and len(devices) < args.data_parallel_size * tp:
        sys.exit(f"grpo-vllm-serve: --data-parallel-size {args.data_parallel_size} x --tensor-parallel-size {tp} "
                 f"needs {args.data_parallel_size * tp} devices; {len(devices)} visible")
    procs = []
    for i in range(args.data_parallel_size):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[i * tp:(i + 1) * tp])
        cmd = [sys.executable, "-m", "grpo.rollout.serve", "--model", args.model, "--host", args.host,
               "--port", str(args.port + i), "--data-parallel-size", "1", "--tensor-parallel-size", str(tp),
               "--dtype", args.dtype, "--seed", str(args.seed + i),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--kv-cache-gb", str(args.kv_cache_gb),
               "--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size),
               *([] if args.enforce_eager else ["--no-enforce-eager"])]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        sys.exit(f"grpo-vllm-serve: engine {next(i for i, p in enumerate(procs) if p.poll() is not None)} exited")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def build_engine(args):
    """The colocated engine, built from the model directory (it syncs nothing until the trainer pushes)."""
    tokenizer = load_tokenizer(args.model)
    return VLLMRolloutEngine(
        None, tokenizer, model_path=args.model, dtype=args.dtype, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb,
        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, enable_sleep_mode=False, block_size=args.block_size)


def _die_with_parent() -> None:
    """In an engine's process: end when the launcher ends, even if it was killed (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EngineHost:
    """An engine (`build()`'s) and its weight channel; every call runs on the one worker thread."""

    def __init__(self, build):
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.channel, self.channel_timeout_s, self.channel_device = None, 0.0, "cpu"
        self.engine = self.worker.submit(build).result()

    def run(self, fn, *args):
        return self.worker.submit(fn, *args).result()

    # --- what the endpoints do (on the worker thread) --------------------------------------------
    def health(self, _request) -> dict:
        return {"ok": True, "max_model_len": self.engine.max_model_len}

    def check(self, _request) -> dict:
        return {"ok": True}

    def generate(self, r: dict) -> dict:
        e = self.engine
        e.temperature, e.top_p, e.top_k = r["temperature"], r["top_p"], r["top_k"]
        e.min_new_tokens, e.stop = r["min_new_tokens"], list(r["stop"])
        out = e.generate_from_ids(r["prompt_ids"], r["n"], greedy=r["greedy"], max_new_tokens=r["max_new_tokens"])
        return {"completion_ids": out.completion_ids, "truncated": out.truncated, "logprobs": out.logprobs,
                "metrics": out.metrics}

    def open_weights(self, r: dict) -> dict:
        secret = r.get("secret")
        if not isinstance(secret, str) or not secret:
            raise ValueError("/weights/open: the body has no 'secret' (the channel's one-time secret, which "
                             "grpo.rollout.remote sends); refusing to join a weight channel without one")
        self.close_weights({})
        if r["backend"] == "nccl":
            torch.cuda.set_device(0)
        self.channel = weight_channel.open_group(r["host"], r["port"], r["rank"], r["world_size"], secret=secret,
                                                 backend=r["backend"], timeout_s=r["timeout_s"])
        self.channel_timeout_s, self.channel_device = r["timeout_s"], "cuda" if r["backend"] == "nccl" else "cpu"
        return {"ok": True}

    def load_bucket(self, r: dict) -> dict:
        if self.channel is None:
            raise RuntimeError("no weight channel: POST /weights/open first")
        flat = torch.empty(weight_channel.bucket_nbytes(r["params"]), dtype=torch.uint8, device=self.channel_device)
        weight_channel.broadcast(self.channel, flat, timeout_s=self.channel_timeout_s)
        self.engine.load_weights(weight_channel.unpack_bucket(r["params"], flat))
        return {"ok": True}

    def finish_weights(self, _request) -> dict:
        self.engine.finish_weight_update()
        return {"ok": True}

    def close_weights(self, _request) -> dict:
        self.channel = None  # the group's sockets close with it
        return {"ok": True}


ROUTES = {("GET", "/health"): "health", ("POST", "/check"): "check", ("POST", "/generate"): "generate",
          ("POST", "/weights/open"): "open_weights", ("POST", "/weights/bucket"): "load_bucket",
          ("POST", "/weights/done"): "finish_weights", ("POST", "/weights/close"): "close_weights"}


def make_handler(host: EngineHost, token: str | None = None):
    """The HTTP handler over `host`; with a `token`, requests but OPEN_ROUTES must carry it (else 403)."""
    expected = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self, method: str):
            name = ROUTES.get((method, self.path))
            if name is None:
                return self._reply(404, {"error": f"no route {method} {self.path}"})
            if expected is not None and (method, self.path) not in OPEN_ROUTES and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), expected):
                log.warning("refused %s %s from %s: no valid token (Authorization: Bearer $%s)", method, self.path,
                            self.client_address[0], TOKEN_ENV)
                self.close_connection = True  # its body is left unread
                return self._reply(403, {"error": f"refused: this server needs the token in ${TOKEN_ENV} "
                                                  "(sent as Authorization: Bearer <token>)"})
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length)) if length else {}
            try:
                self._reply(200, host.run(getattr(host, name), request))
            except Exception as e:  # noqa: BLE001 - the trainer gets the engine's error, the server keeps serving
                log.exception("%s %s failed", method, self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def _reply(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    return Handler


def serve(args) -> None:
    """Build one engine and serve it until interrupted."""
    start = time.perf_counter()
    host = EngineHost(lambda: build_engine(args))
    token = os.environ.get(TOKEN_ENV) or None
    server = ThreadingHTTPServer((args.host, args.port), make_handler(host, token))
    log.info("engine on %s ready in %.0f s: serving http://%s:%d (%s)", args.model, time.perf_counter() - start,
             args.host, args.port, f"token from ${TOKEN_ENV} required" if token else "no token: loopback only")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        host.run(host.engine.close)


if __name__ == "__main__":
    main()
