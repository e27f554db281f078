"""Environments of other libraries as ours (`grpo.envs.Environment`): `env.name=grpo.envs.adapters.<lib>:<Class>`,
`env.kwargs` naming the library's environment. Each adapter's library is an optional extra (`pip install -e
".[envs]"`), imported only when its adapter is chosen."""

from __future__ import annotations

import hashlib


def row_seed(row: dict) -> int:
    """The row's `seed` column, else a fixed 32-bit hash of its prompt (the same in every process): the G episodes
    of one row play the same game."""
    if isinstance(row.get("seed"), int) and row["seed"] >= 0:
        return row["seed"]
    return int.from_bytes(hashlib.blake2b(str(row.get("prompt", "")).encode(), digest_size=4).digest(), "big")
