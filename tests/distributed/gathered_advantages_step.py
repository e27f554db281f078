"""One real GRPO step on 2 ranks with dynamic sampling, run by torchrun (test_distributed.py).

Rank 1's reward gives all but its first group no signal, so dynamic sampling keeps 1 group there
and every group on rank 0: the ranks train on different numbers of rows. Each rank records the
advantages its update received; rank 0 writes them, with the whole step's gathered groups, so the
test can check that they are the whole batch's advantages (REINFORCE++ whitens over all ranks'
groups), each rank holding its own rows.

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/gathered_advantages_step.py --model DIR --out out.pt
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from grpo import distributed as dist
from grpo.algorithms import grpo as trainer

G = 4


def rank_reward(prompts, completions, **_):
    """Rewards that differ within every group on rank 0; on rank 1 only in its first group."""
    rank = int(os.environ.get("RANK", 0))
    return [float(i % 2 == 0) + 0.01 * len(c) if rank == 0 or i < G else 0.5 for i, c in enumerate(completions)]


def main() -> None:
    from grpo.training.run import build_run
    from tests.conftest import compose

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=False, timeout_s=120)
    cfg = compose(["model=hf", f"model.path={args.model}", "model.dtype=float32", "backend=ddp",
                   "train.prompts_per_step=6", f"algorithm.group_size={G}", "algorithm.advantage=reinforce_pp",
                   "algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_on=total", "algorithm.max_resample=0",
                   "rollout.max_new_tokens=6",
                   "tracking.progress_bar=false", "task.arithmetic.num_eval=8",
                   "reward.functions=[{name: 'tests.distributed.gathered_advantages_step:rank_reward'}]"])
    cfg.run_dir = str(Path(args.out).parent / "run")
    run = build_run(cfg)
    seen = {}
    real_update = trainer.update_policy

    def spy(backend, batch, algo, **kwargs):
        seen["advantages"] = batch.advantages.clone()
        P = batch.prompt_width
        seen["completion_ids"] = [ids[P:][mask[P:].bool()].tolist()
                                  for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        return real_update(backend, batch, algo, **kwargs)

    trainer.update_policy = spy
    result = trainer.train_step(run, 1)
    assert result.skipped is None, result.skipped
    shares = dist.all_gather_objects({"advantages": seen["advantages"].tolist(),
                                      "completion_ids": seen["completion_ids"]})
    if dist.is_main():
        torch.save({"shares": shares, "rewards": result.groups.rewards, "completion_ids": result.groups.completion_ids,
                    "kept_groups": result.metrics["train/kept_groups"]}, args.out)
    run.tracker.close(plot=False)
    dist.close_distributed()


if __name__ == "__main__":
    main()
