"""A run: everything one training job uses, built from its config and checked before the first step.

`build_run` builds it (resuming from the run directory's latest checkpoint when asked); the algorithm that
`algorithm.loop` names then trains it (`grpo.cli.train_from_config`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from grpo import distributed as dist
from grpo.backends import TrainBackend, build_backend
from grpo.builtin.warmstart import WarmStart, cache_root, warm_start_report, warm_started_tiny
from grpo.config import DISTILL_LOOPS, Config, completion_budget, validate_world
from grpo.core.logprobs import attention_implementation, attention_of
from grpo.core.packing import AUTO, auto_packing
from grpo.data.contamination import check_held_out, decontaminate, report_metrics
from grpo.data.loading import (
    PromptSampler,
    chat_prompts,
    check_prompt_lengths,
    load_ood_splits,
    load_task,
    load_val_split,
)
from grpo.envs import ENVIRONMENTS, Environment, environment_factory
from grpo.envs.chat import check_chat_template
from grpo.envs.python import SESSIONS_MEMORY, TOOL_MEMORY_MB, available_memory_mb
from grpo.envs.tools import limit_tool_calls
from grpo.errors import ConfigError
from grpo.model.gguf_checkpoint import converted_model_dir, gguf_path
from grpo.model.loading import context_length, load_policy, load_train_policy
from grpo.model.lora import AdapterDisabled, is_adapted
from grpo.model.memory import check_fits, estimate_from_config
from grpo.model.served_teacher import ServedTeacher
from grpo.rollout import OnOwnCopy, RolloutEngine, WithFullWeights, build_rollout_engine
from grpo.training.checkpoint import latest_checkpoint, load_rank_state, load_state, set_rng_state, verify_checkpoint
from grpo.training.evaluate import episode_runner, evaluate_splits
from grpo.training.tracking import Tracker
from rewards import RewardConfigError, RewardScorer, RewardSpec

log = logging.getLogger("grpo")

@dataclass
class Run:
    """Everything one training run uses, built from the config by `build_run`."""

    cfg: Config
    tokenizer: object  # a transformers tokenizer, left padding
    policy: torch.nn.Module
    ref_model: torch.nn.Module | None  # the frozen initial policy, when algorithm.beta > 0 (LoRA: adapters off)
    engine: RolloutEngine
    backend: TrainBackend
    scorer: RewardScorer
    eval_scorer: RewardScorer  # holds the accuracy reward alone
    train_rows: list[dict]
    eval_rows: list[dict]
    sampler: PromptSampler
    tracker: Tracker | NullTracker
    start_step: int = 0
    masked_steps: int = 0  # steps in a row on which every reward was masked
    ood_rows: dict = field(default_factory=dict)  # out-of-distribution splits: name -> rows
    val_rows: list[dict] = field(default_factory=list)  # the validation split (best checkpoint, early stopping)
    best: dict = field(default_factory=dict)  # the best val/accuracy so far: {"accuracy", "step", "since"}
    contamination: dict = field(default_factory=dict)  # grpo.data.contamination report
    setup_metrics: dict = field(default_factory=dict)  # logged at step 0: data report, warm start
    make_env: Callable[[], Environment] | None = None  # a fresh environment per episode, when env.name is set
    teacher: torch.nn.Module | ServedTeacher | None = None  # distill, gkd: the frozen teacher (algorithm.teacher)


def build_run(cfg: Config) -> Run:
    """Everything the loop needs, checked before any training step; resumes when asked."""
    checkpoint = checkpoint_to_resume(cfg)
    make_env = build_environment(cfg)
    scorer, eval_scorer = build_scorers(cfg)
    train_rows, eval_rows, val_rows, ood_rows, contamination = load_rows(cfg, scorer, eval_scorer)
    check_environment_rows(cfg, {"train": train_rows, "test": eval_rows, "val": val_rows, **ood_rows})
    validate_world(cfg, dist.world_size(), len(eval_rows))
    check_sessions_memory(cfg, dist.world_size(), len(eval_rows))
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
    policy, tokenizer = load_train_policy(cfg, checkpoint)
    check_packing(cfg, policy)
    train_rows, eval_rows, val_rows, ood_rows = chat_splits(cfg, tokenizer, train_rows, eval_rows, val_rows, ood_rows)
    if make_env is not None:
        check_chat_template(tokenizer, cfg.model.path)
    check_prompt_lengths(train_rows, eval_rows, tokenizer, context=context_length(policy),
                         max_new_tokens=cfg.rollout.max_new_tokens, where=cfg.task.train_file or cfg.task.name)
    backend = build_policy_backend(cfg, policy)
    ref_model = build_reference(cfg, policy, backend) if cfg.algorithm.uses_reference() else None
    engine = build_training_engine(cfg, policy, tokenizer, backend)
    run = Run(cfg=cfg, tokenizer=tokenizer, policy=policy, ref_model=ref_model, engine=engine, backend=backend,
              scorer=scorer, eval_scorer=eval_scorer, train_rows=train_rows, eval_rows=eval_rows,
              sampler=PromptSampler(len(train_rows), seed=cfg.seed), tracker=NullTracker(), ood_rows=ood_rows,
              val_rows=val_rows, contamination=contamination, setup_metrics=setup_metrics, make_env=make_env,
              teacher=build_teacher(cfg, tokenizer, train_rows) if cfg.algorithm.loop in DISTILL_LOOPS else None)
    if checkpoint is not None:
        restore(run, checkpoint)
    if dist.is_main():  # rank 0 writes the run's files
        run.tracker = open_run_dir(cfg, contamination, start_step=run.start_step, resumed=checkpoint is not None)
    return run


def build_training_engine(cfg: Config, policy: torch.nn.Module, tokenizer, backend: TrainBackend) -> RolloutEngine:
    """The rollout engine of training. Asynchronous rollout (`rollout.max_staleness` > 0) samples while the
    trainer updates the policy, so an engine that samples from the policy module itself gets its own copy."""
    def build(model):
        return build_rollout_engine(engine_name(cfg.rollout), model=model, tokenizer=tokenizer, **engine_options(cfg))

    engine = build(policy)
    if cfg.rollout.max_staleness and not getattr(engine, "holds_own_weights", False):
        return OnOwnCopy(build, policy, getattr(backend, "gathered_for_rollout", nullcontext))
    if hasattr(backend, "gathered_for_rollout") and not getattr(engine, "holds_own_weights", False):
        engine = WithFullWeights(engine, backend.gathered_for_rollout)
    return engine


def build_reference(cfg: Config, policy: torch.nn.Module, backend: TrainBackend) -> torch.nn.Module:
    """The KL's, or DPO's, reference: the starting policy, frozen. Under LoRA the policy's own base with
    the adapters off, run through the backend's forward (no second copy); else a second copy of `model.path`."""
    if is_adapted(policy):
        return AdapterDisabled(policy, backend.model)
    ref_model, _ = load_policy(cfg.model.path, cfg)
    return ref_model.eval().requires_grad_(False)


