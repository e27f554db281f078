"""The weight channel of server mode: a torch process group of its own between trainer rank 0 and
the rollout servers, over which each bucket of the policy's weights travels as one flat byte tensor.

The group is built from a `TCPStore` that trainer rank 0 hosts, as vLLM's
`stateless_init_torch_distributed_process_group` does, without touching the global process group
(the trainer's ranks already use it, and the server never joins it). Rank 0 of the channel is the
trainer; server i is rank i + 1; a bucket is broadcast from rank 0, so every data-parallel engine
receives it at once. Backend: gloo on CPU (what the tests run), NCCL when the trainer has a GPU.
Every operation waits at most the channel's timeout, so a dead or hung peer is an error, not a hang.

Who may join. A torch `TCPStore` has no authentication, and left to itself its host listens on every
interface whatever address it is given. So:
1. Rank 0 binds the store's listening socket itself, to the one address it tells the servers (`listen`),
   and hands it to the store: the port is not reachable through the machine's other interfaces.
2. Each opening draws a fresh secret (`new_secret`), which the trainer sends to each server in the body
   of `POST /weights/open` (grpo.rollout.serve). The store's keys live under a prefix derived from it, so a
   party without it (a stale server, another run, a port scanner using the old fixed prefix) works in
   other keys and never joins the group: its open times out.
3. The prefix alone is no password: any client of a `TCPStore` can call `list_keys` and read it. So once
   the group has formed, every rank proves it holds the secret itself, which never enters the store: each
   contributes HMAC-SHA256(secret, its rank) to an all-gather and checks everyone else's. A stranger who
   took a rank's place cannot produce that rank's proof; the open fails naming the rank, before any weight
   is sent. This stops a party that joins in a rank's place; it does not stop one that can rewrite the store's
   rendezvous keys and relay the ranks' own traffic (proofs included) between them, which only an authenticated,
   encrypted transport would.
What this does not protect against: a party that can read the `/weights/open` body, which travels in clear
HTTP (`grpo-vllm-serve` refuses to start on any `--host` but `localhost` or a loopback IP address unless
`GRPO_SERVER_TOKEN` holds a token of 16 characters or more, but the token authenticates requests, it does not
encrypt them); one that can inject into the TCP connections after the check; gloo's (or NCCL's) own pair
sockets, which the ranks open to each other on addresses and ports the library picks and which carry the
weights unencrypted; a stranger that reaches the port making an opening fail (it can still connect to the
store, read and overwrite keys); and a server the trainer itself was pointed at (`rollout.server_urls`).
Across a network you do not trust, keep the trainer and the servers inside a private network or a VPN.

Only torch and the standard library are imported here: the trainer may run where vLLM is not installed.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import socket

import torch
import torch.distributed as dist

DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


class ChannelAuthError(RuntimeError):
    """A member of the weight channel did not prove it holds the channel's secret."""


def new_secret() -> str:
    """A fresh secret for one opening of the channel (128 random bits, hex)."""
    return secrets.token_hex(16)


def listen(host: str) -> socket.socket:
    """A TCP socket bound to `host` (an IP address) on a free port, listening: where rank 0's store will serve.

    The caller keeps it open until `open_group` returns (the store serves on a duplicate of it), then closes it.
    Binding here, not in the store, also ends the race of finding a free port, closing it and binding it again.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    return socket.create_server((host, 0), family=family)


def open_group(host: str, port: int, rank: int, world_size: int, *, secret: str, backend: str, timeout_s: float,
               listener: socket.socket | None = None):
    """Join the channel whose store rank 0 hosts at host:port; blocks until all `world_size` ranks have joined
    and each proved it holds `secret`. Rank 0 passes `listener` (`listen(host)`'s socket, bound to that port)."""
    if not secret:
        raise ValueError("weight channel: secret is empty; every opening needs one (weight_channel.new_secret())")
    if (rank == 0) != (listener is not None):
        raise ValueError(f"weight channel: rank {rank} {'needs' if rank == 0 else 'takes no'} listener; rank 0 "
                         "hosts the store on weight_channel.listen(host)'s socket, the others connect to it")
    timeout = datetime.timedelta(seconds=timeout_s)
    # the store owns (and closes) the fd it is given: a duplicate, so the caller's socket object stays its own
    listen_fd = None if listener is None else os.dup(listener.fileno())
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=listen_fd, use_libuv=True)
    store = dist.PrefixStore(store_prefix(secret), store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    check_members(group, rank, world_size, secret=secret, device="cuda" if backend == "nccl" else "cpu",
                  timeout_s=timeout_s)
    return group


def store_prefix(secret: str) -> str:
    """The store's key prefix: derived from the secret one way, as any store client can read it."""
    return "grpo_weights/" + hashlib.sha256(b"grpo weight channel store prefix\0" + secret.encode()).hexdigest()


def membership_proof(secret: str, rank: int) -> bytes:
    """What rank `rank` shows the others: HMAC-SHA256(secret, rank), 32 bytes."""
    return hmac.digest(secret.encode(), f"grpo weight channel rank {rank}".encode(), "sha256")


def check_members(group, rank: int, world_size: int, *, secret: str, device: str, timeout_s: float) -> None:
    """All-gather every rank's `membership_proof` and check each; raises ChannelAuthError naming a rank whose
    proof is wrong (a stranger joined in its place)."""
    mine = torch.frombuffer(bytearray(membership_proof(secret, rank)), dtype=torch.uint8).to(device)  # [32]
    proofs = [torch.empty_like(mine) for _ in range(world_size)]
    group.allgather([proofs], [mine]).wait(datetime.timedelta(seconds=timeout_s))
    wrong = [r for r, proof in enumerate(proofs)
             if not hmac.compare_digest(bytes(proof.cpu().tolist()), membership_proof(secret, r))]
    if wrong:
        raise ChannelAuthError(f"weight channel: rank(s) {wrong} did not prove the channel's secret: a party "
                               f"without it joined in their place; refusing the channel (rank {rank} here)")


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
