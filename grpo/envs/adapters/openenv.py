"""OpenEnv's environments (the `openenv-core` package) as ours, through OpenEnv's own server and client.

    env=openenv                                   (its example, grpo.envs.adapters.openenv_answer, over HTTP)
    env=openenv env.kwargs.environment=my_pkg.server:MyEnvironment env.kwargs.transport=inprocess

OpenEnv's API: an environment subclasses `openenv.core.Environment[Action, Observation, State]`; its
`reset(seed, episode_id, ...)` and `step(action)` return an Observation (a pydantic model) that carries `reward`
and `done`. `create_app(factory, Action, Observation)` serves it with FastAPI: each WebSocket connection to `/ws`
is a session with an environment of its own. Its client `EnvClient` (here `GenericEnvClient(url).sync()`) sends
reset and step on such a session and reads back `StepResult(observation, reward, done)`.

The translation (`env.kwargs`):

- `transport=http` (the default): the run starts OpenEnv's app (`create_app` over `environment`) in a uvicorn
  process of its own on a free local port (127.0.0.1, chosen by the kernel), waits until it answers `/health`,
  and each episode opens one session on it through OpenEnv's client. The server is stopped when the run ends
  (`grpo.envs.end_run`, also when the run fails), at the trainer's exit, and when the trainer is killed (the
  server asks the kernel for a signal at its parent's death, and watches its parent besides).
  `transport=inprocess`: each episode builds the Environment object and calls it directly; its observations
  are serialised as the server serialises them, so both transports give the episode the same payloads.
- `reset(row)`: OpenEnv's `reset` with `seed` from the row (its `seed` column, else a hash of its prompt, so
  the G episodes of a row get one seed) and every row column that `reset`'s signature names (`prompt`,
  `answer`, ...). Its observation is the user's opening message (after `system`, if given).
- `step(text)`: the model's turn (special tokens dropped) fills the action's `action_field` (default: the
  action class's only required field). A `done` observation ends the episode with `Done(return)`, the sum of
  the step rewards (None where every step's was None: the task's reward functions then score it); any other
  observation is the next user message.
- An observation as text: its `observation_field`; by default its own fields (less `reward`, `done` and
  `metadata`): the value of the only one if that is a string, else the fields as JSON.
- An environment that raises (in `reset` or `step`; on the server, OpenEnv's client raises its error message)
  ends that episode with no reward, counted in `env/errors`, as any environment's error does.

Not mapped: OpenEnv's MCP tools (`ListToolsAction`, `CallToolAction`) are not offered as our function tools
(`tools` is []); an observation that is already `done` at reset is shown, not scored; `state`, rubrics and
transforms stay the environment's own; Docker images and Hugging Face Spaces (`from_docker_image`,
`from_env`) need a download or Docker, neither of which a run here starts.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import inspect
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from openenv.core import GenericEnvClient
from openenv.core.env_server import Action, create_app, deserialize_action, serialize_observation
from openenv.core.env_server import Environment as OpenEnvBase
from openenv.core.env_server import Observation as OpenEnvObservation

from grpo.envs import Done, Observation, on_run_end
from grpo.envs.adapters import row_seed
from rewards.registry import load_path

logger = logging.getLogger(__name__)

TRANSPORTS = ("http", "inprocess")
START_TIMEOUT_S = 60.0  # importing FastAPI and the environment's module, binding, answering /health
STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class Spec:
    """What OpenEnv's app factory needs: the environment class and its action and observation classes."""

    environment: str  # package.module:Class, as env.kwargs names it (the server process imports it again)
    env_cls: type
    action_cls: type
    observation_cls: type

    @property
    def reset_parameters(self) -> set[str]:
        """The keyword parameters `reset` names (its **kwargs excepted: row columns go only where named)."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {p.name for p in inspect.signature(self.env_cls.reset).parameters.values() if p.kind in kinds} - {"self"}


class OpenEnvEnvironment:
    """One episode of an OpenEnv environment (`environment`: `package.module:Class`, a subclass of
    `openenv.core.Environment`), in this process or on a server the run starts."""

    tools: list = []

    def __init__(self, environment: str, action: str | None = None, observation: str | None = None,
                 transport: str = "http", action_field: str | None = None, observation_field: str | None = None,
                 system: str | None = None, max_sessions: int = 1024):
        if transport not in TRANSPORTS:
            raise ValueError(f"env.kwargs.transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self.spec = load_spec(environment, action, observation)
        self.action_field = action_field or only_required_field(self.spec.action_cls)
        if self.action_field not in self.spec.action_cls.model_fields:
            raise ValueError(f"env.kwargs.action_field: {self.action_field!r} is not a field of "
                             f"{self.spec.action_cls.__name__} ({', '.join(self.spec.action_cls.model_fields)})")
        self.observation_field, self.system = observation_field, system
        if transport == "inprocess":
            self.session = InProcessSession(self.spec)
        else:
            self.session = RemoteSession(server_for(self.spec, action, observation, max_sessions))
        self.total: float | None = None

    def reset(self, row: dict) -> list[dict]:
        named = self.spec.reset_parameters
        kwargs = {"seed": row_seed(row)} if "seed" in named else {}
        kwargs |= {k: v for k, v in row.items() if k in named and k not in ("seed", "episode_id")}
        payload = self.session.reset(kwargs)
        self.total = None
        return [*([{"role": "system", "content": self.system}] if self.system else []),
                {"role": "user", "content": observation_text(payload["observation"], self.observation_field)}]

    def step(self, text: str) -> Observation | Done:
        payload = self.session.step({self.action_field: text})
        if payload.get("reward") is not None:
            self.total = (self.total or 0.0) + float(payload["reward"])
        if payload.get("done"):
            return Done(self.total)
        return Observation([{"role": "user",
                             "content": observation_text(payload["observation"], self.observation_field)}])

    def close(self) -> None:
        self.session.close()


def load_spec(environment: str, action: str | None, observation: str | None) -> Spec:
    """The environment class and its action and observation classes: named in env.kwargs, else read from the
    class's `Environment[Action, Observation, State]` base."""
    env_cls = load_path(environment, "env.kwargs.environment")
    if not (inspect.isclass(env_cls) and issubclass(env_cls, OpenEnvBase)):
        raise ValueError(f"env.kwargs.environment: {environment!r} is not a subclass of openenv.core.Environment")
    args = generic_arguments(env_cls)
    action_cls = load_path(action, "env.kwargs.action") if action else args[0]
    observation_cls = load_path(observation, "env.kwargs.observation") if observation else args[1]
    for name, cls, base in (("action", action_cls, Action), ("observation", observation_cls, OpenEnvObservation)):
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            raise ValueError(f"env.kwargs.{name}: {environment} does not name its {name} class in its "
                             f"Environment[Action, Observation, State] base; give env.kwargs.{name}=module:Class")
    return Spec(environment, env_cls, action_cls, observation_cls)


