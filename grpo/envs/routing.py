"""Per-row environments: a dataset column chooses the environment each row's episodes run in.

    env=routed env.kwargs.column=env env.kwargs.routes='{calc: {name: calculator},
        sums: {name: "grpo.envs.adapters.verifiers:VerifiersEnvironment", kwargs: {load: "pkg.mod:taskset"}}}'

`RoutedEnvironment` is itself an environment: at `reset(row)` it builds the environment that
`routes[row[column]]` names (a name or path, and its kwargs, as `env.name` and `env.kwargs` take them) and
hands every call on to it. A row's G episodes share the row, so they share the environment: a group never
mixes environments, and its advantages compare like with like. Each episode's record carries its route, so
the step's reward figures are also split by environment (`reward/<route>/...`, grpo.training.sampling).
A row whose column names no route is refused before a run trains (`check_rows`); met in an episode, it ends that
episode with an error (`env/errors`), as any reset that raises.
"""

from __future__ import annotations

from grpo.envs import Done, Environment, Observation, environment_factory
from grpo.envs.tools import limit_tool_calls


class RoutedEnvironment:
    """The environment its row's `column` names among `routes` (name -> {"name": ..., "kwargs": {...}})."""

    def __init__(self, routes: dict, column: str = "env"):
        if not isinstance(routes, dict) or not routes:
            raise ValueError("env.kwargs.routes: needs one entry or more, route -> {name: ..., kwargs: {...}}")
        self.factories = {}
        for route, spec in routes.items():
            if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or not spec.get("name"):
                raise ValueError(f"env.kwargs.routes.{route}: expected {{name: ..., kwargs: {{...}}}}, got {spec!r}")
            self.factories[route] = environment_factory(spec["name"], dict(spec.get("kwargs") or {}))
        self.column = column
        self.route: str | None = None  # the route of the row this episode runs
        self.inner: Environment | None = None
        self.tools: list = []
        self.counts: dict = {}
        self.tool_call_limit: int | None = None  # env.max_tool_calls_per_turn, passed on to the inner environment

    @classmethod
    def check_rows(cls, rows: list[dict], routes: dict, column: str = "env") -> None:
        """ValueError naming the first row whose column names no route (checked before a run trains)."""
        for i, row in enumerate(rows):
            if row.get(column) not in (routes or {}):
                raise ValueError(f"row {i}: its {column!r} column is {row.get(column)!r}; env.kwargs.routes has "
                                 f"{', '.join(map(str, routes or {}))}")

    def reset(self, row: dict) -> list[dict]:
        route = row.get(self.column)
        if route not in self.factories:
            raise ValueError(f"row: its {self.column!r} column is {route!r}; env.kwargs.routes has "
                             f"{', '.join(map(str, self.factories))}")
        self.route = route
        self.inner = self.factories[route]()
        if self.tool_call_limit is not None:
            limit_tool_calls(self.inner, self.tool_call_limit)
        messages = self.inner.reset(row)
        self.tools = list(getattr(self.inner, "tools", []))
        self.counts = getattr(self.inner, "counts", {})
        return messages

    def step(self, text: str) -> Observation | Done:
        return self.inner.step(text)

    def close(self) -> None:
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()
