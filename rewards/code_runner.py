"""Runs one candidate program against its tests; executed *inside* the sandbox as ``python -I -c <this file> MODE``.

Not imported by the trainer: ``rewards.sandbox`` sends this file's text as the program, the mode (``tests``,
``run`` or ``session``) as its argument, and a JSON payload on stdin. Standard library only.

``tests`` mode: the verdict never shares an interpreter with the candidate. The runner forks *before* it reads
anything: the child becomes the candidate's process, the parent the judge.

- The candidate's process closes every file descriptor but its two pipes to the judge, sends its stdout/stderr
  to /dev/null, dies with the judge (``PR_SET_PDEATHSIG``), drops every capability and installs the seccomp
  filter, then receives its program, runs it, and answers calls: ``{"call": name, "args", "kwargs"}`` in,
  ``{"value": data}`` or ``{"raised": [exception class names], message}`` out. Data is plain and typed exactly
  (``encode``): None, bool, int, float, str, list, tuple, dict, set, frozenset, bytes, complex, and iterators
  (generators, ``map``, ...) materialised into a list; anything else (an object whose ``__eq__`` lies, an ``int``
  subclass) is refused, and the call raises in the judge.
- The judge makes itself non-dumpable (so the candidate cannot read or write its memory or descriptors through
  ``/proc``, nor ``ptrace`` it), reads the payload ``{"code", "tests", "entry_point", "prompt", "nonce",
  "limits"}``, and runs the tests in its own interpreter with pristine builtins. The names the tests see: a
  proxy for every top-level callable the candidate defines and a copy of its top-level plain data (except names
  that shadow a builtin), then, with an
  ``entry_point``, the prompt's own definitions (HumanEval's ``poly``, ``encode_cyclic``: the problem's
  helpers, not the candidate's copies), then the standard-library modules the tests use without importing
  them (MBPP's ``math.isclose``). A proxy's call sends the arguments and returns what the judge decodes: built
  by the judge, of built-in types only. A raise in the candidate raises the nearest built-in exception in the
  judge; a candidate that exits, crashes or answers out of protocol ends the run as a failure.
- Only the judge holds the pipe to the host. Once the candidate's process says it is up and confined, and
  before the program reaches it, the judge writes ``{"started": nonce}``; at the end it writes ``{"passed",
  "detail", "nonce", "infra"}`` once and exits (``infra``: the harness failed before the program ran). What
  happens before ``started``, or a judge that ends without a verdict, is the harness's failure, not a wrong
  answer; the candidate cannot cause one, since its signals reach only itself (``seccomp_filter``). The
  candidate's process never sees the nonce, the tests or that pipe, so what it prints, the frames it walks,
  the builtins or modules it replaces and the handlers it installs reach nothing that decides.

What this costs: one ``fork`` (about a millisecond) and a pipe round trip per call. Tests can only pass plain
data to the candidate's top-level functions and read plain data back: the candidate's objects (class
instances, closures it returns), in-place changes to arguments, and infinite generators do not cross (such tests
fail; none of HumanEval's 164 needs them). Memory: each of the two processes has ``memory_bytes`` of address
space. Compared with running tests in the candidate's interpreter (as HumanEval's own ``execution.py`` does),
this is slower per call and stricter, and cannot be fooled from inside the candidate.

``run`` mode (the ``python`` tool, ``grpo.envs.python``): no tests and no verdict, one interpreter. The program
runs with its stdout and stderr captured (the first ``max_output`` characters kept), and the report is what it
printed and, if it raised, the exception's last line. ``session`` mode (``rewards.sandbox.PythonSession``): as
``run``, but after the payload it reads one request ``{"code", "nonce"}`` per line, runs each in one namespace
kept from program to program, and answers each with one line, until its stdin closes or the host kills it. Between
programs the host keeps it stopped (SIGSTOP).

Every process that runs untrusted code first sets rlimits (CPU seconds, address space, file size, open files,
processes, no core files), drops every capability (bounding set, ambient, effective, permitted, inheritable;
securebits locked so an exec as uid 0 regains none), and installs a seccomp filter (``seccomp_filter``) that
refuses new processes (threads are allowed: RLIMIT_NPROC does not bind uid 0), new namespaces, mounts, and the
calls that reach kernel memory or other processes (``ptrace``, ``io_uring``, ``bpf``, ``memfd_create``, SysV
shared memory, keyrings, signals to any process but itself, ...).
"""

