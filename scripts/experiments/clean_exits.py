"""How often a finished two-rank run still exits badly: launches the same short ZeRO-2 PPO run of `grpo-train`
N times under the DeepSpeed launcher (2 CPU ranks over gloo) and counts the launches whose exit status is not 0,
those that aborted at exit ("terminate called without an active exception"), and the shared-memory buffers of
DeepSpeed's CPU all-reduce a launch left in /dev/shm (removed after counting).

    python -m scripts.experiments.clean_exits --launches 60

Every launch trains 2 steps of the built-in task on the warm-started tiny model and writes its checkpoint, so a
bad exit here comes after the run's work is done. Prints one JSON line per launch and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ["backend=deepspeed_zero2", "algorithm=ppo", "seed=5", "threads=1", "train.max_steps=2",
       "train.prompts_per_step=4", "algorithm.group_size=4", "train.eval_every=0", "task.arithmetic.num_eval=8",
       "tracking.progress_bar=false", "tracking.plot=false", "backend.check_replicas_every=1",
       "checkpoint.every_steps=2", "backend.timeout_s=60", "optim.lr=1e-3"]
ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path) -> dict:
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "grpo.train",
           f"run_dir={run_dir}", *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's CPU all-reduce's
    for path in left:
        path.unlink()
    return {"status": out.returncode, "aborted": ABORT in text, "shm_buffers_left": len(left),
            "finished": (run_dir / "checkpoints" / "step_2" / "policy").is_dir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="clean-exits-") as tmp:
        for i in range(args.launches):
            results.append(launch(Path(tmp) / f"run_{i}"))
            print(json.dumps({"launch": i + 1, **results[-1]}), flush=True)
    print(json.dumps({"launches": len(results),
                      "finished": sum(r["finished"] for r in results),
                      "bad_exit": sum(r["status"] != 0 for r in results),
                      "aborted_at_exit": sum(r["aborted"] for r in results),
                      "shm_buffers_left": sum(r["shm_buffers_left"] for r in results)}))


if __name__ == "__main__":
    main()
