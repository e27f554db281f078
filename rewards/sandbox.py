"""Run untrusted Python in a throwaway sandbox and get back pass/fail.

Sandboxes, chosen by ``kind``:

- ``bwrap`` (bubblewrap, Debian/Ubuntu package ``bubblewrap``): new user, pid, net, ipc, uts, cgroup and mount
  namespaces; the filesystem is ``/usr`` and the Python installation read-only, a fresh ``/proc``, a minimal
  ``/dev`` and a private size-capped ``/tmp`` (the root and ``/dev`` read-only); no capability
  (``--cap-drop ALL``) and no nested user namespace (``--disable-userns``); nothing else of the host (home
  directories, the repository, credentials) exists inside. A Python installation under ``/tmp`` is bound,
  read-only, inside the private ``/tmp`` (mounted first, so that it does not hide the installation).
- ``unshare`` (util-linux), when bwrap is missing: the same namespaces via ``unshare``, and a small init
  (``_UNSHARE_INIT``) that builds the same read-only root with ``mount`` and ``pivot_root`` before running the
  program.
- ``none``: a plain subprocess with the same rlimits, seccomp filter and empty environment, but the host's
  filesystem and network. Only when asked for explicitly; it logs a warning.
- ``auto``: the first of bwrap, unshare that works here; if neither does, ``SandboxUnavailable`` says how to
  install one.

Every run: an empty environment; rlimits, no capability and a seccomp filter (no new processes, namespaces or
mounts; ``rewards/code_runner.py``) on every process that runs untrusted code; a wall-clock deadline after which
the whole process group is SIGKILLed (killing the namespace's init kills everything in it); at most
``_MAX_OUTPUT`` bytes read back; and no sandbox outlives the trainer (bubblewrap's ``--die-with-parent``,
``setpriv --pdeathsig`` for unshare and none). For ``run_tests`` the program and the tests run in two processes
and only the tests' one can report (``rewards/code_runner.py`` says why, and what it costs).

Memory: no cgroup is used (the machines this was written on have cgroup v1, not delegated). What bounds a
sandbox is ``RLIMIT_AS`` on each process that runs code (``memory_mb``; two of them for ``run_tests``), the
size-capped ``/tmp`` (``tmp_mb``) as the only writable filesystem, ``RLIMIT_FSIZE`` and ``RLIMIT_NOFILE``, and
the filter's refusal of the memory no rlimit counts (memfd, SysV shared memory, io_uring, a tmpfs of its own).

Threads: ``RLIMIT_NPROC`` does not bind a uid that maps to the host's root, and a raw ``clone`` thread needs no
real stack, so each sandbox runs in a pid namespace with its own ``pid_max`` (Linux 6.14 and later):
300 + ``Limits.threads``, set by the unshare init, or for bubblewrap by an ``unshare`` wrapper whose pid namespace
holds bubblewrap's (pids are allocated at every level). ``pid_max_settable`` says whether this machine allows it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from rewards.registry import RewardConfigError

logger = logging.getLogger(__name__)

SANDBOX_KINDS = ("auto", "bwrap", "unshare", "none")
_MAX_OUTPUT = 64 * 1024
_RUNNER = Path(__file__).with_name("code_runner.py")
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


class SandboxUnavailable(RewardConfigError):
    """No sandbox can be set up on this machine (and ``sandbox: none`` was not chosen)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    timeout_s: float = 10.0  # wall clock, enforced from outside
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    tmp_mb: int = 64  # size of the private /tmp
    open_files: int = 64
    processes: int = 16  # RLIMIT_NPROC (binds non-root users; the seccomp filter binds everyone)
    threads: int = 256  # tasks (threads) the sandbox's pid namespace always has room for (module docstring)

    def for_runner(self) -> dict[str, int]:
        return {
            "cpu_s": int(self.timeout_s) + 1,
            "memory_bytes": self.memory_mb << 20,
            "file_bytes": self.file_mb << 20,
            "open_files": self.open_files,
            "processes": self.processes,
        }


