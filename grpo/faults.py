"""Deterministic crash points for fault-injection tests.

`GRPO_KILL_AT="checkpoint_write@4,mid_step@6"` makes the process SIGKILL itself when it reaches
the named point at the named step: no cleanup handler, `finally` block or buffered write runs,
exactly as when the machine loses power or the scheduler kills the job. Without the variable
`crash_point` is a dictionary lookup and nothing else.

Points: `mid_step` (weights updated in memory, nothing written), `after_metrics` (the step's
metrics line written, its checkpoint not), `checkpoint_write` (inside the temporary checkpoint
directory, half its files written), `checkpoint_publish` (checkpoint renamed into place, the
`latest` pointer not yet moved).
"""

from __future__ import annotations

import os
import signal

ENV = "GRPO_KILL_AT"


def crash_point(name: str, step: int) -> None:
    """SIGKILL this process if `GRPO_KILL_AT` names `name@step`."""
    spec = os.environ.get(ENV)
    if spec and f"{name}@{step}" in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
