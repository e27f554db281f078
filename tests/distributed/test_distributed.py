"""Data-parallel GRPO on CPU: 2 ranks over gloo, started by the real launchers in subprocesses.

- one update on 2 ranks x B groups gives the gradient of 1 rank x 2B groups (DeepSpeed ZeRO-2,
  ZeRO-3 and DDP), within float32 rounding;
- so does `backend.packing=groups` on 2 ZeRO-3 ranks against the padded layout on one, every parameter
  partitioned and the ranks holding different numbers of chunks of positions to score;
- the one-rank side of each comparison is the driver run once per session by plain python under the torch
  backend (`one_rank` in tests/conftest.py): each backend costs one two-rank launch, and every backend is
  held to the same single-process reference;
- `grpo.train` trains a few steps of the built-in task on 2 ranks, the ranks hold identical
  weights after every step, the checkpoint resumes (DeepSpeed format) and loads in transformers, and the
  run leaves no DeepSpeed all-reduce buffer in /dev/shm;
- a rank that dies ends the job quickly, and the launcher's error names the rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import requires

DEEPSPEED = requires(importlib.util.find_spec("deepspeed") is not None,
                     "deepspeed is not installed (scripts/install.sh installs it)")


def backends(*names: str) -> list:
    """pytest params for these backends, the DeepSpeed ones marked as needing deepspeed."""
    return [pytest.param(n, marks=DEEPSPEED) if n.startswith("deepspeed") else n for n in names]


pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _release_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce leaves one shared-memory buffer per rank and port in /dev/shm when a job
    does not close its process group (a rank killed, a driver that fails); drop those this module's launches
    left, so they do not pile up in RAM."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # the drivers the tests launch
DRIVER = HERE / "data_parallel_step.py"
TRAIN_ARGS = [
    "threads=1", "train.max_steps=3", "train.prompts_per_step=4", "algorithm.group_size=4", "train.eval_every=0",
    "task.arithmetic.num_eval=8", "tracking.progress_bar=false", "tracking.plot=false",
    "backend.check_replicas_every=1", "checkpoint.every_steps=3", "backend.timeout_s=60", "optim.lr=1e-3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(backend: str, ranks: int) -> list[str]:
    """The command line users type: deepspeed for the DeepSpeed backends, torchrun for ddp."""
    if backend.startswith("deepspeed"):
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return ["torchrun", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]


def env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the caller's entries after ROOT
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def launch(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def one_update(backend: str, ranks: int, out: Path, loss_agg: str, *extra: str) -> dict:
    launch([*launcher(backend, ranks), str(DRIVER), "--backend", backend, "--out", str(out), "--loss-agg", loss_agg,
            *extra])
    return torch.load(out, weights_only=True)


# ZeRO-3 partitions every parameter (a real model's output embedding always is; the tiny model's tensors are all
# under DeepSpeed's persistence threshold) and scores 3 positions per call of the output embedding, so the ranks
# hold different numbers of chunks; each call gathers the partitioned weight, so without as many calls on every
# rank the gathers mismatch (gloo: "Received data size doesn't match expected size", or a hang until --timeout-s)
ZERO3_PARTITIONED = ("--partition-all", "--head-chunk", "3", "--timeout-s", "60")


@pytest.mark.parametrize(
    "backend,loss_agg,packing,extra",
    [pytest.param("deepspeed_zero2", "token_mean", "padded", (), marks=DEEPSPEED),
     # ZeRO-3 with the packed forward inside the DeepSpeed engine's LogProbModel, as many micro-batches on each
     # rank (ZeRO-3's collectives), against one rank's padded gradient: one launch checks both (a packing bug
     # and a loss normalised by one rank's sequences each break the equality)
     pytest.param("deepspeed_zero3", "seq_mean_token_mean", "groups", ZERO3_PARTITIONED, marks=DEEPSPEED),
     ("ddp", "token_mean", "padded", ())],
)
def test_two_ranks_with_b_groups_equal_one_rank_with_2b(tmp_path, one_rank, backend, loss_agg, packing, extra):
    one = one_rank(DRIVER.name, "--loss-agg", loss_agg)  # padded, one chunk
    two = one_update(backend, 2, tmp_path / "two.pt", loss_agg, "--packing", packing, *extra)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    if extra:
        assert two["partitioned"] == [two["parameters"]] * 2  # every parameter sharded on both ranks
        (scoring_0, calls_0), (scoring_1, calls_1) = two["head_calls"]
        assert scoring_0 != scoring_1  # the ranks had different numbers of positions' chunks to score...
        assert calls_0 == calls_1  # ...and called the partitioned output embedding as often, the extra ones empty
    # The loss is normalised by the global counts, so the ranks' losses sum to the whole batch's.
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"]
    moved = 0
    for name, g in one["grads"].items():
        # float32: the two runs sum the same terms in a different order (gradients here are <= ~0.2)
        torch.testing.assert_close(two["grads"][name], g, atol=2e-6, rtol=0, msg=name)
        moved += int(g.abs().sum() > 0)
    assert moved > len(one["grads"]) // 2  # a real gradient reached most tensors


def train(backend: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch([*launcher(backend, 2), "--module", "grpo.train", f"run_dir={run_dir}", f"backend={backend}",
                   *TRAIN_ARGS, *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", backends("deepspeed_zero2", "deepspeed_zero3", "ddp"))
def test_grpo_trains_on_two_ranks_with_identical_replicas(tmp_path, warm_tiny_dir, backend):
    run_dir = tmp_path / "run"
    launched = train(backend, run_dir)
    port = launched.args[launched.args.index("--master_port") + 1]
    # DeepSpeed's CPU all-reduce buffers (one per rank, 66 MB of RAM each) do not outlive a run that ended well
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    rows = metrics(run_dir)
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]  # rank 0 alone writes: no duplicated lines
    for r in steps:
        assert r["dist/replica_weight_diff"] == 0.0, r  # both ranks hold bit-identical weights
        # 4 prompts x 4 samples of a 0/1 reward over both ranks: a count of 16ths, the one reward's own mean
        assert (r["train/reward_mean"] * 16) % 1 == 0 and r["train/reward_mean"] == r["reward/math_accuracy_mean"]
        assert (r["optim/grad_norm"] > 0) == (r["train/zero_std_frac"] < 1)  # no signal, no gradient
    assert "eval/accuracy" in steps[-1]

    ckpt = run_dir / "checkpoints" / "step_3"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(ckpt / "policy")  # the consolidated safetensors export
    start = AutoModelForCausalLM.from_pretrained(warm_tiny_dir)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(policy.parameters(), start.parameters()))
    assert moved > 0  # three steps at lr 1e-3 changed the weights that were exported

    if backend.startswith("deepspeed"):
        assert (ckpt / "deepspeed" / "zero").is_dir()
    if backend == "deepspeed_zero3":
        # resume on the same world size from ZeRO-3's partitioned shards: one more step, same files continued.
        # ZeRO-2's resume is test_ppo_deepspeed.py's, which also holds the resumed weights to the uninterrupted
        # run's (a launch here would add no check: the policy engine's shards load by the same code)
        train(backend, run_dir, "resume=auto", "train.max_steps=4")
        rows = metrics(run_dir)
        assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3, 4]
        assert rows[-1]["dist/replica_weight_diff"] == 0.0


@pytest.mark.parametrize("backend", backends("ddp", "deepspeed_zero2"))
def test_a_non_finite_loss_on_one_rank_is_handled_on_every_rank(tmp_path, backend):
    out = tmp_path / "out.pt"
    cmd = [*launcher(backend, 2), str(DRIVER), "--backend", backend, "--out", str(out), "--poison-rank", "1"]
    if backend == "ddp":  # every rank skips the update: no rank moves, so the replicas stay identical
        launch(cmd)
        result = torch.load(out, weights_only=True)
        assert result["skipped"] == 1 and result["moved"] == 0.0
    else:  # DeepSpeed cannot discard its accumulated gradient: the run stops, weights untouched, and says why
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0
        assert "a rank's loss is not finite" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.parametrize("backend", backends("deepspeed_zero2", "ddp"))
def test_a_dead_rank_ends_the_job_and_is_named(tmp_path, warm_tiny_dir, backend):
    run_dir = tmp_path / "run"
    cmd = [*launcher(backend, 2), "--module", "grpo.train", f"run_dir={run_dir}", f"backend={backend}",
           *TRAIN_ARGS, "train.max_steps=1000", "checkpoint.every_steps=0"]
    tag = f"{os.getpid()}-{backend}"  # finds this job's ranks among all processes on the machine
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env() | {"GRPO_TEST_JOB": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir)) < 2:  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(1)
        pid = _pid_of_rank(1, tag)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=120)  # far below the 30-minute default collective timeout
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert took < 120
    if backend == "ddp":  # torchrun's summary: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: ...) (SIGKILL)"
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", output), output[-3000:]
    else:  # the deepspeed launcher reports the first exit code it sees: the dead rank's -9, or the survivor's 1
        failed = [line for line in output.splitlines() if "exits with return code" in line]
        assert failed and ("= -9" in failed[0]
                           or "error: rank 0: a collective with the other ranks failed" in output), output[-3000:]


def _pid_of_rank(rank: int, tag: str) -> int | None:
    """The pid of the training process with RANK=rank in the job whose environment carries `tag`.

    Its children (the math checker's workers, forked helpers) inherit the same environment and may share
    its command line: of the matching processes, the rank is the one whose parent is not among them."""
    found: dict[int, int] = {}  # pid -> parent pid
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (f"RANK={rank}".encode() in environ and f"GRPO_TEST_JOB={tag}".encode() in environ
                and b"grpo.train" in cmdline):
            found[int(pid)] = parent
    roots = [pid for pid, parent in found.items() if parent not in found]
    return roots[0] if len(roots) == 1 else None


def test_dynamic_sampling_on_two_ranks_trains_each_rank_on_its_rows_of_the_whole_batchs_advantages(
        tmp_path, tiny_random_dir):
    from grpo.core.advantages import compute_advantages

    out = tmp_path / "out.pt"
    launch([*launcher("ddp", 2), str(HERE / "gathered_advantages_step.py"), "--model", str(tiny_random_dir),
            "--out", str(out)])
    result = torch.load(out, weights_only=False)
    rank0, rank1 = result["shares"]
    # 6 prompts, 3 per rank; rank 1's reward leaves one informative group: 12 rows there, 4 here
    assert (len(rank0["advantages"]), len(rank1["advantages"])) == (12, 4) and result["kept_groups"] == 4
    assert rank0["completion_ids"] + rank1["completion_ids"] == result["completion_ids"]  # rank order, no overlap
    whole, _, _ = compute_advantages(result["rewards"], 4, "reinforce_pp")  # whitened over all 16 rows
    torch.testing.assert_close(torch.tensor(rank0["advantages"] + rank1["advantages"]), whole, atol=1e-6, rtol=0)
    alone, _, _ = compute_advantages(result["rewards"][12:], 4, "reinforce_pp")  # what rank 1 would get alone
    assert (alone - whole[12:]).abs().max() > 1e-3  # so the check above could tell them apart


@DEEPSPEED
def test_server_mode_on_two_zero3_ranks_pushes_the_gathered_policy_once_per_sync(tmp_path, tiny_random_dir):
    from tests.integration.test_rollout_server import FakeEngine, serve_fake

    engines = [FakeEngine(0), FakeEngine(1)]
    served = [serve_fake(e) for e in engines]
    out = tmp_path / "out.pt"
    try:
        launch([*launcher("deepspeed_zero3", 2), str(HERE / "server_sync_step.py"), "--model",
                str(tiny_random_dir), "--urls", ",".join(url for url, _ in served), "--out", str(out)])
    finally:
        for _, server in served:
            server.shutdown()
            server.server_close()
    policy = torch.load(out, weights_only=True)
    assert policy.pop("_sync_s") > 0
    start = load_file(tiny_random_dir / "model.safetensors")
    assert any(not torch.equal(p, start[name]) for name, p in policy.items() if name in start)  # the step moved it
    for fake in engines:
        # two pushes (the engine's start, the step), each every parameter once: rank 0 alone sends
        assert fake.updates == 2
        names = [name for bucket in fake.buckets for name in bucket]
        assert sorted(names) == sorted(list(policy) * 2) and len(fake.buckets) > 2  # 0.01 MiB: several buckets
        for name, p in policy.items():  # the whole gathered parameter, as the step left it, bit for bit
            assert fake.loaded[name].shape == p.shape and torch.equal(fake.loaded[name], p), name


def on_two_ranks(driver: str, backend: str, out: Path, *args: str) -> dict:
    """What a driver in tests/distributed writes when the backend's launcher runs it on 2 ranks."""
    launch([*launcher(backend, 2), str(HERE / driver), "--backend", backend, "--out", str(out), *args])
    return torch.load(out, weights_only=False)

PPO_METRICS = ("train/value_mean", "train/kl", "train/loss", "train/value_loss", "optim/grad_norm")


def assert_same_ppo_update(ref_metrics: dict, ref_grads: dict, metrics: dict, grads: dict,
                           keys: tuple[str, ...] = PPO_METRICS) -> None:
    """Two PPO updates agree: the metrics `keys`, and every policy and critic gradient (float32 summation order
    apart), with a real gradient reaching both models."""
    for key in keys:
        assert abs(ref_metrics[key] - metrics[key]) < 1e-5 * max(1.0, abs(ref_metrics[key])), key
    moved = {"policy": 0, "critic": 0}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-6, rtol=0, msg=name)
        moved["critic" if name.startswith("critic") else "policy"] += int(g.abs().sum() > 0)
    assert moved["policy"] > 10 and moved["critic"] > 10  # a real gradient reached both models


