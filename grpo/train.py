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

from grpo.config import Config, ConfigError, register_configs, validate

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

        ws = cfg.model.warm_start
        spec = WarmStart(steps=ws.steps, batch_size=ws.batch_size, lr=ws.lr, drop_carry=ws.drop_carry, num_problems=ws.num_problems,
                         digits=cfg.task.arithmetic.digits, reverse=cfg.task.arithmetic.reverse, seed=ws.seed)
        return str(warm_started_tiny(spec, log=log.info))
    path = cfg.model.path
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not Path(path).parent.name == ""
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path: {path} does not exist")
    return path


def load_policy(path: str, cfg: Config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.model.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.path: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def build_run(cfg: Config):
    """Everything the loop needs, checked before any training step; resumes when asked."""
    from grpo.checkpoint import latest_checkpoint, load_state, set_rng_state
    from grpo.contamination import decontaminate
    from grpo.data import PromptSampler, load_ood_splits, load_task
    from grpo.rollout import build_rollout_engine
    from grpo.backends import build_backend
    from grpo.tracking import Tracker
    from grpo.trainer import Run
    from rewards import RewardScorer, RewardSpec

    run_dir = Path(cfg.run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and cfg.resume == "never":
        raise ConfigError(f"run_dir: {run_dir} already holds checkpoints; pass resume=auto or a new run_dir")
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in cfg.reward.functions]
    scorer = RewardScorer(specs)
    accuracy_kwargs = next((s.kwargs for s in specs if s.name == cfg.reward.accuracy), {})
    eval_scorer = RewardScorer([RewardSpec(cfg.reward.accuracy, 1.0, accuracy_kwargs)])
    train_rows, eval_rows = load_task(cfg.task, scorer.required_columns() | eval_scorer.required_columns())
    ood_rows = load_ood_splits(cfg.task, eval_scorer.required_columns())
    train_rows, splits, contamination = decontaminate(train_rows, {"eval": eval_rows, **ood_rows},
                                                      cfg.task.contamination_ngram)
    eval_rows, ood_rows = splits.pop("eval"), splits

    seed_everything(cfg.seed)
    cfg.model.path = resolve_model_path(cfg)  # recorded in config.yaml
    policy, tokenizer = load_policy(str(checkpoint / "policy") if checkpoint else cfg.model.path, cfg)
    ref_model = None
    if cfg.algorithm.beta > 0:
        ref_model, _ = load_policy(cfg.model.path, cfg)
        ref_model.eval().requires_grad_(False)
    backend = build_backend(
        cfg.backend.name, policy=policy, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
        total_steps=cfg.train.max_steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches,
        max_grad_norm=cfg.optim.max_grad_norm, gradient_checkpointing=cfg.backend.gradient_checkpointing,
    )
    r = cfg.rollout
    engine = build_rollout_engine(
        r.engine, model=policy, tokenizer=tokenizer, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        max_new_tokens=r.max_new_tokens, stop=r.stop, batch_size=r.batch_size,
    )
    sampler = PromptSampler(len(train_rows), seed=cfg.seed)
    start_step = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        backend.load_state_dict(state["backend"])
        sampler.load_state(state["sampler"])
        set_rng_state(state["rng"])
        start_step = int(state["step"])
        log.info("resuming from %s (step %d)", checkpoint, start_step)

    run_dir.mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "contamination.json").write_text(json.dumps(contamination, indent=2))
    t = cfg.tracking
    tracker = Tracker(
        run_dir, total_steps=cfg.train.max_steps, start_step=start_step, progress_bar=t.progress_bar,
        wandb_config={"project": t.wandb_project, "mode": t.wandb_mode, "id": run_dir.name} if t.wandb else None,
        run_config=json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)))),
    )
    return Run(cfg=cfg, tokenizer=tokenizer, policy=policy, ref_model=ref_model, engine=engine, backend=backend,
               scorer=scorer, eval_scorer=eval_scorer, train_rows=train_rows, eval_rows=eval_rows,
               sampler=sampler, tracker=tracker, start_step=start_step, ood_rows=ood_rows,
               contamination=contamination)


# The loop each algorithm runs; imported when chosen. Every GRPO variant shares grpo.trainer.
LOOPS = {"ppo": "grpo.ppo:train", "dpo": "grpo.dpo:train"}


def train_from_config(cfg: Config) -> list[dict]:
    import importlib

    module, fn = LOOPS.get(cfg.algorithm.name, "grpo.trainer:train").split(":")
    train = getattr(importlib.import_module(module), fn)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = build_run(cfg)
    try:
        history = train(run)
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
    r = cfg.rollout
    engine = build_rollout_engine(r.engine, model=model, tokenizer=tokenizer, temperature=r.temperature,
                                  top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens, stop=r.stop,
                                  batch_size=r.batch_size)
    ood_rows = load_ood_splits(cfg.task, scorer.required_columns())
    metrics = evaluate_splits(engine, scorer, eval_rows, ood_rows, cfg.reward.accuracy, pass_k=cfg.train.eval_pass_k)
    print(json.dumps({"model": path, **metrics}, indent=2))
    return metrics


def run_cli(mode: str = "train") -> None:
    import hydra

    register_configs()
    sys.argv = drop_launcher_args(sys.argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _main(dict_cfg) -> None:
        try:
            cfg = to_config(dict_cfg)
            train_from_config(cfg) if mode == "train" else evaluate_from_config(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


def main() -> None:
    run_cli("train")


if __name__ == "__main__":
    main()
