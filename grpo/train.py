"""`grpo-train` (`python -m grpo.train`): build the pieces a config names, then run the loop.

    grpo-train                                   # the built-in demo: tiny model, arithmetic
    grpo-train algorithm=dr_grpo rollout.max_new_tokens=16 run_dir=runs/x
    grpo-train run_dir=runs/x resume=auto        # continue from runs/x's latest checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from grpo import distributed as dist
from grpo.config import Config, ConfigError, register_configs, validate, validate_world
from grpo.modeling import disable_dropout

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("grpo")


def drop_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` that the deepspeed launcher appends (Hydra would reject it);
    the rank is read from the LOCAL_RANK environment variable instead."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


def to_config(dict_cfg) -> Config:
    from omegaconf import OmegaConf

    return validate(OmegaConf.to_object(dict_cfg))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(cfg: Config) -> str:
    """The model directory; builds (once) the warm-started tiny model for `model=tiny`."""
    if cfg.model.builtin == "tiny":
        from grpo.warmstart import WarmStart, warm_started_tiny

        spec = WarmStart.from_config(cfg.model.warm_start, cfg.task.arithmetic.digits, cfg.task.arithmetic.reverse)
        return str(warm_started_tiny(spec, log=log.info))
    path = cfg.model.path
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not Path(path).parent.name == ""
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path: {path} does not exist")
    return path


def warm_start_metrics(model_path: str) -> dict:
    """`warm_start/*` metrics of a built-in warm-started model (its criterion's figures, the step at which
    the criterion was met, its wall time), logged with the run's first line; {} for any other model."""
    from grpo.warmstart import warm_start_report

    report = warm_start_report(model_path)
    if not report:
        return {}
    log.info("warm start: %s; met at step %s, %s s (%s kernels)", report["criterion"], report["met_step"],
             report["wall_s"], report["kernels"])
    return {f"warm_start/{k}": v for k, v in report.items() if isinstance(v, (int, float))}


