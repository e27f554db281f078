"""Multi-turn episodes: B*G environments, one per episode, stepped in lockstep turns, token-exact.

Each turn, every unfinished episode's whole context (prompt, then every earlier turn's ids) is continued
by the engine's `generate_from_ids`; the sampled ids are appended exactly as sampled (loss mask 1, with
the sampler's log-probs). The turn's text goes to the environment; on an `Observation`, only the new
text (the end of the model's turn that it did not write itself, the new messages, the next assistant
header: `grpo.envs.chat.environment_text`) is tokenised and appended, with loss mask 0. The
conversation is never re-tokenised, so the trainer scores exactly the tokens the sampler drew.

The episode's completion is everything after the prompt. An episode ends
- at `Done`: its reward is Done's (None: the task's reward functions alone score it);
- truncated, when `max_turns` model turns have been taken without `Done`, or when the token budget
  `max_episode_tokens` (model and environment tokens together) runs out: a turn cut by the budget is
  not shown to the environment, and an observation that leaves no room for one more model token is not
  appended. A truncated episode has no environment reward (None); the task's reward functions score
  its last model turn, and `truncated` is set (`algorithm.mask_truncated` drops it from the loss).
- timed out, when its wall-clock budget `episode_timeout_s` (from its `reset`, generation included) runs
  out: before a turn is sampled, or while the environment is still stepping (the runner stops waiting; the
  step finishes on its worker thread and the environment is closed then). Scored like a truncated episode:
  a model that writes a program that never ends gets the task's reward for it, not a pass.
- with an error, when its environment's `reset` or `step` raises (or returns neither Observation nor Done),
  or the chat template does not render its turn verbatim: its reward is None (masked, like any None
  reward: the environment failed, not the model), the reason is in its record (`ended`) and in the log,
  and the other episodes go on. `env/errors` counts them per step.
Its environment's `close()`, if it has one, is called as it ends (and for every episode still open when an
error stops the rollout).

The environments of a turn's episodes step at once on `workers` threads (a tool call that waits on a
sandbox does not hold up the others); tokenising and the engine stay on the caller's thread.

Each turn re-prefills every context on the hf engine (no KV cache kept across turns); the vLLM engine
takes the KV blocks of each context's earlier turns from its prefix cache. An engine with a
`max_model_len` (vLLM's) must hold every opening plus `max_episode_tokens`, checked before the first turn.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as StepTimeout
from dataclasses import dataclass, field

from grpo.envs import Done, Environment, Observation
from grpo.envs.chat import environment_text, render
from grpo.envs.tools import FAILURES, tool_schema
from grpo.rollout import Completions, TokenRolloutEngine

logger = logging.getLogger(__name__)


@dataclass
class Episode:
    """One episode in progress: its environment, conversation and completion so far."""

    env: Environment
    tools: list[dict]  # the tools' JSON schemas, rendered by the chat template
    messages: list[dict]  # the conversation; the model's turns as their decoded text
    context: str | None  # the rendered conversation the next turn is sampled after (None: reset failed)
    ids: list[int] = field(default_factory=list)  # the completion: model and environment tokens
    mask: list[int] = field(default_factory=list)  # 1 on the model's tokens, 0 on the environment's
    logprobs: list[float] = field(default_factory=list)  # the sampler's; 0 on environment tokens
    turns: int = 0
    text: str = ""  # the last model turn: what the task's reward functions score
    reward: float | None = None
    scores: dict = field(default_factory=dict)  # Done's named parts of the reward
    finished: bool = False
    truncated: bool = False
    closed: bool = False  # the environment's close() has been called (or will be, when its step returns)
    ended_with_eos: bool = False  # the last model turn ended with EOS (the template's end of turn, already there)
    ended: str = ""  # why it ended: done, truncated, timeout, or "error: ..." (what raised)
    deadline: float = math.inf  # time.monotonic() at which its wall-clock budget runs out


REASON_CHARS = 300  # of an environment's error message, kept in the episode's record and the log


def run_episodes(engine: TokenRolloutEngine, tokenizer, make_env: Callable[[], Environment], rows: list[dict],
                 n: int, *, max_turns: int, max_episode_tokens: int, max_new_tokens: int, greedy: bool = False,
                 episode_timeout_s: float = 0.0, workers: int = 1) -> Completions:
    """n episodes per row (prompt-major, as `generate` lays out n samples), run to their end; `greedy`: every
    turn the engine's greedy continuation (held-out evaluation, n=1). `episode_timeout_s`: each episode's
    wall-clock budget (0: none); `workers`: environments stepped at once."""
    episodes: list[Episode] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env")
    budget = episode_timeout_s if episode_timeout_s > 0 else math.inf
    try:
        for row in rows:
            for _ in range(n):
                episodes.append(start_episode(make_env, row, tokenizer, deadline=time.monotonic() + budget))
        return run_to_the_end(engine, tokenizer, episodes, rows, n, pool, max_turns=max_turns,
                              max_episode_tokens=max_episode_tokens, max_new_tokens=max_new_tokens, greedy=greedy)
    finally:  # also when an error stops the rollout, no environment's process outlives it
        pool.shutdown(wait=False)  # a step still running past its deadline closes its environment when it returns
        for e in episodes:
            close_environment(e)


def episode_options(rollout, env=None) -> dict:
    """`run_episodes`' limits from a run's config: `rollout` (a RolloutConfig: turns, tokens) and `env` (an
    EnvConfig: wall-clock budget, workers; None: no budget, one worker)."""
    return dict(max_turns=rollout.max_turns, max_episode_tokens=rollout.max_episode_tokens,
                max_new_tokens=rollout.max_new_tokens, episode_timeout_s=env.episode_timeout_s if env else 0.0,
                workers=env.workers if env else 1)


def run_to_the_end(engine: TokenRolloutEngine, tokenizer, episodes: list[Episode], rows: list[dict], n: int,
                   pool: ThreadPoolExecutor, *, max_turns: int, max_episode_tokens: int, max_new_tokens: int,
                   greedy: bool) -> Completions:
    """Step the started episodes (n per row, prompt-major) in lockstep turns until each is finished."""
    prompt_ids = [tokenizer(opening, add_special_tokens=False)["input_ids"]
                  for opening in openings(episodes, rows, n, tokenizer)]
    limit = getattr(engine, "max_model_len", None)  # the vLLM engine cannot run past it (the hf engine can)
    if limit and max(map(len, prompt_ids)) + max_episode_tokens > limit:
        raise ValueError(f"rollout.max_episode_tokens: an opening of {max(map(len, prompt_ids))} tokens plus "
                         f"{max_episode_tokens} exceeds the rollout engine's max_model_len={limit}")
    seconds = 0.0
    while active := [i for i, e in enumerate(episodes) if not e.finished and not out_of_time(e)]:
        budget = [max_episode_tokens - len(episodes[i].ids) for i in active]
        out = engine.generate_from_ids([prompt_ids[i // n] + episodes[i].ids for i in active], 1,
                                       max_new_tokens=min(max_new_tokens, max(budget)), greedy=greedy)
        seconds += out.metrics.get("time/generate_s", 0.0)
        stepping = []
        for k, i in enumerate(active):
            lps = out.logprobs[k] if out.logprobs is not None else [0.0] * len(out.completion_ids[k])
            if record_turn(episodes[i], out.completion_ids[k], lps, out.truncated[k], budget[k], tokenizer):
                stepping.append(episodes[i])
        for e, result in zip(stepping, step_all(pool, stepping)):
            apply_step(e, result, tokenizer, max_turns, max_episode_tokens)
        for i in active:
            if episodes[i].finished:
                close_environment(episodes[i])
    return Completions(
        prompt_ids=prompt_ids, completion_ids=[e.ids for e in episodes], texts=[e.text for e in episodes],
        truncated=[e.truncated for e in episodes], logprobs=[e.logprobs for e in episodes],
        metrics={"time/generate_s": seconds}, loss_masks=[e.mask for e in episodes],
        episodes=[episode_record(e) for e in episodes])


def openings(episodes: list[Episode], rows: list[dict], n: int, tokenizer) -> list[str]:
    """Each row's rendered opening, which its n episodes share; a row none of whose environments opened gets
    the row's prompt as the user's message (its episodes are over; the opening is only their prompt)."""
    out = []
    for b, row in enumerate(rows):
        seen = {e.context for e in episodes[b * n : (b + 1) * n] if e.context is not None}
        if len(seen) > 1:
            raise ValueError(f"environment: the {n} episodes of row {b} open differently; reset(row) must "
                             "return the same messages for the same row")
        out.append(seen.pop() if seen else render(tokenizer, [{"role": "user", "content": row["prompt"]}]))
    return out


def out_of_time(e: Episode) -> bool:
    """End an unfinished episode whose budget ran out before its next turn; True if it did."""
    if time.monotonic() < e.deadline:
        return False
    end(e, "timeout", truncated=True)
    close_environment(e)
    return True


def end(e: Episode, why: str, *, truncated: bool = False, reward: float | None = None) -> None:
    e.finished, e.truncated, e.reward, e.ended = True, truncated, reward, why


def fail(e: Episode, what: str, error: BaseException | None = None) -> None:
    """End the episode on an environment's (or the chat template's) error: no reward, the reason logged."""
    reason = f"{what}: {type(error).__name__}: {error}" if error is not None else what
    end(e, f"error: {reason[:REASON_CHARS]}")
    logger.warning("environment %s: an episode ends with no reward: %s", type(e.env).__name__, reason[:REASON_CHARS],
                   exc_info=error)


def close_environment(e: Episode) -> None:
    """Close the episode's environment, once."""
    if not e.closed:
        e.closed = True
        close_quietly(e.env)


