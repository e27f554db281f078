"""One GRPO step on 2 ZeRO-3 ranks in server mode, against the fake servers the test hosts
(test_distributed.py): building the engine pushes the starting weights, the step pushes the updated
ones. Rank 0 then writes the gathered policy, for the test to compare with what the servers received.

    PYTHONPATH=. deepspeed --num_gpus 2 tests/distributed/server_sync_step.py --model DIR --urls URL,URL --out out.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grpo import distributed as dist
from grpo.algorithms import grpo as trainer
from grpo.rollout.vllm import gathered


def alternating_reward(prompts, completions, **_):
    """0, 1, 0, 1, ...: the fake servers' two samples of a prompt differ, so every group has signal."""
    return [float(i % 2) for i in range(len(completions))]


def main() -> None:
    from grpo.training.run import build_run
    from tests.conftest import compose

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()  # the DeepSpeed launcher appends --local_rank
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=True, timeout_s=120)
    cfg = compose(["model=hf", f"model.path={args.model}", "model.dtype=float32", "backend=deepspeed_zero3",
                   "rollout=vllm", "rollout.mode=server", f"rollout.server_urls=[{args.urls}]", "rollout.timeout_s=60",
                   "rollout.sync_bucket_mb=0.01", "train.prompts_per_step=4", "algorithm.group_size=2",
                   "optim.lr=1e-2", "rollout.max_new_tokens=2", "tracking.progress_bar=false",
                   "task.arithmetic.num_eval=8",
                   "reward.functions=[{name: 'tests.distributed.server_sync_step:alternating_reward'}]"])
    cfg.run_dir = str(Path(args.out).parent / "run")
    run = build_run(cfg)
    result = trainer.train_step(run, 1)
    params = list(run.policy.named_parameters())
    with gathered([p for _, p in params]):
        if dist.is_main():
            torch.save({name: p.detach().clone() for name, p in params} | {"_sync_s": result.metrics[
                "time/weight_sync_s"]}, args.out)
    run.tracker.close(plot=False)
    dist.close_distributed()


if __name__ == "__main__":
    main()