def test_ppo_on_two_ranks_with_b_groups_equals_one_rank_with_2b(tmp_path, one_rank, tiny_random_dir):
    one = one_rank("ppo_data_parallel_step.py", "--model", str(tiny_random_dir))
    two = on_two_ranks("ppo_data_parallel_step.py", "ddp", tmp_path / "two.pt", "--model", str(tiny_random_dir))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # GAE's whitening, the value mean and the KL are over every rank's tokens; both losses are normalised by
    # the whole batch's counts, so the summed gradients are the one-rank ones (float32 summation order apart)
    assert_same_ppo_update(one["metrics"], one["grads"], two["metrics"], two["grads"])


def test_ppo_trains_on_two_ranks_with_identical_policy_and_critic_replicas(tmp_path, warm_tiny_dir):
    run_dir = tmp_path / "run"
    train("ddp", run_dir, "algorithm=ppo", "train.max_steps=2", "checkpoint.every_steps=0")
    steps = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # both ranks hold bit-identical policies and critics after every step
        assert r["dist/replica_weight_diff"] == 0.0 and r["dist/critic_replica_weight_diff"] == 0.0, r
        assert r["train/value_loss"] > 0
    state = torch.load(run_dir / "checkpoints" / "step_2" / "state.pt", weights_only=True)
    assert "critic" in state and state["world_size"] == 2


