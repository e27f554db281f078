"""Several reward functions, weighted, over one batch of completions.

``total[i] = sum_k weight_k * r_k[i]`` over the rewards ``k`` whose value for sample ``i`` is not None;
``total[i]`` is None when every reward is None for that sample (the trainer masks it).

A reward function that raises does not stop the step: its samples become None for that reward, counted in
``reward/<name>_error_frac``, and the exception is logged (with traceback) the first time that reward fails.
A reward given a ``timeout_s`` that has not returned by then is treated the same way (and counted in
``reward/<name>_deadline_misses``): its call runs on a worker thread the step stops waiting for. A thread
cannot be killed, so a reward that can hang for good should enforce its own hard deadline in a subprocess
(as ``math_accuracy`` and ``code_tests`` do); ``timeout_s`` keeps the step moving meanwhile.
A reward that returns the wrong number of values, or a value that is not a finite number or None, is treated
the same way, sample by sample for bad values.

Infrastructure failures are figures, not zeros: every reward reports ``reward/<name>_infra_errors``, the samples
it could not score for reasons that are not the completion's (a sandbox that does not start, a checker process
that dies, a scorer that raises). A reward counts its own (the ``infra_errors`` key of its ``metrics()``; those
samples are None); a call that raises adds all its samples. The trainer stops a run whose share of them passes
``reward.max_infra_error_frac`` (grpo/training/sampling.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.catalog import REWARDS
from rewards.registry import Reward, RewardConfigError, UnknownEntry

logger = logging.getLogger(__name__)


@dataclass
class RewardSpec:
    """One reward in the mix."""

    name: str = field(metadata={"help": "registered name, 'package.module:function', or a grpo.rewards entry point"})
    weight: float = field(default=1.0, metadata={"help": "multiplies this reward in the total"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword options passed on every call"})
    timeout_s: float | None = field(default=None, metadata={
        "help": "seconds a call may take before its samples are masked"})


@dataclass
class ScoredBatch:
    """Rewards for one batch: the weighted total and each reward on its own."""

    total: list[float | None]
    per_reward: dict[str, list[float | None]]
    # True where the reward raised or returned an invalid value for that sample.
    errors: dict[str, list[bool]] = field(default_factory=dict)
    # Counters that a reward reported for this call (see RewardScorer), already named "reward/<name>_<key>".
    reward_metrics: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``reward/<name>_{mean,std,none_frac,error_frac}`` per reward.

        Mean and std are over the samples where the reward is not None (std with ddof=0); they are left out
        when every sample is None, rather than logged as NaN.
        """
        out: dict[str, float] = {}
        for name, values in self.per_reward.items():
            present = [v for v in values if v is not None]
            n = max(len(values), 1)
            if present:
                mean = math.fsum(present) / len(present)
                out[f"reward/{name}_mean"] = mean
                out[f"reward/{name}_std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / len(present))
            out[f"reward/{name}_none_frac"] = (len(values) - len(present)) / n
            out[f"reward/{name}_error_frac"] = sum(self.errors.get(name, ())) / n
        out.update(self.reward_metrics)
        return out


@dataclass
class _BoundReward:
    spec: RewardSpec
    fn: Callable[..., Any]
    metrics: Callable[[], dict[str, float]] | None  # the reward's counters (rewards.registry.Reward)
    takes_all_columns: bool  # the function has **kwargs
    column_params: frozenset[str]  # named parameters that a column may fill
    required: frozenset[str]  # named parameters without a default, not given by spec.kwargs


class RewardScorer:
    """Scores a batch with a weighted mix of reward functions.

    Every function is resolved here, so an unknown name or an option the function does not take fails
    before training starts, with a ``RewardConfigError`` naming the reward. ``required_columns()`` lists the
    dataset columns the rewards need.

    A reward's registration (``rewards.registry.Reward``) may add ``check_options(**kwargs)``, called here with
    the spec's kwargs (raise ``RewardConfigError`` to refuse a configuration), and ``metrics() -> dict[str,
    float]`` (counters since the last call, e.g. timeouts), reported as ``reward/<name>_<key>``. A
    ``RewardConfigError`` raised during scoring propagates; any other exception is masked as described above.
    """

    def __init__(self, specs: Sequence[RewardSpec]):
        if not specs:
            raise RewardConfigError("RewardScorer needs at least one RewardSpec")
        self._rewards: list[_BoundReward] = []
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise RewardConfigError(f"reward {spec.name!r} appears twice; each reward may appear once")
            seen.add(spec.name)
            try:
                weight = float(spec.weight)
            except (TypeError, ValueError):
                raise RewardConfigError(f"reward {spec.name!r}: weight must be a number, got {spec.weight!r}") from None
            if not math.isfinite(weight):
                raise RewardConfigError(f"reward {spec.name!r}: weight must be finite, got {spec.weight!r}")
            timeout = spec.timeout_s
            if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
                raise RewardConfigError(
                    f"reward {spec.name!r}: timeout_s must be a positive number or None, got {timeout!r}")
            try:
                reward = REWARDS.resolve(spec.name)
            except UnknownEntry as e:
                raise RewardConfigError(str(e)) from None
            bound = _bind(RewardSpec(spec.name, weight, dict(spec.kwargs or {}), timeout), reward)
            if reward.check_options is not None:  # e.g. code_tests: is the sandbox usable here?
                reward.check_options(**bound.spec.kwargs)
            self._rewards.append(bound)
        self._logged_failure: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [r.spec.name for r in self._rewards]

    def required_columns(self) -> set[str]:
        """Dataset columns that some reward cannot run without (e.g. ``answer`` for ``math_accuracy``)."""
        return set().union(*(r.required for r in self._rewards))

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Sequence[Any]] | None = None
    ) -> ScoredBatch:
        columns = {k: list(v) for k, v in (columns or {}).items()}
        n = len(completions)
        self._check_batch(len(prompts), n, columns)
        prompts, completions = list(prompts), list(completions)
        results: dict[str, Any] = {}
        pending: dict[str, Any] = {}  # name -> awaitable, for async rewards
        deadline_misses: dict[str, float] = {}
        raised: set[str] = set()  # rewards whose call raised: every sample is an infrastructure failure
        for reward in self._rewards:
            arguments = self._arguments(reward, columns)  # a clash here is a config error, not a reward failure
            try:
                out = _call(reward, prompts, completions, arguments)
            except RewardDeadlineError as e:
                results[reward.spec.name] = e
                deadline_misses[reward.spec.name] = 1.0
                continue
            except RewardConfigError:
                raise  # misconfiguration (no sandbox, contradictory options) must stop the run, not read as None
            except Exception as e:  # noqa: BLE001 - a broken reward must not stop training
                results[reward.spec.name] = e
                raised.add(reward.spec.name)
                continue
            if inspect.isawaitable(out):
                timeout = reward.spec.timeout_s
                pending[reward.spec.name] = out if timeout is None else _bounded(reward.spec.name, out, timeout)
            else:
                results[reward.spec.name] = out
        if pending:
            results.update(_await_all(pending))
            deadline_misses |= {k: 1.0 for k, v in results.items() if isinstance(v, RewardDeadlineError)}
            raised |= {k for k in pending if isinstance(results[k], Exception) and k not in deadline_misses}

        per_reward: dict[str, list[float | None]] = {}
        errors: dict[str, list[bool]] = {}
        reward_metrics: dict[str, float] = {}
        for reward in self._rewards:
            name = reward.spec.name
            values, bad = self._validate(name, results[name], n)
            per_reward[name], errors[name] = values, bad
            if reward.spec.timeout_s is not None:
                reward_metrics[f"reward/{name}_deadline_misses"] = deadline_misses.get(name, 0.0)
            reward_metrics[f"reward/{name}_infra_errors"] = float(n if name in raised else 0)
            if reward.metrics is not None:
                for key, value in reward.metrics().items():
                    key = f"reward/{name}_{key}"
                    reward_metrics[key] = reward_metrics.get(key, 0.0) + float(value)

        total: list[float | None] = []
        for i in range(n):
            terms = [r.spec.weight * per_reward[r.spec.name][i] for r in self._rewards
                     if per_reward[r.spec.name][i] is not None]
            total.append(math.fsum(terms) if terms else None)
        return ScoredBatch(total=total, per_reward=per_reward, errors=errors, reward_metrics=reward_metrics)

    def _check_batch(self, num_prompts: int, n: int, columns: dict[str, list[Any]]) -> None:
        if num_prompts != n:
            raise ValueError(f"{num_prompts} prompts for {n} completions: pass one prompt per completion")
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
        missing = self.required_columns() - columns.keys()
        if missing:
            raise ValueError(f"the rewards need columns {sorted(missing)}, the batch has {sorted(columns)}")

    def _arguments(self, reward: _BoundReward, columns: dict[str, list[Any]]) -> dict[str, Any]:
        passed = columns if reward.takes_all_columns else {
            k: v for k, v in columns.items() if k in reward.column_params}
        clash = passed.keys() & reward.spec.kwargs.keys()
        if clash:
            raise ValueError(f"reward {reward.spec.name!r}: {sorted(clash)} is both a column and an option in kwargs")
        return {**passed, **reward.spec.kwargs}

    def _validate(self, name: str, out: Any, n: int) -> tuple[list[float | None], list[bool]]:
        """Values as floats or None; anything the reward got wrong becomes None and is flagged."""
        if isinstance(out, RewardConfigError):
            raise out
        if isinstance(out, BaseException):
            self._log_failure(name, out)
            return [None] * n, [True] * n
        try:
            out = list(out)
        except TypeError:
            self._log_failure(name, TypeError(f"returned {type(out).__name__}, expected a list"))
            return [None] * n, [True] * n
        if len(out) != n:
            self._log_failure(name, ValueError(f"returned {len(out)} values for {n} completions"))
            return [None] * n, [True] * n
        values: list[float | None] = []
        bad: list[bool] = []
        for v in out:
            if v is None:
                values.append(None)
                bad.append(False)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = math.nan
            if math.isfinite(f):
                values.append(f)
                bad.append(False)
            else:
                self._log_failure(name, ValueError(f"returned {v!r}, expected a finite number or None"))
                values.append(None)
                bad.append(True)
        return values, bad

    def _log_failure(self, name: str, error: BaseException) -> None:
        if name in self._logged_failure:
            logger.debug("reward %r failed again: %r", name, error)
            return
        self._logged_failure.add(name)
        logger.error(
            "reward %r failed; its samples are None this step (reported as reward/%s_error_frac; "
            "later failures of this reward are logged at DEBUG level)",
            name,
            name,
            exc_info=(type(error), error, error.__traceback__),
        )


