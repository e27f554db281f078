"""One PPO update (policy and critic) on a fixed batch, run on 1 or 2 ranks (test_distributed.py and
test_ppo_deepspeed.py).

The batch is the same `groups` groups whatever the world size; each rank takes its contiguous share and
runs `PPO.update` (returns, GAE whitened over every rank's tokens, the clipped policy and value losses
normalised by the whole batch's counts) through `--backend` (ddp, or deepspeed_zeroN: the policy and the critic
each their own engine). Rank 0 writes the metrics and the full gradients that reached both optimisers, so the
test can check 2 ranks x B groups against 1 rank x 2B.

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/ppo_data_parallel_step.py --model DIR --out out.pt
    PYTHONPATH=. deepspeed --num_gpus 2 tests/distributed/ppo_data_parallel_step.py --backend deepspeed_zero2 \
        --model DIR --out o.pt
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo import distributed as dist
from grpo.algorithms.ppo import PPO, critic_backend, load_critic
from grpo.cli import drop_launcher_args
from grpo.core.batch import layout_batch
from grpo.training.run import build_policy_backend
from tests.conftest import compose
from tests.distributed.data_parallel_step import fixed_batch, gradient_from_adam_step

G = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--backend", default="ddp")
    args = parser.parse_args(drop_launcher_args(sys.argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=args.backend.startswith("deepspeed"), timeout_s=120)
    # lr 1, eps 1, no warm-up, clipping or decay: AdamW's first step gives back the gradient exactly
    cfg = compose(["algorithm=ppo", f"backend={args.backend}", "model=hf", f"model.path={args.model}",
                   "model.dtype=float32",
                   "optim.lr=1.0", "optim.eps=1.0", "optim.warmup_steps=0", "optim.max_grad_norm=0",
                   "optim.weight_decay=0", "optim.schedule=constant", "algorithm.ppo.value_lr=1.0",
                   "algorithm.beta=0.05", f"algorithm.group_size={G}", "backend.micro_batch_tokens=40",
                   "rollout.temperature=1.0"])
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(args.model)
    ppo = PPO.__new__(PPO)  # the critic without a run directory to resume from
    ppo.critic = load_critic(cfg, args.model)
    # a head that is not zero, so the critic's body gets a gradient; set before ZeRO-3 partitions it
    torch.nn.init.normal_(ppo.critic.score.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    both = [*policy.named_parameters(), *ppo.critic.named_parameters(prefix="critic")]
    before = {n: p.detach().clone() for n, p in both}
    backend = build_policy_backend(cfg, policy)
    ppo.critic_backend = critic_backend(cfg, ppo.critic)
    prompts, completions, _ = fixed_batch(args.groups, G)
    scores = torch.rand(args.groups * G, generator=torch.Generator().manual_seed(2))
    batch = layout_batch(dist.shard(prompts), dist.shard(completions), G, tok.pad_token_id)
    run = SimpleNamespace(cfg=cfg, backend=backend, ref_model=ref, policy=policy)
    metrics = ppo.update(run, batch, torch.stack(dist.shard(list(scores))))
    with backend.gathered_for_rollout(), ppo.critic_backend.gathered_for_rollout():  # ZeRO-3: the full weights
        grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in both}
    if dist.is_main():
        torch.save({"metrics": metrics, "grads": grads, "world_size": dist.world_size()}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