import builtins
import ctypes
import importlib
import json
import os
import resource
import signal
import struct
import sys
import traceback
import types

_write = os.write
_exit = os._exit
_dumps = json.dumps
_MAX_MESSAGE = 32 << 20  # bytes of one message between judge and candidate
_MAX_ITEMS = 1_000_000  # items of one iterator the candidate returns


# ---------------------------------------------------------------------------------------------- confinement


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


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(*args):
    if _libc.prctl(*args) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")


def drop_capabilities():
    """Empty every capability set, for good. Root of a user namespace holds all capabilities inside it (remount
    ``/usr`` read-write, mount a tmpfs of any size); without them the namespace's root is an ordinary user."""
    pr_capbset_drop, pr_cap_ambient, ambient_clear_all, pr_set_securebits = 24, 47, 4, 28
    for cap in range(64):
        if _libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: no such cap
            break
    _libc.prctl(pr_cap_ambient, ambient_clear_all, 0, 0, 0)
    # NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, each locked, and KEEP_CAPS locked off: uid 0 gains nothing
    # at exec. Needs CAP_SETPCAP, which a non-root user without capabilities lacks (and does not need it).
    _libc.prctl(pr_set_securebits, 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80, 0, 0, 0)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two empty {effective, permitted, inheritable}
    nr_capset = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
    if nr_capset is not None and _libc.syscall(nr_capset, ctypes.create_string_buffer(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    with open("/proc/self/status") as f:
        caps = {key: int(value, 16) for key, _, value in (line.partition(":\t") for line in f)
                if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    held = {key: value for key, value in caps.items() if value and (key != "CapBnd" or os.getuid() == 0)}
    if held:  # a non-root user keeps its bounding set, which no exec of it can use under no_new_privs
        raise OSError(1, f"capabilities still held: {held}")


# Syscalls refused with EPERM, by architecture: mounts and namespaces (mount, umount2, pivot_root, chroot,
# unshare, setns, the new mount API), other processes' memory (ptrace, process_vm_*), and the ways to hold memory
# or run kernel code that no rlimit bounds (memfd_create, memfd_secret, shmget, io_uring, bpf, userfaultfd,
# perf_event_open, keyrings, modules, kexec, swap, reboot, acct, quotactl, fanotify, open_by_handle_at).
_DENIED = {
    "x86_64": (165, 166, 155, 161, 272, 308, 428, 429, 430, 431, 432, 433, 442, 101, 310, 311, 319, 447, 29,
               425, 426, 427, 321, 323, 298, 248, 249, 250, 175, 313, 176, 246, 320, 167, 168, 169, 163, 179,
               300, 304, 170, 171),
    "aarch64": (40, 39, 41, 51, 97, 268, 428, 429, 430, 431, 432, 433, 442, 117, 270, 271, 279, 447, 194,
                425, 426, 427, 280, 282, 241, 217, 218, 219, 105, 273, 106, 104, 294, 224, 225, 142, 89, 60,
                262, 265, 161, 162),
}
_CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
# Signals reach only the process itself: the candidate shares the judge's uid, so without this it could SIGKILL
# or SIGSTOP the judge and turn a wrong answer into a failure of the harness. kill, tgkill, rt_sigqueueinfo and
# rt_tgsigqueueinfo are allowed with the caller's own pid only; tkill, pidfd_send_signal and pidfd_getfd are
# refused; so are fcntl F_SETOWN / F_SETOWN_EX and ioctl FIOSETOWN / SIOCSPGRP, through which a descriptor's
# SIGIO (any signal, with F_SETSIG) is sent to a process of one's choice.
_SIGNALS = {
    "x86_64": {"own_pid": (62, 234, 129, 297), "denied": (200, 424, 438), "fcntl": 72, "ioctl": 16},
    "aarch64": {"own_pid": (129, 131, 138, 240), "denied": (130, 424, 438), "fcntl": 25, "ioctl": 29},
}
_SET_OWNER = {"fcntl": (8, 15), "ioctl": (0x8901, 0x8902)}


def seccomp_filter():
    """Install the filter (module docstring). fork and vfork, and clone without CLONE_THREAD or with a
    namespace flag, fail with EPERM; clone3 with ENOSYS (libc then creates threads with clone, whose flags a
    filter can read). Returns False when the architecture is not one we have numbers for."""
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
    for nr in (*nr_forks, *_DENIED[machine], *_SIGNALS[machine]["denied"]):
        prog += [(jeq_k, 0, 1, nr), (ret_k, 0, 0, eperm)]
    for nr in _SIGNALS[machine]["own_pid"]:  # the target pid is the first argument's low word
        prog += [(jeq_k, 0, 4, nr), (ld_w_abs, 0, 0, 16), (jeq_k, 0, 1, os.getpid()), (ret_k, 0, 0, allow),
                 (ret_k, 0, 0, eperm)]
    for call, (first, second) in _SET_OWNER.items():  # the command is the second argument's low word
        prog += [(jeq_k, 0, 5, _SIGNALS[machine][call]), (ld_w_abs, 0, 0, 24), (jeq_k, 2, 0, first),
                 (jeq_k, 1, 0, second), (ret_k, 0, 0, allow), (ret_k, 0, 0, eperm)]
    prog += [(jeq_k, 0, 1, nr_clone3), (ret_k, 0, 0, enosys)]
    prog += [(jeq_k, 1, 0, nr_clone), (ret_k, 0, 0, allow)]
    prog += [(ld_w_abs, 0, 0, 16), (jset_k, 2, 0, _CLONE_NAMESPACES), (jset_k, 0, 1, clone_thread),
             (ret_k, 0, 0, allow), (ret_k, 0, 0, eperm)]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    _prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    _prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0)
    return True


def confine(limits):
    """Everything a process does before it runs code it did not write: rlimits, capabilities, seccomp."""
    set_limits(limits)
    drop_capabilities()
    seccomp_filter()  # False on other architectures: RLIMIT_NPROC, the namespaces and the deadline still apply


def quiet_std_fds():
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


# ---------------------------------------------------------------------------------------------- plain data

_TAGGED = {tuple: "tuple", set: "set", frozenset: "frozenset"}
_ITERATORS = (types.GeneratorType, map, filter, zip, enumerate, reversed, type(iter([])), type(iter(())),
              type(iter("")), type(iter(range(0))), type(iter({})), type(iter(set())))


def encode(value, depth=0):
    """``value`` as JSON-ready data that says its exact type; TypeError for anything but plain built-in data."""
    kind = type(value)
    if depth > 100:
        raise TypeError("data nested deeper than 100 levels")
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in _TAGGED:
        return {_TAGGED[kind]: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind in (bytes, bytearray):
        return {kind.__name__: value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind in _ITERATORS:
        items = []
        for item in value:
            if len(items) >= _MAX_ITEMS:
                raise TypeError(f"an iterator of more than {_MAX_ITEMS} items")
            items.append(encode(item, depth + 1))
        return {"iter": items}
    raise TypeError(f"a {kind.__name__} is not plain data (None, bool, int, float, str, bytes, complex, list, "
                    "tuple, dict, set, frozenset, or an iterator of those)")


def decode(data):
    """The value ``encode`` described, built from built-in types only."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise TypeError("malformed data")
    (tag, body), = data.items()
    if tag in ("tuple", "set", "frozenset", "iter"):
        items = [decode(v) for v in body]
        return {"tuple": tuple, "set": set, "frozenset": frozenset, "iter": iter}[tag](items)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in body}
    if tag in ("bytes", "bytearray"):
        return {"bytes": bytes, "bytearray": bytearray}[tag].fromhex(body)
    if tag == "complex":
        return complex(float(body[0]), float(body[1]))
    raise TypeError(f"malformed data (tag {tag!r})")


class Channel:
    """One JSON object per line over a pair of pipe descriptors."""

    def __init__(self, read_fd, write_fd):
        self.read_fd, self.write_fd, self.pending = read_fd, write_fd, b""

    def send(self, message):
        data = (_dumps(message) + "\n").encode("utf-8")
        while data:
            data = data[_write(self.write_fd, data):]

    def receive(self):
        """The next object; EOFError when the other end closed, wrote too much or wrote something else."""
        while b"\n" not in self.pending:
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk or len(self.pending) + len(chunk) > _MAX_MESSAGE:
                raise EOFError("the candidate's process stopped answering")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError:  # a huge integer included
            raise EOFError("the candidate's process answered out of protocol") from None
        if type(message) is not dict:
            raise EOFError("the candidate's process answered out of protocol")
        return message


# ---------------------------------------------------------------------------------------------- the candidate


def candidate_main(channel, limits, judge):
    """The candidate's process: confine, run the program, answer calls until the judge closes the pipe."""
    keep = {channel.read_fd, channel.write_fd}
    for fd in [int(fd) for fd in os.listdir("/proc/self/fd")]:  # the host's pipe above all: only the judge writes
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, closed already
                pass
    quiet_std_fds()
    _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no candidate outlives its judge
    if os.getppid() != judge:  # the judge died before the death signal was armed
        _exit(1)
    confine(limits)
    channel.send({"ready": True})  # up and confined: from here on, what goes wrong is the program's doing
    code = channel.receive()["code"]
    scope = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(code, "<candidate>", "exec"), scope)
    except BaseException as e:  # SystemExit included: leaving early is failing
        channel.send({"raised": [c.__name__ for c in type(e).__mro__], "message": str(e)[:300]})
        _exit(0)
    defined, values = [], {}
    for name, value in list(scope.items()):
        if type(name) is not str or name.startswith("__") or isinstance(value, types.ModuleType):
            continue
        if callable(value):
            defined.append(name)
        else:
            try:
                values[name] = encode(value)
            except (TypeError, ValueError, RecursionError):  # not data: the tests cannot see it
                pass
    channel.send({"defined": defined, "values": values})
    while True:
        try:
            request = channel.receive()
        except EOFError:
            _exit(0)
        channel.send(answer(scope, request))


def answer(scope, request):
    try:
        value = scope[request["call"]](*decode(request["args"]), **decode(request["kwargs"]))
        return {"value": encode(value)}
    except BaseException as e:  # the judge decides what a raise means
        return {"raised": [c.__name__ for c in type(e).__mro__], "message": str(e)[:300]}


# ---------------------------------------------------------------------------------------------- the judge


class CandidateGone(BaseException):
    """The candidate's process exited, crashed or broke the protocol. A BaseException, so that a test's
    ``except Exception`` cannot read it as the raise it expected."""


class Remote:
    """A candidate's function, as the tests see it: arguments out, plain data back."""

    def __init__(self, channel, name):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        try:
            request = {"call": self.__name__, "args": encode(list(args)), "kwargs": encode(kwargs)}
        except TypeError as e:
            raise TypeError(f"the tests passed {self.__name__} an argument that cannot cross to the candidate's "
                            f"process: {e}") from None
        self._channel.send(request)
        try:
            reply = self._channel.receive()
        except EOFError as e:
            raise CandidateGone(str(e)) from None
        if "value" in reply:
            try:
                return decode(reply["value"])
            except (TypeError, ValueError, AttributeError) as e:
                raise CandidateGone(f"{self.__name__} returned malformed data: {e}") from None
        raise raised_in_candidate(reply)

    def __repr__(self):
        return f"<the candidate's {self.__name__}>"


def raised_in_candidate(reply):
    """The judge's own exception for a raise the candidate reports: the first built-in ``Exception`` class among
    the names it gives (a candidate's ``class Oops(ValueError)`` gives ValueError), else CandidateGone."""
    names = reply.get("raised")
    message = str(reply.get("message", ""))[:300]
    for name in names if type(names) is list else []:
        kind = getattr(builtins, name, None) if type(name) is str else None
        if isinstance(kind, type) and issubclass(kind, Exception):
            return kind(message)
    return CandidateGone(f"the candidate raised {names and names[0]!r}: {message}")


def global_names(code):
    """Every name ``code`` (and the functions in it) may look up as a global."""
    names, stack = set(), [code]
    while stack:
        co = stack.pop()
        names.update(co.co_names)
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return names


def scope_for_tests(channel, first, tests_code, entry_point, prompt):
    """The tests' globals: the candidate's functions as proxies and its plain-data globals as copies, then the
    prompt's helpers, then standard modules (module docstring). No candidate name shadows a builtin."""
    scope = {"__name__": "__tests__", "__builtins__": builtins}
    for name in first["defined"] if type(first["defined"]) is list else []:
        if type(name) is str and name.isidentifier() and not name.startswith("__") and not hasattr(builtins, name):
            scope[name] = Remote(channel, name)
    values = first.get("values")
    for name, data in values.items() if type(values) is dict else ():
        if name.isidentifier() and not name.startswith("__") and not hasattr(builtins, name):
            scope[name] = decode(data)
    if entry_point and prompt:
        helpers = {"__name__": "__prompt__", "__builtins__": builtins}
        try:
            exec(compile(prompt, "<prompt>", "exec"), helpers)
        except Exception:  # a prompt that is not a program (a chat template): no helpers
            helpers = {}
        scope.update((k, v) for k, v in helpers.items() if k != entry_point and not k.startswith("__"))
    for name in global_names(tests_code) - scope.keys():
        if name in sys.stdlib_module_names:
            try:
                scope[name] = importlib.import_module(name)
            except ImportError:
                pass
    return scope


def judge_main(channel):
    """The judge: read the payload, hand the program over, run the tests, report once."""
    _prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<judge>/mem, fd or environ, no ptrace, for a non-root
    payload = json.loads(open(0, "rb", closefd=False).readline().decode("utf-8"))
    result_fd = os.dup(1)
    quiet_std_fds()
    nonce = payload.pop("nonce", None)

    def report(passed, detail, infra=False):
        line = _dumps({"passed": passed, "detail": str(detail)[:300], "nonce": nonce if passed else "",
                       "infra": infra})
        _write(result_fd, (line + "\n").encode("utf-8"))
        _exit(0)

    confine(payload["limits"])
    entry_point = payload.get("entry_point")
    try:
        tests_code = compile(payload["tests"], "<tests>", "exec")
        channel.receive()  # the candidate's process is up and confined
        _write(result_fd, (_dumps({"started": nonce}) + "\n").encode("utf-8"))
        channel.send({"code": payload["code"]})
    except (EOFError, OSError) as e:  # before the program reached its process: the harness failed, not it
        report(False, f"the candidate's process failed before its program ran: {e}", infra=True)
    except SyntaxError as e:
        report(False, f"the tests do not compile: {e}")
    try:
        first = channel.receive()
    except (EOFError, OSError) as e:
        report(False, f"the candidate's process ended while its program ran: {e}")
    if "defined" not in first:
        report(False, f"candidate raised {raised_in_candidate(first)!r}")
    if entry_point and (type(first["defined"]) is not list or entry_point not in first["defined"]):
        report(False, f"the solution defines no function {entry_point!r}")
    try:
        scope = scope_for_tests(channel, first, tests_code, entry_point, payload.get("prompt"))
        exec(tests_code, scope)
        if entry_point:
            scope["check"](Remote(channel, entry_point))
    except BaseException as e:
        report(False, f"test failed with {type(e).__name__}: {e}")
    report(True, "passed")


def tests_main():
    """Fork first, so the candidate's process holds nothing of the payload (module docstring)."""
    from_judge, to_candidate = os.pipe()
    from_candidate, to_judge = os.pipe()
    judge = os.getpid()
    if os.fork() == 0:
        os.close(to_candidate)
        os.close(from_candidate)
        try:
            candidate_main(Channel(from_judge, to_judge), json.loads(sys.argv[2]), judge)
        finally:
            _exit(1)
    os.close(from_judge)
    os.close(to_judge)
    judge_main(Channel(from_candidate, to_candidate))


# ---------------------------------------------------------------------------------------------- the python tool


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


def tool_main(mode):
    """``run`` and ``session``: the program's output is the result, so one interpreter does."""
    requests = open(os.dup(0), "rb")  # the first line is the payload; a session's requests follow it
    payload = json.loads(requests.readline().decode("utf-8"))
    result_fd = os.dup(1)
    quiet_std_fds()
    _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG, for sandbox none: setpriv's covers the launcher
    confine(payload["limits"])
    if mode == "session":
        run_session(requests, result_fd, payload["max_output"])
    requests.close()
    output, error = run_program(payload["code"], payload["max_output"])
    _write(result_fd, (_dumps({"output": output, "error": error, "nonce": payload.get("nonce")}) + "\n").encode())
    _exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["tests"]:
        tests_main()
    else:
        tool_main(sys.argv[1] if len(sys.argv) > 1 else "run")
