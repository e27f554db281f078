"""Atomic save and exact resume.

A checkpoint `checkpoints/step_N/` holds
- `policy/`: the weights as a transformers directory (safetensors only) and the tokenizer;
  under LoRA (`model.lora.r > 0`) `adapter/` instead: the adapters in peft's format (loadable with
  `PeftModel.from_pretrained` over the base model), and `policy/` only with `checkpoint.merge_lora`,
  the base with the adapters merged;
- `state.pt`: what every rank shares: optimiser, scheduler, data position, guard counters, step,
  world size;
- `rank_R.pt`: what each rank owns: its Python, NumPy and torch (CPU and CUDA) RNG states;
- `deepspeed/` (DeepSpeed backends only): every rank's ZeRO shards of the weights and optimiser,
  in DeepSpeed's own format, resumable on the same world size;
- `<name>_deepspeed/` (DeepSpeed backends only): the same for another model the algorithm trains with
  its own engine (PPO's `critic_deepspeed/`), whose weights and optimiser then live only there;
- `COMPLETE`: a manifest of every file's size, written last.

The directory is written under a temporary name (`.tmp_step_N`), each file fsynced, then renamed
into place; the `latest` pointer is replaced after that, and older checkpoints are deleted only
once the new one is published. A crash at any moment therefore leaves the previous checkpoint
intact and pointed to. On resume a directory without a manifest (a write that never finished) is
skipped with a warning naming it, and the chosen checkpoint's files are checked against its
manifest so a truncated file is an error naming the file, not a crash deep inside a loader.

With several ranks every rank calls `save_checkpoint`: each writes its own `rank_R.pt` (and its
shards); rank 0 writes `policy/` and `state.pt`, then the manifest, and publishes the directory
once all ranks are done.

Everything is read with `torch.load(weights_only=True)` or safetensors: loading a checkpoint
never runs code from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from grpo import distributed as dist
from grpo.errors import CheckpointError
from grpo.faults import crash_point
from grpo.model.lora import is_adapted, merged_copy, save_adapters

COMPLETE = "COMPLETE"



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(path)


def rng_state() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and (where present) every CUDA device."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or inf, or None when all are finite."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def save_checkpoint(run_dir: str | Path, step: int, *, policy, tokenizer, state: dict, keep_last: int = 2,
                    backend=None, extra_backends: dict | None = None, merge_lora: bool = False) -> Path:
    """Write `checkpoints/step_{step}` atomically and point `latest` at it; returns its path.

    `extra_backends` (name -> backend): other models' backends (PPO's critic); DeepSpeed ones write their shards
    to `<name>_deepspeed/`, the others keep theirs in `state`. LoRA: `adapter/`, `policy/` only with `merge_lora`.

    Collective when several ranks run: every rank must call it. Non-finite weights are refused
    (on every rank, so none waits for the others); a write that fails for any reason (a full disk) on
    any rank removes the temporary directory and raises `CheckpointError` on every rank at the next
    phase's collective (not after the collective timeout), naming the path and the cause, leaving every
    earlier checkpoint and the `latest` pointer as they were.
    """
    bad = first_nonfinite_parameter(policy)  # ZeRO-3 holds a shard here: each rank checks its own
    if dist.all_reduce_max(float(bad is not None)):
        where = f"parameter {bad}" if bad else "a parameter on another rank"
        raise CheckpointError(f"step {step}: {where} is not finite; refusing to checkpoint it")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    writing = Writing(tmp, step, run_dir)
    if dist.is_main():
        writing.attempt(_make_empty, root, tmp)
    writing.agree()  # in place of a barrier: every rank learns of any rank's failure, and fails with it
    writing.attempt(_write_rank_files, tmp, step, policy=policy, tokenizer=tokenizer, backend=backend,
                    extra_backends=extra_backends, merge_lora=merge_lora)
    writing.agree()
    if dist.is_main():
        writing.attempt(_write_state_and_manifest, tmp, step, state)
    writing.agree()
    if dist.is_main():
        writing.attempt(_publish, tmp, final, step, keep_last)
    writing.agree()
    return final


def _make_empty(root: Path, tmp: Path) -> None:
    with writing_to(tmp):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()


def _write_rank_files(tmp: Path, step: int, *, policy, tokenizer, backend, extra_backends, merge_lora) -> None:
    """What every rank writes: its DeepSpeed shards, its part in the policy's files, its RNG states."""
    if hasattr(backend, "save_sharded"):  # DeepSpeed: every rank writes its shards
        with writing_to(tmp / "deepspeed"):
            backend.save_sharded(tmp / "deepspeed")
    with writing_to(tmp / "policy"):
        save_policy_files(policy, tokenizer, policy_dir=tmp / "policy", adapter_dir=tmp / "adapter",
                          merge_lora=merge_lora, backend=backend)
    for name, other in (extra_backends or {}).items():
        if hasattr(other, "save_sharded"):
            with writing_to(sharded_dir(tmp, name)):
                other.save_sharded(sharded_dir(tmp, name))
    crash_point("checkpoint_write", step)
    with writing_to(tmp / f"rank_{dist.rank()}.pt"):
        torch.save({"rng": rng_state()}, tmp / f"rank_{dist.rank()}.pt")