def build_teacher(cfg: Config, tokenizer, train_rows: list[dict] = ()) -> torch.nn.Module | ServedTeacher:
    """The distillation teacher of `algorithm.teacher`, frozen, in its own dtype and on its own device; its
    tokenizer must be the policy's (the teacher scores the student's token ids). With `url`, the teacher's
    server, checked now (reachable, serving the model with a context that holds `train_rows`' longest prompt plus
    the completion budget, the policy's tokenizer, prompt log-probs)."""
    t = cfg.algorithm.teacher
    if t.url:
        served = ServedTeacher(t.url, t.model, timeout_s=t.timeout_s, retries=t.retries, concurrency=t.concurrency,
                               batch_size=t.batch_size, api_key_env=t.api_key_env)
        try:
            served.check(tokenizer, longest=longest_prompt(train_rows, tokenizer) + completion_budget(cfg))
        except BaseException:
            served.close()
            raise
        return served
    looks_local = t.path.startswith((".", "/", "~")) or os.sep in t.path and not Path(t.path).parent.name == ""
    if looks_local and not Path(t.path).expanduser().exists():
        raise ConfigError(f"algorithm.teacher.path: {t.path} does not exist")
    teacher_cfg = replace(cfg, model=replace(cfg.model, dtype=t.dtype or cfg.model.dtype))
    teacher, teacher_tokenizer = load_policy(str(Path(t.path).expanduser()), teacher_cfg)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"algorithm.teacher.path: {t.path} has another tokenizer than the policy "
                          f"({cfg.model.path}); distillation compares the two models' log-probs of the same token ids")
    device = torch.device(t.device) if t.device else dist.device()
    return teacher.to(device).eval().requires_grad_(False)