def generic_arguments(env_cls: type) -> tuple:
    """The (Action, Observation) of the first `Environment[...]` base in the class's ancestry; (None, None)."""
    for klass in env_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is OpenEnvBase:
                found = typing.get_args(base)
                return found[0], found[1]
    return None, None


def only_required_field(action_cls: type) -> str:
    """The action's one required field, which the model's text fills; ValueError naming env.kwargs.action_field."""
    required = [name for name, f in action_cls.model_fields.items() if f.is_required()]
    if len(required) != 1:
        raise ValueError(f"env.kwargs.action_field: {action_cls.__name__} has {len(required)} required fields "
                         f"({', '.join(required) or 'none'}); name the one the model's text fills")
    return required[0]


def observation_text(observation: dict, field: str | None) -> str:
    """The text of an observation's fields (OpenEnv's serialised form: reward, done and metadata left out)."""
    if field is not None:
        if field not in observation:
            raise ValueError(f"env.kwargs.observation_field: {field!r} is not in the observation "
                             f"({', '.join(observation) or 'no fields'})")
        value = observation[field]
        return value if isinstance(value, str) else json.dumps(value)
    if len(observation) == 1 and isinstance(only := next(iter(observation.values())), str):
        return only
    return json.dumps(observation)


class InProcessSession:
    """The Environment object itself; payloads as the server's `serialize_observation` writes them."""

    def __init__(self, spec: Spec):
        self.spec, self.env = spec, spec.env_cls()

    def reset(self, kwargs: dict) -> dict:
        return serialize_observation(self.env.reset(**kwargs))

    def step(self, action: dict) -> dict:
        return serialize_observation(self.env.step(deserialize_action(action, self.spec.action_cls)))

    def close(self) -> None:
        self.env.close()


class RemoteSession:
    """One WebSocket session on the run's server, through OpenEnv's client."""

    def __init__(self, server: Server):
        self.client = GenericEnvClient(base_url=server.url).sync()

    def reset(self, kwargs: dict) -> dict:
        return as_payload(self.client.reset(**kwargs))

    def step(self, action: dict) -> dict:
        return as_payload(self.client.step(action))

    def close(self) -> None:
        self.client.close()


