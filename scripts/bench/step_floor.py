"""Where a real model's GRPO step goes, phase by phase, against the matmul floor of the same work.

    python -m scripts.bench.step_floor --threads 1            # SmolLM2-135M, experiment=smollm2_addition's shapes
    python -m scripts.bench.step_floor --threads 1 --repeats 5 --override rollout.max_new_tokens=64

`scripts.bench.matmul_floor` does this arithmetic for the tiny model; here it is the real one, at its recipe's
shapes (`experiment=smollm2_addition`: SmolLM2-135M-Instruct, float32, LoRA r=16 on every linear layer, 8 prompts
x 8 completions of up to 32 tokens, the chat-formatted addition prompts, `backend.packing=groups`). One batch is
sampled with the run's own engine, then each phase of a step is timed on it, and beside it its floor:

- generation: `rollout=hf`'s sampler (`grpo.rollout.hf`) on the batch's 8 prompts, the same seed every repeat;
  its sampling (`sample_tokens`: temperature, filters, softmax and the draw over the 49,152-token vocabulary) is
  also reported on its own.
- old/ref log-probs: the no-gradient forward (`grpo.training.update.score_logprobs`) that a step runs for the
  ratio's old policy (`algorithm.epochs` x `mini_batches` > 1) or for the KL's reference (`beta` > 0). The recipe
  runs neither (one pass, beta 0), so it is timed as what one would cost and left out of the step's total.
- update: `grpo.training.update.update_policy` on the batch: the training forward (log-probs with a graph and the
  loss), the backward, the optimiser step (gradient clipping and fused AdamW over the adapters). The adapters are
  restored after each repeat, so every repeat samples and trains on the same tokens.

The floor of a phase is the same matmuls in bare `torch.mm` / `torch.bmm`, at the same dtype and thread count, on
the model's own weight tensors (so weights are read from memory as the model reads them), in the order the phase
runs them, with the work the phase needs and nothing else:

- every forward the phase runs (recorded by a hook on the backbone: rows, positions, cached length) as the 7
  projections of each layer with their LoRA A and B, the attention's two batched products over each sequence's
  own positions (query x keys, weights x values, per head; no padding), and the output head on the positions
  whose log-prob or next token is needed;
- the backward of the training forward as its input gradients (base weights frozen: no weight gradients but the
  adapters'), the adapters' weight gradients, the head's input gradient and twice the attention's products; the
  logits are not recomputed (the chunked head's checkpointing is ours);
- the optimiser step as bandwidth: the bytes fused AdamW and the gradient clipping read and write (parameters,
  gradients and both moments of the 4.9M adapter numbers) at the measured copy bandwidth;
- decode steps, which read every weight for a handful of rows, as the larger of their matmul time and their
  bandwidth time: the bytes of the weights (head included) and of the KV cache each step reads, over the measured
  copy bandwidth (a `copy_` of a 256 MiB tensor: bytes read + written per second).

Each repeat times a phase, then its floor, so load from other jobs hits both alike; medians over `--repeats`.
The load average is printed before and after. Read ratios, not absolute seconds, on a shared machine; where the
load changes within a run, `--clock cpu` (this process's CPU seconds, at one thread) is steadier than wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import grpo.rollout.hf as hf_rollout
from grpo.algorithms.grpo import advantage_batch
from grpo.config import completion_budget
from grpo.training.pipeline import InlineRollout
from grpo.training.run import build_run
from grpo.training.update import score_logprobs, update_policy
from tests.conftest import compose

CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (this process's CPU seconds: what load from others
# does not add to, at one thread)
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="smollm2_addition", help="the recipe (configs/experiment/); '' for none")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the run's `threads`)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats of every phase and floor (medians); 0: none (with --profile: the profile alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock seconds, or this process's CPU seconds (steadier on a loaded machine)")
    p.add_argument("--override", action="append", default=[], help="a further Hydra override of the recipe")
    p.add_argument("--profile", action="store_true", help="then each phase once under torch's profiler: its top "
                   "operators by own time (not part of the timings)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"load average before: {os.getloadavg()}")
    recipe = [f"experiment={args.experiment}"] if args.experiment else []
    cfg = compose([*recipe, f"run_dir={tempfile.mkdtemp(prefix='step-floor-')}", f"threads={args.threads}",
                   f"seed={args.seed}", *args.override])
    run = build_run(cfg)
    bench = StepBench(run, args.seed)
    results = {}
    if args.repeats > 0:
        results = bench.measure(args.repeats)
        report(bench, results, args)
    if args.profile:
        for name, phase in (("generation", bench.generate), ("update", bench.update)):
            print(f"\n{name}: operators by own time, one run under the profiler")
            top_operators(phase)
    print(f"load average after: {os.getloadavg()}")
    return results


# ---------------------------------------------------------------- the phases


@dataclass
class Forward:
    """One backbone forward: `rows` x `width` input positions after `cached` positions of KV cache."""

    rows: int
    width: int
    cached: int


class StepBench:
    """The run's phases on one fixed batch, and the floors of their recorded shapes."""

    def __init__(self, run, seed: int):
        self.run, self.cfg, self.seed = run, run.cfg, seed
        torch.manual_seed(seed)
        groups, _ = InlineRollout(run).take(1)
        self.prompts = [r["prompt"] for r in groups.rows]
        self.batch, _ = advantage_batch(run, groups, groups, 0)
        self.group = self.cfg.algorithm.group_size
        self.base = run.policy.get_base_model() if hasattr(run.policy, "get_base_model") else run.policy
        self.trainable = [p for p in run.policy.parameters() if p.requires_grad]
        self.forwards: list[Forward] | None = None  # recording: a list (prepare)
        self.base.model.register_forward_pre_hook(self._record, with_kwargs=True)
        self.sampling_s = 0.0
        self.sub = defaultdict(float)  # the update's backward and optimiser step
        run.backend.backward = self._timed("backward", run.backend.backward)
        run.backend.step = self._timed("optimiser", run.backend.step)
        sample = hf_rollout.sample_tokens

        def timed_sample(*a, **k):
            start = CLOCK[0]()
            out = sample(*a, **k)
            self.sampling_s += CLOCK[0]() - start
            return out

        hf_rollout.sample_tokens = timed_sample

    def prepare(self) -> None:
        """Each phase once (a warm-up), its forwards recorded for the floor: the timed repeats run the same."""
        self.generation_calls = self._record_calls(self.generate)
        self.logprob_calls = self._record_calls(self.old_logprobs)
        self.update_calls = self._record_calls(self.update)
        self.forwards = None
        self.floor = Floor(self)

    def _record(self, module, args, kwargs):
        if self.forwards is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        self.forwards.append(Forward(ids.shape[0], ids.shape[1], cache.get_seq_length() if cache is not None else 0))

    def _record_calls(self, phase) -> list[Forward]:
        self.forwards = []
        phase()
        return self.forwards

    def _timed(self, name, fn):
        def timed(*a, **k):
            start = CLOCK[0]()
            try:
                return fn(*a, **k)
            finally:
                self.sub[name] += CLOCK[0]() - start
        return timed

    def generate(self) -> None:
        torch.manual_seed(self.seed + 1)
        self.run.engine.generate(self.prompts, self.group)

    def old_logprobs(self) -> None:
        score_logprobs(self.run.backend.model, self.batch, temperature=self.cfg.rollout.temperature,
                       micro_batch_tokens=self.cfg.backend.micro_batch_tokens, packing=self.cfg.backend.packing)

    def update(self) -> None:
        saved = [p.detach().clone() for p in self.trainable]
        update_policy(self.run.backend, self.batch, self.cfg.algorithm, temperature=self.cfg.rollout.temperature,
                      micro_batch_tokens=self.cfg.backend.micro_batch_tokens,
                      max_new_tokens=completion_budget(self.cfg), packing=self.cfg.backend.packing)
        with torch.no_grad():  # the same weights every repeat: the next generation samples the same tokens
            for p, s in zip(self.trainable, saved):
                p.copy_(s)

    def measure(self, repeats: int) -> dict:
        """Each phase then its floor, `repeats` times; the medians (seconds)."""
        self.prepare()
        times = defaultdict(list)
        floor = self.floor
        for _ in range(repeats):
            self.sampling_s = 0.0
            times["generation"].append(clock(self.generate))
            times["generation/sampling"].append(self.sampling_s)
            gen = floor.generation()
            times["generation floor"].append(gen["total"])
            times["generation floor/matmul"].append(gen["matmul"])
            times["generation floor/bandwidth"].append(gen["bandwidth"])
            times["old/ref log-probs"].append(clock(self.old_logprobs))
            times["old/ref log-probs floor"].append(floor.forward_matmuls(grad=False))
            self.sub.clear()
            update = clock(self.update)
            times["update"].append(update)
            times["update/backward"].append(self.sub["backward"])
            times["update/optimiser"].append(self.sub["optimiser"])
            times["update/forward"].append(update - self.sub["backward"] - self.sub["optimiser"])
            fwd = floor.forward_matmuls(grad=False)
            bwd = floor.forward_matmuls(grad=True)
            opt = floor.optimiser()
            times["update floor/forward"].append(fwd)
            times["update floor/backward"].append(bwd)
            times["update floor/optimiser"].append(opt)
            times["update floor"].append(fwd + bwd + opt)
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
        return {k: statistics.median(v) for k, v in times.items()}


