"""Worker processes with a hard deadline enforced from outside.

A ``DeadlinePool`` runs ``python -m <module>`` workers that answer one JSON request per line. The parent hands
each idle worker one request and waits on the pipes; a worker that is still busy when its request's deadline
passes is killed (SIGKILL to its whole process group) and replaced, and that request is reported as
``TIMEOUT``. Nothing relies on ``signal.alarm``, which cannot interrupt a long C call (a huge integer power in
sympy) and only works on the main thread.

Workers start with ``start_new_session`` (their own process group), die with the parent (``PR_SET_PDEATHSIG``)
and cap their own address space, so a runaway check cannot take the trainer's memory with it. Linux sends that
signal when the *thread* that started the worker exits, not the process: workers are therefore started by a
thread the pool owns and keeps for its whole life, so a pool called from short-lived threads (the scorer runs a
reward with ``timeout_s`` on a fresh thread each call) keeps its workers from one call to the next.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

OK, TIMEOUT, CRASHED, FAILED = "ok", "timeout", "crashed", "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one request: ``status`` is OK (``value`` holds the answer), TIMEOUT, CRASHED or FAILED
    (the handler raised; ``value`` holds the message)."""

    status: str
    value: Any = None


class _Worker:
    def __init__(self, module: str, args: list[str]):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.spawned_at = time.monotonic()
        self.job: int | None = None  # index of the request it is working on
        self.deadline = 0.0

    def send(self, job: int, request: Any, timeout_s: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        self.job = job
        self.deadline = time.monotonic() + timeout_s

    def read_lines(self) -> tuple[list[bytes], bool]:
        """Complete lines available now, and whether the worker closed its end (exited)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines, eof

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class DeadlinePool:
    """``size`` workers running ``python -m module``; see the module docstring.

    ``map`` is safe to call from several threads (calls are serialised).
    """

    def __init__(self, module: str, size: int, args: list[str] | None = None, startup_timeout_s: float = 120.0):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got size={size}")
        self.module, self.size, self.args = module, size, list(args or [])
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        # The one thread that starts workers: they die when it does (PR_SET_PDEATHSIG), so it lives as the pool.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"start-{module}")
        self.restarts = 0  # workers replaced after a timeout or a crash
        self.starts = 0  # workers started, the first ones and the replacements
        atexit.register(self.close)

    def map(self, requests: list[Any], timeout_s: float) -> list[Outcome]:
        """Run every request, ``timeout_s`` seconds each (counted from when a worker picks it up)."""
        with self._lock:
            if not requests:
                return []
            while len(self._workers) < self.size:
                self._workers.append(self._start_worker())
            return self._run(requests, timeout_s)

    def _run(self, requests: list[Any], timeout_s: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)
        todo = deque(range(len(requests)))
        selector = selectors.DefaultSelector()
        for w in self._workers:
            selector.register(w.fd, selectors.EVENT_READ, w)
        try:
            while todo or any(w.job is not None for w in self._workers):
                for w in list(self._workers):
                    if w.ready and w.job is None and todo:
                        job = todo.popleft()
                        try:
                            w.send(job, requests[job], timeout_s)
                        except (BrokenPipeError, OSError):
                            todo.appendleft(job)  # it died idle: nothing was lost but the worker
                            self._replace(w, selector)
                now = time.monotonic()
                waits = [w.deadline - now for w in self._workers if w.job is not None]
                waits += [w.spawned_at + self.startup_timeout_s - now for w in self._workers if not w.ready]
                for key, _ in selector.select(max(0.0, min(waits, default=1.0))):
                    w = key.data
                    lines, eof = w.read_lines()
                    for line in lines:
                        self._receive(w, line, results)
                    if eof:
                        if w.job is not None:
                            results[w.job] = Outcome(CRASHED)
                            w.job = None
                        elif not w.ready:
                            raise RuntimeError(f"worker `python -m {self.module}` exited while starting")
                        self._replace(w, selector)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job is not None and now >= w.deadline:
                        results[w.job] = Outcome(TIMEOUT)
                        w.job = None
                        self._replace(w, selector)
                    elif not w.ready and now >= w.spawned_at + self.startup_timeout_s:
                        raise RuntimeError(
                            f"worker `python -m {self.module}` did not start within {self.startup_timeout_s:.0f} s"
                        )
        finally:
            selector.close()
        return [r if r is not None else Outcome(CRASHED) for r in results]

    def _receive(self, w: _Worker, line: bytes, results: list[Outcome | None]) -> None:
        message = json.loads(line)
        if "ready" in message:
            w.ready = True
        elif "startup_error" in message:
            raise RuntimeError(f"worker `python -m {self.module}` failed to start: {message['startup_error']}")
        elif w.job is not None:
            results[w.job] = Outcome(OK, message["ok"]) if "ok" in message else Outcome(FAILED, message.get("error"))
            w.job = None

    def _replace(self, w: _Worker, selector: selectors.BaseSelector) -> None:
        selector.unregister(w.fd)
        w.kill()
        fresh = self._start_worker()
        self._workers[self._workers.index(w)] = fresh
        selector.register(fresh.fd, selectors.EVENT_READ, fresh)
        self.restarts += 1

    def _start_worker(self) -> _Worker:
        self.starts += 1
        return self._starter.submit(_Worker, self.module, self.args).result()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Kill every worker. The pool starts fresh ones on the next ``map``."""
        for w in self._workers:
            w.kill()
        self._workers = []


def serve(handle: Callable[[Any], Any], memory_limit_mb: int | None = None) -> None:
    """The worker side: answer each JSON line on stdin with ``{"ok": handle(request)}`` or ``{"error": ...}``.

    Call it at the end of a worker module's ``__main__`` block, after the heavy imports.
    """
    _die_with_parent()
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    sys.stdout = sys.stderr  # a library that prints must not corrupt the protocol
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            reply = {"ok": handle(json.loads(line))}
        except MemoryError:
            reply = {"error": "MemoryError"}
        except Exception as e:  # noqa: BLE001 - any failure is an answer for this one request
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def report_startup_error(error: BaseException) -> None:
    sys.stdout.write(json.dumps({"startup_error": f"{type(error).__name__}: {error}"[:2000]}) + "\n")
    sys.stdout.flush()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)
