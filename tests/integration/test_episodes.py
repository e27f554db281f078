"""Multi-turn episodes: how an episode ends and what its completion holds (a scripted engine, by hand),
the trainer's log-probs of the model's tokens against the sampler's across turns (the single-turn parity
test of tests/integration/test_trainer.py, extended), no gradient through environment tokens, and `env=...` through
the real loop."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.backends.torch_backend import TorchBackend
from grpo.builtin.tiny import build_char_tokenizer
from grpo.cli import train_from_config
from grpo.config import AlgorithmConfig
from grpo.core.batch import layout_batch
from grpo.envs import Done, Observation
from grpo.envs.calculator import calculate
from grpo.envs.tools import ToolEnvironment
from grpo.errors import ConfigError
from grpo.rollout import Completions
from grpo.rollout.episodes import episode_metrics, run_episodes
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.sampling import add_env_reward
from grpo.training.update import score_logprobs, update_policy
from tests.conftest import THREADS, compose
from tests.integration.test_trainer import pad_probability


class Chatty:
    """Replies "go" to the model's first `turns - 1` turns, then ends with reward 1 for an even-length last
    turn (a signal on a random model)."""

    tools = []

    def __init__(self, turns: int = 3):
        self.turns, self.steps = turns, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.steps += 1
        if self.steps >= self.turns:
            return Done(float(len(text) % 2 == 0))
        return Observation([{"role": "user", "content": "go"}])


CALLS = '<tool_call>{"name": "calculate", "arguments": {"expression": "2*3"}}</tool_call><tool_call>{</tool_call>'


class CallsOnce:
    """On the model's first turn, whatever it wrote, one good `calculate` call and one malformed; its second
    turn ends the episode, scored 1 for an even length."""

    def __init__(self):
        self.toolbox = ToolEnvironment([calculate], score=lambda text, row: float(len(text) % 2 == 0))
        self.tools, self.counts, self.turns = self.toolbox.tools, self.toolbox.counts, 0

    def reset(self, row):
        return self.toolbox.reset(row)

    def step(self, text):
        self.turns += 1
        calls = CALLS if self.turns == 1 else ""
        return self.toolbox.step(text.replace("<tool_call>", "") + calls)


class ScriptedEngine:
    """Answers every context with the same turn of token ids, cut at `max_new_tokens`."""

    def __init__(self, turn: list[int]):
        self.turn = turn

    def generate_from_ids(self, prompt_ids, n, *, greedy=False, max_new_tokens=None):
        ids = [self.turn[:max_new_tokens] for _ in prompt_ids]
        return Completions(prompt_ids, ids, [""] * len(ids), [len(self.turn) > max_new_tokens] * len(ids),
                           [[-0.5] * len(i) for i in ids])


TOK = build_char_tokenizer()
TURN = [*TOK("ab", add_special_tokens=False)["input_ids"], TOK.eos_token_id]  # "ab<eos>": 3 tokens
ENV = "<user>go<eos><assistant>"  # the environment's text after a turn that ended with EOS: 6 + 2 + 1 + 11 = 20 tokens


def episode(turns: int, *, max_turns: int = 5, budget: int = 200):
    envs = []

    def make():
        envs.append(Chatty(turns))
        return envs[-1]

    out = run_episodes(ScriptedEngine(TURN), TOK, make, [{"prompt": "1+2="}], 1, max_turns=max_turns,
                       max_episode_tokens=budget, max_new_tokens=8)
    return out, envs[0]


def test_an_episode_is_the_models_tokens_as_sampled_and_only_the_new_environment_text():
    out, env = episode(2)
    assert TOK.decode(out.prompt_ids[0]) == "<user>1+2=<eos><assistant>"
    assert TOK.decode(out.completion_ids[0]) == "ab<eos>" + ENV + "ab<eos>"
    assert out.completion_ids[0] == TURN + TOK(ENV, add_special_tokens=False)["input_ids"] + TURN
    assert out.loss_masks[0] == [1] * 3 + [0] * 20 + [1] * 3
    assert out.logprobs[0] == [-0.5] * 3 + [0.0] * 20 + [-0.5] * 3
    assert out.texts == ["ab"] and out.truncated == [False]
    assert out.episodes == [{"turns": 2, "tool_calls": 0, "tool_errors": 0, "truncated": False, "reward": 1.0,
                             "ended": "done", "scores": {}, "route": None}]


@pytest.mark.parametrize("turns, max_turns, budget, length, steps, truncated", [
    (2, 5, 26, 26, 2, False),  # the last turn fills the budget exactly and ends with EOS: Done is heard
    (9, 2, 200, 26, 2, True),  # max_turns: the second turn is the last, without Done
    (9, 5, 25, 25, 1, True),  # the second turn is cut at 2 of its 3 tokens: not shown to the environment
    (9, 5, 23, 3, 1, True),  # 3 + 20 environment tokens leave no room for a model token: not appended
])
def test_an_episode_ends_at_done_max_turns_or_its_token_budget(turns, max_turns, budget, length, steps, truncated):
    out, env = episode(turns, max_turns=max_turns, budget=budget)
    assert len(out.completion_ids[0]) == length <= budget
    assert env.steps == steps and out.truncated == [truncated]
    assert out.episodes[0]["reward"] == (None if truncated else 1.0)  # a truncated episode: no env reward


class Closing(Chatty):
    """Chatty that counts its `close()` calls; `fail` names the method that raises ("reset", "step", "close")."""

    def __init__(self, turns: int, fail: str | None = None):
        super().__init__(turns)
        self.fail, self.closes = fail, 0

    def reset(self, row):
        if self.fail == "reset":
            raise RuntimeError("reset failed")
        return super().reset(row)

    def step(self, text):
        if self.fail == "step":
            raise RuntimeError("step failed")
        return super().step(text)

    def close(self):
        self.closes += 1
        if self.fail == "close":
            raise OSError("close failed")


def closing_episodes(*specs: tuple[int, str | None]):
    """One row, an episode per (turns, fail); returns the environments and, per engine call, how many times each
    had been closed by then."""
    envs, seen = [], []
    specs_left = iter(specs)

    def make():
        envs.append(Closing(*next(specs_left)))
        return envs[-1]

    class Watching(ScriptedEngine):
        def generate_from_ids(self, prompt_ids, n, **kwargs):
            seen.append([e.closes for e in envs])
            return super().generate_from_ids(prompt_ids, n, **kwargs)

    def run():
        return run_episodes(Watching(TURN), TOK, make, [{"prompt": "1+2="}], len(specs), max_turns=5,
                            max_episode_tokens=200, max_new_tokens=8)

    return envs, seen, run


def test_each_environment_is_closed_once_as_its_episode_ends_and_an_environment_error_ends_its_episode_alone(
        caplog):
    envs, seen, run = closing_episodes((1, None), (3, None))
    run()
    assert seen == [[0, 0], [1, 0], [1, 0]] and [e.closes for e in envs] == [1, 1]  # the first, after its 1 turn
    for failing in ("reset", "step"):
        envs, seen, run = closing_episodes((3, None), (3, failing), (3, None))
        out = run()
        # the failing one ends at once (reset: no turn; step: after its first turn), with no reward; the
        # others take their 3 turns and end with Done (reward 1: "ab" has even length)
        assert [r["turns"] for r in out.episodes] == [3, 0 if failing == "reset" else 1, 3]
        assert out.episodes[1]["ended"] == f"error: {failing} raised: RuntimeError: {failing} failed"
        assert [r["reward"] for r in out.episodes] == [1.0, None, 1.0]
        assert episode_metrics(out.episodes)["env/errors"] == 1
        assert [e.closes for e in envs] == [1, 1, 1]  # every one built, once
        assert f"an episode ends with no reward: {failing} raised" in caplog.text
    envs, seen, run = closing_episodes((1, "close"), (2, None))
    assert run().episodes[1]["turns"] == 2  # a close() that raises is logged, and the rollout goes on
    assert [e.closes for e in envs] == [1, 1] and "Closing.close() raised" in caplog.text


def test_episode_metrics_and_the_env_reward_in_the_total():
    records = [{"turns": 3, "tool_calls": 4, "tool_errors": 1, "truncated": False, "reward": 1.0},
               {"turns": 1, "tool_calls": 0, "tool_errors": 0, "truncated": True, "reward": None}]
    assert episode_metrics(records) == {"env/turns_mean": 2.0, "env/tool_calls_mean": 2.0,
                                        "env/tool_error_frac": 0.25, "env/truncated_frac": 0.5,
                                        "env/timeout_frac": 0.0, "env/errors": 0}
    # task total + 0.5 * env; a None on one side is left out, on both sides the total is None
    assert add_env_reward([1.0, None, 2.0, None], [1.0, 1.0, None, None], 0.5) == [1.5, 0.5, 2.0, None]


def test_layout_masks_the_environment_tokens_out_of_the_loss():
    batch = layout_batch([[5, 6]], [[1, 2, 3, 4], [7, 8]], 2, pad_id=0, loss_masks=[[1, 0, 0, 1], [1, 1]])
    # P = 2: column t scores token t+1, so the completion's tokens are columns 1..4
    assert batch.completion_mask.tolist() == [[0, 1, 0, 0, 1], [0, 1, 1, 0, 0]]


def sample(model_dir, turns=3, temperature=0.7):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = HFRolloutEngine(model, tok, temperature=temperature, max_new_tokens=5)
    rows = [{"prompt": "1+1="}, {"prompt": "12+345="}, {"prompt": "9="}]  # different lengths: padding differs
    out = run_episodes(engine, tok, lambda: Chatty(turns), rows, 2, max_turns=turns, max_episode_tokens=200,
                       max_new_tokens=5)
    batch = layout_batch(out.prompt_ids, out.completion_ids, 2, tok.pad_token_id, out.logprobs, out.loss_masks)
    return model, out, batch


def test_trainer_logprobs_equal_the_samplers_across_turns(tiny_random_dir):
    model, out, batch = sample(tiny_random_dir)
    assert all(e["turns"] == 3 for e in out.episodes)  # three model turns, two environment replies each
    trainer = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=10_000)  # [N, T-1]
    mask = batch.completion_mask.bool()
    assert mask.sum() == sum(map(sum, out.loss_masks)) and mask.sum() < sum(map(len, out.completion_ids))
    p_pad = pad_probability(model, batch, model.config.pad_token_id, temperature=0.7)  # the sampler's renormalisation
    torch.testing.assert_close(trainer[mask] - torch.log1p(-p_pad[mask]), batch.sampler_logprobs[mask],
                               atol=2e-5, rtol=0)


def test_no_gradient_reaches_the_environment_tokens(tiny_random_dir):
    # The loss's gradient w.r.t. the last hidden state at column t comes from column t's log-prob alone
    # (final norm and head act per position): zero exactly where the environment wrote token t+1.
    model, out, batch = sample(tiny_random_dir)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    grads = []

    def keep_grad(module, inputs, output):
        output.register_hook(grads.append)

    model.model.norm.register_forward_hook(keep_grad)
    update_policy(TorchBackend(model, lr=1e-3), batch, AlgorithmConfig(group_size=2), temperature=0.7,
                  micro_batch_tokens=100_000, max_new_tokens=200)
    (grad,) = grads  # [N, T, H]: one micro-batch, no column trimmed (every column is used by some row)
    assert grad.shape[:2] == batch.input_ids.shape
    norms = grad[:, :-1].norm(dim=-1)  # [N, T-1]
    env = torch.zeros_like(batch.completion_mask)  # columns scoring an environment token
    P = batch.prompt_width
    for i, m in enumerate(out.loss_masks):
        env[i, P - 1 : P - 1 + len(m)] = 1 - torch.tensor(m, dtype=env.dtype)
    assert env.sum() > 0
    assert torch.all(norms[env.bool()] == 0)
    assert torch.all(norms[batch.completion_mask.bool()] > 0)


QUIET = ["tracking.progress_bar=false", THREADS, "model=hf", "model.dtype=float32", "train.eval_before=false",
         "train.eval_every=0", "task.arithmetic.num_eval=4", "task.arithmetic.num_ood=0", "task.arithmetic.num_val=0",
         "train.prompts_per_step=2", "algorithm.group_size=4", "rollout.max_new_tokens=4", "optim.lr=1e-3"]


def train(tmp_path, model_dir, name, *overrides):
    cfg = compose([*QUIET, f"model.path={model_dir}", *overrides])
    cfg.run_dir = str(tmp_path / name)
    train_from_config(cfg)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_train_env_calculator_runs_steps_with_env_metrics(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "calc", "env=calculator", "train.max_steps=2",
                  "rollout.max_episode_tokens=40")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["env/turns_mean"] >= 1
        assert {"env/tool_calls_mean", "env/tool_error_frac", "reward/math_accuracy_mean"} <= m.keys()
        assert m["reward/env_none_frac"] == 1.0  # the calculator leaves the reward to math_accuracy


@pytest.mark.slow
def test_a_multi_turn_run_with_tool_calls_scores_the_models_tokens_as_sampled(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "calls", "env.name=tests.integration.test_episodes:CallsOnce",
                  "train.max_steps=2", "rollout.max_turns=3", "rollout.max_episode_tokens=200",
                  "reward.functions=[{name: 'tests.integration.test_options:parity_reward'}]")
    steps = [m for m in lines if "train/loss" in m]
    assert len(steps) == 2
    for m in steps:
        # two model turns per episode, two tool calls in the first, one of them malformed
        assert m["env/turns_mean"] == 2 and m["env/truncated_frac"] == 0
        assert m["env/tool_calls_mean"] == 2 and m["env/tool_error_frac"] == 0.5
        # the trainer's log-probs are the sampler's, every turn, but for the sampler's renormalisation without pad
        # (-log(1 - p(pad)), about 0.01 on this random model; exact in test_trainer_logprobs_equal_the_samplers_...)
        assert 0 < m["rollout/logprob_abs_diff"] < 0.02
        assert m["reward/env_none_frac"] == 0  # every episode ended with Done and its score


def test_env_settings_are_checked_naming_the_field():
    with pytest.raises(ConfigError, match="rollout.max_turns"):
        compose(["env=calculator", "rollout.max_turns=0"])
    with pytest.raises(ConfigError, match="env.name: multi-turn episodes run in the grpo loop only"):
        compose(["env=calculator", "algorithm=ppo"])
    assert compose(["env=calculator", "rollout=vllm", "model=hf", "model.path=/x"]).rollout.engine == "vllm"
    with pytest.raises(ConfigError, match="rollout.block_size"):
        compose(["rollout=vllm", "rollout.block_size=-1", "model=hf", "model.path=/x"])
    with pytest.raises(ConfigError, match="algorithm.overlong_buffer"):
        compose(["env=calculator", "algorithm.overlong_buffer=2"])
    for bad, field in [("env.max_tool_calls_per_turn=0", "env.max_tool_calls_per_turn: must be > 0"),
                       ("env.episode_timeout_s=-1", "env.episode_timeout_s: must be >= 0"),
                       ("env.workers=0", "env.workers: must be > 0")]:
        with pytest.raises(ConfigError, match=field):
            compose(["env=calculator", bad])


@pytest.mark.slow
def test_a_multi_turn_run_resumed_mid_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_random_dir):
    # episodes of up to three turns with tool calls (CallsOnce), checkpoints every 2 steps; one run straight to
    # step 4, one stopped after step 2 (as if killed) and resumed from its checkpoint
    common = ["env.name=tests.integration.test_episodes:CallsOnce", "rollout.max_turns=3",
              "rollout.max_episode_tokens=120",
              "reward.functions=[{name: 'tests.integration.test_options:parity_reward'}]",
              "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.max_steps=4"]
    straight = train(tmp_path, tiny_random_dir, "straight", *common)
    train(tmp_path, tiny_random_dir, "resumed", *common, "train.max_steps=2")
    resumed = train(tmp_path, tiny_random_dir, "resumed", *common, "resume=auto")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight]  # continuous, nothing doubled
    losses = [[m["train/loss"] for m in lines if "train/loss" in m] for lines in (straight, resumed)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and len(losses[0]) == 4
    assert [m["env/tool_calls_mean"] for m in resumed if "train/loss" in m] == [2, 2, 2, 2]
    wa, wb = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "checkpoints" / "step_4" / "policy")
              for name in ("straight", "resumed"))
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)


class Waits(Chatty):
    """Chatty whose step first waits at `barrier` (None: not at all) and then for `release` (None: not at all)."""

    def __init__(self, barrier=None, release=None, turns=2):
        super().__init__(turns)
        self.barrier, self.release, self.closes = barrier, release, 0

    def step(self, text):
        if self.barrier is not None:
            self.barrier.wait(timeout=3)  # raises BrokenBarrierError unless both episodes step at once
        if self.release is not None:
            self.release.wait()
        return super().step(text)

    def close(self):
        self.closes += 1


def waiting_episodes(envs, **limits):
    made = iter(envs)
    return run_episodes(ScriptedEngine(TURN), TOK, lambda: next(made), [{"prompt": "1+2="}], len(envs), max_turns=5,
                        max_episode_tokens=200, max_new_tokens=8, **limits)


def test_environments_step_at_once_on_the_workers():
    # two episodes whose steps each wait for the other at a barrier: they meet only if they run at once
    barrier = threading.Barrier(2)
    out = waiting_episodes([Waits(barrier), Waits(barrier)], workers=2)
    assert [r["ended"] for r in out.episodes] == ["done", "done"]
    barrier = threading.Barrier(2)
    out = waiting_episodes([Waits(barrier), Waits(barrier)], workers=1, episode_timeout_s=60)
    # one at a time: the first waits its 3 s and breaks the barrier; both steps raise, and only they end
    assert [r["ended"].split(":")[0] for r in out.episodes] == ["error", "error"]


def test_an_episode_past_its_wall_clock_budget_ends_truncated_and_its_environment_closes_when_its_step_returns():
    release = threading.Event()
    stuck, quick = Waits(release=release), Waits(turns=1)
    start = time.monotonic()
    out = waiting_episodes([stuck, quick], workers=2, episode_timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + 5  # the budget, plus slack for two scripted turns
    # the stuck one: its first turn, then the budget ran out in its step; the quick one: Done after one turn
    assert [(r["ended"], r["truncated"], r["turns"]) for r in out.episodes] == [("timeout", True, 1),
                                                                                ("done", False, 1)]
    assert episode_metrics(out.episodes)["env/timeout_frac"] == 0.5
    assert stuck.closes == 0 and quick.closes == 1  # not closed under its running step
    release.set()
    for _ in range(100):
        if stuck.closes:
            break
        time.sleep(0.05)
    assert stuck.closes == 1
