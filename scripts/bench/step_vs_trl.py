"""Our GRPO step against TRL's `GRPOTrainer`, doing the same work, alternated in one run.

    python -m scripts.bench.step_vs_trl                # the standard CPU settings (configs/bench/cpu.yaml)
    python -m scripts.bench.step_vs_trl --steps 20 --warmup 2
    python -m scripts.bench.step_vs_trl --natural-eos  # completions stop at EOS (token counts then differ)
    python -m scripts.bench.step_vs_trl --device cuda --model qwen2.5-1.5b  # random Qwen2.5-1.5B-shaped model, bf16

Both sides get the same model weights (two copies, each trained by its own side), prompts, group size,
sampling settings (temperature, top-p, top-k, up to `max_new_tokens`), reward function, optimiser
(AdamW, same learning rate, betas, clipping, constant schedule) and loss (token mean over the batch,
which is TRL's `loss_type="dapo"`); no KL term and no reference model (`beta=0`); one optimiser step per
rollout batch of B*G completions (TRL: `per_device_train_batch_size=B*G`, `gradient_accumulation_steps=1`,
hence `steps_per_generation=1`, `generation_batch_size=B*G`, `num_iterations=1`, so it skips its old-log-prob
pass too); the same activation checkpointing (ours: `backend.gradient_checkpointing`, off by default; TRL's
default is on, which recomputes the forward in backward and keeps fewer activations, so left at its default
TRL would do more work per step in less memory); the same precision (the model's dtype: TRL's default
`bf16=True` autocast is set to match it); TRL's logging, checkpointing and progress bar are off. Every completion has
exactly `max_new_tokens` tokens (`min_new_tokens` on both sides) unless `--natural-eos`.

The machine may be shared: one side's step runs, then the other's, alternately, so that load from
elsewhere hits both alike; compare the ratios from one run, not absolute times across runs.
A TRL step is timed from the end of our previous step to TRL's `on_step_end` callback, so it includes
its loop's own overhead (data loading, bookkeeping); ours is `grpo.algorithms.grpo.train_step`.

Phases (seconds per step, medians): generation (the rollout engine / `_generate_single_turn`), scoring
(reward functions), log-probs (the forward passes that compute per-token log-probs), update (backward
and optimiser step), weight sync (ours: `engine.sync_weights`; TRL with transformers generate has none),
other (the rest of the step). Peak memory: on CPU, the peak resident-set growth over a few steps, each side
in a fresh process (one process cannot tell the two sides' peaks apart), read from VmHWM after resetting it
at the first timed step; it counts freed memory that malloc keeps; on CUDA, `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from scripts.bench.common import (
    MODEL_SHAPES,
    PHASES,
    ROOT,
    mfu,
    peak_memory_mb,
    random_model_dir,
    run_alternating,
    summarise,
    update_flops,
)

# ---------------------------------------------------------------- settings and model

def standard_config(args, run_dir: str):
    """The validated Config of `bench=cpu` plus this run's overrides."""
    from hydra import compose, initialize_config_dir

    from grpo.config import CONFIG_DIR, register_configs, to_config

    overrides = ["bench=cpu", f"run_dir={run_dir}"]
    if args.natural_eos:
        overrides.append("rollout.min_new_tokens=0")
    if args.model != "tiny":
        overrides.append(f"model.dtype={args.dtype}")
    overrides += args.override
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


# ---------------------------------------------------------------- measurement

