"""`grpo-memory` (`python -m grpo.memory`): the per-GPU memory plan of a config, without loading weights.

    grpo-memory --gpus 8 --gpu-memory-gb 80 experiment=qwen2.5-7b_gsm8k_8gpu

The arithmetic is `grpo.model.memory`; a plan that does not fit ends with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from hydra import compose, initialize_config_dir

from grpo.config import CONFIG_DIR, register_configs, to_config
from grpo.errors import ConfigError
from grpo.model.memory import check_fits, estimate_from_config


def main(argv: list[str] | None = None) -> None:
    """Print the plan of a config (Hydra overrides) for a number of GPUs, without loading weights."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--gpus", type=int, default=1, help="ranks the run will have")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("overrides", nargs="*", help="grpo-train overrides, e.g. experiment=qwen2.5-7b_gsm8k_8gpu")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["run_dir=unused", *args.overrides]))
    plan = estimate_from_config(cfg, args.gpus, args.gpu_memory_gb)
    print(plan.table())
    try:
        check_fits(plan, args.gpu_memory_gb)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"fits in {args.gpu_memory_gb:.0f} GiB")


if __name__ == "__main__":
    main()
