"""Rollout throughput: the `rollout=hf` engine's loop, transformers' `generate`, and `rollout=vllm`, alternated.

    python -m scripts.bench.rollout_throughput --engines hf,generate        # the demo's tiny model, 64 prompts x 8
    .venv-vllm/bin/python -m scripts.bench.rollout_throughput               # all three (vLLM needs its venv)
    .venv-vllm/bin/python -m scripts.bench.rollout_throughput --size small  # a 4x wider, 2x deeper random model
    .venv-vllm/bin/python -m scripts.bench.rollout_throughput --prompts 32 --group 16 --max-new-tokens 32 --rounds 5
    .venv-vllm/bin/python -m scripts.bench.rollout_throughput --model smollm2-135m --prompts 8 --max-new-tokens 32
    .venv-vllm/bin/python -m scripts.bench.rollout_throughput --model smollm2-135m --lora-rank 16 \
        --engines hf,vllm,vllm-merged

All engines get the same model directory (the same weights), the same prompts, group size and sampling
settings, and every completion is exactly `--max-new-tokens` long (`min_new_tokens` everywhere holds
EOS back), so all generate the same number of tokens; throughput is generated tokens per second of
`generate` wall time. `generate` is transformers' `model.generate` with the settings the `hf` engine
used before it had its own loop (`num_return_sequences`, logits returned for the sampler's log-probs).
The machine may be shared: the engines take turns, round by round, so load from elsewhere hits all
alike; read the ratios of one run, not absolute figures across runs. The vLLM engine is built once
(its start-up is not counted; it is paid once per run) and each engine runs one warm-up round.

`--model smollm2-135m` is SmolLM2-135M-Instruct (`model=smollm2-135m-instruct`, converted once into the cache), given
`experiment=smollm2_addition`'s held-out questions in its chat template with the recipe's system prompt.
`--lora-rank R` samples from the model with fresh LoRA adapters of rank R on every linear layer (B = 0, so the same
distribution): `hf` and `generate` run the peft model, `vllm` is the engine that `rollout.lora_sync=adapter` builds
(vLLM's LoRA kernels serving the adapters) and `vllm-merged` the one `rollout.lora_sync=merged` builds (plain
weights, the adapters merged in at each sync).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

from grpo.rollout.hf import HFRolloutEngine

SIZES = {  # Qwen2-architecture models with the character-level tokenizer; head_dim 64 (vLLM's CPU attention)
    "tiny": None,  # the demo's warm-started model (grpo.builtin.warmstart), 0.8M parameters
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, max_positions=256),  # 34M
}
REAL_MODELS = {"smollm2-135m": "smollm2_addition"}  # --model -> the configs/experiment/ whose model and task it takes
MODELS = [*SIZES, *REAL_MODELS]
REAL_CONTEXT = 1024  # vLLM's max_model_len for a real model: its 8,192 would size the KV cache check for nothing


def real_model_config(name: str):
    from tests.conftest import compose

    return compose([f"experiment={REAL_MODELS[name]}"])


def model_dir(size: str, workdir: Path) -> str:
    if size in REAL_MODELS:
        from grpo.training.run import resolve_model_path

        return resolve_model_path(real_model_config(size))
    if SIZES[size] is None:
        from grpo.training.run import resolve_model_path
        from tests.conftest import compose

        return resolve_model_path(compose([]))
    from grpo.builtin.tiny import save_tiny

    return str(save_tiny(workdir / size, seed=0, **SIZES[size]))


class TransformersGenerate:
    """The reference: transformers' `generate`, n sequences per prompt, with the logits for log-probs."""

    def __init__(self, model, tokenizer, *, temperature, top_p, top_k, max_new_tokens, min_new_tokens):
        self.model, self.tokenizer = model, tokenizer
        self.kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None,
                           max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           return_dict_in_generate=True, output_logits=True)

    def generate(self, prompts, n):
        import torch

        start = time.perf_counter()
        enc = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**enc, num_return_sequences=n, **self.kwargs)
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, V]
            logits.log_softmax(-1).gather(-1, new.unsqueeze(-1))  # the sampler's log-probs, as the engine returns
        completions = [row.tolist() for row in new]
        return types.SimpleNamespace(completion_ids=completions,
                                     metrics={"time/generate_s": time.perf_counter() - start})


