"""The command lines: `grpo-train` (`python -m grpo.train`) and `grpo-eval`, and the one Hydra wrapper every
console script runs its job through (`run_cli`).

Both are Hydra applications over `configs/`: every option is an override (`algorithm=dr_grpo`,
`rollout.max_new_tokens=16`). A bad config, checkpoint or reward setting ends with one line naming
the field or file, and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
import torch

from grpo import distributed as dist
from grpo.algorithms import distill, dpo, gkd, online_dpo, ppo, supervised
from grpo.algorithms import grpo as grpo_algorithm
from grpo.config import CONFIG_DIR, Config, register_configs, to_config
from grpo.envs import end_run
from grpo.errors import CheckpointError, ConfigError, MaskedRewardsError, RewardInfraError, TeacherUnavailableError
from grpo.model.served_teacher import ServedTeacher
from grpo.rollout.vllm import VLLMRolloutEngine
from grpo.training.run import build_run, evaluate_from_config

log = logging.getLogger("grpo")

# What each `algorithm.loop` runs: a function that trains a built run and returns its logged metrics.
LOOPS = {"grpo": grpo_algorithm.train, "ppo": ppo.train, "dpo": dpo.train, "online_dpo": online_dpo.train,
         "rft": supervised.train_rft, "sft": supervised.train_sft, "distill": distill.train, "gkd": gkd.train}


def train_from_config(cfg: Config) -> list[dict]:
    """Build the run and train it with the loop `algorithm.loop` names; returns the logged metrics."""
    train = LOOPS[cfg.algorithm.loop]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init_distributed(deepspeed=cfg.backend.name.startswith("deepspeed"), timeout_s=cfg.backend.timeout_s)
    try:
        run = build_run(cfg)
    except BaseException:
        end_run()  # a server an environment started for the run stops with it
        raise
    try:
        history = train(run)
    except Exception as e:  # a peer rank died or timed out: say which rank saw it, and exit at once
        if dist.world_size() > 1 and dist.is_collective_failure(e):
            print(f"error: rank {dist.rank()}: a collective with the other ranks failed (a rank died or hung; "
                  f"the launcher's log names it): {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            os._exit(1)  # the process group is broken: skip the exit handlers that would wait on it
        raise
    finally:
        end_run()
        if isinstance(run.teacher, ServedTeacher):
            run.teacher.close()  # its connections to the teacher's server
        run.tracker.close(plot=cfg.tracking.plot)
    if isinstance(run.engine, VLLMRolloutEngine):
        run.engine.close()  # vLLM's own process groups stand on the launchers' group: they come down first
    dist.close_distributed()
    final = [h for h in history if "eval/accuracy" in h]
    if final:
        log.info("held-out accuracy: %.3f at step %d -> %.3f at step %d", final[0]["eval/accuracy"],
                 final[0]["step"], final[-1]["eval/accuracy"], final[-1]["step"])
    log.info("run directory: %s", cfg.run_dir)
    return history


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


def run_cli(job: Callable[[Any], Any], *, config_name: str = "config",
            register: Callable[[], None] = register_configs, load: Callable[[Any], Any] = to_config) -> None:
    """The one Hydra entry of every console script: compose `configs/<config_name>.yaml` with the command
    line's overrides (its schema registered by `register`), turn it into the validated typed config (`load`),
    and run `job(cfg)`. A ConfigError, CheckpointError, MaskedRewardsError, RewardInfraError or
    TeacherUnavailableError ends with one line and status 2."""
    register()
    sys.argv = drop_launcher_args(sys.argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _main(dict_cfg) -> None:
        try:
            job(load(dict_cfg))
        except (ConfigError, CheckpointError, MaskedRewardsError, RewardInfraError, TeacherUnavailableError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            end_run()  # grpo-eval's too: servers its environments started stop with it

    _main()


def train_main() -> None:
    """`grpo-train`: train with the composed config."""
    run_cli(train_from_config)


def eval_main() -> None:
    """`grpo-eval`: the held-out accuracy of `model.path`, with the same config and overrides as grpo-train."""
    run_cli(evaluate_from_config)