class RewardDeadlineError(TimeoutError):
    """A reward call that ran past its `timeout_s`."""


def _call(reward: _BoundReward, prompts: list[str], completions: list[str], arguments: dict[str, Any]) -> Any:
    """The reward's output; with a `timeout_s`, waited for on a worker thread at most that long."""
    timeout = reward.spec.timeout_s
    if timeout is None:
        return reward.fn(prompts, completions, **arguments)
    box: list[Any] = []

    def work() -> None:
        try:
            box.append((True, reward.fn(prompts, completions, **arguments)))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller below
            box.append((False, e))

    thread = threading.Thread(target=work, name=f"reward-{reward.spec.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:  # still running: the step goes on without it (the daemon thread cannot block exit)
        raise RewardDeadlineError(f"reward {reward.spec.name!r} did not return within timeout_s={timeout}")
    ok, value = box[0]
    if not ok:
        raise value
    return value


async def _bounded(name: str, awaitable: Any, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise RewardDeadlineError(f"reward {name!r} did not return within timeout_s={timeout}") from None


def _bind(spec: RewardSpec, reward: Reward) -> _BoundReward:
    """Check ``spec.kwargs`` against the function's signature and work out which columns it takes."""
    fn = reward.fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: pass everything
        return _BoundReward(spec, fn, reward.metrics, True, frozenset(), frozenset())
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    if len(positional) < 2 and not has_var_positional:
        raise RewardConfigError(
            f"reward {spec.name!r} must take (prompts, completions, **columns); its signature is {sig}"
        )
    named = [p for p in positional[2:] if p.kind is not p.POSITIONAL_ONLY]
    named += [p for p in params if p.kind is p.KEYWORD_ONLY]
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    names = {p.name for p in named}
    unknown = set(spec.kwargs) - names
    if unknown and not takes_all:
        raise RewardConfigError(
            f"reward {spec.name!r} takes no option {sorted(unknown)}; its signature is {sig}"
        )
    required = {p.name for p in named if p.default is p.empty} - set(spec.kwargs)
    return _BoundReward(spec, fn, reward.metrics, takes_all, frozenset(names), frozenset(required))


def _await_all(pending: dict[str, Any]) -> dict[str, Any]:
    """Run the async rewards concurrently; an exception stays attached to its reward."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*pending.values(), return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        outs = asyncio.run(gather())
    else:  # called from inside an event loop (a notebook): run ours on a thread of its own
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(asyncio.run(gather())))
        thread.start()
        thread.join()
        outs = box[0]
    return dict(zip(pending, outs))
