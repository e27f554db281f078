"""Driver: every rank saves a checkpoint of the tiny model while rank `--failing-rank`'s write fails as a full
disk makes torch.save fail (RuntimeError, not OSError); each rank writes what it raised, and after how long, to
`--out`.rank_R.json. The collective timeout is 120 s: a rank left waiting for the failed one would take that long.

    torchrun --nproc_per_node 2 tests/distributed/checkpoint_failure_step.py --run-dir DIR --out FILE
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from grpo import distributed as dist
from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model
from grpo.cli import drop_launcher_args
from grpo.errors import CheckpointError
from grpo.training import checkpoint


def full_disk_save(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                       "file write failed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--failing-rank", type=int, default=1)
    args = parser.parse_args(drop_launcher_args(__import__("sys").argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=False, timeout_s=120)
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    if dist.rank() == args.failing_rank:
        checkpoint.torch.save = full_disk_save  # only the rank files go through torch.save here: rank_R.pt
    start = time.monotonic()
    try:
        checkpoint.save_checkpoint(args.run_dir, 1, policy=model, tokenizer=tok, state={})
        raised = None
    except CheckpointError as e:
        raised = str(e)
    with open(f"{args.out}.rank_{dist.rank()}.json", "w") as f:
        json.dump({"raised": raised, "seconds": time.monotonic() - start}, f)
    dist.close_distributed()


if __name__ == "__main__":
    main()
