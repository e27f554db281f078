"""What scoring reasoning-gym answers costs: in the trainer's process (reasoning-gym's own ``score_answer``, as the
``reasoning_gym`` reward used to call it) against the sandboxed reward (one interpreter per call, then one round
trip per answer).

    python -m scripts.bench.reasoning_gym_cost                  # countdown and spiral_matrix, 64 answers a batch
    python -m scripts.bench.reasoning_gym_cost --batch 256 --repeats 3

Each batch holds the dataset's gold answer and wrong answers in turn, so both paths through the scorer run.
Figures: milliseconds per answer in process; in the sandbox, seconds per batch, and inside a call the
interpreter's start (importing reasoning-gym: the fixed cost of each call) and the median answer's round trip.
"""

from __future__ import annotations

import argparse
import statistics
import time

import reasoning_gym

from rewards import REWARDS
from rewards.reasoning_tasks import _SandboxedScorer, dump_entry
from rewards.sandbox import resolve_sandbox


def batch_for(name: str, size: int) -> tuple[dict, list[str], dict]:
    entry = reasoning_gym.create_dataset(name, size=1, seed=0)[0]
    record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
    answers = [entry["answer"] if i % 2 == 0 else "0" for i in range(size)]
    columns = {"rg_dataset": [name] * size, "rg_entry": [dump_entry(record)] * size, "rg_options": ["{}"] * size}
    return entry, answers, columns


def in_process_ms(name: str, answers: list[str], entry: dict) -> float:
    score = reasoning_gym.create_dataset(name, size=1, seed=0).score_answer
    start = time.perf_counter()
    for answer in answers:
        score(answer, entry)
    return (time.perf_counter() - start) * 1e3 / len(answers)


def sandboxed(name: str, answers: list[str], columns: dict, repeats: int) -> tuple[float, float, float]:
    """Medians over `repeats` calls of: the whole batch (s), the interpreter's start (s), one answer (ms, the
    median answer of the call) -- the parts timed inside one call, so that a busy machine's noise between calls
    does not leak into them."""
    whole, starts, per_answer = [], [], []
    entry = columns["rg_entry"][0]
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = REWARDS["reasoning_gym"].fn([""] * len(answers), [f"<answer>{a}</answer>" for a in answers],
                                             **columns)
        whole.append(time.perf_counter() - t0)
        assert scores[0] == 1.0 and scores[1] is not None, scores
        checker = _SandboxedScorer(resolve_sandbox("auto"), 5.0, 1024, len(answers))
        try:
            starts.append(_timed(checker._ready))
            per_answer.append(statistics.median(
                _timed(lambda a=a, c=checker: c.score(name, "{}", a, entry)) for a in answers) * 1e3)
        finally:
            checker.close()
    return statistics.median(whole), statistics.median(starts), statistics.median(per_answer)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["countdown", "spiral_matrix"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.datasets:
        entry, answers, columns = batch_for(name, args.batch)
        inproc = in_process_ms(name, answers, entry)
        per_batch, start, per_answer_ms = sandboxed(name, answers, columns, args.repeats)
        print(f"{name}: in process {inproc:.3f} ms/answer ({inproc * args.batch:.1f} ms/batch of {args.batch}); "
              f"sandboxed {per_batch:.2f} s/batch of {args.batch}: the interpreter's start {start:.2f} s, then "
              f"{per_answer_ms:.2f} ms/answer")


if __name__ == "__main__":
    main()
