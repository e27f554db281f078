"""One distillation update and one GKD update on fixed rows, run by a real launcher on 1 or 2 ranks
(test_distill_data_parallel.py): each rank takes its contiguous share of the rows, and rank 0 writes the loss, the
distillation metric and the gradients that reached the optimiser, to check 2 ranks x B/2 against 1 rank x B.

- `distill`: `grpo.algorithms.distill.add_distillation_advantages` (student and teacher log-probs, the per-token
  reverse-KL advantage, its metrics over every rank's tokens), then GRPO's `update_policy`;
- `gkd`: `grpo.algorithms.gkd.jsd_update` (the teacher's hidden states, the chunked generalised JSD, beta 0.5).

The teacher is loaded as a run loads it (`grpo.training.run.build_teacher`, after the student's backend is built),
and each rank writes how many of the student's and of the teacher's parameters ZeRO-3 holds partitioned at the
update. Under ZeRO-3 every parameter is partitioned (`stage3_param_persistence_threshold` 0: by default DeepSpeed
keeps tensors under 1e5 values whole on every rank, which is all of the tiny model's), so the teacher's forwards run
beside a sharded student.

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/distill_data_parallel_step.py --model DIR \
        --teacher DIR --out out.pt
    PYTHONPATH=. deepspeed --num_gpus 2 tests/distributed/distill_data_parallel_step.py --backend deepspeed_zero3 ...
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo import distributed as dist
from grpo.algorithms.distill import add_distillation_advantages
from grpo.algorithms.gkd import jsd_update
from grpo.cli import drop_launcher_args
from grpo.config import completion_budget
from grpo.core.batch import layout_batch
from grpo.training.run import build_policy_backend, build_teacher, check_packing
from grpo.training.update import update_policy
from tests.conftest import compose
from tests.distributed.data_parallel_step import gradient_from_adam_step, partitioned

ROWS = 8  # two prompts of G = 4 completions each
KINDS = ("distill", "gkd")


def fixed_rows(seed: int = 0):
    """Prompts [ROWS / 4] and completions [ROWS] of random token ids, from a seed."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in torch.randint(2, 7, (ROWS // 4,),
                                                                                            generator=g)]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist() for k in torch.randint(1, 7, (ROWS,),
                                                                                                generator=g)]
    return prompts, completions


def one_update(args, cfg, kind: str) -> dict:
    """The loss, metric and full gradient of one update of a fresh copy of the student on this rank's share."""
    prompts, completions = fixed_rows()
    mine = dist.shard(list(range(ROWS // 4)))  # this rank's prompts, with their G completions
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    check_packing(cfg, policy)  # backend.packing=auto -> the layout, as building a run would resolve it
    backend = build_policy_backend(cfg, policy)
    teacher = build_teacher(cfg, AutoTokenizer.from_pretrained(args.model))  # after the backend, as build_run does
    run = SimpleNamespace(cfg=cfg, backend=backend, teacher=teacher, ref_model=None)
    sharded = {"student": partitioned(policy), "teacher": partitioned(teacher)}
    with backend.gathered_for_rollout():  # ZeRO-3: the full weights
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    batch = layout_batch([prompts[p] for p in mine], [completions[4 * p + j] for p in mine for j in range(4)], 4, 0)
    if kind == "distill":
        metrics = add_distillation_advantages(run, batch)
        metrics |= update_policy(backend, batch, cfg.algorithm, temperature=cfg.rollout.temperature,
                                 micro_batch_tokens=cfg.backend.micro_batch_tokens,
                                 max_new_tokens=completion_budget(cfg), packing=cfg.backend.packing)
        measure = metrics["distill/reverse_kl"]
    else:
        metrics = jsd_update(run, batch)
        measure = metrics["gkd/jsd"]
    with backend.gathered_for_rollout():
        grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in policy.named_parameters()}
    return {"loss": metrics["train/loss"], "measure": measure, "grads": grads, "partitioned": sharded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="ddp")
    args = parser.parse_args(drop_launcher_args(sys.argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=args.backend.startswith("deepspeed"), timeout_s=120)
    # lr 1, eps 1, no warm-up, clipping or decay: AdamW's first step gives back the gradient exactly
    common = [f"backend={args.backend}", "model=hf", f"model.path={args.model}",
              f"algorithm.teacher.path={args.teacher}",
              "optim.lr=1.0", "optim.eps=1.0", "optim.warmup_steps=0", "optim.max_grad_norm=0", "optim.weight_decay=0",
              "optim.schedule=constant", "backend.micro_batch_tokens=30", "rollout.temperature=0.8",
              "algorithm.group_size=4", "backend.check_replicas_every=0", "algorithm.teacher.chunk_size=5",
              "model.dtype=float32"]  # the teacher's (build_teacher); the student is loaded in float32 above
    if args.backend == "deepspeed_zero3":  # partition every parameter, however small
        common.append("+backend.deepspeed.zero_optimization.stage3_param_persistence_threshold=0")
    out = {kind: one_update(args, compose([f"algorithm={kind}", *common]), kind) for kind in KINDS}
    if dist.is_main():
        torch.save({**out, "world_size": dist.world_size()}, args.out)
    dist.close_distributed()


if __name__ == "__main__":
    main()
