"""Runs one candidate program against its tests; executed *inside* the sandbox as ``python -I -c <this file>``.

Not imported by the trainer: ``rewards.sandbox`` sends this file's text as the program and a JSON payload
``{"code", "tests", "entry_point", "nonce", "limits"}`` on stdin. Standard library only.

With ``"mode": "run"`` (the ``python`` tool, ``grpo.envs.python``) there are no tests: steps 1-3 are the same, then
the program runs with its stdout and stderr captured (the first ``max_output`` characters kept), and the report
is what it printed and, if it raised, the exception's last line.

With ``"mode": "session"`` (the persistent ``python`` tool, ``rewards.sandbox.PythonSession``) the runner keeps a
private copy of its stdin too and, after steps 1-3, reads one request ``{"code", "nonce"}`` per line, runs each
program as ``run`` does but in one namespace kept from program to program, and answers each with one line. It
runs until its stdin closes or the host kills it; the CPU limit is then the whole session's. Between programs
the host keeps it stopped (SIGSTOP), so nothing a program leaves behind (a thread, a timer) runs between calls.

Order matters:
1. read the payload (one JSON line) from stdin, then point stdin at /dev/null (``input()`` gets EOF, never blocks);
2. set rlimits (CPU seconds, address space, file size, open files, processes, no core files) and a seccomp
   filter that refuses to create processes (threads are allowed): RLIMIT_NPROC does not bind uid 0, and a
   root-run trainer would otherwise leave fork bombs to the wall-clock deadline alone;
3. keep a private copy of the result pipe and of the builtins, then send the candidate's stdout/stderr to
   /dev/null (huge output costs nothing);
4. run the candidate, then the tests in a namespace of their own that sees the candidate's functions through a
   wrapper refusing return values that are not plain data (an object whose ``__eq__`` is always True fails);
5. only when every test passed, write the nonce (known to the host, not in any file or variable of the
   candidate's namespace) and exit with ``os._exit``. ``sys.exit(0)`` or ``os._exit(0)`` before the asserts
   therefore reads as a failure.

The candidate shares this interpreter, so a program set on reading the runner's memory could still find the
nonce; the sandbox, not this file, is what protects the host.
"""

import builtins
import collections
import ctypes
import datetime
import decimal
import fractions
import json
import os
import resource
import struct
import sys
import traceback
import types

_write = os.write
_exit = os._exit
_dumps = json.dumps


