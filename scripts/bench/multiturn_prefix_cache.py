"""Multi-turn episodes on the vLLM engine with its prefix cache on and off: seconds per turn's generate call.

    .venv-vllm/bin/python -m scripts.bench.multiturn_prefix_cache
    .venv-vllm/bin/python -m scripts.bench.multiturn_prefix_cache --rows 8 --group 4 --turns 4 --reply 300

Two engines on the same random model (Qwen2 architecture, character tokenizer, 2048 positions), one with
`enable_prefix_caching` and one without, the same `block_size`, run the same episodes: `--rows` openings of
`--opening` characters, `--group` episodes each, `--turns` model turns of exactly `--max-new-tokens` tokens
(EOS held back), and after each turn but the last an environment reply of `--reply` characters. Each turn is
one `generate_from_ids` call over all episodes; with the cache on, a turn prefills only what the previous
turn did not compute (its own sampled ids' last token, the reply). The engines take turns, round by round,
on a machine that may be shared; each round starts from an empty cache, and round 0 warms up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from grpo.builtin.tiny import save_tiny
from grpo.envs import Done, Observation
from grpo.model.loading import load_tokenizer
from grpo.rollout.episodes import run_episodes


class Replies:
    """Answers every turn with the same long user message; `Done` after `turns` turns."""

    tools = []

    def __init__(self, turns: int, reply: str):
        self.turns, self.reply, self.steps = turns, reply, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.steps += 1
        return Done(0.0) if self.steps >= self.turns else Observation([{"role": "user", "content": self.reply}])


class Timed:
    """The engine, keeping each `generate_from_ids` call's seconds and prefix-cached tokens (one call a turn)."""

    def __init__(self, engine):
        self.engine, self.max_model_len, self.calls = engine, engine.max_model_len, []

    def generate_from_ids(self, prompt_ids, n, **kwargs):
        out = self.engine.generate_from_ids(prompt_ids, n, **kwargs)
        self.calls.append((out.metrics["time/generate_s"], out.metrics["rollout/prefix_cached_tokens"],
                           sum(map(len, prompt_ids))))
        return out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="openings per call")
    p.add_argument("--group", type=int, default=4, help="episodes per opening")
    p.add_argument("--turns", type=int, default=4, help="model turns per episode")
    p.add_argument("--opening", type=int, default=300, help="characters (tokens) of each opening's user message")
    p.add_argument("--reply", type=int, default=300, help="characters (tokens) of each environment reply")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 64: hidden / 64 heads)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32, help="KV-cache block, both engines (CPU: a multiple of 32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from grpo.rollout.vllm import VLLMRolloutEngine

    torch.set_num_threads(args.threads)  # before vLLM binds its threads
    path = str(save_tiny(Path(tempfile.mkdtemp(prefix="bench_multiturn_")), seed=0, hidden_size=args.hidden,
                         num_layers=args.layers, num_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                         max_positions=2048))
    tokenizer = load_tokenizer(path)
    budget = args.turns * args.max_new_tokens + (args.turns - 1) * (args.reply + 40)
    engines = {cached: VLLMRolloutEngine(None, tokenizer, model_path=path, dtype="float32", kv_cache_gb=1.0,
                                         max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                         block_size=args.block_size, enable_prefix_caching=cached, seed=0)
               for cached in (True, False)}
    digits = "0123456789"
    rows = [{"prompt": (digits[r:] + digits[:r]) * (args.opening // 10)} for r in range(args.rows)]
    reply = ("go " * args.reply)[: args.reply]
    seconds = {cached: [] for cached in engines}  # per round: [turn 1 s, turn 2 s, ...]
    cached_tokens, context_tokens = {}, {}
    for round_ in range(args.rounds + 1):
        for cached, engine in engines.items():
            engine.llm.reset_prefix_cache()
            timed = Timed(engine)
            out = run_episodes(timed, tokenizer, lambda: Replies(args.turns, reply), rows, args.group,
                               max_turns=args.turns, max_episode_tokens=budget, max_new_tokens=args.max_new_tokens)
            assert all(e["turns"] == args.turns and not e["truncated"] for e in out.episodes), out.episodes[0]
            if round_:
                seconds[cached].append([s for s, _, _ in timed.calls])
            cached_tokens[cached] = [c for _, c, _ in timed.calls]
            context_tokens[cached] = [t for _, _, t in timed.calls]
    print(f"model: hidden {args.hidden}, {args.layers} layers, float32; {args.rows} openings x {args.group} "
          f"episodes, {args.turns} turns of {args.max_new_tokens} tokens, replies of {args.reply} tokens, block "
          f"{args.block_size}; {args.rounds} rounds, median; torch threads {args.threads}")
    print(f"context tokens per call: {context_tokens[True]}")
    for cached in engines:
        per_turn = [statistics.median(r[t] for r in seconds[cached]) for t in range(args.turns)]
        total = statistics.median(sum(r) for r in seconds[cached])
        print(f"prefix cache {'on ' if cached else 'off'}: per turn {', '.join(f'{s:.3f}' for s in per_turn)} s; "
              f"episode {total:.3f} s; prefix-cached tokens per call {cached_tokens[cached]}")
        print(f"  rounds: {'; '.join(', '.join(f'{s:.2f}' for s in r) for r in seconds[cached])}")
    on, off = (statistics.median(r[-1] for r in seconds[c]) for c in (True, False))
    print(f"last turn: on / off = {on / off:.2f}")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
