"""The command lines: `grpo-train` (`python -m grpo.train`) and `grpo-eval`.

Both are Hydra applications over `configs/`: every option is an override (`algorithm=dr_grpo`,
`rollout.max_new_tokens=16`). A bad config, checkpoint or reward setting ends with one line naming
the field or file, and exit status 2.
"""

from __future__ import annotations

import logging
import sys

import hydra

from grpo.checkpoint import CheckpointError
from grpo.config import CONFIG_DIR, ConfigError, register_configs, to_config
from grpo.loop import MaskedRewardsError
from grpo.run import evaluate_from_config, train_from_config


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


def run_cli(job) -> None:
    """Compose the config from the command line's overrides, validate it, and run `job(cfg)`."""
    register_configs()
    sys.argv = drop_launcher_args(sys.argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _main(dict_cfg) -> None:
        try:
            job(to_config(dict_cfg))
        except (ConfigError, CheckpointError, MaskedRewardsError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


def train_main() -> None:
    """`grpo-train`: train with the composed config."""
    run_cli(train_from_config)


def eval_main() -> None:
    """`grpo-eval`: the held-out accuracy of `model.path`, with the same config and overrides as grpo-train."""
    run_cli(evaluate_from_config)