@dataclass(frozen=True)
class RunResult:
    passed: bool
    detail: str  # why it failed ("timeout", the exception the tests raised, ...), or "passed"
    seconds: float
    infra: bool = False  # the harness failed (no verdict): not the program's doing, so not a wrong answer


@dataclass(frozen=True)
class CodeRun:
    output: str  # what the program printed (stdout and stderr), capped
    error: str | None  # the exception's last line, "timeout: ...", or None when it ran to its end
    seconds: float


def resolve_sandbox(kind: str = "auto") -> str:
    """The sandbox to use for ``kind``; raises ``SandboxUnavailable`` (with install advice) if it cannot run."""
    if kind not in SANDBOX_KINDS:
        raise RewardConfigError(f"sandbox must be one of {SANDBOX_KINDS}, got {kind!r}")
    if kind == "none":
        _warn_no_sandbox()
        return "none"
    candidates = ["bwrap", "unshare"] if kind == "auto" else [kind]
    reasons = []
    for candidate in candidates:
        reason = _probe(candidate)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise SandboxUnavailable(
        "cannot set up a sandbox for code_tests (" + "; ".join(reasons) + "). Install bubblewrap "
        "(`apt-get install bubblewrap`, `dnf install bubblewrap`) or allow unprivileged user namespaces "
        "(`sysctl kernel.unprivileged_userns_clone=1`, `sysctl kernel.apparmor_restrict_unprivileged_userns=0`). "
        "To run generated code with no isolation at all, set the option sandbox: none."
    )


@functools.cache
def _probe(kind: str) -> str | None:
    """None if ``kind`` can run the runner here, else the reason it cannot."""
    if shutil.which(kind) is None:
        return "not installed"
    try:
        result = run_tests("def f():\n    return 1\n", "assert f() == 1\n", None, kind=kind,
                           limits=Limits(timeout_s=20))
    except OSError as e:
        return str(e)
    return None if result.passed else f"test run failed ({result.detail})"


@functools.cache
def _warn_no_sandbox() -> None:
    logger.warning(
        "code_tests runs generated code WITHOUT a sandbox (sandbox: none): it can read your files and use the "
        "network. rlimits, an empty environment and the no-fork filter still apply."
    )


def run_tests(
    code: str,
    tests: str,
    entry_point: str | None,
    *,
    kind: str,
    limits: Limits | None = None,
    site_packages: bool = False,
    prompt: str | None = None,
) -> RunResult:
    """Run ``code`` in sandbox ``kind`` and ``tests`` (asserts, or a ``check(candidate)`` with ``entry_point``)
    against it, in a process of their own (``rewards/code_runner.py``).

    ``site_packages``: let the program import installed packages (numpy, ...); off, it has the standard library
    only and starts about twice as fast. ``prompt``: with an ``entry_point``, the problem's own code; the helpers
    it defines are the ones the tests use.
    """
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    payload = {"code": code, "tests": tests, "entry_point": entry_point, "prompt": prompt, "nonce": nonce}
    start = time.monotonic()
    try:
        messages, timed_out, returncode, seconds = _run_runner(payload, kind, limits, site_packages, "tests")
    except OSError as e:  # the sandbox's launcher cannot be executed
        return RunResult(False, f"the sandbox did not start: {e}", time.monotonic() - start, infra=True)
    started = any(message.get("started") == nonce for message in messages)
    if timed_out:  # the program's doing only once it was running
        return (RunResult(False, "timeout", seconds) if started else
                RunResult(False, f"the sandbox did not start within {limits.timeout_s:g} s", seconds, infra=True))
    for message in messages:
        if "passed" in message:
            if message.get("infra") is True or not started or (message["passed"] is True) != (
                    message.get("nonce") == nonce):  # only the judge writes here: a mismatch is its failure
                return RunResult(False, f"the judge failed: {message.get('detail')!s:.300}", seconds, infra=True)
            return RunResult(message["passed"] is True, str(message.get("detail", "")), seconds)
    how = "the sandbox did not start" if not started else "the judge ended without a verdict"
    return RunResult(False, f"{how} (exit status {returncode})", seconds, infra=True)