def _write_state_and_manifest(tmp: Path, step: int, state: dict) -> None:
    with writing_to(tmp / "state.pt"):
        torch.save({**state, "step": step, "world_size": dist.world_size()}, tmp / "state.pt")
    with writing_to(tmp / COMPLETE):
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync_tree(tmp)


class WriteFailed(Exception):
    """A checkpoint write's failure and the path it was writing."""

    def __init__(self, path: Path, error: Exception):
        super().__init__(str(error))
        self.path, self.error = path, error


@contextlib.contextmanager
def writing_to(path: Path):
    """Name `path` in any failure of the block (the innermost `writing_to` names the most precise path)."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:  # noqa: BLE001 - torch.save and safetensors report a full disk as RuntimeError/SafetensorError
        raise WriteFailed(path, e) from e


class Writing:
    """A checkpoint write shared by the ranks: this rank's first failure, with the path it was writing, and
    `agree`, the collective after each phase that fails every rank with it."""

    def __init__(self, tmp: Path, step: int, run_dir):
        self.tmp, self.step, self.run_dir = tmp, step, run_dir
        self.failure: tuple[str, str] | None = None  # (path, cause)

    def attempt(self, write, *args, **kwargs) -> None:
        """`write(*args, **kwargs)` unless this rank has failed already; any exception is kept, not raised."""
        if self.failure is not None:
            return
        try:
            write(*args, **kwargs)
        except WriteFailed as e:
            self.failure = (str(e.path), cause(e.error, e.path))
        except Exception as e:  # noqa: BLE001 - any failure fails the checkpoint, on every rank
            self.failure = (str(self.tmp), cause(e, self.tmp))

    def agree(self) -> None:
        """Collective: if any rank has failed, remove the temporary directory and raise CheckpointError on every
        rank, naming the first failed rank's path and cause; earlier checkpoints and `latest` stay as they were."""
        failures = [(rank, f) for rank, f in enumerate(dist.all_gather_objects(self.failure)) if f is not None]
        if not failures:
            return
        if dist.is_main():
            shutil.rmtree(self.tmp, ignore_errors=True)
        rank, (path, reason) = failures[0]
        previous = latest_checkpoint(self.run_dir, warn=False)
        kept = f"the last complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        who = f" on rank {rank}" if dist.world_size() > 1 else ""
        raise CheckpointError(f"checkpoint step {self.step}: writing {path}{who} failed ({reason}); {kept}")


