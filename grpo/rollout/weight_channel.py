"""The weight channel of server mode: a torch process group of its own between trainer rank 0 and
the rollout servers, over which each bucket of the policy's weights travels as one flat byte tensor.

The group is built from a `TCPStore` that trainer rank 0 hosts, as vLLM's
`stateless_init_torch_distributed_process_group` does, without touching the global process group
(the trainer's ranks already use it, and the server never joins it). Rank 0 of the channel is the
trainer; server i is rank i + 1; a bucket is broadcast from rank 0, so every data-parallel engine
receives it at once. Backend: gloo on CPU (what the tests run), NCCL when the trainer has a GPU.
Every operation waits at most the channel's timeout, so a dead or hung peer is an error, not a hang.

Only torch is imported here: the trainer may run where vLLM is not installed.
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist

DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def open_group(host: str, port: int, rank: int, world_size: int, *, backend: str, timeout_s: float):
    """Join the channel (rank 0 hosts its store at host:port); blocks until all `world_size` ranks have."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("grpo_weights", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def broadcast(group, tensor: torch.Tensor, *, timeout_s: float) -> None:
    """Broadcast `tensor` from channel rank 0 to all ranks, in place; raises after `timeout_s`."""
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    work = group.broadcast([tensor], options)
    work.wait(datetime.timedelta(seconds=timeout_s))


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[list], torch.Tensor]:
    """The bucket's description ([name, dtype, shape] per tensor) and its bytes, concatenated: [sum of nbytes]."""
    meta = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in bucket]
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])  # [bytes]
    return meta, flat


def bucket_nbytes(meta: list[list]) -> int:
    return sum(math.prod(shape) * DTYPES[dtype].itemsize for _, dtype, shape in meta)


def unpack_bucket(meta: list[list], flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """`pack_bucket` undone: (name, tensor) views into `flat`."""
    out, offset = [], 0
    for name, dtype, shape in meta:
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        out.append((name, flat[offset:offset + nbytes].view(DTYPES[dtype]).reshape(shape)))
        offset += nbytes
    return out