def run_code(code: str, *, kind: str, limits: Limits | None = None, max_output: int = 4096,
             site_packages: bool = False) -> CodeRun:
    """Run the program ``code`` in sandbox ``kind`` and return what it printed (stdout and stderr, the first
    ``max_output`` characters) and its error, as the ``python`` tool does (``grpo.envs.python``)."""
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    messages, timed_out, returncode, seconds = _run_runner(
        {"code": code, "max_output": max_output, "nonce": nonce}, kind, limits, site_packages, "run")
    if timed_out:
        return CodeRun("", f"timeout: the program ran past {limits.timeout_s:g} s", seconds)
    for message in messages:
        if message.get("nonce") == nonce and "output" in message:
            return CodeRun(str(message["output"]), message["error"] and str(message["error"]), seconds)
    return CodeRun("", f"the program ended without a result (exit status {returncode}; memory or CPU limit?)",
                   seconds)


class MemoryBudget:
    """Megabytes that live sessions may hold together: each ``PythonSession`` given this budget reserves its
    ``memory_mb`` (its address-space limit, which a stopped interpreter keeps) when its interpreter starts and
    releases it when the interpreter ends. ``limit_mb`` None: no limit."""

    def __init__(self, limit_mb: float | None = None):
        self.limit_mb, self.held_mb = limit_mb, 0
        self._lock = threading.Lock()

    def reserve(self, mb: int) -> bool:
        with self._lock:
            if self.limit_mb is not None and self.held_mb + mb > self.limit_mb:
                return False
            self.held_mb += mb
            return True

    def release(self, mb: int) -> None:
        with self._lock:
            self.held_mb = max(0, self.held_mb - mb)