def test_online_dpo_and_nll_updates_on_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path, one_rank,
                                                                                     tiny_random_dir):
    args = ("--model", str(tiny_random_dir), "--kinds", "dpo,offline_dpo,nll")
    out = {1: one_rank("pairs_data_parallel_step.py", *args),
           2: on_two_ranks("pairs_data_parallel_step.py", "ddp", tmp_path / "two.pt", *args)}
    assert (out[1]["world_size"], out[2]["world_size"]) == (1, 2)
    for kind in ("dpo", "nll"):  # normalised by every rank's pairs / tokens: the summed gradient is the mean's
        one, two = out[1][kind], out[2][kind]
        assert abs(one["loss"] - two["loss"]) < 1e-6, kind
        for name, g in one["grads"].items():
            torch.testing.assert_close(two["grads"][name], g, atol=2e-6, rtol=0, msg=f"{kind}: {name}")
        assert sum(int(g.abs().sum() > 0) for g in one["grads"].values()) > 10, kind


def test_a_checkpoint_write_that_fails_on_one_rank_fails_every_rank_promptly_and_leaves_no_temp_dir(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    launch([*launcher("ddp", 2), str(HERE / "checkpoint_failure_step.py"), "--run-dir", str(run_dir),
            "--out", str(out), "--failing-rank", "1"])
    results = [json.loads(Path(f"{out}.rank_{r}.json").read_text()) for r in (0, 1)]
    for r in results:  # both ranks name rank 1's file and its cause
        assert r["raised"] is not None and re.search(
            r"checkpoint step 1: writing \S+/\.tmp_step_1/rank_1\.pt on rank 1 failed \(RuntimeError: .*file write "
            r"failed; \d+ bytes free on the disk of .*\); no earlier checkpoint exists", r["raised"]), r["raised"]
        assert r["seconds"] < 60  # not the collective timeout (120 s) of a rank left waiting for the other
    assert not any((run_dir / "checkpoints").iterdir())  # the temporary directory is gone, nothing published
