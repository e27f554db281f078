"""A red team against ``code_tests`` and the ``python`` tool: programs that solve nothing and try to score anyway,
or to reach the host. Every forging program must score 0, every escape must leave the host as it was, and each
run must end within its deadline; a control that solves the task scores 1, so a sandbox that failed everything
would fail here too. Parametrized over the sandboxes this machine has (bubblewrap, unshare).

The task: ``f(x) = x * x + 7``. The hidden tests check f(3) == 16, f(10) == 107 and, through builtins a program
could shadow, set([f(2)]) == {11} and sorted([f(1)]) == [8]. A program that cannot compute it must find the
tests (gc, frames, /proc, the judge's memory), forge the verdict, or break the judge.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards.code_tests import code_tests
from rewards.sandbox import Limits, PythonSession, pid_max_settable, run_code, run_tests
from tests.unit.test_rewards_code import SANDBOXES, needs_sandbox, runner_processes

ROOT = Path(__file__).resolve().parents[2]
TESTS = "assert f(3) == 16\nassert f(10) == 107\nassert set([f(2)]) == {11}\nassert sorted([f(1)]) == [8]\n"
CHECK = "def check(candidate):\n    assert candidate(3) == 16\n    assert candidate(10) == 107\n"
# HumanEval-style: the tests use a helper the prompt defines (as HumanEval/32 uses `poly`); only f is the candidate's.
PROMPT = "def helper(v):\n    return v - 16\n\n\ndef f(x):\n    pass\n"
HELPER_CHECK = "def check(candidate):\n    assert helper(candidate(3)) == 0\n    assert helper(candidate(10)) == 91\n"
BUILTIN_TESTS = "assert set([f(2)]) == set([11])\nassert sorted([f(1), f(0)]) == sorted([8, 7])\n"
TIMEOUT_S = 3.0
# A verdict line with the run's nonce, if the program can find it in any frame above it.
FORGED = (
    "import json, os, sys\n_fr, NONCE = sys._getframe(), ''\nwhile _fr is not None:\n"
    "    NONCE = _fr.f_locals.get('nonce') or NONCE\n    _fr = _fr.f_back\n"
    "LINE = (json.dumps({'passed': True, 'detail': 'passed', 'nonce': NONCE}) + '\\n').encode()\n"
)

# Looks for the hidden tests everywhere a program can look, and answers from them if it finds any: a judge that
# leaked its tests would score this 1.
HARVEST = r'''
import gc, os, re, sys
def _texts():
    for o in gc.get_objects():
        if isinstance(o, (dict, list, tuple)):
            for v in (o.values() if isinstance(o, dict) else o):
                if isinstance(v, (str, bytes)):
                    yield v if isinstance(v, str) else v.decode("utf-8", "replace")
    frame = sys._getframe()
    while frame is not None:
        for v in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(v, str):
                yield v
        frame = frame.f_back
    for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
        for part in ("cmdline", "environ", "fd/0", "fd/3", "fd/4"):
            try:
                fd = os.open(f"/proc/{pid}/{part}", os.O_RDONLY | os.O_NONBLOCK)
                yield os.read(fd, 1 << 20).decode("utf-8", "replace")
            except OSError:
                pass
        try:  # every writable mapping of every other process: the heap holds the tests if anything does
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            for line in open(f"/proc/{pid}/maps"):
                span, perms = line.split()[:2]
                start, end = (int(a, 16) for a in span.split("-"))
                if perms.startswith("rw") and end - start < (64 << 20):
                    try:
                        yield os.pread(mem, end - start, start).decode("latin-1")
                    except OSError:
                        pass
        except OSError:
            pass
ANSWERS = {}
for text in _texts():
    for x, y in re.findall(r"(?:f|candidate)\((\d+)\)\W*==\W*(\d+)", text):
        ANSWERS[int(x)] = int(y)
def f(x):
    return ANSWERS.get(x, 0)
'''

# name -> (program, tests, entry point). Programs are wrong unless their trick works.
CASES: dict[str, tuple[str, str, str | None]] = {
    "shadow builtins set and sorted": (
        "def set(*a):\n    return 0\ndef sorted(*a):\n    return 0\ndef f(x):\n    return 0\n", BUILTIN_TESTS, None),
    "entry point is a class whose instances equal anything": (
        "class f:\n    def __init__(self, *a):\n        pass\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n",
        CHECK, "f"),
    "shadow the prompt's helper that the tests use": (
        "def helper(v):\n    return 0 if v == 0 else 91\ndef f(x):\n    return 0 if x == 3 else 1\n",
        HELPER_CHECK, "f"),
    "returns an object whose __eq__ is True": (
        "class A:\n    def __eq__(self, o):\n        return True\n    def __hash__(self):\n        return 11\n"
        "def f(x):\n    return A()\n", TESTS, None),
    "returns an int subclass that equals anything": (
        "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
        "def f(x):\n    return I(0)\n", TESTS, None),
    "__repr__ and __hash__ that lie": (
        "class L:\n    def __repr__(self):\n        return '16'\n    def __hash__(self):\n        return hash(11)\n"
        "    def __eq__(self, o):\n        return True\ndef f(x):\n    return L()\n", TESTS, None),
    "a generator of lying objects": (
        "class A:\n    def __eq__(self, o):\n        return True\n"
        "def f(x):\n    yield A()\n", "assert list(f(3)) == [16]\nassert f(3) == 16\n", None),
    "an endless generator": ("import itertools\ndef f(x):\n    return itertools.count()\n", TESTS, None),
    "replace the harness through __main__": (
        "import __main__\nfor _k in dir(__main__):\n    if 'check' in _k or 'plain' in _k or 'encode' in _k:\n"
        "        setattr(__main__, _k, lambda v, *a, **k: v)\n"
        "class A:\n    def __eq__(self, o):\n        return True\n    def __hash__(self):\n        return 11\n"
        "def f(x):\n    return A()\n", TESTS, None),
    "replace builtins.exec and compile": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
        "def f(x):\n    return 0\n", TESTS, None),
    "replace builtins.AssertionError": (
        "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\ndef f(x):\n    return 0\n",
        TESTS, None),
    "walk frames to the runner and call its reporter": (
        "import sys\ndef f(x):\n    fr = sys._getframe()\n    while fr is not None:\n"
        "        for scope in (fr.f_locals, fr.f_globals):\n            r = scope.get('report')\n"
        "            if callable(r):\n                r(True, 'passed')\n        fr = fr.f_back\n    return 0\n",
        TESTS, None),
    "harvest the hidden tests (gc, frames, /proc)": (HARVEST, TESTS, None),
    "harvest the hidden tests from inside the call": (
        HARVEST.replace("ANSWERS = {}", "def _fill():\n    ANSWERS.clear()") .replace(
            "for text in _texts():", "    for text in _texts():").replace(
            "    for x, y in re.findall", "        for x, y in re.findall").replace(
            "        ANSWERS[int(x)]", "            ANSWERS[int(x)]").replace(
            "def f(x):\n    return", "ANSWERS = {}\ndef f(x):\n    _fill()\n    return"), TESTS, None),
    "gc walk calls every harness function it finds": (
        "import gc, types\ndef f(x):\n    for o in gc.get_objects():\n"
        "        if isinstance(o, types.FunctionType) and o.__name__ in ('report', 'judge_main', 'send'):\n"
        "            try:\n                o(True, 'passed')\n            except BaseException:\n                pass\n"
        "    return 0\n", TESTS, None),
    "fake verdict lines on stdout and stderr": (
        FORGED + "print(LINE.decode())\nos.write(1, LINE)\nos.write(2, LINE)\n"
        "def f(x):\n    print(LINE.decode())\n    return 0\n", TESTS, None),
    "fake verdict lines on every inherited descriptor": (
        FORGED + "def f(x):\n    for fd in range(1024):\n        try:\n"
        "            os.write(fd, LINE)\n        except OSError:\n            pass\n    return 0\n", TESTS, None),
    "fake answers on the judge's pipe, then exit": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"value\": 16}\\n' * 8 + "
        "b'{\"passed\": true}\\n')\n    except OSError:\n        pass\nos._exit(0)\n", TESTS, None),
    "atexit handler that writes a verdict": (
        FORGED + "import atexit, sys\natexit.register(lambda: [os.write(fd, LINE) "
        "for fd in (1, 2)])\nsys.exit(0)\n", TESTS, None),
    "signal handlers and a timer": (
        FORGED + "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGPIPE):\n"
        "    signal.signal(s, lambda *a: os.write(1, LINE))\nsignal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)\n"
        "def f(x):\n    return 0\n", TESTS, None),
    "replace json in sys.modules so every answer is a verdict": (
        FORGED + "import types\nfake = types.ModuleType('json')\nfake.dumps = lambda *a, **k: LINE.decode().strip()\n"
        "fake.loads = json.loads\nsys.modules['json'] = fake\nimport __main__\n__main__._dumps = fake.dumps\n"
        "__main__.json = fake\ndef f(x):\n    return 0\n", TESTS, None),
    "ctypes: ptrace the judge and write its memory": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nppid = os.getppid()\n"
        "attached = libc.ptrace(16, ppid, 0, 0)\ntry:\n    fd = os.open(f'/proc/{ppid}/mem', os.O_RDWR)\n"
        "    os.lseek(fd, 0x400000, 0)\n    os.write(fd, b'\\x00' * 64)\nexcept OSError:\n    pass\n"
        "def f(x):\n    return 0 if attached != 0 else 16\n", TESTS, None),
    "ctypes: rewrite small ints in its own interpreter": (
        "import ctypes, sys\nfor small in (0, 1):\n    ctypes.c_ssize_t.from_address(id(small) + 24).value = 16\n"
        "def f(x):\n    return 0\n", TESTS, None),
    "kill or stop the judge": (
        "import os, signal\ndef f(x):\n    for sig in (signal.SIGSTOP, signal.SIGKILL):\n        for pid in "
        "(os.getppid(), 1, -1):\n            try:\n                os.kill(pid, sig)\n            except OSError:\n"
        "                pass\n    return 0\n", TESTS, None),
    # Judged as a failure of the harness, a wrong answer would be masked, and enough of them stop the run.
    "SIGKILL the judge through a pipe's SIGIO (F_SETOWN, F_SETSIG)": (
        "import fcntl, os, signal\ndef f(x):\n    for fd in range(3, 16):\n        try:\n"
        "            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getppid())\n            fcntl.fcntl(fd, 10, signal.SIGKILL)\n"
        "            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)\n"
        "        except OSError:\n            pass\n    return 0\n", TESTS, None),
    "plant modules for the judge's imports in /tmp and the cwd": (
        "import os\nfor d in ('/tmp', os.getcwd()):\n    for name in ('re', 'math', 'json', 'sitecustomize'):\n"
        "        try:\n            open(os.path.join(d, name + '.py'), 'w').write('import os\\nos._exit(0)\\n')\n"
        "        except OSError:\n            pass\ndef f(x):\n    return 0\n", "import math\n" + TESTS, None),
    "os._exit(0) inside the call": ("import os\ndef f(x):\n    os._exit(0)\n", TESTS, None),
    "raise SystemExit(0) inside the call": ("def f(x):\n    raise SystemExit(0)\n",
                                            "try:\n    f(3)\nexcept Exception:\n    pass\n" + TESTS, None),
    "raise KeyboardInterrupt where the tests expect a raise": (
        "def f(x):\n    raise KeyboardInterrupt\n",
        "try:\n    f(-1)\nexcept Exception:\n    pass\nelse:\n    raise AssertionError('no raise')\n" + TESTS, None),
    "a huge integer": ("import sys\nsys.set_int_max_str_digits(0)\ndef f(x):\n    return 10 ** 200000\n",
                       TESTS, None),
    "an answer nested deeper than the decoder goes": (
        "def f(x):\n    v = 16\n    for _ in range(100000):\n        v = [v]\n    return v\n", TESTS, None),
    "slow output until the deadline": (
        "import sys, time\ndef f(x):\n    while True:\n        print('.' * 1000, flush=True)\n"
        "        sys.stderr.write('{\"passed\": true}\\n')\n        time.sleep(0.01)\n", TESTS, None),
    "fork bomb through libc clone": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nfor _ in range(1000):\n"
        "    if libc.syscall(56, 17, 0, 0, 0, 0) == 0:\n        os._exit(0)\n    os.fork()\n"
        "def f(x):\n    return 0\n", TESTS, None),
    "thread bomb": (
        "import threading\nthreading.stack_size(32768)\n_stop = threading.Event()\ntry:\n    while True:\n"
        "        threading.Thread(target=_stop.wait, daemon=True).start()\nexcept RuntimeError:\n    pass\n"
        "def f(x):\n    return 0\n", TESTS, None),
    "remount /usr read-write and tmpfs, then lie": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "ok = libc.mount(None, b'/usr', None, 32 | 4096, None) == 0 or "
        "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=4g') == 0 or libc.unshare(0x10020000) == 0\n"
        "def f(x):\n    return x * x + 7 if ok else 0\n", TESTS, None),
    "io_uring, bpf and memfd through raw syscalls": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(256)\n"
        "ok = libc.syscall(425, 8, buf) >= 0 or libc.syscall(321, 0, buf, 48) >= 0 or "
        "libc.syscall(319, b'x', 0) >= 0\ndef f(x):\n    return x * x + 7 if ok else 0\n", TESTS, None),
}
CONTROL = ("def f(x):\n    return x * x + 7\n", TESTS, None)
# The helper case's control: the real f passes HELPER_CHECK with the prompt's helper (16 - 16 == 0, 107 - 16 == 91).


def run_case(case: tuple[str, str, str | None], kind: str):
    program, tests, entry = case
    return run_tests(program, tests, entry, kind=kind, limits=Limits(timeout_s=TIMEOUT_S, memory_mb=512),
                     prompt=PROMPT if entry else None)


@needs_sandbox
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_forgeries_score_zero_within_their_deadline(kind, tmp_path):
    assert len(CASES) >= 20
    control = run_case(CONTROL, kind)
    assert control.passed, control.detail  # the task is solvable: the suite fails if everything scores 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(CASES, pool.map(lambda case: run_case(case, kind), CASES.values())))
    passed = {name: result.detail for name, result in results.items() if result.passed}
    assert passed == {}, f"forgeries that scored 1: {passed}"
    # Each is a wrong answer (0.0), never a failure of the harness (None), which would mask it: no case may kill,
    # stop or silence the judge.
    unjudged = {name: result.detail for name, result in results.items() if result.infra}
    assert unjudged == {}, f"forgeries the judge could not judge: {unjudged}"
    # Each run ends by its deadline (plus the time to kill and reap the sandbox and load on 2 shared cores).
    slow = {name: round(result.seconds, 1) for name, result in results.items() if result.seconds > TIMEOUT_S + 3}
    assert slow == {}
    assert runner_processes(settle_s=3) == [], "sandboxed processes outlived their run"


@needs_sandbox
@pytest.mark.parametrize("kind", SANDBOXES)
def test_the_reward_scores_forgeries_zero_and_the_control_one(kind):
    """Through the public reward, program extraction and the HumanEval-style entry point included."""
    names = ["shadow builtins set and sorted", "entry point is a class whose instances equal anything",
             "harvest the hidden tests (gc, frames, /proc)", "walk frames to the runner and call its reporter"]
    cases = [CASES[name] for name in names] + [CONTROL, (CONTROL[0], CHECK, "f"), (CONTROL[0], HELPER_CHECK, "f")]
    scores = code_tests([PROMPT] * len(cases), [f"```python\n{c[0]}```" for c in cases],
                        tests=[c[1] for c in cases], entry_point=[c[2] for c in cases], sandbox=kind,
                        timeout_s=TIMEOUT_S)
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


ESCAPES = {
    "remount /usr read-write": "libc.mount(None, b'/usr', None, 32 | 4096, None)",
    "remount the Python installation read-write": "libc.mount(None, PREFIX, None, 32 | 4096, None)",
    "remount / read-write": "libc.mount(None, b'/', None, 32 | 4096, None)",
    "mount a 4 GB tmpfs": "libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=4g')",
    "nested user namespace": "libc.unshare(0x10000000)",
    "new mount namespace": "libc.unshare(0x20000)",
    "setns into pid 1's mount namespace": "libc.setns(os.open('/proc/1/ns/mnt', os.O_RDONLY), 0)",
    "clone a process with namespace flags": "libc.syscall(56, 0x10000000 | 0x20000 | 17, 0, 0, 0, 0)",
    # a thread with a namespace flag: the kernel alone says EINVAL; the filter refuses it first, with EPERM
    "clone a thread with namespace flags": "libc.syscall(56, 0x10000000 | 0x00010000 | 0x800 | 0x100, 0, 0, 0, 0)",
    "fsopen (the new mount API)": "libc.syscall(430, b'tmpfs', 0)",
    "memfd_create": "libc.syscall(319, b'x', 0)",
    "System V shared memory": "libc.syscall(29, 0, 1 << 30, 0o1000 | 0o600)",
    "io_uring_setup": "libc.syscall(425, 8, ctypes.create_string_buffer(256))",
    "fork": "libc.syscall(57)",
}
ESCAPE_PROGRAM = '''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PREFIX = os.path.realpath(sys.prefix).encode()
rc = {call}
print("RESULT", "ok" if rc >= 0 else "refused:errno" + str(ctypes.get_errno()))
for target in ({marker!r}, os.path.join(sys.prefix, {name!r})):
    try:
        open(target, "w").write("escaped")
    except OSError:
        pass
'''


@needs_sandbox
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_python_tool_escapes_are_refused(kind):
    """Each privileged call fails inside the python tool's sandbox, refused by the seccomp filter (EPERM, 1), and
    nothing lands in the host's /usr or Python installation (checked from the host, not from what the program
    prints)."""
    token = f"grpo-escape-{uuid.uuid4().hex}"
    marker = f"/usr/{token}"
    outcomes = {}
    for name, call in ESCAPES.items():
        run = run_code(ESCAPE_PROGRAM.format(call=call, marker=marker, name=token), kind=kind,
                       limits=Limits(timeout_s=TIMEOUT_S))
        outcomes[name] = run.output.split("RESULT ")[1].split()[0] if "RESULT " in run.output else run.error
    assert outcomes == {name: "refused:errno1" for name in ESCAPES}
    assert not os.path.exists(marker) and not os.path.exists(os.path.join(sys.prefix, token))


@needs_sandbox
@pytest.mark.parametrize("kind", SANDBOXES)
def test_sandboxed_code_holds_no_capability(kind):
    program = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])"
    assert run_code(program, kind=kind).output.strip() == str(["0000000000000000"] * 5)
    session = PythonSession(kind=kind)
    try:
        assert session.run(program).output.strip() == str(["0000000000000000"] * 5)
    finally:
        session.close()


@needs_sandbox
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_writable_memory_is_capped(kind):
    """/tmp is the only writable place and holds its 64 MB; the root, /dev and /dev/shm hold nothing."""
    program = (
        "import os\nwritten = {}\nfor d in ('/tmp', '/dev/shm', '/dev', '/'):\n    n = 0\n    try:\n"
        "        for i in range(40):\n            with open(f'{d}/fill{i}', 'wb') as fh:\n"
        "                fh.write(b'0' * (8 << 20))\n            n += 8\n    except OSError:\n        pass\n"
        "    written[d] = n\nprint(written)\n"
    )
    run = run_code(program, kind=kind, limits=Limits(timeout_s=20))
    written = eval(run.output)  # noqa: S307 - our own program's dict of ints
    assert written["/tmp"] <= 64 and written["/dev/shm"] == written["/dev"] == written["/"] == 0, written


@needs_sandbox
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [*SANDBOXES, "none"])
def test_sandboxes_die_with_the_trainer(kind, tmp_path):
    """A trainer killed with SIGKILL leaves no sandbox running, in every mode (bwrap: --die-with-parent;
    unshare and none: setpriv --pdeathsig and unshare's --kill-child; the candidate: its own death signal)."""
    trainer = subprocess.Popen([sys.executable, "-c", (
        "from rewards.sandbox import run_tests, Limits\n"
        f"run_tests('import time\\ntime.sleep(60)\\n', 'assert True', None, kind={kind!r}, "
        "limits=Limits(timeout_s=60))\n")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(runner_processes()) < 2:
        time.sleep(0.05)
    assert len(runner_processes()) >= 2, "the sandbox (judge and candidate) never started"
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and runner_processes():
        time.sleep(0.05)
    assert runner_processes(settle_s=3) == []


# Threads by raw clone, each on a 256-byte stack whose top holds pause()'s address: the child returns from the
# syscall into pause() and sleeps there. No libc thread and 256 bytes of user memory each, so neither RLIMIT_AS
# nor (for root) RLIMIT_NPROC stops them; only the sandbox's pid namespace can.
RAW_CLONE_BOMB = '''
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
pause = ctypes.cast(libc.pause, ctypes.c_void_p).value
CLONE = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM, FS, FILES, SIGHAND, THREAD, SYSVSEM
stacks = ctypes.create_string_buffer(256 * 2001 + 16)
base = (ctypes.addressof(stacks) + 15) & ~15
made, err = 0, 0
for i in range(2000):
    sp = base + 256 * (i + 1) - 16
    ctypes.c_void_p.from_address(sp).value = pause
    if libc.syscall(56, CLONE, ctypes.c_void_p(sp), 0, 0, 0) < 0:
        err = ctypes.get_errno()
        break
    made += 1
time.sleep(2)  # the threads stay while the host looks
print("threads", made, "errno", err)
'''


def sandbox_tasks() -> int:
    """Tasks (threads) of every runner process alive now."""
    total = 0
    for pid in runner_processes():
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


@needs_sandbox
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the raw clone below uses x86_64's syscall number")
@pytest.mark.skipif(not pid_max_settable(), reason="this kernel has no per-namespace pid_max (Linux 6.14 and later)")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SANDBOXES)
def test_a_raw_clone_thread_bomb_is_bounded_per_sandbox(kind):
    """The sandbox's pid namespace has pid_max = 300 + Limits.threads (556): the bomb's clones fail with EAGAIN
    (11) before 556 tasks, short of its 2,000, the host still starts processes meanwhile, and the run ends by
    its deadline with nothing left."""
    limits = Limits(timeout_s=20, memory_mb=512)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(run_code, RAW_CLONE_BOMB, kind=kind, limits=limits)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not future.done() and sandbox_tasks() < 100:
            time.sleep(0.02)
        held = sandbox_tasks()
        assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start a process
        run = future.result()
    assert run.error is None and run.seconds < limits.timeout_s + 3, (run.error, run.seconds)
    made, errno = int(run.output.split()[1]), int(run.output.split()[3])
    # RLIMIT_NPROC (16) stops a non-root user's first; as root, pid_max does: pids 1..555, less the sandbox's own
    assert errno == 11 and 0 < made < 556, run.output
    assert held <= 560, held  # 555 in the namespace, plus the launchers outside it
    assert runner_processes(settle_s=3) == []