def load_policy(path: str, cfg: Config, *, checkpoint: bool = False):
    """The model and tokenizer at `path`. Code shipped with a model runs only with
    `model.trust_remote_code=true`; a checkpoint's weights are read from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.model.dtype)
    trust = cfg.model.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                     use_safetensors=True if checkpoint else None)
    except Exception as e:  # noqa: BLE001 - OSError, a refused remote-code prompt, a corrupt safetensors header...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if checkpoint:
            from grpo.checkpoint import CheckpointError

            raise CheckpointError(f"checkpoint {path} is unreadable: {first}") from None
        if "trust_remote_code" in str(e) and not trust:
            raise ConfigError(f"model.path: {path!r} ships its own code; set model.trust_remote_code=true "
                              f"only if you trust it") from None
        raise ConfigError(f"model.path: cannot load {path!r}: {first}") from None
    if not cfg.model.dropout:
        changed = disable_dropout(model)
        if changed:
            log.info("dropout off in %d places of %s (model.dropout=true keeps it)", len(changed), path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def build_run(cfg: Config):
    """Everything the loop needs, checked before any training step; resumes when asked."""
    from grpo.checkpoint import latest_checkpoint, load_rank_state, load_state, set_rng_state, verify_checkpoint
    from grpo.contamination import decontaminate, report_metrics
    from grpo.data import PromptSampler, check_prompt_lengths, load_ood_splits, load_task
    from grpo.rollout import WithFullWeights, build_rollout_engine
    from grpo.backends import build_backend
    from grpo.tracking import Tracker
    from grpo.trainer import Run
    from rewards import RewardScorer, RewardSpec

    run_dir = Path(cfg.run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and cfg.resume == "never":
        raise ConfigError(f"run_dir: {run_dir} already holds checkpoints; pass resume=auto or a new run_dir")
    if checkpoint is not None:
        verify_checkpoint(checkpoint)  # a truncated file is named here, before anything is built
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs), f.timeout_s) for f in cfg.reward.functions]
    scorer = RewardScorer(specs)
    accuracy_kwargs = next((s.kwargs for s in specs if s.name == cfg.reward.accuracy), {})
    eval_scorer = RewardScorer([RewardSpec(cfg.reward.accuracy, 1.0, accuracy_kwargs)])
    train_rows, eval_rows = load_task(cfg.task, scorer.required_columns() | eval_scorer.required_columns())
    ood_rows = load_ood_splits(cfg.task, eval_scorer.required_columns())
    train_rows, splits, contamination = decontaminate(train_rows, {"eval": eval_rows, **ood_rows},
                                                      cfg.task.contamination_ngram, cfg.task.drop_contaminated)
    eval_rows, ood_rows = splits.pop("eval"), splits
    validate_world(cfg, dist.world_size(), len(eval_rows))
    if checkpoint is not None:
        saved_world = int(load_state(checkpoint).get("world_size", 1))
        if saved_world != dist.world_size():
            raise ConfigError(f"resume: {checkpoint} was written by {saved_world} ranks; relaunch with "
                              f"{saved_world} (its policy/ directory starts a new run at any size)")

    # Each rank samples its own completions: distinct seeds, or the ranks' samples would be correlated.
    seed_everything(cfg.seed + dist.rank())
    if not dist.is_main():
        dist.barrier()  # rank 0 builds the tiny model's cache first
    cfg.model.path = resolve_model_path(cfg)  # recorded in config.yaml
    if dist.is_main():
        dist.barrier()
    setup_metrics = report_metrics(contamination) | warm_start_metrics(cfg.model.path)
    plan_memory(cfg)
    if checkpoint is not None:
        policy, tokenizer = load_policy(str(checkpoint / "policy"), cfg, checkpoint=True)
    else:
        policy, tokenizer = load_policy(cfg.model.path, cfg)
    check_prompt_lengths(train_rows, eval_rows, tokenizer, context=context_length(policy),
                         max_new_tokens=cfg.rollout.max_new_tokens, where=cfg.task.train_file or cfg.task.name)
    ref_model = None
    if cfg.algorithm.beta > 0:
        ref_model, _ = load_policy(cfg.model.path, cfg)
        ref_model.eval().requires_grad_(False)
    backend = build_backend(
        cfg.backend.name, policy=policy, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
        total_steps=cfg.train.max_steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches,
        max_grad_norm=cfg.optim.max_grad_norm, gradient_checkpointing=cfg.backend.gradient_checkpointing,
        offload_optimizer=cfg.backend.offload_optimizer, offload_params=cfg.backend.offload_params,
        deepspeed_overrides=dict(cfg.backend.deepspeed),
    )
    engine = build_rollout_engine(cfg.rollout.engine, model=policy, tokenizer=tokenizer, **engine_options(cfg))
    if hasattr(backend, "gathered_for_rollout") and not getattr(engine, "holds_own_weights", False):
        engine = WithFullWeights(engine, backend.gathered_for_rollout)
    sampler = PromptSampler(len(train_rows), seed=cfg.seed)
    start_step, masked_steps = 0, 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        if hasattr(backend, "load_sharded"):
            backend.load_sharded(checkpoint / "deepspeed")
        backend.load_state_dict(state["backend"])
        sampler.load_state(state["sampler"])  # one shared order: the same on every rank
        set_rng_state(load_rank_state(checkpoint, dist.rank())["rng"])
        start_step = int(state["step"])
        masked_steps = int(state.get("guards", {}).get("masked_steps", 0))
        log.info("resuming from %s (step %d)", checkpoint, start_step)

    from omegaconf import OmegaConf

    t = cfg.tracking
    if not dist.is_main():  # rank 0 writes the run's files
        return Run(cfg=cfg, tokenizer=tokenizer, policy=policy, ref_model=ref_model, engine=engine, backend=backend,
                   scorer=scorer, eval_scorer=eval_scorer, train_rows=train_rows, eval_rows=eval_rows,
                   sampler=sampler, tracker=NullTracker(), start_step=start_step, masked_steps=masked_steps,
                   ood_rows=ood_rows, contamination=contamination, setup_metrics=setup_metrics)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "contamination.json").write_text(json.dumps(contamination, indent=2))
    tracker = Tracker(
        run_dir, total_steps=cfg.train.max_steps, start_step=start_step, resumed=checkpoint is not None,
        progress_bar=t.progress_bar,
        wandb_config={"project": t.wandb_project, "mode": t.wandb_mode, "id": run_dir.name} if t.wandb else None,
        run_config=json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)))),
    )
    return Run(cfg=cfg, tokenizer=tokenizer, policy=policy, ref_model=ref_model, engine=engine, backend=backend,
               scorer=scorer, eval_scorer=eval_scorer, train_rows=train_rows, eval_rows=eval_rows,
               sampler=sampler, tracker=tracker, start_step=start_step, masked_steps=masked_steps,
               ood_rows=ood_rows, contamination=contamination, setup_metrics=setup_metrics)


def engine_options(cfg: Config) -> dict:
    """The rollout engine's keyword arguments from `cfg.rollout` (vLLM also gets its engine settings)."""
    r = cfg.rollout
    options = dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                   min_new_tokens=r.min_new_tokens, stop=r.stop, batch_size=r.batch_size)
    if r.engine == "vllm":
        options |= dict(model_path=cfg.model.path, dtype=cfg.model.dtype, seed=cfg.seed + dist.rank(),
                        gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb,
                        max_model_len=r.max_model_len, enforce_eager=r.enforce_eager,
                        tensor_parallel_size=r.tensor_parallel_size, enable_sleep_mode=r.enable_sleep_mode,
                        sync_bucket_mb=r.sync_bucket_mb)
    return options


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings cover, where its config says."""
    return getattr(model.config, "max_position_embeddings", None)


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0 writes the reduced metrics)."""

    def log(self, step, metrics) -> None: ...

    def log_samples(self, step, prompts, completions, rewards) -> None: ...

    def close(self, plot: bool = True) -> None: ...