def top_operators(fn, count: int = 12) -> None:
    """`fn` once under torch's profiler: the `count` operators with the most own time, their share and calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:count]:
        print(f"  {e.key:55s} {e.self_cpu_time_total / 1e6:7.2f} s {e.self_cpu_time_total / total:6.1%} "
              f"{e.count:6d} calls")


def clock(fn) -> float:
    start = CLOCK[0]()
    fn()
    return CLOCK[0]() - start


# ---------------------------------------------------------------- the floor


@dataclass
class Floor:
    """Bare matmuls of a phase's recorded forwards on the model's own weights (module docstring)."""

    bench: StepBench
    inputs: dict = field(default_factory=dict)

    def __post_init__(self):
        base = self.bench.base
        c = base.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.layers = [[lora_parts(getattr(getattr(layer, block), name)) for block, name in PROJECTIONS]
                       for layer in base.model.layers]
        self.head = base.get_output_embeddings().weight  # [V, H]
        self.dtype = self.head.dtype
        self.bandwidth = copy_bandwidth(self.dtype)
        b = self.bench.batch
        self.prompt_lengths = b.attention_mask[:, : b.prompt_width].sum(1).tolist()  # [N]
        self.completion_lengths = b.attention_mask[:, b.prompt_width :].sum(1).tolist()  # [N]
        weights = [t for layer in self.layers for parts in layer for t in parts[:3] if t is not None]
        self.weight_bytes = sum(t.numel() * t.element_size() for t in [*weights, self.head])

    def x(self, m: int, k: int) -> torch.Tensor:
        if (m, k) not in self.inputs:
            self.inputs[m, k] = torch.randn(m, k, dtype=self.dtype)
        return self.inputs[m, k]

    def linears(self, m: int, grad: bool) -> None:
        """The 7 projections of every layer with their adapters, forward or their backward (`grad`)."""
        for layer in self.layers:
            for w, a, b in layer:  # w [n, k], a [r, k], b [n, r]
                n, k = w.shape
                if not grad:
                    torch.mm(self.x(m, k), w.t())
                    if a is not None:
                        torch.mm(torch.mm(self.x(m, k), a.t()), b.t())
                    continue
                torch.mm(self.x(m, n), w)  # dx = dy W
                if a is not None:
                    r = a.shape[0]
                    torch.mm(self.x(m, n), b)  # d(xA^T) = dy B          [m, r]
                    torch.mm(self.x(m, n).t(), self.x(m, r))  # dB = dy^T (x A^T)  [n, r]
                    torch.mm(self.x(m, r).t(), self.x(m, k))  # dA = d(xA^T)^T x   [r, k]
                    torch.mm(self.x(m, r), a)  # dx += d(xA^T) A       [m, k]

    def attention(self, queries: int, keys: int, count: int) -> None:
        """Both products of attention, per head, for `count` sequences of `queries` x `keys` positions."""
        h, d = self.heads, self.head_dim
        q = self.x(count * h * queries, d).view(count * h, queries, d)
        k = self.x(count * h * keys, d).view(count * h, keys, d)
        for _ in self.layers:
            scores = torch.bmm(q, k.transpose(1, 2))  # [count*h, queries, keys]
            torch.bmm(scores, k)  # [count*h, queries, d]

    def forward_matmuls(self, grad: bool) -> float:
        """Seconds of the training (or old/ref) forwards' matmuls, or of their backward (`grad`): every position
        that is not padding through the layers, each sequence's attention, the head on the completion tokens."""
        start = CLOCK[0]()
        sequences = list(zip(self.prompt_lengths, self.completion_lengths))
        positions = self.needed_positions(sequences)
        self.linears(positions, grad)
        for length in {p + c for p, c in sequences}:
            count = sum(1 for p, c in sequences if p + c == length)
            for _ in range(2 if grad else 1):
                self.attention(length, length, count)
        scored = sum(self.completion_lengths)
        if grad:
            torch.mm(self.x(scored, self.head.shape[0]), self.head)  # [S, V] x [V, H]
        else:
            torch.mm(self.x(scored, self.head.shape[1]), self.head.t())  # [S, H] x [H, V]
        return CLOCK[0]() - start

    def needed_positions(self, sequences) -> int:
        """Positions through the layers: each prompt once for its group (as `backend.packing=groups` does), and
        every completion token."""
        g = self.bench.group
        return sum(self.prompt_lengths[i] for i in range(0, len(sequences), g)) + sum(c for _, c in sequences)

    def generation(self) -> dict:
        """The sampler's forwards: each the larger of its matmuls' time and its bytes over the copy bandwidth."""
        total = matmul = bandwidth = 0.0
        for f in self.bench.generation_calls:
            start = CLOCK[0]()
            if f.cached == 0:  # the prefill: each prompt's own positions
                prompts = self.prompt_lengths[:: self.bench.group]
                self.linears(sum(prompts), grad=False)
                for length in set(prompts):
                    self.attention(length, length, prompts.count(length))
            else:
                self.linears(f.rows, grad=False)
                self.attention(1, f.cached + 1, f.rows)
            torch.mm(self.x(f.rows, self.head.shape[1]), self.head.t())  # the next token's logits only
            mm = CLOCK[0]() - start
            kv = f.rows * len(self.layers) * 2 * self.kv_heads * (f.cached + f.width) * self.head_dim
            bw = (self.weight_bytes + kv * self.head.element_size()) / self.bandwidth
            matmul, bandwidth, total = matmul + mm, bandwidth + bw, total + max(mm, bw)
        return {"total": total, "matmul": matmul, "bandwidth": bandwidth}

    def optimiser(self) -> float:
        """Fused AdamW and the clipping over the adapters as bytes over the copy bandwidth: AdamW reads parameter,
        gradient and two moments and writes three; the norm reads the gradients, the clip reads and writes them."""
        numbers = sum(p.numel() for p in self.bench.trainable)
        return numbers * self.head.element_size() * (7 + 3) / self.bandwidth