def longest_prompt(rows: list[dict], tokenizer) -> int:
    """The most tokens of any row's prompt (0 without rows)."""
    if not rows:
        return 0
    return max(len(ids) for ids in tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"])


def checkpoint_to_resume(cfg: Config) -> Path | None:
    """The run directory's latest checkpoint, verified, if the run resumes; refuses to overwrite one."""
    checkpoint = latest_checkpoint(Path(cfg.run_dir))
    if checkpoint is not None and cfg.resume == "never":
        raise ConfigError(f"run_dir: {cfg.run_dir} already holds checkpoints; pass resume=auto or a new run_dir")
    if checkpoint is not None:
        verify_checkpoint(checkpoint)  # a truncated file is named here, before anything is built
    return checkpoint


def build_environment(cfg: Config) -> Callable[[], Environment] | None:
    """The factory of one environment per episode that `env.name` names (None: single-turn)."""
    if not cfg.env.name:
        return None
    try:
        factory = environment_factory(cfg.env.name, dict(cfg.env.kwargs))
    except ValueError as e:  # an unknown name, or a path that does not import: the message names it
        raise ConfigError(f"env.name: {e}") from e
    except (ImportError, AttributeError) as e:  # an entry point's module failed to load
        raise ConfigError(f"env.name: cannot load {cfg.env.name!r}: {e}") from e
    try:
        env = factory()  # one built now, so that a bad env.kwargs value fails before training, not at the first rollout
    except (TypeError, ValueError) as e:
        raise ConfigError(f"env.kwargs: {cfg.env.name!r} cannot be built with {dict(cfg.env.kwargs)}: {e}") from e
    if callable(getattr(env, "close", None)):
        env.close()
    limit = cfg.env.max_tool_calls_per_turn

    def make_env() -> Environment:
        env = factory()
        limit_tool_calls(env, limit)
        return env
    return make_env


def check_environment_rows(cfg: Config, splits: dict[str, list[dict]]) -> None:
    """Rows the run's environment refuses (its class's `check_rows(rows, **env.kwargs)`, e.g. a route that no
    `env.kwargs.routes` entry names) fail here, naming the split and row, not at each of the row's episodes."""
    check = getattr(ENVIRONMENTS.resolve(cfg.env.name), "check_rows", None) if cfg.env.name else None
    for split, rows in splits.items() if callable(check) else ():
        try:
            check(rows, **dict(cfg.env.kwargs))
        except ValueError as e:
            raise ConfigError(f"task ({split} split): {e}") from e


def check_sessions_memory(cfg: Config, world_size: int, num_eval_rows: int) -> None:
    """Set the budget of persistent python interpreters (`env.sessions_memory_mb`, default half of MemAvailable),
    and refuse a run of `env=python` with `persistent` whose episodes in flight at once on a rank (a step's, an
    evaluation's, both with asynchronous rollout) could hold more than it: each holds `env.kwargs.memory_mb`."""
    budget = cfg.env.sessions_memory_mb or available_memory_mb() // 2
    SESSIONS_MEMORY.limit_mb = budget
    if cfg.env.name != "python" or not cfg.env.kwargs.get("persistent", False):
        return  # another environment's sessions are refused at run time, past the same budget
    memory_mb = int(cfg.env.kwargs.get("memory_mb", TOOL_MEMORY_MB))
    step = cfg.train.prompts_per_step // world_size * cfg.algorithm.group_size
    evaluation = -(-num_eval_rows // world_size) * max(1, cfg.train.eval_pass_k)
    sessions = step + evaluation if cfg.rollout.max_staleness > 0 else max(step, evaluation)
    if sessions * memory_mb > budget:
        source = "env.sessions_memory_mb" if cfg.env.sessions_memory_mb else "env.sessions_memory_mb=0: half of it"
        raise ConfigError(
            f"env.kwargs.memory_mb: {sessions} persistent python interpreters may run at once on a rank (a step: "
            f"train.prompts_per_step={cfg.train.prompts_per_step} / {world_size} ranks x algorithm.group_size="
            f"{cfg.algorithm.group_size} = {step}; an evaluation: {num_eval_rows} held-out rows / {world_size} ranks"
            f" x max(1, train.eval_pass_k={cfg.train.eval_pass_k}) = {evaluation}), each holding env.kwargs.memory_mb="
            f"{memory_mb} MB: {sessions * memory_mb} MB, more than the {budget} MB budget ({source}). Lower "
            "env.kwargs.memory_mb or the episodes per step, or raise env.sessions_memory_mb")


def build_scorers(cfg: Config) -> tuple[RewardScorer, RewardScorer]:
    """The training scorer (every reward function, weighted) and the evaluation scorer (the accuracy reward,
    and the format reward when `reward.format` names one)."""
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs), f.timeout_s) for f in cfg.reward.functions]
    accuracy_kwargs = next((s.kwargs for s in specs if s.name == cfg.reward.accuracy), {})
    measured = [RewardSpec(cfg.reward.accuracy, 1.0, accuracy_kwargs)]
    if cfg.reward.format is not None and cfg.reward.format != cfg.reward.accuracy:
        measured += [RewardSpec(s.name, 1.0, s.kwargs) for s in specs if s.name == cfg.reward.format]
    # reward.format names one of the functions, so the evaluation scorer can fail only on reward.accuracy
    return scorer_for(specs, "reward.functions"), scorer_for(measured, "reward.accuracy")