def set_limits(limits):
    pairs = {
        "cpu_s": resource.RLIMIT_CPU,
        "memory_bytes": resource.RLIMIT_AS,
        "file_bytes": resource.RLIMIT_FSIZE,
        "open_files": resource.RLIMIT_NOFILE,
        "processes": resource.RLIMIT_NPROC,
    }
    for key, which in pairs.items():
        value = limits.get(key)
        if value is not None:
            resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def forbid_new_processes():
    """seccomp-bpf: fork, vfork and clone without CLONE_THREAD fail with EPERM; clone3 with ENOSYS (libc then
    creates threads with clone). Returns False when the architecture is not one we have numbers for."""
    machine = os.uname().machine
    if machine == "x86_64":
        arch, nr_clone, nr_clone3, nr_forks = 0xC000003E, 56, 435, (57, 58)
    elif machine == "aarch64":
        arch, nr_clone, nr_clone3, nr_forks = 0xC00000B7, 220, 435, ()
    else:
        return False
    ld_w_abs, jeq_k, jge_k, jset_k, ret_k = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    clone_thread = 0x00010000

    prog = [(ld_w_abs, 0, 0, 4), (jeq_k, 1, 0, arch), (ret_k, 0, 0, kill), (ld_w_abs, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(jge_k, 0, 1, 0x40000000), (ret_k, 0, 0, kill)]  # the x32 ABI would bypass the numbers below
    for nr in nr_forks:
        prog += [(jeq_k, 0, 1, nr), (ret_k, 0, 0, eperm)]
    prog += [(jeq_k, 0, 1, nr_clone3), (ret_k, 0, 0, enosys)]
    prog += [(jeq_k, 1, 0, nr_clone), (ret_k, 0, 0, allow)]
    prog += [(ld_w_abs, 0, 0, 16), (jset_k, 1, 0, clone_thread), (ret_k, 0, 0, eperm), (ret_k, 0, 0, allow)]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    return True


_PLAIN = frozenset(
    [int, float, complex, bool, str, bytes, bytearray, type(None), list, tuple, dict, set, frozenset, range]
    + [fractions.Fraction, decimal.Decimal, collections.OrderedDict, collections.defaultdict, collections.Counter]
    + [collections.deque, datetime.date, datetime.datetime, datetime.time, datetime.timedelta]
)
_ITERATORS = frozenset([types.GeneratorType, map, filter, zip, enumerate, reversed, type(iter([])), type(iter(()))])


def check_plain(value, depth=0):
    """Raise TypeError unless ``value`` is built-in data all the way down (exact types, no subclasses)."""
    kind = type(value)
    if kind not in _PLAIN:
        raise TypeError(f"the solution returned a {kind.__name__}; the tests accept plain built-in values only")
    if depth > 50:
        raise TypeError("the solution returned data nested deeper than 50 levels")
    if kind in (list, tuple, set, frozenset, collections.deque):
        for item in value:
            check_plain(item, depth + 1)
    elif kind in (dict, collections.OrderedDict, collections.defaultdict, collections.Counter):
        for k, v in value.items():
            check_plain(k, depth + 1)
            check_plain(v, depth + 1)


def checked(fn):
    def call(*args, **kwargs):
        value = fn(*args, **kwargs)
        if type(value) in _ITERATORS:
            return checked_items(value)
        check_plain(value)
        return value

    call.__name__ = getattr(fn, "__name__", "candidate")
    call.__doc__ = getattr(fn, "__doc__", None)
    return call


def checked_items(iterator):
    for item in iterator:
        check_plain(item)
        yield item


class CappedText:
    """A text stream for ``print``: keeps the first ``limit`` characters written and counts the rest."""

    def __init__(self, limit):
        self.parts, self.kept, self.dropped, self.limit = [], 0, 0, limit

    def write(self, text):
        text = str(text)
        room = max(0, self.limit - self.kept)
        self.parts.append(text[:room])
        self.kept += min(room, len(text))
        self.dropped += max(0, len(text) - room)
        return len(text)

    def flush(self):
        pass

    def text(self):
        more = f"\n[... {self.dropped} more characters]" if self.dropped else ""
        return "".join(self.parts) + more


def run_program(code, max_output, scope=None):
    """(what ``code`` printed, its error's last line or None), run in ``scope`` (a fresh namespace when None);
    ``exit()`` or ``exit(0)`` is no error."""
    out = CappedText(max_output)
    sys.stdout = sys.stderr = out
    error = None
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins} if scope is None
             else scope)
    except SystemExit as e:
        error = None if e.code in (None, 0) else f"SystemExit: {e.code}"
    except BaseException as e:
        error = traceback.format_exception(e, limit=-1)
        error = "".join(error[1:]).strip()  # the program's line and the exception, without the header
        if len(error) > max_output:
            error = error[:max_output] + f"\n[... {len(error) - max_output} more characters]"
    return out.text(), error


def run_session(requests, result_fd, max_output):
    """Answer each request line with what its program printed, every program in the same namespace."""
    scope = {"__name__": "__main__", "__builtins__": builtins}
    for line in requests:
        request = json.loads(line.decode("utf-8"))
        output, error = run_program(request["code"], max_output, scope)
        _write(result_fd, (_dumps({"output": output, "error": error, "nonce": request["nonce"]}) + "\n").encode())
    _exit(0)


def main():
    requests = open(os.dup(0), "rb")  # the first line is the payload; a session's requests follow it
    payload = json.loads(requests.readline().decode("utf-8"))
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    nonce = payload.pop("nonce", None)

    def report(passed, detail):
        line = _dumps({"passed": passed, "detail": str(detail)[:300], "nonce": nonce if passed else ""})
        _write(result_fd, (line + "\n").encode("utf-8"))
        _exit(0)

    set_limits(payload["limits"])
    if not forbid_new_processes():
        pass  # RLIMIT_NPROC and the deadline still apply
    if payload.get("mode") == "session":
        run_session(requests, result_fd, payload["max_output"])
    requests.close()
    if payload.get("mode") == "run":
        output, error = run_program(payload["code"], payload["max_output"])
        line = _dumps({"output": output, "error": error, "nonce": nonce})
        _write(result_fd, (line + "\n").encode("utf-8"))
        _exit(0)
    clean_builtins = dict(vars(builtins))
    code, tests, entry_point = payload["code"], payload["tests"], payload.get("entry_point")
    del payload

    candidate = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(code, "<candidate>", "exec"), candidate)
    except BaseException as e:  # SystemExit included: leaving early is failing
        report(False, f"candidate raised {type(e).__name__}: {e}")
    scope = {"__name__": "__tests__", "__builtins__": clean_builtins}
    for name, value in list(candidate.items()):
        if isinstance(value, types.FunctionType):
            scope[name] = checked(value)
        elif not name.startswith("__"):
            scope[name] = value
    try:
        exec(compile(tests, "<tests>", "exec"), scope)
        if entry_point:
            if entry_point not in scope:
                report(False, f"the solution defines no function {entry_point!r}")
            scope["check"](scope[entry_point])
    except BaseException as e:
        report(False, f"test failed with {type(e).__name__}: {e}")
    report(True, "passed")


main()