class PythonSession:
    """One sandboxed interpreter that runs programs one after another in the same namespace, as a notebook does:
    variables, functions and imports stay from one ``run`` to the next.

    The interpreter starts at the first ``run`` (in sandbox ``kind``, with ``limits``' memory, files and processes
    limits; the CPU limit, ``cpu_budget_s``, is the whole session's) and lives until ``close()``, or until the
    object is collected. Each program has ``limits.timeout_s`` of wall clock, writing its request and reading its
    answer included; between programs the interpreter is stopped (SIGSTOP), so a thread or a timer a program
    leaves behind runs only while a later program does, inside that one's deadline. A program that runs past its
    deadline, or that kills its interpreter (a memory or CPU limit, ``os._exit``), costs the session its state:
    the result says so, and the next ``run`` starts a fresh interpreter. ``max_output``: characters of each
    program's output (and of its error) kept. ``memory_budget``: a ``MemoryBudget`` shared with other sessions;
    an interpreter that would take it past its limit is not started, and the ``run`` says so in its error.
    """

    def __init__(self, *, kind: str, limits: Limits | None = None, max_output: int = 4096,
                 site_packages: bool = False, cpu_budget_s: float = 60.0, memory_budget: MemoryBudget | None = None):
        self.kind, self.limits, self.max_output = kind, limits or Limits(), max_output
        self.site_packages, self.cpu_budget_s, self.memory_budget = site_packages, cpu_budget_s, memory_budget
        self.max_line = max(_MAX_OUTPUT, 24 * max_output + 4096)  # output and error, 12 bytes a character at worst
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None  # kills the interpreter's sandbox, once
        self.pending = bytearray()  # what the interpreter wrote after the last line read
        self.pending_request = b""  # the session's payload, written with its first request
        self.starts = 0  # interpreters started (1 + the restarts)

    def run(self, code: str) -> CodeRun:
        start = time.monotonic()
        deadline = start + self.limits.timeout_s
        if self.proc is None:
            if self.memory_budget is not None and not self.memory_budget.reserve(self.limits.memory_mb):
                budget = self.memory_budget
                return CodeRun("", f"refused: no memory left to start an interpreter (the running ones hold "
                                   f"{budget.held_mb} MB of the {budget.limit_mb:g} MB they may hold together); "
                                   "nothing ran", time.monotonic() - start)
            try:
                self._start()
            except BaseException:
                if self.memory_budget is not None:
                    self.memory_budget.release(self.limits.memory_mb)
                raise
        else:
            self._signal(signal.SIGCONT)
        nonce = secrets.token_hex(16)
        try:
            if self._write(json.dumps({"code": code, "nonce": nonce}).encode() + b"\n", deadline):
                while (line := self._read_line(deadline)) is not None:
                    answer = _json_object(line)
                    if answer.get("nonce") == nonce and "output" in answer:
                        self._signal(signal.SIGSTOP)
                        error = answer.get("error")
                        return CodeRun(str(answer["output"]), None if error is None else str(error),
                                       time.monotonic() - start)
        except (BrokenPipeError, EOFError):
            self.close()
            return CodeRun("", "the interpreter stopped (a memory or CPU limit, or an exit of its own); it restarts "
                               "at the next call, without the earlier calls' variables", time.monotonic() - start)
        self.close()
        return CodeRun("", f"timeout: the program ran past {self.limits.timeout_s:g} s; the interpreter restarts at "
                           "the next call, without the earlier calls' variables", time.monotonic() - start)

    def close(self) -> None:
        """Stop the interpreter (and everything in its sandbox); a later ``run`` starts a fresh one."""
        if self.proc is not None:
            self._finalizer()
            self.proc, self.pending = None, bytearray()

    def _start(self) -> None:
        runner_limits = {**self.limits.for_runner(), "cpu_s": max(1, math.ceil(self.cpu_budget_s))}
        payload = {"max_output": self.max_output, "limits": runner_limits}
        self.proc = subprocess.Popen(
            _command(self.kind, self.limits, self.site_packages, "session"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_ENV, cwd="/",
            start_new_session=True,
        )
        # No interpreter outlives its session, nor its reservation its interpreter.
        self._finalizer = weakref.finalize(self, _end_session, self.proc, self.memory_budget, self.limits.memory_mb)
        self.starts += 1
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending_request = json.dumps(payload).encode() + b"\n"

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the interpreter and every process of its sandbox (bubblewrap's own session included)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _write(self, request: bytes, deadline: float) -> bool:
        """Write the request (after the session's payload, at its start), unless the deadline passes first."""
        data = memoryview(self.pending_request + request)
        self.pending_request = b""
        fd = self.proc.stdin.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_WRITE)
            while data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if selector.select(remaining):
                    try:
                        data = data[os.write(fd, data):]
                    except BlockingIOError:
                        pass
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        """The interpreter's next line; None at the deadline; EOFError when it closed its end, or wrote more than
        ``max_line`` bytes without a newline."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if not selector.select(remaining):
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk or len(self.pending) + len(chunk) > self.max_line:
                    raise EOFError
                self.pending += chunk
        line, _, rest = bytes(self.pending).partition(b"\n")
        self.pending = bytearray(rest)
        return line


def _end_session(proc: subprocess.Popen, budget: MemoryBudget | None, memory_mb: int) -> None:
    try:
        _kill_group(proc)
    finally:
        if budget is not None:
            budget.release(memory_mb)


def _json_object(line: bytes) -> dict:
    """The JSON object on ``line``, or {} for anything else."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _run_runner(payload: dict, kind: str, limits: Limits, site_packages: bool, mode: str):
    """Run the runner in sandbox ``kind`` and ``mode`` on ``payload`` (limits added); returns (the JSON objects it
    wrote, whether the deadline passed, its exit status, seconds)."""
    payload = json.dumps({**payload, "limits": limits.for_runner()}).encode()
    argv = _command(kind, limits, site_packages, mode)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_ENV,
        cwd="/",
        start_new_session=True,
    )
    try:
        output, timed_out = _communicate(proc, payload, start + limits.timeout_s)
    finally:
        _kill_group(proc)
    messages = [message for message in map(_json_object, output.splitlines()) if message]
    return messages, timed_out, proc.returncode, time.monotonic() - start