def scorer_for(specs: list[RewardSpec], field: str) -> RewardScorer:
    """The scorer of `specs`; a reward that cannot run as configured (an unknown name, an option the function does
    not take, no sandbox) is a ConfigError naming `field`."""
    try:
        return RewardScorer(specs)
    except RewardConfigError as e:
        raise ConfigError(f"{field}: {e}") from e


def load_rows(cfg: Config, scorer: RewardScorer, eval_scorer: RewardScorer):
    """Training, held-out (test), validation and out-of-distribution rows, training rows that overlap an
    evaluation split dropped (`task.drop_contaminated`), and the contamination report."""
    train_rows, eval_rows = load_task(cfg.task, scorer.required_columns() | eval_scorer.required_columns(),
                                      cfg.env)
    val_rows = load_val_split(cfg.task, eval_scorer.required_columns())
    ood_rows = load_ood_splits(cfg.task, eval_scorer.required_columns())
    if (cfg.checkpoint.keep_best or cfg.train.early_stop) and not val_rows:
        raise ConfigError("checkpoint.keep_best, train.early_stop: need a validation split "
                          "(task.val_file, task.arithmetic.num_val or task.reasoning_gym.num_val)")
    train_rows, splits, contamination = decontaminate(
        train_rows, {"eval": eval_rows, **({"val": val_rows} if val_rows else {}), **ood_rows},
        cfg.task.contamination_ngram, cfg.task.drop_contaminated)
    check_held_out(contamination, cfg.task.min_eval_rows)
    eval_rows, val_rows = splits.pop("eval"), splits.pop("val", [])
    if not eval_rows:
        log.warning("task: no held-out rows, so no eval/accuracy (task.eval_file, task.hf_eval_split)")
    return train_rows, eval_rows, val_rows, splits, contamination


def chat_splits(cfg: Config, tokenizer, train_rows: list[dict], eval_rows: list[dict], val_rows: list[dict],
                ood_rows: dict[str, list[dict]]):
    """Every split's prompts as the model is given them, through the chat template when chat is on
    (`grpo.data.loading.chat_prompts`); after decontamination, which compares the task's text. Episodes
    (`env.name`) write their own chat messages from the task's text, so their rows stay as they are."""
    if cfg.env.name:
        return train_rows, eval_rows, val_rows, ood_rows
    where = cfg.task.train_file or f"task {cfg.task.name}"

    def render(rows: list[dict], split: str) -> list[dict]:
        return chat_prompts(rows, tokenizer, cfg.task, f"{where} ({split})")

    return (render(train_rows, "train"), render(eval_rows, "eval"), render(val_rows, "val"),
            {name: render(rows, name) for name, rows in ood_rows.items()})


