"""Data parallelism: which rank this process is, and the few collectives the loop needs.

Every function works in one process too (no process group: rank 0 of 1, reductions are the
identity), so the loop has one code path. The process group is started by `init_distributed`
from the environment the launchers set (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ... from
`torchrun` or `deepspeed`), over NCCL on GPUs and gloo on CPUs, and left by `close_distributed`
once the job has ended well on every rank.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    """True when a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(*, deepspeed: bool, timeout_s: float) -> None:
    """Join the process group the launcher set up (no-op in a single process).

    `timeout_s` bounds how long a collective waits for a peer; a rank that hangs (rather than
    dies, which the launchers notice) then fails the job after that long instead of the
    default 30 minutes.
    """
    if dist.is_initialized() or not launched_distributed():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


def close_distributed() -> None:
    """Leave the launchers' process group together, after a job that ended well on every rank.

    A process that exits with its group still open tears the group down during interpreter shutdown, where
    gloo's worker threads can take the process down with them: "terminate called without an active
    exception" and SIGABRT after a run that had finished and written everything. The barrier first makes
    no rank leave while a peer still talks to it. Not for the error path: there a peer may never reach it.
    A group this process was not launched into is left alone (in one process, a colocated vLLM engine
    starts a group of its own and takes it down when it shuts down).
    """
    if launched_distributed() and dist.is_initialized():
        dist.barrier()
        release_cpu_allreduce_buffer()
        dist.destroy_process_group()


def release_cpu_allreduce_buffer() -> None:
    """Remove the name of this rank's shared-memory buffer for DeepSpeed's CPU all-reduce (ranks on one host).

    DeepSpeed never removes it, so each rank of each launch would leave 66 MB of RAM in /dev/shm until the
    machine reboots. Each rank maps its peers' buffers when the group starts; once every rank has passed the
    closing barrier the names are no longer needed, and the mappings outlive them. No-op where there is none.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}").unlink(missing_ok=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes the run's files (metrics, samples, plot, config, the consolidated policy)."""
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a float64 copy, on the collective's device)."""
    out = values.detach().to(torch.float64)
    if dist.is_initialized():
        out = out.to(device())
        dist.all_reduce(out)
        out = out.cpu()
    return out


def all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small things: rewards, texts, metrics)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list, *, of_rank: int | None = None, ranks: int | None = None) -> list:
    """The contiguous share of `items` that rank `of_rank` of `ranks` takes (len divisible by ranks)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if ranks is None else ranks
    if len(items) % w:
        raise ValueError(f"{len(items)} items do not split evenly over {w} ranks")
    per = len(items) // w
    return items[r * per : (r + 1) * per]


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer rank died or timed out."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "timed out"))


@torch.no_grad()
def replica_difference(model: torch.nn.Module) -> float:
    """Largest difference between ranks of a per-parameter fingerprint (sum and sum of squares,
    in float64); 0.0 when every rank holds bit-identical weights. Call with full weights."""
    parts = []
    for p in model.parameters():
        x = p.detach().double()
        parts.append(torch.stack([x.sum(), (x * x).sum()]))
    fingerprint = torch.cat(parts).cpu()  # [2 * number of parameter tensors]
    everyone = all_gather_objects(fingerprint)
    return max(float((f - everyone[0]).abs().max()) for f in everyone)
