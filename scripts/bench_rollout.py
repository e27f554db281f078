"""Rollout throughput: `rollout=hf` (transformers generate) against `rollout=vllm`, alternated in one run.

    .venv-vllm/bin/python scripts/bench_rollout.py                    # the demo's tiny model, 64 prompts x 8
    .venv-vllm/bin/python scripts/bench_rollout.py --size small       # a 4x wider, 2x deeper random model
    .venv-vllm/bin/python scripts/bench_rollout.py --prompts 32 --group 16 --max-new-tokens 32 --rounds 5

Both engines get the same model directory (the same weights), the same prompts, group size and sampling
settings, and every completion is exactly `--max-new-tokens` long (`min_new_tokens` on both sides holds
EOS back), so both generate the same number of tokens; throughput is generated tokens per second of
`generate` wall time. The machine may be shared: the engines take turns, round by round, so load from
elsewhere hits both alike; read the ratio of one run, not absolute figures across runs. The vLLM engine is
built once (its start-up is not counted; it is paid once per run) and each engine runs one warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Qwen2-architecture models with the character-level tokenizer; head_dim 64 (vLLM's CPU attention)
    "tiny": None,  # the demo's warm-started model (grpo.warmstart), 0.8M parameters
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, max_positions=256),  # 34M
}


def model_dir(size: str, workdir: Path) -> str:
    if SIZES[size] is None:
        from grpo.train import resolve_model_path
        from tests.conftest import compose

        return resolve_model_path(compose([]))
    from grpo.tiny import save_tiny

    return str(save_tiny(workdir / size, seed=0, **SIZES[size]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--prompts", type=int, default=64, help="prompts per generate call")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per engine")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.rollout.hf import HFRolloutEngine
    from grpo.rollout.vllm import VLLMRolloutEngine
    from grpo.tasks.arithmetic import Arithmetic

    torch.set_num_threads(args.threads)  # before vLLM binds its threads (it refuses changes afterwards)
    workdir = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    path = model_dir(args.size, workdir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [row["prompt"] for row in Arithmetic().eval_rows()[: args.prompts]]
    n_params = sum(p.numel() for p in model.parameters())
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens)
    engines = {
        "hf": HFRolloutEngine(model, tokenizer, batch_size=args.prompts * args.group, **sampling),
        "vllm": VLLMRolloutEngine(model, tokenizer, model_path=path, dtype="float32", kv_cache_gb=0.5, **sampling),
    }
    rates = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            out = engine.generate(prompts, args.group)
            tokens = sum(map(len, out.completion_ids))
            assert tokens == len(prompts) * args.group * args.max_new_tokens, (name, tokens)
            if round_:
                rates[name].append(tokens / out.metrics["time/generate_s"])
    sync_s = engines["vllm"].sync_weights(model)
    hf, vllm = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    print(f"model: {args.size} ({n_params / 1e6:.1f}M parameters, float32), {args.prompts} prompts x {args.group} "
          f"samples x {args.max_new_tokens} tokens, {args.rounds} rounds, torch threads {args.threads}")
    print(f"hf    generate: {hf:10.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['hf'])})")
    print(f"vllm  generate: {vllm:10.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['vllm'])})")
    print(f"vllm / hf: {vllm / hf:.2f}x;  vllm weight sync: {sync_s * 1000:.1f} ms")
    engines["vllm"].close()


if __name__ == "__main__":
    main()
