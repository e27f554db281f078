"""The `python` tool's cost per call: a fresh sandbox per call against one persistent interpreter per episode.

    python -m scripts.bench.python_tool
    python -m scripts.bench.python_tool --sandbox unshare --episodes 16 --calls 4
    python -m scripts.bench.python_tool --site-packages --code 'import sympy; print(sympy.factorint(5535))'

`--episodes` episodes, each making `--calls` calls of a short program (`--code`), run the way a step runs them:
in lockstep turns, every episode's call of a turn before any of the next turn's. One-off calls
(`persistent=False`) start a sandbox and an interpreter per call; persistent ones (`persistent=True`) start one
per episode, at its first call, and stop it when the episode ends (its `close()`, counted). The two take turns,
round by round, on a machine that may be shared; round 0 warms up. Reports the median over rounds of
milliseconds per call, their ratio, and the memory one persistent interpreter holds. There is no peer to run
beside it: TRL's trainers run the tools a user passes them in the trainer's own process, without a sandbox.
"""

from __future__ import annotations

import argparse
import statistics
import time

from grpo.envs.python import python_tool
from rewards.sandbox import descendants


def seconds_per_call(persistent: bool, args) -> tuple[float, float]:
    """(seconds per call, MiB resident in the first episode's interpreter and its sandbox's processes before it
    is stopped: 0 for one-off calls)."""
    start = time.perf_counter()
    tools = [python_tool(sandbox=args.sandbox, persistent=persistent, site_packages=args.site_packages)
             for _ in range(args.episodes)]
    for _ in range(args.calls):
        for tool in tools:
            tool(args.code)
    elapsed = time.perf_counter() - start
    resident = resident_mib(tools[0].session.proc.pid) if persistent else 0.0
    start = time.perf_counter()
    for tool in tools:
        getattr(tool, "close", lambda: None)()
    elapsed += time.perf_counter() - start
    return elapsed / (args.episodes * args.calls), resident


def resident_mib(pid: int) -> float:
    """VmRSS of `pid` and every process below it, in MiB (Linux /proc)."""
    total_kb = 0
    for p in [pid, *descendants(pid)]:
        with open(f"/proc/{p}/status") as f:
            total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="auto", help="auto, bwrap, unshare or none")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--site-packages", action="store_true", help="the tool's site_packages option")
    parser.add_argument("--code", default="x = sum(i * i for i in range(1000))\nprint(x)")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    resident = []
    for r in range(args.rounds + 1):
        for persistent in (False, True):
            t, mib = seconds_per_call(persistent, args)
            if r:
                times[persistent].append(t)
                resident += [mib] if persistent else []
    fresh, kept = (statistics.median(times[p]) * 1e3 for p in (False, True))
    print(f"{args.episodes} episodes x {args.calls} calls, sandbox {args.sandbox}, site_packages "
          f"{args.site_packages}, median of {args.rounds} rounds")
    print(f"one-off sandbox per call:      {fresh:8.3f} ms per call")
    print(f"persistent interpreter:        {kept:8.3f} ms per call (its start and stop included)")
    print(f"one-off / persistent:          {fresh / kept:8.1f}x")
    print(f"one persistent interpreter:    {statistics.median(resident):8.1f} MiB resident, its sandbox's processes "
          "included (one per episode in flight)")


if __name__ == "__main__":
    main()