def as_payload(result) -> dict:
    """OpenEnv's StepResult as the serialised form the in-process session returns."""
    return {"observation": result.observation, "reward": result.reward, "done": result.done}


@dataclass
class Server:
    """An OpenEnv app in a uvicorn process of its own; `log` holds its output."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past STOP_TIMEOUT_S; reaped either way (no zombie, no orphan)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


SERVERS: dict[tuple, Server] = {}  # the run's servers, by what they serve
SERVERS_LOCK = threading.Lock()


def server_for(spec: Spec, action: str | None, observation: str | None, max_sessions: int) -> Server:
    """The running server of this environment, started on first use (again if it died); stopped with the run."""
    if max_sessions > 1 and not getattr(spec.env_cls, "SUPPORTS_CONCURRENT_SESSIONS", False):
        raise ValueError(f"env.kwargs.environment: {spec.environment} does not set SUPPORTS_CONCURRENT_SESSIONS = "
                         "True, so OpenEnv's server runs one session of it at a time, and a step's episodes run at "
                         "once: use env.kwargs.transport=inprocess")
    key = (spec.environment, action, observation, max_sessions)
    with SERVERS_LOCK:
        server = SERVERS.get(key)
        if server is not None and server.process.poll() is None:
            return server
        if server is not None:
            logger.warning("environment: the OpenEnv server of %s exited (%s); starting another",
                           spec.environment, server.process.returncode)
        SERVERS[key] = server = start_server(spec.environment, action, observation, max_sessions)
        on_run_end(lambda: stop_server(key))
        return server


def stop_server(key: tuple) -> None:
    with SERVERS_LOCK:
        server = SERVERS.pop(key, None)
    if server is not None:
        server.stop()


def stop_all() -> None:
    for key in list(SERVERS):
        stop_server(key)


atexit.register(stop_all)


def start_server(environment: str, action: str | None, observation: str | None, max_sessions: int) -> Server:
    """Start `python -m grpo.envs.adapters.openenv` serving the environment and wait until it answers /health;
    RuntimeError naming env.kwargs.environment, with the server's output, if it exits or does not answer."""
    fd, log_name = tempfile.mkstemp(prefix="openenv-server-", suffix=".log")
    port_file = Path(log_name).with_suffix(".port")
    cmd = [sys.executable, "-m", "grpo.envs.adapters.openenv", "--environment", environment, "--max-sessions",
           str(max_sessions), "--port-file", str(port_file), "--parent", str(os.getpid()),
           *(["--action", action] if action else []), *(["--observation", observation] if observation else [])]
    # whatever this process imports (the environment's package, a test module), the server imports too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with os.fdopen(fd, "w") as log:
        process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, "", Path(log_name))
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if port_file.exists() and answers_health(url := f"http://127.0.0.1:{port_file.read_text()}"):
                server.url = url
                return server
            time.sleep(0.1)
        why = f"exited with status {process.returncode}" if process.poll() is not None else \
            f"did not answer /health within {START_TIMEOUT_S:.0f} s"
        raise RuntimeError(f"env.kwargs.environment: the OpenEnv server of {environment} {why}:\n"
                           f"{server.log.read_text()[-3000:]}")
    except BaseException:
        server.stop()
        raise
    finally:
        port_file.unlink(missing_ok=True)


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def die_with(parent: int) -> None:
    """End this process when `parent` ends: the kernel's parent-death signal (Linux), and a thread that watches
    the parent's pid, for other systems and for a parent that ended before the signal was asked for."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def serve(argv: list[str] | None = None) -> None:
    """The server process: OpenEnv's app over the environment, on a port the kernel picks (written to
    --port-file once bound, so no other process can take it between choosing and binding)."""
    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--environment", required=True)
    parser.add_argument("--action")
    parser.add_argument("--observation")
    parser.add_argument("--max-sessions", type=int, default=1024)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    die_with(args.parent)
    spec = load_spec(args.environment, args.action, args.observation)
    app = create_app(spec.env_cls, spec.action_cls, spec.observation_cls, max_concurrent_envs=args.max_sessions)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    written = Path(args.port_file + ".tmp")
    written.write_text(str(sock.getsockname()[1]))
    written.rename(args.port_file)  # whole, never half-written, when the parent reads it
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    serve()