def plan_memory(cfg: Config) -> None:
    """Print the per-GPU memory estimate of a GPU run and refuse one that cannot fit."""
    if not torch.cuda.is_available() and not cfg.backend.gpu_memory_gb:
        return
    from grpo.memory import check_fits, estimate_from_config

    capacity = cfg.backend.gpu_memory_gb or torch.cuda.get_device_properties(dist.local_rank()).total_memory / 2**30
    estimate = estimate_from_config(cfg, dist.world_size(), capacity)
    if dist.is_main():
        log.info("%s", estimate.table())
    check_fits(estimate, capacity)


# The loop each algorithm runs; imported when chosen. Every GRPO variant shares grpo.trainer.
LOOPS = {"ppo": "grpo.ppo:train", "dpo": "grpo.dpo:train"}


def train_from_config(cfg: Config) -> list[dict]:
    import importlib

    module, fn = LOOPS.get(cfg.algorithm.name, "grpo.trainer:train").split(":")
    train = getattr(importlib.import_module(module), fn)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init_distributed(deepspeed=cfg.backend.name.startswith("deepspeed"), timeout_s=cfg.backend.timeout_s)
    run = build_run(cfg)
    try:
        history = train(run)
    except Exception as e:  # a peer rank died or timed out: say which rank saw it, and exit at once
        if dist.world_size() > 1 and dist.is_collective_failure(e):
            print(f"error: rank {dist.rank()}: a collective with the other ranks failed (a rank died or hung; "
                  f"the launcher's log names it): {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            os._exit(1)  # the process group is broken: skip the exit handlers that would wait on it
        raise
    finally:
        run.tracker.close(plot=cfg.tracking.plot)
    final = [h for h in history if "eval/accuracy" in h]
    if final:
        first = final[0]["eval/accuracy"]
        log.info("held-out accuracy: %.3f at step %d -> %.3f at step %d", first, final[0]["step"],
                 final[-1]["eval/accuracy"], final[-1]["step"])
    log.info("run directory: %s", cfg.run_dir)
    return history


def evaluate_from_config(cfg: Config) -> dict:
    from grpo.data import load_ood_splits, load_task
    from grpo.evaluate import evaluate_splits
    from grpo.rollout import build_rollout_engine
    from rewards import RewardScorer, RewardSpec

    kwargs = next((dict(f.kwargs) for f in cfg.reward.functions if f.name == cfg.reward.accuracy), {})
    scorer = RewardScorer([RewardSpec(cfg.reward.accuracy, 1.0, kwargs)])
    _, eval_rows = load_task(cfg.task, scorer.required_columns())
    if not eval_rows:
        raise ConfigError("task: no held-out rows to evaluate (set task.eval_file or task.hf_eval_split)")
    path = resolve_model_path(cfg)
    model, tokenizer = load_policy(path, cfg)
    cfg.model.path = path
    engine = build_rollout_engine(cfg.rollout.engine, model=model, tokenizer=tokenizer, **engine_options(cfg))
    ood_rows = load_ood_splits(cfg.task, scorer.required_columns())
    metrics = evaluate_splits(engine, scorer, eval_rows, ood_rows, cfg.reward.accuracy, pass_k=cfg.train.eval_pass_k)
    print(json.dumps({"model": path, **metrics}, indent=2))
    return metrics


def run_cli(mode: str = "train") -> None:
    import hydra

    from grpo.checkpoint import CheckpointError
    from grpo.trainer import MaskedRewardsError

    register_configs()
    sys.argv = drop_launcher_args(sys.argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _main(dict_cfg) -> None:
        try:
            cfg = to_config(dict_cfg)
            train_from_config(cfg) if mode == "train" else evaluate_from_config(cfg)
        except (ConfigError, CheckpointError, MaskedRewardsError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


def main() -> None:
    run_cli("train")


if __name__ == "__main__":
    main()
