"""code_tests: program extraction, the sandbox, and programs that try to escape, hang, or cheat."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards import RewardConfigError, RewardScorer, RewardSpec
from rewards import sandbox as sandbox_module
from rewards.code_tests import CODE_TESTS, code_tests, program_from
from rewards.sandbox import Limits, SandboxUnavailable, resolve_sandbox, run_tests
from tests.conftest import requires

# This checkout's runner, whole: other checkouts' sandboxes on a shared machine carry other texts.
_RUNNER_MARK = (Path(sandbox_module.__file__).with_name("code_runner.py")).read_text()


def available_sandboxes() -> list[str]:
    kinds = []
    for kind in ("bwrap", "unshare"):
        try:
            resolve_sandbox(kind)
            kinds.append(kind)
        except SandboxUnavailable:
            pass
    return kinds


SANDBOXES = available_sandboxes()
REPO_FILE = str(Path(__file__).resolve().parents[1] / "pyproject.toml")  # the host's files, never the sandbox's
needs_sandbox = requires(bool(SANDBOXES), "neither bubblewrap nor unprivileged user namespaces here")


def runner_processes(settle_s: float = 0.0) -> list[int]:
    """Host pids of every sandboxed runner of this checkout still alive (their command line carries the runner's
    source), but for those another test session started and still holds (a pytest-xdist worker beside this one, a
    second pytest): their ancestry passes through that session's pytest process, not this one. A runner that
    outlived its sandbox has lost its ancestry (it hangs from init), so it is counted whoever leaked it.
    `settle_s`: only those still there after up to that long (a sandbox another session is tearing down hangs
    from init for a moment)."""
    def parent_and_argv(pid: int) -> tuple[int, list[bytes]]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return ppid, f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            return 0, []

    def is_pytest(argv: list[bytes]) -> bool:  # `pytest ...`, `py.test ...` or `python -m pytest ...`
        head = argv[:6]
        return any(os.path.basename(a) in (b"pytest", b"py.test") for a in head) or any(
            a == b"-m" and b == b"pytest" for a, b in zip(head, head[1:]))

    def held_by_another_session(pid: int) -> bool:
        ancestor = parent_and_argv(pid)[0]
        while ancestor > 1 and ancestor != os.getpid():
            parent, argv = parent_and_argv(ancestor)
            if is_pytest(argv):  # the sandbox's own launchers carry the runner's source, never pytest's name
                return True
            ancestor = parent
        return False

    def snapshot() -> set[int]:
        runners = [int(p) for p in os.listdir("/proc")
                   if p.isdigit() and any(_RUNNER_MARK.encode() in a for a in parent_and_argv(int(p))[1])]
        return {pid for pid in runners if not held_by_another_session(pid)}

    found, deadline = snapshot(), time.monotonic() + settle_s
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found &= snapshot()
    return sorted(found)


def test_program_extraction():
    assert program_from("```python\nx = 1\n```\ntext\n```py\nx = 2\n```") == "x = 2\n"
    assert program_from("def f():\n    return 1\n") == "def f():\n    return 1\n"
    # HumanEval: the completion continues the prompt's signature, so the prompt goes in front.
    prompt = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    assert program_from("    return a + b\n", prompt, "add") == prompt + "    return a + b\n"
    assert program_from("def add(a, b):\n    return a + b\n", prompt, "add") == "def add(a, b):\n    return a + b\n"


def test_unknown_sandbox_and_missing_sandbox(monkeypatch):
    with pytest.raises(RewardConfigError, match="sandbox must be"):
        RewardScorer([RewardSpec("code_tests", kwargs={"sandbox": "docker"})])
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    sandbox_module._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            resolve_sandbox("auto")
        with pytest.raises(SandboxUnavailable):  # fails when the scorer is built, before any training step
            RewardScorer([RewardSpec("code_tests")])
    finally:
        sandbox_module._probe.cache_clear()


def test_sandbox_none_is_explicit_and_warns(caplog):
    sandbox_module._warn_no_sandbox.cache_clear()
    with caplog.at_level("WARNING", logger="rewards.sandbox"):
        assert resolve_sandbox("none") == "none"
    assert "WITHOUT a sandbox" in caplog.text
    scores = code_tests(["", ""], ["def f():\n    return 1\n", "def f():\n    return 2\n"],
                        tests=["assert f() == 1"] * 2, sandbox="none")
    assert scores == [1.0, 0.0]


@needs_sandbox
def test_assert_and_check_styles_and_not_applicable():
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "def add(a, b):\n    return a - b\n",
        "    return a + b\n",  # HumanEval-style continuation of the prompt
        "def add(a, b):\n    return a + b\n",
        "anything",
    ]
    prompts = ["", "", "def add(a, b):\n", "", ""]
    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    tests = [["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "assert add(1, 2) == 3", check, check, None]
    entry = [None, None, "add", "add", None]
    assert code_tests(prompts, completions, tests=tests, entry_point=entry) == [1.0, 0.0, 1.0, 1.0, None]


@needs_sandbox
@pytest.mark.parametrize("kind", SANDBOXES)
def test_sandbox_sees_nothing_of_the_host(kind, tmp_path):
    probe = (
        "import os, socket\n"
        # folders above a bound virtual environment exist (a venv in ~/repo makes /home/you), their files do not
        f"home_visible = os.path.exists(os.path.expanduser('~/.bashrc')) or os.path.exists({REPO_FILE!r})\n"
        f"host_tmp_visible = os.path.exists({str(tmp_path)!r})\n"
        "env = dict(os.environ)\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "    net = True\n"
        "except OSError:\n"
        "    net = False\n"
    )
    tests = (
        "assert not home_visible\n"
        "assert not host_tmp_visible\n"
        "assert 'GRPO_TEST_SECRET' not in env, env\n"
        "assert not net\n"
        "assert os.getcwd() == '/tmp'"
    )
    os.environ["GRPO_TEST_SECRET"] = "hunter2"
    try:
        result = run_tests(probe, tests, None, kind=kind, limits=Limits(timeout_s=10))
    finally:
        del os.environ["GRPO_TEST_SECRET"]
    assert result.passed, result.detail


def adversarial_cases(canary: str) -> dict[str, tuple[str, str]]:
    """name -> (program, tests). Every program is wrong unless its trick works, so the expected reward is 0."""
    test = "assert f(1) == 2"
    return {
        "infinite loop": ("def f(x):\n    while True:\n        pass\n", test),
        "input() with no stdin": ("def f(x):\n    return int(input()) + 1\n", test),
        "fork bomb": ("import os\ndef f(x):\n    while True:\n        os.fork()\n", test),
        "fork bomb via posix": ("import posix\nwhile True:\n    posix.fork()\ndef f(x):\n    return x + 1\n", test),
        "subprocess": ("import subprocess\nsubprocess.run(['sh', '-c', 'true'])\ndef f(x):\n    return x + 1\n", test),
        "huge output": ("import sys\ndef f(x):\n    while True:\n        sys.stdout.write('x' * 65536)\n", test),
        "50 GB allocation": ("def f(x):\n    b = bytearray(50 * 10**9)\n    return x + 1\n", test),
        "delete canary": (f"import os\ndef f(x):\n    os.remove({canary!r})\n    return x + 1\n", test),
        "read env secret": ("import os\ndef f(x):\n    return int(os.environ['GRPO_TEST_SECRET'])\n",
                            "assert f(1) == 42"),
        "network": ("import socket\ndef f(x):\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                    "    return x + 1\n", test),
        "sys.exit(0) first": ("import sys\nsys.exit(0)\ndef f(x):\n    return x\n", test),
        "os._exit(0) first": ("import os\nos._exit(0)\n", test),
        "exit inside the call": ("import sys\ndef f(x):\n    sys.exit(0)\n", test),
        "__eq__ always True": ("class Any:\n    def __eq__(self, other):\n        return True\n"
                               "def f(x):\n    return Any()\n", test),
        "int subclass __eq__": ("class Int(int):\n    def __eq__(self, other):\n        return True\n"
                                "def f(x):\n    return Int(0)\n", test),
        "forged result line": ("import os\nos.write(1, b'{\"passed\": true, \"detail\": \"\", \"nonce\": \"0\"}\\n')\n"
                               "os._exit(0)\n", test),
        "patched builtins": ("import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
                             "def f(x):\n    return x\n", test),
        "write a huge file": ("def f(x):\n    with open('/tmp/big', 'wb') as fh:\n"
                              "        fh.write(b'0' * (200 << 20))\n    return x + 1\n", test),
    }


@needs_sandbox
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_adversarial_programs_score_zero_and_leave_nothing(kind, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    cases = adversarial_cases(str(canary))
    os.environ["GRPO_TEST_SECRET"] = "42"
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        scores = code_tests(
            [""] * len(cases),
            [program for program, _ in cases.values()],
            tests=[tests for _, tests in cases.values()],
            sandbox=kind,
            timeout_s=3.0,
            memory_mb=512,
        )
    finally:
        del os.environ["GRPO_TEST_SECRET"]
    elapsed = time.perf_counter() - start
    assert dict(zip(cases, scores)) == {name: 0.0 for name in cases}
    assert canary.read_text() == "still here"
    assert runner_processes(settle_s=3) == [], "sandboxed processes outlived their run"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024
    assert grown_mb < 50, f"the trainer process grew by {grown_mb:.0f} MB"
    # 18 programs, a handful hitting the 3 s deadline, on the CPUs available: bounded well under a minute.
    assert elapsed < 60


@needs_sandbox
def test_threads_still_work_inside():
    program = (
        "import threading\n"
        "def f(x):\n"
        "    out = []\n"
        "    t = threading.Thread(target=lambda: out.append(x + 1))\n"
        "    t.start(); t.join()\n"
        "    return out[0]\n"
    )
    assert code_tests([""], [program], tests=["assert f(1) == 2"]) == [1.0]


@needs_sandbox
@pytest.mark.timeout(60)
def test_runs_in_parallel():
    n = 8
    program = "import time\ndef f(x):\n    time.sleep(0.5)\n    return x + 1\n"
    start = time.perf_counter()
    scores = code_tests([""] * n, [program] * n, tests=["assert f(1) == 2"] * n, num_workers=n)
    elapsed = time.perf_counter() - start
    assert scores == [1.0] * n
    assert elapsed < n * 0.5 / 2, f"{n} half-second programs took {elapsed:.1f} s: not parallel"


@needs_sandbox
@requires(shutil.which("bwrap") is not None,
          "bubblewrap not installed (scripts/install.sh installs it where apt works)")
def test_auto_prefers_bubblewrap():
    assert resolve_sandbox("auto") == "bwrap"


@needs_sandbox
def test_what_crosses_between_the_program_and_the_tests():
    """The tests run in their own process; what they need from the program still arrives, typed exactly."""
    cases = {
        # a tuple stays a tuple (HumanEval's sum_product compares with (0, 1)); dict keys keep their type
        "exact types": ("def f():\n    return (0, 1), {1: b'x', (2, 3): {4}}, frozenset([1]), 2j, None\n",
                        "assert f() == ((0, 1), {1: b'x', (2, 3): {4}}, frozenset([1]), 2j, None)\n"
                        "assert type(f()[0]) is tuple\n"),
        # a raise in the program is the nearest built-in exception in the tests: Oops(ValueError) -> ValueError
        "raises": ("class Oops(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n        raise Oops('negative')\n"
                   "    return x\n",
                   "try:\n    f(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n"
                   "    raise AssertionError\nassert f(2) == 2\n"),
        # the program's top-level data, and a standard module the tests use without importing it (MBPP)
        "globals and math": ("import math\nLIMIT = [1, 2]\ndef area(r):\n    return math.pi * r * r\n",
                             "assert LIMIT == [1, 2]\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n"),
        # iterators come back as iterators over their items
        "generator": ("def f(n):\n    for i in range(n):\n        yield i * i\n",
                      "assert list(f(4)) == [0, 1, 4, 9]\nassert next(f(3)) == 0\n"),
        # what does not cross: in-place changes to an argument (the program has its own copy)
        "mutation stays in the program": ("def f(xs):\n    xs.sort()\n", "a = [2, 1]\nf(a)\nassert a == [1, 2]\n"),
    }
    scores = code_tests([""] * len(cases), [p for p, _ in cases.values()], tests=[t for _, t in cases.values()])
    assert dict(zip(cases, scores)) == {"exact types": 1.0, "raises": 1.0, "globals and math": 1.0,
                                        "generator": 1.0, "mutation stays in the program": 0.0}


def judge_of_a_running_sandbox(timeout_s: float = 20.0) -> int:
    """The host pid of the judge: the Python runner whose child is a Python runner (the candidate's process);
    the launchers above them (bwrap, unshare) carry the runner's text in their command lines too."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runners = set()
        for pid in runner_processes():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().startswith("python"):
                        runners.add(pid)
            except OSError:
                pass
        for pid in runners:
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    if runners & {int(c) for c in f.read().split()}:
                        return pid
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError("no sandbox with a judge and a candidate appeared")


@needs_sandbox
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_harness_failures_are_infra_errors_not_wrong_answers(kind, tmp_path, monkeypatch):
    """A sandbox that cannot start, one not up by the deadline, and a judge killed from outside: None, counted in
    reward/code_tests_infra_errors. The programs are right (each would score 1.0), so a 0.0 here is a harness
    failure read as a wrong answer."""
    right = "def f(x):\n    return x + 1\n"
    scorer = RewardScorer([RewardSpec("code_tests", kwargs={"sandbox": kind, "timeout_s": 10.0})])
    assert scorer([""], [right], {"tests": ["assert f(1) == 2"]}).total == [1.0]  # the control

    # Deadline before the sandbox is up: 1 ms, less than any interpreter takes to start.
    assert code_tests([""], [right], tests=["assert f(1) == 2"], sandbox=kind, timeout_s=0.001) == [None]
    assert CODE_TESTS.metrics() == {"infra_errors": 1.0}
    # The launcher missing from the sandbox's PATH, then one that exits at once writing nothing (a broken sandbox).
    monkeypatch.setitem(sandbox_module._ENV, "PATH", str(tmp_path))
    launcher = "bwrap" if kind == "bwrap" else "setpriv" if shutil.which("setpriv") else "unshare"
    batch = scorer([""] * 2, [right] * 2, {"tests": ["assert f(1) == 2"] * 2})
    assert batch.total == [None, None] and batch.reward_metrics["reward/code_tests_infra_errors"] == 2.0
    (tmp_path / launcher).write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / launcher).chmod(0o755)
    batch = scorer([""] * 3, [right] * 3, {"tests": ["assert f(1) == 2"] * 3})
    assert batch.total == [None] * 3 and batch.reward_metrics["reward/code_tests_infra_errors"] == 3.0
    monkeypatch.undo()

    # The judge killed from outside while a (right, slow) program runs: no verdict.
    slow = "import time\ndef f(x):\n    time.sleep(30)\n    return x + 1\n"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(code_tests, [""], [slow], tests=["assert f(1) == 2"], sandbox=kind, timeout_s=40.0)
        os.kill(judge_of_a_running_sandbox(), signal.SIGKILL)
        assert future.result() == [None]
    assert CODE_TESTS.metrics() == {"infra_errors": 1.0}
    # The program's own failures stay wrong answers: a timeout and a crash are 0.0, not infra errors.
    scores = code_tests([""] * 2, ["def f(x):\n    while True:\n        pass\n", "import os\nos._exit(0)\n"],
                        tests=["assert f(1) == 2"] * 2, sandbox=kind, timeout_s=2.0)
    assert scores == [0.0, 0.0] and CODE_TESTS.metrics() == {"timeouts": 1.0, "infra_errors": 0.0}
    assert runner_processes(settle_s=3) == []


