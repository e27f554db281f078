"""An OpenEnv environment over the task's rows, `env=openenv`'s default: answer the row's prompt, with one
more try after a wrong answer.

It is written as any OpenEnv environment is (openenv-core's `Environment` base class, pydantic Action and
Observation), so OpenEnv's own server (`create_app`) serves it and OpenEnv's client talks to it. Its `reset`
names the row columns it needs (`prompt`, `answer`), which the adapter (grpo.envs.adapters.openenv) passes from
the row. The answer is the last integer of the model's turn; the reward is 1 for a right first answer, 0.5 for a
right second one, 0 otherwise.
"""

from __future__ import annotations

import re

from openenv.core.env_server import Action, Environment, Observation, State

ATTEMPTS = 2
RETRY = "Wrong. Try again."


class AnswerAction(Action):
    answer: str  # the model's turn


class AnswerObservation(Observation):
    text: str = ""  # the question, or what the environment says to a wrong answer


class AnswerEnvironment(Environment[AnswerAction, AnswerObservation, State]):
    """The row's question; a right answer ends the episode with 1 / attempt, the last wrong one with 0."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # no state outside the instance: the server may hold many sessions

    def __init__(self):
        super().__init__()
        self._state, self.answer = State(step_count=0), ""

    def reset(self, seed: int | None = None, episode_id: str | None = None, prompt: str = "",
              answer: str = "") -> AnswerObservation:
        self._state, self.answer = State(episode_id=episode_id, step_count=0), str(answer)
        return AnswerObservation(text=prompt)

    def step(self, action: AnswerAction, timeout_s: float | None = None, **kwargs) -> AnswerObservation:
        self._state.step_count += 1
        numbers = re.findall(r"-?\d+", action.answer)
        right = bool(numbers) and numbers[-1] == self.answer
        if right:
            return AnswerObservation(done=True, reward=1.0 / self._state.step_count)
        if self._state.step_count >= ATTEMPTS:
            return AnswerObservation(done=True, reward=0.0)
        return AnswerObservation(text=RETRY, reward=0.0)

    @property
    def state(self) -> State:
        return self._state