def lora_parts(module) -> tuple:
    """(W [n, k], A [r, k] or None, B [n, r] or None) of a linear layer, LoRA-adapted or not."""
    if hasattr(module, "base_layer"):
        adapter = module.active_adapters[0]
        return module.base_layer.weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return module.weight, None, None


def copy_bandwidth(dtype: torch.dtype, mib: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by `copy_` of a `mib` MiB tensor (far larger than the caches)."""
    src = torch.ones(mib * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(clock(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / seconds


# ---------------------------------------------------------------- the report


def report(bench: StepBench, r: dict, args) -> None:
    c, f = bench.base.config, bench.floor
    rows = [("generation", r["generation"], r["generation floor"]),
            ("update: forward", r["update/forward"], r["update floor/forward"]),
            ("update: backward", r["update/backward"], r["update floor/backward"]),
            ("update: optimiser step", r["update/optimiser"], r["update floor/optimiser"]),
            ("step (generation + update)", r["generation"] + r["update"], r["generation floor"] + r["update floor"]),
            ("old/ref log-probs (not in the recipe's step)", r["old/ref log-probs"], r["old/ref log-probs floor"])]
    decode = [x for x in bench.generation_calls if x.cached]
    m = bench.cfg.model
    print(f"\n{m.gguf_file or m.path or m.builtin}: hidden {c.hidden_size}, {c.num_hidden_layers} "
          f"layers, vocabulary {c.vocab_size}, {f.dtype}; torch threads {args.threads}; "
          f"{torch.backends.cpu.get_cpu_capability()} kernels; repeats {args.repeats}; {args.clock} seconds")
    print(f"batch: {len(bench.prompts)} prompts x {bench.group}, prompts {min(f.prompt_lengths)}-"
          f"{max(f.prompt_lengths)} tokens, completions {sum(f.completion_lengths)} tokens "
          f"(max {max(f.completion_lengths)}); {len(decode)} decode steps over {sum(x.rows for x in decode)} rows; "
          f"copy bandwidth {f.bandwidth / 1e9:.1f} GB/s; weights {f.weight_bytes / 2**20:.0f} MiB")
    forwarded = sum(x.rows * x.width for x in bench.update_calls)
    needed = f.needed_positions(list(zip(f.prompt_lengths, f.completion_lengths)))
    print(f"training forward: {forwarded} positions forwarded ({bench.cfg.backend.packing} layout: "
          f"{[(x.rows, x.width) for x in bench.update_calls]}), {needed} needed")
    print("\n| phase | measured s | floor s | measured / floor |\n|---|---|---|---|")
    for name, measured, floor in rows:
        print(f"| {name} | {measured:.2f} | {floor:.2f} | {measured / floor:.1f}x |")
    print(f"\ngeneration floor: matmuls {r['generation floor/matmul']:.2f} s, bandwidth "
          f"{r['generation floor/bandwidth']:.2f} s (each decode step the larger); sampling over the vocabulary "
          f"{r['generation/sampling']:.2f} s of the measured {r['generation']:.2f} s")


if __name__ == "__main__":
    main()
