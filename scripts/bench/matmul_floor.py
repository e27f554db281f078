"""How close one GRPO step on CPU is to its matmul floor: the arithmetic behind docs/benchmarks.md.

    python -m scripts.bench.matmul_floor  # the standard settings' shapes (bench=cpu)
    python -m scripts.bench.matmul_floor --threads 1

On the tiny built-in model, at the standard benchmark's shapes (64 rows, a 9-token prompt, 32
completion tokens), it times:

- float32 and bfloat16 matmuls of the model's shapes, alone (GFLOP/s);
- the training forward + backward over the whole batch, and the part of it spent in matmuls
  (`aten::mm`/`aten::addmm`, from torch's profiler); the same under bfloat16 autocast;
- one decode step (64 rows, one token, KV cache), and the part of it spent in matmuls.

Medians of `--repeats`; the machine may be shared, so compare figures from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_share(fn) -> float:
    """Fraction of `fn`'s profiled CPU time spent in matmul operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return mm / total


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt", type=int, default=9)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from grpo.training.run import resolve_model_path
    from tests.conftest import compose

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(compose([])), dtype=torch.float32)
    c = model.config
    R, P, C = args.rows, args.prompt, args.completion
    T = P + C
    print(f"tiny model: hidden {c.hidden_size}, {c.num_hidden_layers} layers, MLP {c.intermediate_size}; "
          f"{R} rows x ({P} prompt + {C} completion) tokens; torch threads {args.threads}")

    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((R * T, c.hidden_size, c.intermediate_size), (R, c.hidden_size, c.intermediate_size)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            s = median_time(lambda a=a, b=b: a @ b, args.repeats * 10)
            print(f"matmul {str(dtype):15s} [{m}, {k}] x [{k}, {n}]: {2 * m * k * n / s / 1e9:6.0f} GFLOP/s")

    ids = torch.randint(3, c.vocab_size, (R, T))

    def forward_backward():
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().log_softmax(-1).mean().backward()

    def forward_backward_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        logits.float().log_softmax(-1).mean().backward()

    fb = median_time(forward_backward, args.repeats)
    print(f"training forward + backward, float32: {fb:.3f} s, {matmul_share(forward_backward):.0%} in matmuls")
    fb16 = median_time(forward_backward_autocast, args.repeats)
    print(f"training forward + backward, bfloat16 autocast: {fb16:.3f} s ({fb16 / fb:.2f}x float32)")

    model.eval()
    with torch.no_grad():
        cache = model(input_ids=ids[:, : T - 1], use_cache=True).past_key_values
        last = ids[:, T - 1 :]
        length = cache.get_seq_length()

        def decode_step():
            model(input_ids=last, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new position: every repeat does the same work

        step = median_time(decode_step, args.repeats * 5)
        print(f"decode step ({R} rows, {length} cached positions): {step * 1000:.2f} ms, "
              f"{matmul_share(decode_step):.0%} in matmuls; x {C} steps = {step * C:.3f} s")


if __name__ == "__main__":
    main()
