"""GEM's environments (the `gem-llm` package: games, reasoning-gym tasks, tool use) as ours.

    env.name=grpo.envs.adapters.gem:GemEnvironment env.kwargs.env_id=game:GuessTheNumber-v0-easy

GEM's API is gym's, text in and out: `reset(seed) -> (observation, info)`, `step(action) -> (observation,
reward, terminated, truncated, info)`. The translation:

- `reset(row)`: the game is seeded from the row (its `seed` column, else a fixed hash of its prompt), so
  the G episodes of one row play the same game and open with the same message, as a group must; the
  task's rows serve as the games' seeds, their prompts are not shown. The opening observation is the
  user's message (after `system`, if given).
- `step(text)`: the turn's text is GEM's action. An observation that does not end the game is the next
  user message. GEM's `info["suffix"]` (the board, "Enter your next guess.") is appended to every
  observation, as GEM's own observation wrapper appends it. `terminated` or `truncated` ends the episode:
  `Done` with its return, the sum of every step's reward (GEM's games give 0 on inner steps, 1 for a win,
  -0.1 for a move that cannot be read, which also ends the game).
- GEM's games draw from Python's and NumPy's global random generators, and GEM's `reset(seed)` re-seeds
  them. Each episode keeps its own generator state, swapped in around every call into GEM
  (`PrivateRandom`): episodes run in lockstep do not draw from one another's stream, and the trainer's
  global streams are left as they were.
- Tools: GEM's tools (Python, search) read their calls from the action text in their own tags, through
  its `ToolEnvWrapper`; they are not offered as our function tools (`tools` is []).

Environments that run here with no download: the `game:` ids but Wordle, Hangman, WordSearch and
Crosswords (those fetch NLTK's word list) and GEM's `rg:` reasoning-gym ids; `math:`, `code:` and `qa:`
load Hugging Face datasets.
"""

from __future__ import annotations

import random

import gem
import numpy as np

from grpo.envs import Done, Observation
from grpo.envs.adapters import row_seed


class PrivateRandom:
    """Python's and NumPy's global random generators, made one owner's own: `call` runs a function with
    the owner's state swapped in and puts the previous state back after."""

    def __init__(self):
        self.state: tuple | None = None  # None: start from whatever the global state is

    def call(self, fn, *args, **kwargs):
        saved = random.getstate(), np.random.get_state()
        if self.state is not None:
            random.setstate(self.state[0])
            np.random.set_state(self.state[1])
        try:
            return fn(*args, **kwargs)
        finally:
            self.state = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])



class GemEnvironment:
    """One GEM environment's episode, by its registered id (`gem.make(env_id, **options)`)."""

    tools: list = []

    def __init__(self, env_id: str, system: str | None = None, **options):
        if env_id not in gem.envs.registration.ENV_REGISTRY:
            raise ValueError(f"env.kwargs.env_id: {env_id!r} is not a registered GEM environment "
                             f"(e.g. game:GuessTheNumber-v0-easy, game:Mastermind-v0-easy)")
        self.random = PrivateRandom()
        self.env = self.random.call(gem.make, env_id, **options)  # GEM's games reset once when built
        self.system, self.total = system, 0.0

    def reset(self, row: dict) -> list[dict]:
        observation, info = self.random.call(self.env.reset, seed=row_seed(row))
        self.total = 0.0
        return [*([{"role": "system", "content": self.system}] if self.system else []),
                {"role": "user", "content": with_suffix(observation, info)}]

    def step(self, text: str) -> Observation | Done:
        observation, reward, terminated, truncated, info = self.random.call(self.env.step, text)
        self.total += float(reward)
        if terminated or truncated:
            return Done(self.total)
        return Observation([{"role": "user", "content": with_suffix(observation, info)}])


def with_suffix(observation: str, info: dict) -> str:
    """The observation and GEM's `info["suffix"]` on a line of its own, as GEM's ObservationWrapper writes them."""
    suffix = info.get("suffix") if isinstance(info, dict) else None
    if not suffix:
        return observation
    return observation + suffix if observation.endswith("\n") else f"{observation}\n{suffix}"
