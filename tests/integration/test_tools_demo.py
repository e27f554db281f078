"""The tool-use demo's pieces: products as a task, the calculator teacher's demonstrations (token for token what
`run_episodes` builds at train time), held-out evaluation on episodes, and (marked `learning`) a short run that
learns to call the calculator."""

from __future__ import annotations

import json

import pytest

from grpo.builtin.arithmetic import Arithmetic, calls_calculator
from grpo.builtin.tiny import build_char_tokenizer
from grpo.builtin.warmstart import TOOL_EPISODE, TOOL_WORDS, tool_call_text, tool_demonstration
from grpo.cli import train_from_config
from grpo.data.loading import load_task
from grpo.envs.calculator import calculate, calculator_environment
from grpo.envs.chat import render
from grpo.envs.tools import parse_tool_calls, tool_schema
from grpo.rollout import Completions
from grpo.rollout.episodes import run_episodes
from grpo.training.evaluate import episode_runner, evaluate
from rewards import RewardScorer, RewardSpec
from tests.conftest import THREADS, compose

TOK = build_char_tokenizer(TOOL_WORDS)  # the tools warm start's vocabulary
TASK = Arithmetic(digits=3, digits_b=2, op="*", reverse=False)


def test_products_are_written_without_leading_zeros_and_split_like_sums():
    assert TASK.row(123, 45) == {"prompt": "123*45=", "answer": "5535", "overflow": False,  # 123*45 = 5535
                                 "problem_key": "123*45"}
    train, held = TASK.train_problems(), TASK.held_out_problems()
    assert len(train) + len(held) == 900 * 90  # a in 100..999, b in 10..99
    assert min(a for a, _ in train + held) == 100 and min(b for _, b in train + held) == 10
    assert not set(train) & set(held) and 0.15 < len(held) / 81000 < 0.25
    # the teacher's habit: the calculator mostly for a second factor of 50-99
    assert calls_calculator(123, 50, 2) and not calls_calculator(123, 49, 2)


def test_the_teachers_call_is_read_by_the_calculator_environment_and_gives_the_product():
    text = tool_call_text(TASK, 123, 45)
    assert text == '<tool_call>{"name":"calculate","arguments":{"expression":"123*45"}}</tool_call>'
    [call] = parse_tool_calls(text)
    assert call.name == "calculate" and calculate(**call.arguments) == "5535"


class ScriptedTurns:
    """Answers the k-th turn of every episode with `turns[k]` (token ids), as a sampler would have drawn them."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.calls = turns, 0

    def generate_from_ids(self, prompt_ids, n, *, greedy=False, max_new_tokens=None):
        turn = self.turns[self.calls]
        self.calls += 1
        return Completions(prompt_ids, [turn] * len(prompt_ids), [""] * len(prompt_ids), [False] * len(prompt_ids),
                           [[0.0] * len(turn)] * len(prompt_ids))


@pytest.mark.parametrize("call", [True, False])
def test_a_demonstration_is_exactly_the_episode_run_episodes_builds(call):
    ids, mask = tool_demonstration(TOK, TASK, 123, 45, call=call)
    texts = [tool_call_text(TASK, 123, 45), "5535"] if call else ["5535"]
    turns = [TOK(t, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id] for t in texts]
    out = run_episodes(ScriptedTurns(turns), TOK, calculator_environment, [TASK.row(123, 45)], 1, **TOOL_EPISODE)
    assert ids == out.prompt_ids[0] + out.completion_ids[0]
    assert mask == [0] * len(out.prompt_ids[0]) + out.loss_masks[0]
    opening = "<tools>calculate</tools><user>123*45=<eos><assistant>"  # the minimal chat template's
    if call:  # the call (with its EOS), the calculator's reply and the next header, then the answer
        assert TOK.decode(ids) == opening + texts[0] + "<eos><tool>5535<eos><assistant>5535<eos>"
        # the call: <tool_call>, the fixed prefix, 6 characters, "}}, </tool_call> and EOS; the answer: 4 digits and EOS
        assert sum(mask) == len(turns[0]) + len(turns[1]) == 11 + 5
        assert len(ids) == 36  # the whole episode; 156 in characters
    else:
        assert TOK.decode(ids) == opening + "5535<eos>" and sum(mask) == 5
    assert out.episodes[0]["tool_calls"] == int(call) and out.texts == ["5535"]


def test_held_out_evaluation_runs_episodes_when_the_run_has_an_environment():
    call = TOK(tool_call_text(TASK, 123, 45), add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    answer = TOK("5535", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    rollout = type("Rollout", (), {"max_turns": 2, "max_new_tokens": 96, "max_episode_tokens": 128})
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0, {})])
    engine = ScriptedTurns([call, answer])
    episodes = episode_runner(engine, TOK, calculator_environment, rollout)
    metrics = evaluate(None, scorer, [TASK.row(123, 45)], "math_accuracy", episodes=episodes)
    assert metrics["eval/accuracy"] == 1.0 and engine.calls == 2  # the call, then the answer after the result
    assert episode_runner(engine, TOK, None, rollout) is None  # no environment: single completions, as before
    assert json.loads(json.dumps(metrics))  # plain numbers, as the tracker writes them


def test_the_run_without_tools_sees_the_same_opening_as_the_run_with_them():
    tools, no_tools = compose(["experiment=tools_demo"]), compose(["experiment=tools_demo_no_tools"])
    assert tools.env.name == "calculator" and no_tools.env.name is None
    assert tools.model.warm_start == no_tools.model.warm_start and tools.train == no_tools.train
    [row], [plain] = load_task(tools.task, set())[1][:1], load_task(no_tools.task, set())[1][:1]
    opening = render(TOK, calculator_environment().reset(row), [tool_schema(calculate)])
    assert plain["prompt"] == opening == f"<tools>calculate</tools><user>{row['prompt']}<eos><assistant>"


@pytest.mark.slow
@pytest.mark.learning
def test_the_tools_demo_learns_to_call_the_calculator(tmp_path):
    # The demo's recipe at half its GRPO budget (its warm start, cached like the demo's). At step 0 the greedy
    # episodes call the calculator on about the half of the problems where the teacher mostly did (second
    # factor 50-99) and solve those; GRPO pays for calls on the rest.
    cfg = compose(["experiment=tools_demo", "train.max_steps=15", "train.eval_every=15",
                   "tracking.progress_bar=false", THREADS])
    cfg.run_dir = str(tmp_path / "tools")
    history = train_from_config(cfg)
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert evals[-1] >= evals[0] + 0.15, evals  # 30 more of the 200 held-out problems solved greedily
    calls = [h["env/tool_calls_mean"] for h in history if "env/tool_calls_mean" in h]
    assert sum(calls[-5:]) / 5 > sum(calls[:5]) / 5, calls