def check_packing(cfg: Config, policy: torch.nn.Module) -> None:
    """`backend.packing` against the model's attention implementation, when the run is built rather than at
    its first forward. `auto` is resolved here, once, to the layout that attention takes (`auto_packing`), and
    `cfg` holds that layout from then on: every forward, `config.yaml` and the tracker's run config see it."""
    if cfg.backend.packing == AUTO:
        impl, sliding = attention_of(policy)
        cfg.backend.packing, why = auto_packing(impl, sliding)
        if dist.is_main():
            log.info("backend.packing=auto: %s (%s)", cfg.backend.packing, why)
    if cfg.backend.packing != "padded":
        try:
            attention_implementation(policy, cfg.backend.packing)
        except ValueError as err:
            raise ConfigError(f"{err} (model {cfg.model.path})") from None


def build_policy_backend(cfg: Config, policy: torch.nn.Module) -> TrainBackend:
    """The policy's optimiser and data-parallel wrapper (`backend=torch|ddp|deepspeed_zero*`)."""
    return build_backend(
        cfg.backend.name, policy=policy, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
        total_steps=cfg.train.max_steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches,
        max_grad_norm=cfg.optim.max_grad_norm, gradient_checkpointing=cfg.backend.gradient_checkpointing,
        offload_optimizer=cfg.backend.offload_optimizer, offload_params=cfg.backend.offload_params,
        deepspeed_overrides=dict(cfg.backend.deepspeed),
    )


def restore(run: Run, checkpoint: Path) -> None:
    """The optimiser, sampler position, RNG streams, step and guards of `checkpoint` (the weights are
    loaded with the policy)."""
    state = load_state(checkpoint)
    if hasattr(run.backend, "load_sharded"):
        run.backend.load_sharded(checkpoint / "deepspeed")
    run.backend.load_state_dict(state["backend"])
    run.sampler.load_state(state["sampler"])  # one shared order: the same on every rank
    set_rng_state(load_rank_state(checkpoint, dist.rank())["rng"])
    run.start_step = int(state["step"])
    run.masked_steps = int(state.get("guards", {}).get("masked_steps", 0))
    run.best = dict(state.get("best", {}))
    log.info("resuming from %s (step %d)", checkpoint, run.start_step)


def open_run_dir(cfg: Config, contamination: dict, *, start_step: int, resumed: bool) -> Tracker:
    """Write the run's config.yaml and contamination.json, and open its metrics tracker."""
    run_dir, t = Path(cfg.run_dir), cfg.tracking
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "contamination.json").write_text(json.dumps(contamination, indent=2))
    return Tracker(
        run_dir, total_steps=cfg.train.max_steps, start_step=start_step, resumed=resumed,
        progress_bar=t.progress_bar, title=run_title(cfg),
        wandb_config={"project": t.wandb_project, "mode": t.wandb_mode, "id": run_dir.name} if t.wandb else None,
        run_config=json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)))),
    )


def run_title(cfg: Config) -> str:
    """What the run is, in a few words, for its plot: algorithm, task, model and run directory."""
    model = cfg.model.builtin or Path(str(cfg.model.path)).name
    return f"{cfg.algorithm.name} on {cfg.task.name}, model {model} ({Path(cfg.run_dir).name})"


def evaluate_from_config(cfg: Config) -> dict:
    """What `grpo-eval` does: the held-out (and out-of-distribution) accuracy of `model.path`."""
    _, eval_scorer = build_scorers(cfg)
    _, eval_rows = load_task(cfg.task, eval_scorer.required_columns(), cfg.env)
    if not eval_rows:
        raise ConfigError("task: no held-out rows to evaluate (set task.eval_file or task.hf_eval_split)")
    path = resolve_model_path(cfg)
    model, tokenizer = load_policy(path, cfg)
    cfg.model.path = path
    make_env = build_environment(cfg)
    if make_env is not None:
        check_chat_template(tokenizer, path)
    engine = build_rollout_engine(engine_name(cfg.rollout), model=model, tokenizer=tokenizer, **engine_options(cfg))
    ood_rows = load_ood_splits(cfg.task, eval_scorer.required_columns())
    _, eval_rows, _, ood_rows = chat_splits(cfg, tokenizer, [], eval_rows, [], ood_rows)
    episodes = episode_runner(engine, tokenizer, make_env, cfg.rollout, cfg.env)
    metrics = evaluate_splits(engine, eval_scorer, eval_rows, ood_rows, cfg.reward.accuracy,
                              pass_k=cfg.train.eval_pass_k, episodes=episodes, format_reward=cfg.reward.format)
    print(json.dumps({"model": path, **metrics}, indent=2))
    return metrics


