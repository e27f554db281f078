"""Who may join the weight channel of server mode (grpo.rollout.weight_channel): real gloo process groups,
one rank per thread, on a store that the test's rank 0 hosts on a loopback address other than 127.0.0.1."""

from __future__ import annotations

import datetime
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from grpo.rollout import weight_channel
from grpo.rollout.serve import EngineHost

HOST = "127.0.0.2"  # Linux routes all of 127/8 to lo: an address that is neither 127.0.0.1 nor any
SECRET = "0123456789abcdef0123456789abcdef"


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on TCP `port` (all of this network namespace's)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if int(local_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]  # each in host byte order
            found.add(socket.inet_ntop(family, struct.pack(f"={len(words)}I", *words)))
    return found


def open_host(pool: ThreadPoolExecutor, listener: socket.socket, world_size: int = 2, timeout_s: float = 30.0):
    """Trainer rank 0 opening the channel in a thread of `pool`: its future."""
    port = listener.getsockname()[1]
    return pool.submit(weight_channel.open_group, HOST, port, 0, world_size, secret=SECRET, backend="gloo",
                       timeout_s=timeout_s, listener=listener)


def broadcast_known_bytes(host_group, server_group) -> torch.Tensor:
    """Rank 0 broadcasts 0..255 once; what rank 1 received."""
    sent, received = torch.arange(256, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8)
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(weight_channel.broadcast, g, t, timeout_s=30) for g, t in
                ((host_group, sent), (server_group, received))]
        for f in done:
            f.result()
    return received


def test_the_store_listens_on_the_given_address_only():
    # torch's own TCPStore host listens on '::' (every interface, IPv4 too) whatever host it is given; the
    # channel's must listen on HOST and nowhere else: {'127.0.0.2'}, where unfixed it reads {'::'}
    with weight_channel.listen(HOST) as listener, ThreadPoolExecutor(1) as pool:
        port = listener.getsockname()[1]
        group = open_host(pool, listener, world_size=1).result()
    assert listening_addresses(port) == {HOST}
    del group


def test_two_ranks_with_the_secret_form_the_group_and_a_broadcast_arrives_intact():
    with weight_channel.listen(HOST) as listener, ThreadPoolExecutor(2) as pool:
        host = open_host(pool, listener)
        server = pool.submit(weight_channel.open_group, HOST, listener.getsockname()[1], 1, 2, secret=SECRET,
                             backend="gloo", timeout_s=30)
        host_group, server_group = host.result(), server.result()
    assert torch.equal(broadcast_known_bytes(host_group, server_group), torch.arange(256, dtype=torch.uint8))


def join_as_stranger(port: int, prefix: str, timeout_s: float):
    """A party that reached the port and joins as rank 1 with its own idea of the key prefix."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(HOST, port, None, False, timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), 1, 2, timeout)


@pytest.mark.parametrize("stranger", ["old fixed prefix", "wrong secret"])
def test_a_stranger_without_the_secret_times_out_and_the_genuine_pair_still_forms(stranger):
    with weight_channel.listen(HOST) as listener, ThreadPoolExecutor(2) as pool:
        port = listener.getsockname()[1]
        host = open_host(pool, listener)
        start = time.monotonic()
        with pytest.raises(dist.DistStoreError, match="wait timeout"):  # it waits for a rank 0 in keys of its own
            if stranger == "old fixed prefix":  # the prefix every channel used before it had a secret
                join_as_stranger(port, "grpo_weights", timeout_s=2)
            else:
                weight_channel.open_group(HOST, port, 1, 2, secret="f" * 32, backend="gloo", timeout_s=2)
        assert time.monotonic() - start < 2 + 10  # its own timeout, plus slack for a loaded machine
        server = pool.submit(weight_channel.open_group, HOST, port, 1, 2, secret=SECRET, backend="gloo",
                             timeout_s=30)
        host_group, server_group = host.result(), server.result()
    assert torch.equal(broadcast_known_bytes(host_group, server_group), torch.arange(256, dtype=torch.uint8))


def test_a_stranger_who_reads_the_prefix_from_the_store_is_refused_before_any_weight_is_sent():
    # any store client may list the keys, so the prefix is no secret; the membership check is what refuses it
    with weight_channel.listen(HOST) as listener, ThreadPoolExecutor(2) as pool:
        port = listener.getsockname()[1]
        host = open_host(pool, listener)
        snoop = dist.TCPStore(HOST, port, None, False, datetime.timedelta(seconds=10))
        while not snoop.list_keys():  # rank 0 publishes its gloo address as <prefix>/0/0
            time.sleep(0.05)
        prefix = snoop.list_keys()[0].rsplit("/", 2)[0]
        assert prefix == weight_channel.store_prefix(SECRET) and SECRET not in prefix
        group = join_as_stranger(port, prefix, timeout_s=10)  # the store lets it in as rank 1
        guess = torch.zeros(32, dtype=torch.uint8)  # it cannot compute HMAC(secret, 1) without the secret
        seen = [torch.empty(32, dtype=torch.uint8) for _ in range(2)]
        group.allgather([seen], [guess]).wait(datetime.timedelta(seconds=10))
        with pytest.raises(weight_channel.ChannelAuthError, match=r"rank\(s\) \[1\] did not prove"):
            host.result()


def test_open_group_needs_a_secret_and_rank_0_a_listener():
    with pytest.raises(ValueError, match="secret is empty"):
        weight_channel.open_group(HOST, 1, 1, 2, secret="", backend="gloo", timeout_s=1)
    with pytest.raises(ValueError, match="rank 0 needs listener"):
        weight_channel.open_group(HOST, 1, 0, 2, secret=SECRET, backend="gloo", timeout_s=1)


def test_a_server_refuses_to_join_a_channel_without_a_secret():
    server = EngineHost(lambda: None)
    opening = {"host": HOST, "port": 1, "rank": 1, "world_size": 2, "backend": "gloo", "timeout_s": 1}
    for body in (opening, dict(opening, secret=""), dict(opening, secret=None)):
        with pytest.raises(ValueError, match="/weights/open: the body has no 'secret'"):
            server.open_weights(body)