def _communicate(proc: subprocess.Popen, payload: bytes, deadline: float) -> tuple[bytes, bool]:
    """Write the payload, read at most _MAX_OUTPUT bytes of stdout, stop at the deadline."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), True
            if not selector.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            out += chunk
            if len(out) >= _MAX_OUTPUT:
                break
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # the result is in; whatever keeps running is killed by the caller
    return bytes(out[:_MAX_OUTPUT]), False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's group and everything under it, and return only once all of it is gone.

    The sandboxed processes live in their own session and pid namespace, so killing the launcher alone would
    leave their teardown to happen asynchronously; killing the namespace's init directly makes the kernel
    reap the whole namespace before the init's exit is reported.
    """
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except BrokenPipeError:  # flushing into a pipe whose reader is gone
                pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.005)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), deepest last."""
    out: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += children
            frontier += children
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _interpreter() -> str:
    """The interpreter the sandbox starts: the path it was started by, its directories resolved (the sandbox binds
    real directories) but not its own link. Python finds a venv (pyvenv.cfg beside bin/) from that path; through
    the link's target it would import the base installation's packages instead of the venv's."""
    return os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))


def _link_dirs(path: str) -> set[str]:
    """The directories of each link `path` goes through (a venv's bin/python -> /opt/python/bin/python3.11 ->
    ...), each resolved: bound in the sandbox, the chain resolves there as on the host."""
    dirs = set()
    for _ in range(40):  # the kernel's own bound on nested links
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        dirs.add(os.path.dirname(path))
    return dirs


def _python_dirs() -> list[str]:
    """Directories the interpreter needs: its installation (and a venv's base), and the directories of the links
    that lead to it, where outside /usr."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    dirs = {d for d in dirs | _link_dirs(_interpreter()) if not d.startswith("/usr/") and d != "/usr"}
    return sorted(d for d in dirs if not any(d.startswith(other + "/") for other in dirs))  # nested: bound with its top


def _command(kind: str, limits: Limits, site_packages: bool, mode: str) -> list[str]:
    python = _interpreter()
    runner = [python, "-I", *([] if site_packages else ["-S"]), "-c", _RUNNER.read_text(), mode,
              json.dumps(limits.for_runner())]
    if kind == "none":
        return [*_die_with_trainer(), *runner]
    if kind == "bwrap":
        # --cap-drop ALL: bubblewrap run by root keeps every capability inside by default; --disable-userns: no
        # nested user namespace (which would hand them back); the root and /dev read-only, so their tmpfs (half
        # the host's memory by default) holds nothing; the runner drops capabilities and filters syscalls again.
        argv = ["bwrap", "--unshare-all", "--unshare-user", *_bwrap_disable_userns(), "--cap-drop", "ALL",
                "--die-with-parent", "--new-session", "--clearenv"]
        # the private /tmp first: a Python installation under /tmp is then bound inside it, read-only, where a
        # tmpfs mounted after the binds would hide it
        argv += ["--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        for d in _python_dirs():
            argv += ["--ro-bind", d, d]
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/"]
        argv += ["--chdir", "/tmp", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
        return _in_bounded_pid_namespace(argv + ["--"] + runner, limits)
    if kind == "unshare":
        spec = json.dumps({"binds": ["/usr", *_python_dirs()], "tmp_mb": limits.tmp_mb, "argv": runner,
                           "pid_max": _pid_max(limits) if pid_max_settable() else None})
        init = [python, "-I", "-S", "-c", _UNSHARE_INIT, spec]
        flags = ["--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
        return [*_die_with_trainer(), "unshare", *flags, "--", *init]
    raise RewardConfigError(f"unknown sandbox {kind!r}")


# The kernel hands out pids 1 .. pid_max - 1 in a pid namespace, then, once it has wrapped, only RESERVED_PIDS
# (300) .. pid_max - 1: pid_max = 300 + threads leaves room for `threads` tasks at any time and at most
# 299 + threads at once.
_RESERVED_PIDS = 300


def _pid_max(limits: Limits) -> int:
    return _RESERVED_PIDS + limits.threads


@functools.cache
def pid_max_settable() -> bool:
    """Whether a pid namespace of our own can be given its own pid_max here (Linux 6.14 and later, with user
    namespaces): the bound on a sandbox's threads (module docstring)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--mount", "--fork", "--", "sh", "-c",
                                "mount -t proc proc /proc && echo 301 > /proc/sys/kernel/pid_max"],
                               capture_output=True, timeout=10, env=_ENV, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _in_bounded_pid_namespace(argv: list[str], limits: Limits) -> list[str]:
    """``argv`` (bubblewrap's) run inside a pid namespace whose pid_max bounds every task below it, bubblewrap's
    own pid namespace included (a pid is allocated at every level); ``argv`` as it is where that cannot be set."""
    if not pid_max_settable():
        return argv
    setup = 'mount -t proc proc /proc && echo "$0" > /proc/sys/kernel/pid_max && exec "$@"'
    return [*_die_with_trainer(), "unshare", "--user", "--map-root-user", "--pid", "--mount", "--fork",
            "--kill-child", "--", "sh", "-c", setup, str(_pid_max(limits)), *argv]


