"""OpenEnv environments for tests/integration/test_openenv.py, written on openenv-core's `Environment` base class
as its own template writes its echo environment. The adapter's server process imports them by path, so they
live in a module the test process need not import (it holds openenv-core, an optional extra)."""

from __future__ import annotations

import os

from openenv.core.env_server import Action, Environment, Observation, State

PIDS = "GRPO_TEST_OPENENV_PIDS"  # a file each environment built appends its process id to, where set
STEPS = 2  # an Echo episode's steps
STEP_REWARD = 0.25


class EchoAction(Action):
    message: str


class EchoObservation(Observation):
    echoed_message: str = ""
    message_length: int = 0


class Echo(Environment[EchoAction, EchoObservation, State]):
    """OpenEnv's echo template, with an end: echoes the message with STEP_REWARD, done after STEPS steps."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State(step_count=0)
        self.seen: dict = {}  # what reset was called with
        if os.environ.get(PIDS):
            with open(os.environ[PIDS], "a") as f:
                f.write(f"{os.getpid()}\n")

    def reset(self, seed: int | None = None, episode_id: str | None = None, prompt: str = "") -> EchoObservation:
        self._state, self.seen = State(episode_id=episode_id, step_count=0), {"seed": seed, "prompt": prompt}
        return EchoObservation(echoed_message="Echo environment ready!")

    def step(self, action: EchoAction, timeout_s: float | None = None, **kwargs) -> EchoObservation:
        self._state.step_count += 1
        return EchoObservation(echoed_message=action.message, message_length=len(action.message),
                               reward=STEP_REWARD, done=self._state.step_count >= STEPS)

    @property
    def state(self) -> State:
        return self._state


class Raising(Echo):
    """Echo, but its reset raises on a prompt that starts with 9, and its step on one that starts with 1."""

    def reset(self, seed: int | None = None, episode_id: str | None = None, prompt: str = "") -> EchoObservation:
        if prompt.startswith("9"):
            raise ValueError("reset broke")
        return super().reset(seed, episode_id, prompt)

    def step(self, action: EchoAction, timeout_s: float | None = None, **kwargs) -> EchoObservation:
        if self.seen["prompt"].startswith("1"):
            raise RuntimeError("step broke")
        return super().step(action)


class OneSession(Echo):
    """Echo, as an environment that does not declare concurrent sessions safe."""

    SUPPORTS_CONCURRENT_SESSIONS = False
