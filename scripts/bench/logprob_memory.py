"""Peak memory of the log-prob and loss pass on a 151,936-token vocabulary (Qwen2.5's): ours vs naive vs TRL.

    python -m scripts.bench.logprob_memory                              # 64 sequences x 256 tokens, micro-batches of 8
    python -m scripts.bench.logprob_memory --hidden-size 896 --layers 4
    python -m scripts.bench.logprob_memory --methods ours --chunk-size 55  # 31.9 MiB chunks (see grpo/core/logprobs.py)

One pass = what an optimiser step needs from the model: per-token log-probs (and entropy) of the
completion tokens under a random-weight Qwen2 model, the GRPO loss (token mean of -ratio * advantage,
ratio = exp(logp - logp.detach())), backward, gradients accumulated over the micro-batches of
`--micro-batch` sequences (TRL's default `per_device_train_batch_size` is 8). Methods:

- ours:   `grpo.core.logprobs.sequence_logprobs` (backbone once, output embedding over chunks of positions);
- naive:  `grpo.core.logprobs.naive_sequence_logprobs` (the model's full `[B, T, V]` logits, then log-softmax);
- trl:    TRL's `GRPOTrainer._get_per_token_logps_and_entropies`, called as its `_compute_loss` calls it
          (`compute_entropy=True`), on a model patched by TRL's `add_fused_lm_head` as its trainer patches it;
- trl_selective: the model's logits, then TRL's `selective_log_softmax` (TRL's earlier path, still exported).

Each method runs in a fresh process; its peak is the growth of the peak resident set (`ru_maxrss`) over
the resident set measured just before the pass, after the model and its inputs are built and one short
warm-up sequence has been through the same method (so code pages and thread pools are not counted).
Torch allocations on CPU are invisible to tracemalloc; RSS sees them. The machine may be shared: memory
figures are not disturbed by that, times are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: each method reruns this module from it

METHODS = ("ours", "naive", "trl", "trl_selective")
VOCAB = 151936  # Qwen2.5


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64,
                         num_key_value_heads=max(1, args.hidden_size // 128), head_dim=64,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, VOCAB, (args.sequences, args.seq_len))  # [N, T]
    mask = torch.ones_like(ids)  # [N, T]
    advantages = torch.randn(args.sequences)  # [N]
    return model, ids, mask, advantages


def grpo_loss(logp, completion_mask, advantages):
    """Token-mean GRPO loss with one pass per batch (ratio exactly 1, gradient of the log-probs)."""
    import torch

    ratio = torch.exp(logp - logp.detach())  # [n, C]
    return -(ratio * advantages[:, None] * completion_mask).sum() / completion_mask.sum()


def run_pass(method: str, args) -> dict:
    """One log-prob + loss + backward pass over all sequences, in micro-batches; peak RSS growth."""
    import torch

    torch.set_num_threads(args.threads)
    model, ids, mask, advantages = build(args)
    model.train()
    P = args.seq_len - args.completion_len
    C = args.completion_len
    if method in ("trl", "trl_selective"):
        from trl import GRPOTrainer
        from trl.trainer.utils import add_fused_lm_head, selective_log_softmax

        if method == "trl":
            add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__
            trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext,
                                                                            is_main_process=True))
    from grpo.core.logprobs import naive_sequence_logprobs, sequence_logprobs

    def logprobs(mids, mmask):  # [n, C] log-probs of the completion tokens
        if method == "ours":
            lp, _ = sequence_logprobs(model, mids, mmask, with_entropy=True, logits_to_keep_from=P - 1,
                                      chunk_size=args.chunk_size)
            return lp[:, P - 1 :]
        if method == "naive":
            lp, _ = naive_sequence_logprobs(model, mids, mmask, with_entropy=True, logits_to_keep_from=P - 1)
            return lp[:, P - 1 :]
        if method == "trl":
            lp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, mids, mmask, C, compute_entropy=True)
            return lp
        logits = model(input_ids=mids, attention_mask=mmask, logits_to_keep=C + 1).logits[:, :-1]  # [n, C, V]
        return selective_log_softmax(logits, mids[:, -C:])

    completion_mask = torch.ones(args.sequences, C)  # [N, C]
    # Warm-up on one short sequence: loads the kernels' code pages and the thread pools, which the
    # resident set would otherwise count as growth of the first pass.
    warm = logprobs(ids[:1], mask[:1])  # [1, C]
    warm.sum().backward()
    model.zero_grad(set_to_none=True)
    del warm
    base = rss_mb()
    start = time.perf_counter()
    for lo in range(0, args.sequences, args.micro_batch):
        sl = slice(lo, lo + args.micro_batch)
        lp = logprobs(ids[sl], mask[sl])  # [n, C]
        loss = grpo_loss(lp, completion_mask[sl], advantages[sl]) * (lp.shape[0] / args.sequences)
        loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                              if p.grad is not None])))
    return {"method": method, "peak_growth_mb": peak - base, "base_rss_mb": base, "seconds": elapsed,
            "grad_norm": grad_norm}


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, prompt + completion")
    p.add_argument("--completion-len", type=int, default=192, help="completion tokens (the scored ones)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None, help="ours: positions per logits chunk (default: 64 MiB)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_pass(args.one, args)))
        return
    print(f"vocab {VOCAB}, hidden {args.hidden_size}, {args.layers} layers, float32, {args.sequences} sequences x "
          f"{args.seq_len} tokens ({args.completion_len} scored), micro-batches of {args.micro_batch}, "
          f"{args.threads} threads; each method in a fresh process")
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", __spec__.name, "--one", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("one", "methods") and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{method}: failed\n{out.stderr[-2000:]}")
            continue
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[method]
        print(f"{method:14s} peak growth {r['peak_growth_mb']:8.0f} MiB   {r['seconds']:7.1f} s   "
              f"grad norm {r['grad_norm']:.6f}", flush=True)
    if "ours" in results:
        for other in ("naive", "trl", "trl_selective"):
            if other in results:
                print(f"ours / {other}: "
                      f"peak {results['ours']['peak_growth_mb'] / results[other]['peak_growth_mb']:.3f}, "
                      f"time {results['ours']['seconds'] / results[other]['seconds']:.3f}")


if __name__ == "__main__":
    main()