def close_quietly(env: Environment | None) -> None:
    """Call the environment's `close()`, if it has one; an error there is logged, and the rollout goes on."""
    if callable(getattr(env, "close", None)):
        try:
            env.close()
        except Exception:
            logger.exception("environment: %s.close() raised; the rollout goes on", type(env).__name__)


def start_episode(make_env: Callable[[], Environment], row: dict, tokenizer, *,
                  deadline: float = math.inf) -> Episode:
    """A new episode on `row`: an environment `make_env` builds, reset and rendered. If building, resetting
    or rendering raises, the episode is over at once, with the error (`fail`)."""
    e = Episode(None, [], [], None, deadline=deadline)
    try:
        e.env = make_env()
        e.messages = list(e.env.reset(row))  # before its tools: an environment may choose them by the row
        e.tools = [tool_schema(fn) for fn in getattr(e.env, "tools", [])]
        e.context = render(tokenizer, e.messages, e.tools)
    except Exception as error:  # the user's environment: anything may go wrong, and only this episode pays
        fail(e, "reset raised" if e.env is not None else "building the environment raised", error)
    return e


def take_turn(e: Episode, ids: list[int], logprobs: list[float], unfinished: bool, budget: int, tokenizer,
              max_turns: int, max_episode_tokens: int) -> None:
    """Append one sampled model turn, then the environment's reply (one episode, on this thread)."""
    if record_turn(e, ids, logprobs, unfinished, budget, tokenizer):
        apply_step(e, step_once(e), tokenizer, max_turns, max_episode_tokens)


