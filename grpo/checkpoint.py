"""Atomic save and exact resume.

A checkpoint `checkpoints/step_N/` holds the policy as a transformers directory (`policy/`,
safetensors), and `state.pt` with the optimiser, scheduler, RNG states, data position and step.
It is written under a temporary name, flushed, then renamed; the `latest` pointer is replaced
last, so a crash at any moment leaves the previous checkpoint intact and pointed to. Old
checkpoints are deleted only after a newer one is complete.

With several ranks every rank calls `save_checkpoint`: each writes its RNG state
(`rng/rank_R.pt`) and, under DeepSpeed, its ZeRO shards (`deepspeed/`, DeepSpeed's own format,
resumable on the same world size); rank 0 writes the consolidated `policy/` and `state.pt`
and renames the directory once all ranks are done.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from grpo import distributed as dist

COMPLETE = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, *, policy, tokenizer, state: dict, keep_last: int = 2,
                    backend=None) -> Path:
    """Write `checkpoints/step_{step}` atomically and point `latest` at it; returns its path.

    Collective when several ranks run: every rank must call it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    if hasattr(backend, "save_sharded"):  # DeepSpeed: sharded optimiser/weights, consolidated policy
        backend.save_sharded(tmp / "deepspeed")
        backend.save_policy(tmp / "policy", tokenizer)
    elif dist.is_main():
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
    if dist.world_size() > 1:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        torch.save({**state, "step": step, "world_size": dist.world_size()}, tmp / "state.pt")
        (tmp / COMPLETE).write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(final.name)
        with pointer_tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, root / "latest")
        _rotate(root, keep_last, protect=final)
    dist.barrier()
    return final


def load_rank_rng(checkpoint: Path, state: dict) -> dict:
    """This rank's RNG state: its own file when the run had several ranks, else the one in state.pt."""
    path = checkpoint / "rng" / f"rank_{dist.rank()}.pt"
    if not path.exists():
        return state["rng"]
    return torch.load(path, weights_only=True, map_location="cpu")


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _rotate(root: Path, keep_last: int, protect: Path) -> None:
    complete = sorted((p for p in root.glob("step_*") if (p / COMPLETE).exists()), key=_step_of)
    for old in complete[:-keep_last]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None; partial ones are skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return None
    for partial in root.glob(".tmp_step_*"):
        warnings.warn(f"ignoring partial checkpoint {partial} (its write did not finish)")
    candidates = sorted(root.glob("step_*"), key=_step_of, reverse=True)
    pointer = root / "latest"
    if pointer.exists() and (root / pointer.read_text().strip() / COMPLETE).exists():
        return root / pointer.read_text().strip()
    for path in candidates:
        if (path / COMPLETE).exists():
            return path
        warnings.warn(f"ignoring partial checkpoint {path} (no {COMPLETE} marker)")
    return None


def load_state(checkpoint: Path) -> dict:
    """The trainer state of a checkpoint (weights-only unpickling: no code runs)."""
    try:
        return torch.load(checkpoint / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise RuntimeError(f"checkpoint {checkpoint / 'state.pt'} is unreadable: {e}") from e
