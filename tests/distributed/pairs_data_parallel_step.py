"""One DPO update and one NLL (RFT/SFT) update on fixed batches, run by a real launcher on 1 or 2 ranks
(test_distributed.py, test_dpo_data_parallel.py): each rank takes its contiguous share of the pairs (DPO) or
rows (NLL), and rank 0 writes the losses and the gradients that reached the optimiser, to check 2 ranks x B
against 1 rank x 2B.

- `dpo`: `grpo.algorithms.preference.dpo_update` on pairs with given reference log-probs (online DPO's update);
- `offline_dpo`: one step of the offline DPO loop (`grpo.algorithms.dpo.train_step`: the step's pairs from the shuffled
  stream, this rank's share, the reference's log-probs, the update), the reference a frozen copy of the policy;
- `nll`: `grpo.algorithms.supervised.nll_update`.

The forwards run in the layout a run of this config would (`backend.packing=auto`, resolved on the policy as
`grpo.training.run.build_run` does: `groups` on the tiny model's sdpa).

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/pairs_data_parallel_step.py --model DIR --out out.pt
    PYTHONPATH=. deepspeed --num_gpus 2 tests/distributed/pairs_data_parallel_step.py --backend deepspeed_zero2 \
        --model DIR ...
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from grpo import distributed as dist
from grpo.algorithms.dpo import TokenisedPairs, train_step
from grpo.algorithms.preference import dpo_update
from grpo.algorithms.supervised import nll_update
from grpo.cli import drop_launcher_args
from grpo.core.batch import layout_batch
from grpo.training.run import build_policy_backend, check_packing
from tests.conftest import compose
from tests.distributed.data_parallel_step import gradient_from_adam_step

PAIRS = 4
KINDS = ("dpo", "offline_dpo", "nll")


def fixed_pairs(seed: int = 0):
    """Prompts [PAIRS], completions [2 x PAIRS] (chosen, rejected, ...) and reference log-probs, from a seed."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(2, 7, (PAIRS,), generator=g)
    completion_lengths = torch.randint(1, 7, (2 * PAIRS,), generator=g)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in prompt_lengths]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in completion_lengths]
    ref = [torch.randn(len(c), generator=g) - 3.0 for c in completions]
    return prompts, completions, ref


def one_update(args, cfg, kind: str) -> dict:
    """The loss and full gradient of one update of a fresh copy of the model on this rank's share."""
    prompts, completions, ref = fixed_pairs()
    mine = dist.shard(list(range(PAIRS)))  # this rank's pairs (DPO) or prompts (NLL)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    check_packing(cfg, policy)  # backend.packing=auto -> the layout, as building a run would resolve it
    backend = build_policy_backend(cfg, policy)
    run = SimpleNamespace(cfg=cfg, backend=backend)
    with backend.gathered_for_rollout():  # ZeRO-3: the full weights
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    if kind == "dpo":
        batch = layout_batch([prompts[p] for p in mine], [completions[r] for p in mine for r in (2 * p, 2 * p + 1)],
                             2, 0)
        batch.ref_logprobs = torch.zeros(batch.completion_mask.shape)
        for i, r in enumerate(r for p in mine for r in (2 * p, 2 * p + 1)):
            batch.ref_logprobs[i, batch.completion_mask[i].bool()] = ref[r]
        metrics = dpo_update(run, batch, total_pairs=PAIRS)
    elif kind == "offline_dpo":
        metrics = offline_step(run, policy, args.model, prompts, completions)
    else:
        batch = layout_batch([prompts[p] for p in mine], [completions[2 * p] for p in mine], 1, 0)
        metrics = nll_update(run, batch)
    with backend.gathered_for_rollout():
        grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in policy.named_parameters()}
    return {"loss": metrics["train/loss"], "grads": grads, "margin": metrics.get("train/dpo_margin")}


def offline_step(run, policy, model_dir: str, prompts, completions) -> dict:
    """Step 2 of the offline DPO loop over the fixed pairs (its batch: a shuffle's pairs, not the file order)."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dist.device()).eval()
    pairs = TokenisedPairs(rows=[{"prompt": "", "chosen": "", "rejected": ""}] * PAIRS, prompt_ids=prompts,
                           chosen_ids=completions[0::2], rejected_ids=completions[1::2])
    run.ref_model = ref.requires_grad_(False)
    run.tokenizer = SimpleNamespace(pad_token_id=0)
    run.policy = policy
    run.engine = SimpleNamespace(sync_weights=lambda model: 0.0)
    return train_step(run, 2, pairs).metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="ddp")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which updates, comma-separated")
    args = parser.parse_args(drop_launcher_args(sys.argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=args.backend.startswith("deepspeed"), timeout_s=120)
    # lr 1, eps 1, no warm-up, clipping or decay: AdamW's first step gives back the gradient exactly
    cfg = compose(["algorithm=dpo", f"backend={args.backend}", "model=hf", f"model.path={args.model}",
                   "optim.lr=1.0", "optim.eps=1.0", "optim.warmup_steps=0", "optim.max_grad_norm=0",
                   "optim.weight_decay=0", "optim.schedule=constant", "backend.micro_batch_tokens=30",
                   "rollout.temperature=1.0", f"algorithm.dpo.batch_size={PAIRS}", "algorithm.dpo.beta=0.5",
                   "backend.check_replicas_every=0"])
    out = {kind: one_update(args, cfg, kind) for kind in args.kinds.split(",")}
    if dist.is_main():
        torch.save({**out, "world_size": dist.world_size()}, args.out)
    dist.close_distributed()


if __name__ == "__main__":
    main()