def record_turn(e: Episode, ids: list[int], logprobs: list[float], unfinished: bool, budget: int,
                tokenizer) -> bool:
    """Append one sampled model turn (cut to the episode's `budget` of tokens left); True if the environment is
    to see it. `unfinished`: the sampler stopped the turn at its token limit, before EOS or a stop string."""
    cut = ids[:budget]
    e.ids += cut
    e.mask += [1] * len(cut)
    e.logprobs += logprobs[: len(cut)]
    e.turns += 1
    e.text = tokenizer.decode(cut, skip_special_tokens=True)
    e.ended_with_eos = bool(cut) and cut[-1] == tokenizer.eos_token_id
    if len(cut) < len(ids) or (len(cut) == budget and unfinished):  # the budget ran out mid-turn
        end(e, "truncated", truncated=True)
        return False
    return True


TIMED_OUT = object()  # step_all's result for a step still running at its episode's deadline


def step_once(e: Episode):
    """The environment's answer to the episode's last turn, or the exception it raised."""
    try:
        return e.env.step(e.text)
    except Exception as error:  # the user's environment: only this episode pays
        return error


def step_all(pool: ThreadPoolExecutor, episodes: list[Episode]) -> list:
    """Every episode's environment stepped on the pool; each result is what `step_once` returns, or TIMED_OUT
    for a step still running at its episode's deadline (it is left to finish, and closes its environment)."""
    futures = [pool.submit(step_once, e) for e in episodes]
    results = []
    for e, future in zip(episodes, futures):
        left = None if e.deadline == math.inf else max(0.0, e.deadline - time.monotonic())
        try:
            results.append(future.result(timeout=left))
        except StepTimeout:
            e.closed = True  # closed when the step returns, not under it
            future.add_done_callback(closer(e.env))
            results.append(TIMED_OUT)
    return results