# Run inside the sandbox by an interpreter installed under /tmp: what it sees of its own installation and of /tmp.
UNDER_TMP_PROGRAM = r'''
import errno, json, os, sys
home = os.path.dirname(sys.executable)
seen = {"executable": sys.executable, "lists_its_home": os.path.basename(sys.executable) in os.listdir(home)}
try:
    open(os.path.join(home, "planted"), "w").close()
    seen["home_write"] = "written"
except OSError as e:
    seen["home_write"] = errno.errorcode[e.errno]
open("/tmp/{marker}", "w").close()
seen["written_mb"], seen["fill_error"] = 0, None
try:
    for i in range(3 * {tmp_mb}):
        with open("/tmp/fill%d" % i, "wb") as f:
            f.write(b"0" * (1 << 20))
        seen["written_mb"] += 1
except OSError as e:
    seen["fill_error"] = errno.errorcode[e.errno]
print(json.dumps(seen))
'''
# The trainer's side, run by that interpreter: the sandbox runs the program with the trainer's own interpreter.
UNDER_TMP_TRAINER = (
    "import json, sys\nfrom rewards.sandbox import Limits, run_code\n"
    "run = run_code(sys.argv[1], kind=sys.argv[2], limits=Limits(timeout_s=30, tmp_mb=int(sys.argv[3])))\n"
    "print(json.dumps([run.output, run.error]))\n"
)