@functools.cache
def _bwrap_disable_userns() -> list[str]:
    """``--disable-userns`` where this bubblewrap has it (0.8.0 on); without it the runner's seccomp filter, which
    refuses ``unshare`` and ``clone`` with namespace flags, is what stops a nested user namespace."""
    try:
        usage = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["--disable-userns"] if "--disable-userns" in usage else []


@functools.cache
def _die_with_trainer() -> list[str]:
    """A prefix that SIGKILLs the launched process when the trainer dies (``setpriv --pdeathsig``, util-linux);
    unshare's ``--kill-child`` then takes the namespace with it. bubblewrap has ``--die-with-parent``."""
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


# Runs as root of a fresh user namespace (pid 1 of a fresh pid namespace), before the runner: builds a root
# of a tmpfs /tmp, read-only binds, a fresh /proc and a few device nodes, pivots into it, then execs the runner.
_UNSHARE_INIT = r"""
import ctypes, json, os, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
def mount(src, dst, fstype, flags, data=None):
    if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()) != 0:
        e = ctypes.get_errno(); raise OSError(e, "mount %s -> %s: %s" % (src, dst, os.strerror(e)))
def bind_ro(src, dst, is_file=False):
    if is_file:
        open(dst, "a").close()
    else:
        os.makedirs(dst, exist_ok=True)
    mount(src, dst, None, MS_BIND | MS_REC)
    locked = os.statvfs(dst).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # flags a user namespace must keep
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | locked)
mount(None, "/", None, MS_REC | MS_PRIVATE)
root = "/tmp/.sandbox-root-%d" % os.getpid()
os.makedirs(root, exist_ok=True)
mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
# the private /tmp before the binds: a Python installation under /tmp lands inside it, read-only, not under it
os.makedirs(root + "/tmp")
mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm" % spec["tmp_mb"])
for d in spec["binds"]:
    bind_ro(d, root + d)
for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.islink(top):
        os.symlink(os.readlink(top), root + top)
    elif os.path.isdir(top):
        bind_ro(top, root + top)
os.makedirs(root + "/dev")
for dev in ("null", "zero", "full", "random", "urandom"):
    bind_ro("/dev/" + dev, root + "/dev/" + dev, is_file=True)
os.makedirs(root + "/proc")
mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
if spec["pid_max"] is not None:  # this pid namespace's own: bounds the threads of everything in it
    with open(root + "/proc/sys/kernel/pid_max", "w") as f:
        f.write(str(spec["pid_max"]))
os.makedirs(root + "/.old")
if libc.syscall(155 if os.uname().machine == "x86_64" else 41, root.encode(), (root + "/.old").encode()) != 0:
    e = ctypes.get_errno(); raise OSError(e, "pivot_root: " + os.strerror(e))
os.chdir("/")
if libc.umount2(b"/.old", 2) != 0:
    e = ctypes.get_errno(); raise OSError(e, "umount old root: " + os.strerror(e))
os.rmdir("/.old")
mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
os.chdir("/tmp")
os.execv(spec["argv"][0], spec["argv"])
"""