def resolve_model_path(cfg: Config) -> str:
    """The model directory; builds (once) the warm-started tiny model for `model=tiny`, and converts (once)
    the GGUF checkpoint of `model.gguf_file` into the cache."""
    if cfg.model.builtin == "tiny":
        a = cfg.task.arithmetic
        if a.style != "compact":
            raise ConfigError(f"task.arithmetic.style={a.style}: the tiny model's warm start reads the compact "
                              "style only; use a pretrained model (e.g. model=smollm2-135m-instruct)")
        spec = WarmStart.from_config(cfg.model.warm_start, a.digits, a.reverse, a.op, a.digits_b, a.max_carries)
        return str(warm_started_tiny(spec, log=log.info))
    if cfg.model.gguf_file:
        return str(converted_model_dir(gguf_path(cfg.model.gguf_file, cfg.model.package), cache_root(),
                                       log=log.info))
    path = cfg.model.path
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and not Path(path).parent.name == ""
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path: {path} does not exist")
    return path


def warm_start_metrics(model_path: str) -> dict:
    """`warm_start/*` metrics of a built-in warm-started model (its criterion's figures, the step at which
    the criterion was met, its wall time), logged with the run's first line; {} for any other model."""
    report = warm_start_report(model_path)
    if not report:
        return {}
    log.info("warm start: %s; met at step %s, %s s (%s kernels)", report["criterion"], report["met_step"],
             report["wall_s"], report["kernels"])
    return {f"warm_start/{k}": v for k, v in report.items() if isinstance(v, (int, float))}


def engine_name(r) -> str:
    """The key of `grpo.rollout.ENGINES` that `rollout` selects (vLLM in server mode: its client)."""
    return "server" if r.engine == "vllm" and r.mode == "server" else r.engine


def engine_options(cfg: Config) -> dict:
    """The rollout engine's keyword arguments from `cfg.rollout` (vLLM also gets its engine settings)."""
    r = cfg.rollout
    options = dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                   min_new_tokens=r.min_new_tokens, stop=r.stop, batch_size=r.batch_size)
    if r.engine == "vllm" and r.mode == "server":
        options |= dict(server_urls=list(r.server_urls), timeout_s=r.timeout_s, sync_bucket_mb=r.sync_bucket_mb)
    elif r.engine == "vllm":
        options |= dict(model_path=cfg.model.path, dtype=cfg.model.dtype, seed=cfg.seed + dist.rank(),
                        gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb,
                        max_model_len=r.max_model_len, enforce_eager=r.enforce_eager,
                        tensor_parallel_size=r.tensor_parallel_size, enable_sleep_mode=r.enable_sleep_mode,
                        sync_bucket_mb=r.sync_bucket_mb, block_size=r.block_size, lora_rank=cfg.model.lora.r,
                        lora_sync=r.lora_sync)
    return options


def plan_memory(cfg: Config) -> None:
    """Print the per-GPU memory estimate of a GPU run and refuse one that cannot fit."""
    if not torch.cuda.is_available() and not cfg.backend.gpu_memory_gb:
        return
    capacity = cfg.backend.gpu_memory_gb or torch.cuda.get_device_properties(dist.local_rank()).total_memory / 2**30
    estimate = estimate_from_config(cfg, dist.world_size(), capacity)
    if dist.is_main():
        log.info("%s", estimate.table())
    check_fits(estimate, capacity)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0 writes the reduced metrics)."""

    def set_total_steps(self, total_steps) -> None: ...

    def log(self, step, metrics) -> None: ...

    def log_samples(self, step, prompts, completions, rewards) -> None: ...

    def log_outcomes(self, step, outcomes) -> None: ...

    def close(self, plot: bool = True) -> None: ...