def peak_rss_in_fresh_process(side: str, args) -> float:
    """Peak RSS growth (MiB) over `--memory-steps` steps of one side, alone in a new process."""
    cmd = [sys.executable, "-m", __spec__.name, "--only", side, "--steps", str(args.memory_steps), "--warmup", "1",
           "--json", "--model", args.model, "--dtype", args.dtype] + (["--natural-eos"] if args.natural_eos else [])
    cmd += [f"--override={o}" for o in args.override]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory run of {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mb"]


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="tiny", choices=("tiny", *MODEL_SHAPES), help="tiny: the built-in model")
    p.add_argument("--dtype", default="bfloat16", help="dtype of a random-weight model (tiny stays float32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: the config's `threads`")
    p.add_argument("--natural-eos", action="store_true", help="let completions stop at EOS")
    p.add_argument("--memory-steps", type=int, default=3, help="CPU peak-RSS runs: steps per side")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS runs")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override, e.g. train.prompts_per_step=4")
    p.add_argument("--only", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    import logging

    import torch
    import transformers

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("WANDB_MODE", "disabled")
    run_dir = tempfile.mkdtemp(prefix="grpo-bench-")
    cfg = standard_config(args, run_dir)
    torch.set_num_threads(args.threads or cfg.threads or torch.get_num_threads())
    from grpo.training.run import resolve_model_path

    if args.model != "tiny":
        cfg.model.builtin, cfg.model.path = None, random_model_dir(args.model, args.dtype)
    model_path = resolve_model_path(cfg)
    cfg.model.path = model_path
    torch.manual_seed(cfg.seed)

    result = run_alternating(args, cfg, model_path)
    if args.only:
        side = args.only
        growth = peak_memory_mb("cpu") - result["base_rss"][side]
        print(json.dumps({"side": side, "peak_rss_growth_mb": growth, **summarise(result["records"][side])}))
        return

    ours, trl = summarise(result["records"]["ours"]), summarise(result["records"]["trl"])
    if args.device == "cpu" and not args.no_memory:
        ours["peak_mb"], trl["peak_mb"] = (peak_rss_in_fresh_process(s, args) for s in ("ours", "trl"))
        peak_note = "peak RSS growth over the steps, each side alone in a fresh process"
    elif args.device == "cuda":
        ours["peak_mb"] = max(r["peak_mb"] for r in result["records"]["ours"])
        trl["peak_mb"] = max(r["peak_mb"] for r in result["records"]["trl"])
        peak_note = "torch.cuda.max_memory_allocated during a step"
    else:
        peak_note = "not measured (--no-memory)"
    r = cfg.rollout
    print(f"model {args.model} ({model_path}), device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{cfg.train.prompts_per_step} prompts x {cfg.algorithm.group_size} completions, "
          f"max_new_tokens {r.max_new_tokens}, min_new_tokens {r.min_new_tokens}, temperature {r.temperature}, "
          f"beta {cfg.algorithm.beta}, {args.steps} timed steps per side after {args.warmup} warm-up, alternating")
    rows = [("median step (s)", "step_s", "{:.3f}"), ("  min (s)", "step_min", "{:.3f}"),
            ("  max (s)", "step_max", "{:.3f}"), ("  interquartile range (s)", "step_iqr", "{:.3f}"),
            ("generated tokens / step", "tokens", "{:.0f}"), ("tokens / s (whole step)", "tokens_per_s", "{:.0f}"),
            ("tokens / s (generation)", "gen_tokens_per_s", "{:.0f}")]
    rows += [(f"{ph} (s)", ph, "{:.4f}") for ph in PHASES]
    rows += [("peak memory (MiB)", "peak_mb", "{:.0f}")]
    print(f"{'':28s}{'ours':>12s}{'TRL':>12s}{'ours/TRL':>10s}")
    for label, key, fmt in rows:
        a, b = ours.get(key, float("nan")), trl.get(key, float("nan"))
        ratio = f"{a / b:10.3f}" if b else f"{'-':>10s}"
        print(f"{label:28s}{fmt.format(a):>12s}{fmt.format(b):>12s}{ratio}")
    print(f"peak memory: {peak_note}")
    if "logprob_abs_diff" in ours:
        print(f"ours: max rollout/logprob_abs_diff (sampler vs trainer) {ours['logprob_abs_diff']:.2e}")
    print(f"speed-up (TRL median step / ours): {trl['step_s'] / ours['step_s']:.2f}x")
    if args.device == "cuda":
        for side, s in (("ours", ours), ("TRL", trl)):
            tokens = s["scored_tokens"]  # prompt + completion positions of the training forward
            secs = s["logprobs"] + s["update"]
            print(f"{side}: update phase (log-probs + backward + step) {secs:.3f} s, "
                  f"{tokens / secs:,.0f} tokens/s, MFU {mfu(update_flops(model_path, tokens), secs)}")

if __name__ == "__main__":
    main()