def cause(error: Exception, path: Path) -> str:
    """What went wrong, in a few words: a full disk said so (and how much room is left), else the error's first line."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"the disk is full: {free_space(path)}"
    first = (str(error).splitlines() or [""])[0][:200]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if "ENOSPC" in text or "No space left" in text or "write failed" in text or "file write" in text:
        return f"{text}; {free_space(path)}"
    return text


def free_space(path: Path) -> str:
    """`N bytes free on the disk of path`, from its nearest existing parent."""
    for parent in (path, *path.parents):
        if parent.exists():
            return f"{shutil.disk_usage(parent).free} bytes free on the disk of {parent}"
    return "free space unknown"


def save_policy_files(policy, tokenizer, *, policy_dir: Path, adapter_dir: Path | None, merge_lora: bool,
                      backend=None) -> None:
    """Rank 0 writes the policy as a transformers directory with the tokenizer; a LoRA policy its adapters
    in peft's format (with the tokenizer) to `adapter_dir` (unless None), and to `policy_dir` only the merged
    model, when `merge_lora` asks for it. Collective under ZeRO-3: every rank takes part in gathering the weights."""
    with backend.gathered_for_rollout() if backend is not None else contextlib.nullcontext():
        if not dist.is_main():
            return
        if is_adapted(policy):
            if adapter_dir is not None:
                save_adapters(policy, adapter_dir)
                tokenizer.save_pretrained(adapter_dir)
            if not merge_lora:
                return
            policy = merged_copy(policy)
        policy.save_pretrained(policy_dir, safe_serialization=True)
        tokenizer.save_pretrained(policy_dir)


def sharded_dir(checkpoint: Path, name: str) -> Path:
    """Where a checkpoint holds the DeepSpeed shards of the model `name` besides the policy (`critic`)."""
    return checkpoint / f"{name}_deepspeed"


def save_best(run_dir: str | Path, step: int, *, policy, tokenizer, record: dict, backend=None,
              merge_lora: bool = False) -> Path:
    """Write the policy to `checkpoints/best` (a transformers directory, with `best.json` saying which step and
    evaluation it is), replacing the previous best atomically. Collective when several ranks run.
    A LoRA policy writes its adapter directory there instead, or with `merge_lora` the merged model."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / "best", root / ".tmp_best"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    save_policy_files(policy, tokenizer, policy_dir=tmp, adapter_dir=None if merge_lora else tmp,  # one or the other
                      merge_lora=merge_lora, backend=backend)
    if dist.is_main():
        (tmp / "best.json").write_text(json.dumps({"step": step, **record}, indent=1))
        _fsync_tree(tmp)
        stale = root / ".old_best"
        shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _publish(tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Rename the complete temporary directory to `final`, point `latest` at it, and drop the checkpoints
    past `keep_last`; each rename is atomic and fsynced, so a crash leaves the old or the new state."""
    root = final.parent
    if final.exists():  # re-saving a step (a resumed run that re-ran it): move the old copy aside first
        stale = root / f".old_step_{step}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    crash_point("checkpoint_publish", step)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    with pointer_tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / "latest")
    _fsync_dir(root)
    _rotate(root, keep_last, protect=final)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _rotate(root: Path, keep_last: int, protect: Path) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of killed writes."""
    complete = sorted((p for p in root.glob("step_*") if _is_complete(p)), key=_step_of)
    for old in complete[:-keep_last]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(".tmp_step_*"):
        shutil.rmtree(partial, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint of a run, or None; partial ones are skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return None
    say = warnings.warn if warn else (lambda *_: None)
    for partial in sorted(root.glob(".tmp_step_*")):
        say(f"ignoring partial checkpoint {partial} (its write did not finish)")
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            return named
        say(f"checkpoint pointer {pointer} names {named.name}, which is not a complete checkpoint")
    for path in sorted(root.glob("step_*"), key=_step_of, reverse=True):
        if _is_complete(path):
            return path
        say(f"ignoring partial checkpoint {path} (no {COMPLETE} marker)")
    return None


def verify_checkpoint(checkpoint: Path) -> None:
    """Check every file the manifest lists is there with its size; raise naming the first that is not."""
    try:
        text = (checkpoint / COMPLETE).read_text()
    except OSError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: its manifest {COMPLETE} is unreadable ({e})") from None
    if text.strip().isdigit():  # written before manifests listed the files: only the step, nothing to check
        return
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: its manifest {COMPLETE} is unreadable ({e})") from None
    for rel, size in manifest["files"].items():
        path = checkpoint / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint}: {rel} is missing; move the checkpoint away to "
                                  f"resume from an earlier one")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {checkpoint}: {rel} is {actual} bytes, the manifest says {size} "
                                  f"(truncated or overwritten); move the checkpoint away to resume from an earlier one")


def _load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0]}") from e


def load_state(checkpoint: Path) -> dict:
    """The shared trainer state of a checkpoint (weights-only unpickling: no code runs)."""
    return _load(checkpoint / "state.pt")


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    """The state one rank saved (its RNG streams); an error naming the file if that rank has none."""
    path = checkpoint / f"rank_{rank}.pt"
    if not path.is_file() and rank == 0 and not any(checkpoint.glob("rank_*.pt")):
        legacy = load_state(checkpoint)  # written before RNG states moved to per-rank files
        if "rng" in legacy:
            return {"rng": legacy["rng"]}
    if not path.is_file():
        saved = sorted(p.name for p in checkpoint.glob("rank_*.pt"))
        raise CheckpointError(f"checkpoint {checkpoint}: no {path.name} (it holds {', '.join(saved) or 'none'}); "
                              f"resume with the world size the run was saved with")
    return _load(path)