@pytest.fixture
def python_under_tmp():
    """A Python whose interpreter binary lives under /tmp (a venv of copies, as a user's /tmp/x/venv may be)."""
    home = Path(tempfile.mkdtemp(prefix="sbx-python-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", str(home / "venv")], check=True,
                       timeout=120)
        yield home / "venv" / "bin" / "python"
    finally:
        shutil.rmtree(home)


@needs_sandbox
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_an_interpreter_under_tmp_runs_with_its_installation_read_only_and_tmp_private(kind, python_under_tmp):
    # before the private /tmp was mounted first, unshare failed on makedirs('<root>/tmp') (FileExistsError: the
    # bind of the venv had made it) and bwrap mounted its /tmp over the bound venv (execvp: no such file)
    tmp_mb, marker = 8, f"sandbox-marker-{uuid.uuid4().hex}"
    program = UNDER_TMP_PROGRAM.replace("{marker}", marker).replace("{tmp_mb}", str(tmp_mb))
    trainer = subprocess.run([str(python_under_tmp), "-c", UNDER_TMP_TRAINER, program, kind, str(tmp_mb)],
                             capture_output=True, text=True, timeout=90, cwd="/",
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert trainer.returncode == 0, trainer.stderr
    output, error = json.loads(trainer.stdout)
    assert error is None, (error, output)
    seen = json.loads(output)
    assert seen["executable"] == str(python_under_tmp) and seen["lists_its_home"]  # the installation is there
    assert seen["home_write"] == "EROFS"  # ... read-only, not hidden under the tmpfs nor writable
    # 8 files of 1 MiB fill the 8 MiB tmpfs (its mount points for the binds take no pages); the 9th: ENOSPC
    assert seen["fill_error"] == "ENOSPC" and seen["written_mb"] == tmp_mb, seen
    assert not os.path.exists(f"/tmp/{marker}") and not (python_under_tmp.parent / "planted").exists()  # private


def test_the_sandbox_binds_every_directory_the_interpreters_links_pass_through(tmp_path, monkeypatch):
    # venv/bin/python -> ../../alt/python3 -> <the real interpreter>: started as venv/bin/python (so Python finds the
    # venv), the link chain must resolve inside the sandbox, so alt/ and the interpreter's own directory are bound
    real = os.path.realpath(sys.executable)
    (tmp_path / "alt").mkdir()
    (tmp_path / "alt" / "python3").symlink_to(real)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(Path("..") / ".." / "alt" / "python3")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    assert sandbox_module._interpreter() == str(tmp_path / "venv" / "bin" / "python")  # its own link kept
    assert sandbox_module._link_dirs(sys.executable) == {str(tmp_path / "alt"), os.path.dirname(real)}
    bound = sandbox_module._python_dirs()
    assert str(tmp_path / "alt") in bound and not any(d.startswith(b + "/") for d in bound for b in bound)