def closer(env: Environment) -> Callable[[Future], None]:
    return lambda _: close_quietly(env)


def apply_step(e: Episode, result, tokenizer, max_turns: int, max_episode_tokens: int) -> None:
    """Append the environment's reply to the episode's last turn, or end the episode as the reply says."""
    if result is TIMED_OUT:
        return end(e, "timeout", truncated=True)
    if isinstance(result, Exception):
        return fail(e, "step raised", result)
    if isinstance(result, Done):
        e.scores = dict(getattr(result, "scores", {}))
        return end(e, "done", reward=result.reward)
    if not isinstance(result, Observation):
        return fail(e, f"step returned {type(result).__name__}, not Observation or Done")
    if e.turns >= max_turns:
        return end(e, "truncated", truncated=True)
    messages = [*e.messages, {"role": "assistant", "content": e.text}, *result.messages]
    try:
        rendered = render(tokenizer, messages, e.tools)
        text = environment_text(e.context, e.text, rendered, ended_with=tokenizer.eos_token if e.ended_with_eos else "")
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as error:  # a message the template cannot render, or a turn it does not keep verbatim
        return fail(e, "rendering the environment's reply failed", error)
    if len(e.ids) + len(new) >= max_episode_tokens:  # no room left for the model's next turn
        return end(e, "truncated", truncated=True)
    e.messages, e.context = messages, rendered
    e.ids += new
    e.mask += [0] * len(new)
    e.logprobs += [0.0] * len(new)


def episode_record(e: Episode) -> dict:
    """What the metrics need of one finished episode; `route`: the name its row chose (grpo.envs.routing), or None."""
    counts = getattr(e.env, "counts", {})
    return {"turns": e.turns, "tool_calls": counts.get("calls", 0),
            "tool_errors": sum(counts.get(kind, 0) for kind in FAILURES), "truncated": e.truncated,
            "reward": e.reward, "ended": e.ended, "scores": e.scores, "route": getattr(e.env, "route", None)}


def failed(record: dict) -> bool:
    """Did the episode end on its environment's error (its reward is then None, whatever the task scores)?"""
    return record.get("ended", "").startswith("error")


def episode_metrics(records: list[dict]) -> dict:
    """`env/turns_mean`, `env/tool_calls_mean` (per episode), `env/tool_error_frac` (of all tool calls, a
    malformed one included), `env/truncated_frac` (timed-out episodes included), `env/timeout_frac` over the
    step's episodes, and `env/errors`: how many ended on their environment's error."""
    n = max(1, len(records))
    calls = sum(r["tool_calls"] for r in records)
    return {"env/turns_mean": sum(r["turns"] for r in records) / n, "env/tool_calls_mean": calls / n,
            "env/tool_error_frac": sum(r["tool_errors"] for r in records) / max(1, calls),
            "env/truncated_frac": sum(r["truncated"] for r in records) / n,
            "env/timeout_frac": sum(r.get("ended") == "timeout" for r in records) / n,
            "env/errors": sum(map(failed, records))}
