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

`ppo_update` is the same update in-process (tests/unit/test_packing.py runs it under each `backend.packing`).
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
    parser.add_argument("--packing", default="padded", help="backend.packing of the policy's and critic's forwards")
    args = parser.parse_args(drop_launcher_args(sys.argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=args.backend.startswith("deepspeed"), timeout_s=120)
    metrics, grads = ppo_update(args.model, args.backend, args.groups, args.packing)
    if dist.is_main():
        torch.save({"metrics": metrics, "grads": grads, "world_size": dist.world_size()}, args.out)
    dist.close_distributed()


def ppo_update(model: str, backend: str = "torch", groups: int = 4, packing: str = "padded", critic_hook=None
               ) -> tuple[dict, dict[str, torch.Tensor]]:
    """`PPO.update` of this rank's share of the fixed batch; returns its metrics and the gradients that reached
    the policy's and the critic's optimisers (the critic's names prefixed `critic.`). `critic_hook(critic)`, if
    given, is called on the bare critic before its backend is built (a test's forward hooks go there)."""
    # lr 1, eps 1, no warm-up, clipping or decay: AdamW's first step gives back the gradient exactly
    cfg = compose(["algorithm=ppo", f"backend={backend}", "model=hf", f"model.path={model}",
                   "model.dtype=float32",
                   "optim.lr=1.0", "optim.eps=1.0", "optim.warmup_steps=0", "optim.max_grad_norm=0",
                   "optim.weight_decay=0", "optim.schedule=constant", "algorithm.ppo.value_lr=1.0",
                   "algorithm.beta=0.05", f"algorithm.group_size={G}", "backend.micro_batch_tokens=40",
                   "rollout.temperature=1.0", f"backend.packing={packing}"])
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model)
    ppo = PPO.__new__(PPO)  # the critic without a run directory to resume from
    ppo.critic = load_critic(cfg, model)
    # a head that is not zero, so the critic's body gets a gradient; set before ZeRO-3 partitions it
    torch.nn.init.normal_(ppo.critic.score.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    if critic_hook is not None:
        critic_hook(ppo.critic)
    both = [*policy.named_parameters(), *ppo.critic.named_parameters(prefix="critic")]
    before = {n: p.detach().clone() for n, p in both}
    policy_backend = build_policy_backend(cfg, policy)
    ppo.critic_backend = critic_backend(cfg, ppo.critic)
    prompts, completions, _ = fixed_batch(groups, G)
    scores = torch.rand(groups * G, generator=torch.Generator().manual_seed(2))
    batch = layout_batch(dist.shard(prompts), dist.shard(completions), G, tok.pad_token_id)
    run = SimpleNamespace(cfg=cfg, backend=policy_backend, ref_model=ref, policy=policy)
    metrics = ppo.update(run, batch, torch.stack(dist.shard(list(scores))))
    with policy_backend.gathered_for_rollout(), ppo.critic_backend.gathered_for_rollout():  # ZeRO-3: full weights
        grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in both}
    return metrics, grads

if __name__ == "__main__":
    main()
