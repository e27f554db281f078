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
Its environment's `close()`, if it has one, is called as it ends (and for every episode still open when an
error stops the rollout).

Each turn re-prefills every context on the hf engine (no KV cache kept across turns); the vLLM engine
takes the KV blocks of each context's earlier turns from its prefix cache. An engine with a
`max_model_len` (vLLM's) must hold every opening plus `max_episode_tokens`, checked before the first turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from grpo.envs import Done, Environment
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
    context: str  # the rendered conversation the next turn is sampled after
    ids: list[int] = field(default_factory=list)  # the completion: model and environment tokens
    mask: list[int] = field(default_factory=list)  # 1 on the model's tokens, 0 on the environment's
    logprobs: list[float] = field(default_factory=list)  # the sampler's; 0 on environment tokens
    turns: int = 0
    text: str = ""  # the last model turn: what the task's reward functions score
    reward: float | None = None
    finished: bool = False
    truncated: bool = False
    closed: bool = False  # the environment's close() has been called


def run_episodes(engine: TokenRolloutEngine, tokenizer, make_env: Callable[[], Environment], rows: list[dict],
                 n: int, *, max_turns: int, max_episode_tokens: int, max_new_tokens: int,
                 greedy: bool = False) -> Completions:
    """n episodes per row (prompt-major, as `generate` lays out n samples), run to their end; `greedy`: every
    turn the engine's greedy continuation (held-out evaluation, n=1)."""
    episodes: list[Episode] = []
    env = None  # one built whose episode has not started yet
    try:
        for row in rows:
            for _ in range(n):
                env = make_env()
                episodes.append(start_episode(env, row, tokenizer))
                env = None
        return run_to_the_end(engine, tokenizer, episodes, n, max_turns=max_turns,
                              max_episode_tokens=max_episode_tokens, max_new_tokens=max_new_tokens, greedy=greedy)
    finally:  # also when an error stops the rollout, no environment's process outlives it
        if env is not None:
            close_quietly(env)
        for e in episodes:
            close_environment(e)


def run_to_the_end(engine: TokenRolloutEngine, tokenizer, episodes: list[Episode], n: int, *, max_turns: int,
                   max_episode_tokens: int, max_new_tokens: int, greedy: bool) -> Completions:
    """Step the started episodes (n per row, prompt-major) in lockstep turns until each is finished."""
    rows = len(episodes) // n
    prompt_ids = []
    for b in range(rows):
        openings = {e.context for e in episodes[b * n : (b + 1) * n]}
        if len(openings) != 1:
            raise ValueError(f"environment: the {n} episodes of row {b} open differently; reset(row) must "
                             "return the same messages for the same row")
        prompt_ids.append(tokenizer(openings.pop(), add_special_tokens=False)["input_ids"])
    limit = getattr(engine, "max_model_len", None)  # the vLLM engine cannot run past it (the hf engine can)
    if limit and max(map(len, prompt_ids)) + max_episode_tokens > limit:
        raise ValueError(f"rollout.max_episode_tokens: an opening of {max(map(len, prompt_ids))} tokens plus "
                         f"{max_episode_tokens} exceeds the rollout engine's max_model_len={limit}")
    seconds = 0.0
    while active := [i for i, e in enumerate(episodes) if not e.finished]:
        budget = [max_episode_tokens - len(episodes[i].ids) for i in active]
        out = engine.generate_from_ids([prompt_ids[i // n] + episodes[i].ids for i in active], 1,
                                       max_new_tokens=min(max_new_tokens, max(budget)), greedy=greedy)
        seconds += out.metrics.get("time/generate_s", 0.0)
        for k, i in enumerate(active):
            lps = out.logprobs[k] if out.logprobs is not None else [0.0] * len(out.completion_ids[k])
            take_turn(episodes[i], out.completion_ids[k], lps, out.truncated[k], budget[k], tokenizer, max_turns,
                      max_episode_tokens)
            if episodes[i].finished:
                close_environment(episodes[i])
    return Completions(
        prompt_ids=prompt_ids, completion_ids=[e.ids for e in episodes], texts=[e.text for e in episodes],
        truncated=[e.truncated for e in episodes], logprobs=[e.logprobs for e in episodes],
        metrics={"time/generate_s": seconds}, loss_masks=[e.mask for e in episodes],
        episodes=[episode_record(e) for e in episodes])


def close_environment(e: Episode) -> None:
    """Close the episode's environment, once."""
    if not e.closed:
        e.closed = True
        close_quietly(e.env)


def close_quietly(env: Environment) -> None:
    """Call the environment's `close()`, if it has one; an error there is logged, and the rollout goes on."""
    if callable(getattr(env, "close", None)):
        try:
            env.close()
        except Exception:
            logger.exception("environment: %s.close() raised; the rollout goes on", type(env).__name__)


def start_episode(env: Environment, row: dict, tokenizer) -> Episode:
    tools = [tool_schema(fn) for fn in getattr(env, "tools", [])]
    messages = env.reset(row)
    return Episode(env, tools, list(messages), render(tokenizer, messages, tools))


def take_turn(e: Episode, ids: list[int], logprobs: list[float], unfinished: bool, budget: int, tokenizer,
              max_turns: int, max_episode_tokens: int) -> None:
    """Append one sampled model turn (cut to the episode's `budget` of tokens left), then the environment's
    reply. `unfinished`: the sampler stopped the turn at its token limit, before EOS or a stop string."""
    cut = ids[:budget]
    e.ids += cut
    e.mask += [1] * len(cut)
    e.logprobs += logprobs[: len(cut)]
    e.turns += 1
    e.text = tokenizer.decode(cut, skip_special_tokens=True)
    if len(cut) < len(ids) or (len(cut) == budget and unfinished):  # the budget ran out mid-turn
        e.finished = e.truncated = True
        return
    result = e.env.step(e.text)
    if isinstance(result, Done):
        e.finished, e.reward = True, result.reward
        return
    if e.turns >= max_turns:
        e.finished = e.truncated = True
        return
    e.messages += [{"role": "assistant", "content": e.text}, *result.messages]
    rendered = render(tokenizer, e.messages, e.tools)
    ended_with = tokenizer.eos_token if cut and cut[-1] == tokenizer.eos_token_id else ""
    new = tokenizer(environment_text(e.context, e.text, rendered, ended_with=ended_with),
                    add_special_tokens=False)["input_ids"]
    if len(e.ids) + len(new) >= max_episode_tokens:  # no room left for the model's next turn
        e.finished = e.truncated = True
        return
    e.context = rendered
    e.ids += new
    e.mask += [0] * len(new)
    e.logprobs += [0.0] * len(new)


def episode_record(e: Episode) -> dict:
    """What the metrics need of one finished episode."""
    counts = getattr(e.env, "counts", {})
    return {"turns": e.turns, "tool_calls": counts.get("calls", 0),
            "tool_errors": sum(counts.get(kind, 0) for kind in FAILURES), "truncated": e.truncated,
            "reward": e.reward}


def episode_metrics(records: list[dict]) -> dict:
    """`env/turns_mean`, `env/tool_calls_mean` (per episode), `env/tool_error_frac` (of all tool calls, a
    malformed one included) and `env/truncated_frac` over the step's episodes."""
    n = max(1, len(records))
    calls = sum(r["tool_calls"] for r in records)
    return {"env/turns_mean": sum(r["turns"] for r in records) / n, "env/tool_calls_mean": calls / n,
            "env/tool_error_frac": sum(r["tool_errors"] for r in records) / max(1, calls),
            "env/truncated_frac": sum(r["truncated"] for r in records) / n}
