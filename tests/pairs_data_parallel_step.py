"""One online-DPO update and one NLL (RFT/SFT) update on fixed batches, run by torchrun on 1 or 2 ranks
(test_distributed.py): each rank takes its contiguous share of the pairs (DPO) or rows (NLL), and rank 0
writes the losses and the gradients that reached the optimiser, to check 2 ranks x B against 1 rank x 2B.

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/pairs_data_parallel_step.py --model DIR --out out.pt
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from grpo import distributed as dist
from grpo.batch import layout_batch
from grpo.online_dpo import dpo_update
from grpo.run import build_policy_backend
from grpo.supervised import nll_update
from tests.conftest import compose
from tests.data_parallel_step import gradient_from_adam_step

PAIRS = 4


def one_update(args, cfg, kind: str) -> dict:
    """The loss and full gradient of one update of a fresh copy of the model on this rank's share."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths = torch.randint(2, 7, (PAIRS,), generator=g)
    completion_lengths = torch.randint(1, 7, (2 * PAIRS,), generator=g)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in prompt_lengths]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in completion_lengths]
    ref = [torch.randn(len(c), generator=g) - 3.0 for c in completions]
    mine = dist.shard(list(range(PAIRS)))  # this rank's pairs (DPO) or prompts (NLL)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    backend = build_policy_backend(cfg, policy)
    run = SimpleNamespace(cfg=cfg, backend=backend)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    if kind == "dpo":
        batch = layout_batch([prompts[p] for p in mine], [completions[r] for p in mine for r in (2 * p, 2 * p + 1)],
                             2, 0)
        batch.ref_logprobs = torch.zeros(batch.completion_mask.shape)
        for i, r in enumerate(r for p in mine for r in (2 * p, 2 * p + 1)):
            batch.ref_logprobs[i, batch.completion_mask[i].bool()] = ref[r]
        metrics = dpo_update(run, batch, total_pairs=PAIRS)
    else:
        batch = layout_batch([prompts[p] for p in mine], [completions[2 * p] for p in mine], 1, 0)
        metrics = nll_update(run, batch)
    grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in policy.named_parameters()}
    return {"loss": metrics["train/loss"], "grads": grads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=False, timeout_s=120)
    # lr 1, eps 1, no warm-up, clipping or decay: AdamW's first step gives back the gradient exactly
    cfg = compose(["algorithm=online_dpo", "backend=ddp", "model=hf", f"model.path={args.model}", "optim.lr=1.0",
                   "optim.eps=1.0", "optim.warmup_steps=0", "optim.max_grad_norm=0", "optim.weight_decay=0",
                   "optim.schedule=constant", "backend.micro_batch_tokens=30", "rollout.temperature=1.0"])
    out = {kind: one_update(args, cfg, kind) for kind in ("dpo", "nll")}
    if dist.is_main():
        torch.save({**out, "world_size": dist.world_size()}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