def bench_prompts(model: str, tokenizer, count: int) -> list[str]:
    """The demo's held-out problems, or for a real model its recipe's, rendered as the trainer renders them."""
    from grpo.builtin.arithmetic import Arithmetic

    if model not in REAL_MODELS:
        return [row["prompt"] for row in Arithmetic().eval_rows()[:count]]
    from grpo.data.loading import chat_prompts

    task = real_model_config(model).task
    options = task.arithmetic
    rows = Arithmetic(digits=options.digits, digits_b=options.digits_b, reverse=options.reverse,
                      style=options.style).eval_rows()[:count]
    return [row["prompt"] for row in chat_prompts(rows, tokenizer, task, "bench")]


def build_engines(args, names: list[str], model, tokenizer, path: str, sampling: dict) -> dict:
    engines = {}
    for name in names:
        if name == "hf":
            engines[name] = HFRolloutEngine(model, tokenizer, batch_size=args.prompts * args.group, **sampling)
        elif name == "generate":
            engines[name] = TransformersGenerate(model, tokenizer, **sampling)
        elif name in ("vllm", "vllm-merged"):
            from grpo.rollout.vllm import VLLMRolloutEngine

            engines[name] = VLLMRolloutEngine(model, tokenizer, model_path=path, dtype="float32", kv_cache_gb=0.5,
                                              max_model_len=REAL_CONTEXT if args.size in REAL_MODELS else 0,
                                              lora_rank=args.lora_rank,
                                              lora_sync="merged" if name == "vllm-merged" else "adapter", **sampling)
        else:
            raise SystemExit(f"--engines: unknown engine {name!r} (hf, generate, vllm, vllm-merged)")
    return engines


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--model", "--size", dest="size", choices=MODELS, default="tiny")
    p.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="hf,generate,vllm", help="comma-separated: hf, generate, vllm, vllm-merged")
    p.add_argument("--lora-rank", type=int, default=0, help="sample from the model with LoRA adapters of this rank")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from grpo.model.loading import load_tokenizer, pad_left

    torch.set_num_threads(args.threads)  # before vLLM binds its threads (it refuses changes afterwards)
    workdir = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    path = model_dir(args.size, workdir)
    tokenizer = pad_left(load_tokenizer(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = bench_prompts(args.size, tokenizer, args.prompts)
    n_params = sum(p.numel() for p in model.parameters())
    if args.lora_rank:
        from grpo.config import LoraOptions
        from grpo.model.lora import add_adapters

        model = add_adapters(model, LoraOptions(r=args.lora_rank, alpha=2 * args.lora_rank))
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens)
    engines = build_engines(args, args.engines.split(","), model, tokenizer, path, sampling)
    rates = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            out = engine.generate(prompts, args.group)
            tokens = sum(map(len, out.completion_ids))
            assert tokens == len(prompts) * args.group * args.max_new_tokens, (name, tokens)
            if round_:
                rates[name].append(tokens / out.metrics["time/generate_s"])
    print(f"model: {args.size} ({n_params / 1e6:.1f}M parameters, float32), {args.prompts} prompts x {args.group} "
          f"samples x {args.max_new_tokens} tokens, {args.rounds} rounds, torch threads {args.threads}, LoRA rank "
          f"{args.lora_rank or '-'}, load average {os.getloadavg()[0]:.1f}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:11s} {median[name]:10.0f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in r)})")
    if "hf" in median:
        for name in median.keys() - {"hf"}:
            print(f"{name} / hf: {median[name] / median['hf']:.2f}x")
    for name in engines.keys() & {"vllm", "vllm-merged"}:
        print(f"{name} weight sync: {engines[name].sync_weights(model) * 1000:.1f} ms")
        engines[name].close()


if __name__ == "__main__":
    main()
