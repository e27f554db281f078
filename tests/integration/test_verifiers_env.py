"""verifiers' environments (grpo/envs/adapters/verifiers.py) on tasksets built in code from the library's own
classes (tests/integration/verifiers_tasksets.py): the rubric's weights, the dataset and its held-out split, tools
and stop conditions, an environment that raises, token parity across turns, `env=verifiers` through the real loop;
and per-row environments (grpo/envs/routing.py) mixing the calculator and a verifiers taskset in one run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.core.batch import layout_batch
from grpo.envs import Done, Observation, environment_factory
from grpo.errors import ConfigError
from grpo.rollout.episodes import episode_metrics, run_episodes
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.sampling import environment_figures, join_columns
from grpo.training.update import score_logprobs
from rewards.scorer import ScoredBatch
from tests.conftest import compose, requires
from tests.integration.test_episodes import TOK, TURN, ScriptedEngine, train
from tests.integration.test_trainer import pad_probability

HAS_VERIFIERS = importlib.util.find_spec("verifiers") is not None
pytestmark = requires(HAS_VERIFIERS, "verifiers is not installed (pip install -e '.[envs]')")

VF = "grpo.envs.adapters.verifiers:VerifiersEnvironment"
SETS = "tests.integration.verifiers_tasksets"
CALL = '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'


def make(taskset: str, **kwargs):
    return environment_factory(VF, {"load": f"{SETS}:{taskset}", **kwargs})()


def test_a_single_turn_task_is_scored_by_its_rubric_with_its_weights():
    env = make("sums")
    assert env.reset({"prompt": "ignored", "vf_index": 3}) == [{"role": "user", "content": "3+4="}]
    assert env.tools == []
    # correct (weight 1) and even length (weight 0.5): "7" is right and odd, 1*1 + 0.5*0
    assert env.step("7") == Done(1.0, {"correct": 1.0, "even": 0.0})
    assert env.trace.metrics == {"reply_chars": 1.0}
    env.reset({"prompt": "3+4="})  # no vf_index: found by its prompt
    assert env.step("77") == Done(0.5, {"correct": 0.0, "even": 1.0})  # 1*0 + 0.5*1


def test_an_environment_built_in_code_is_played_through_its_taskset():
    env = make("sums_env")  # a vf.SingleAgentEnv over the sums taskset
    assert env.reset({"vf_index": 3}) == [{"role": "user", "content": "3+4="}]
    assert env.step("7") == Done(1.0, {"correct": 1.0, "even": 0.0})


def test_the_taskset_is_the_dataset_with_its_last_tasks_held_out():
    splits = environment_factory(VF, {"load": f"{SETS}:sums"})().rows(f"{SETS}:sums", num_eval=2)
    # 12 tasks a+(a+1)=2a+1, a = 0..11: the last two held out
    assert [r["vf_index"] for r in splits["train"]] == list(range(10))
    assert splits["test"] == [{"prompt": "10+11=", "answer": "21", "vf_index": 10},
                              {"prompt": "11+12=", "answer": "23", "vf_index": 11}]
    with pytest.raises(ValueError, match="env.kwargs.num_eval: 12 of 12 tasks leaves none"):
        make("sums").rows(f"{SETS}:sums", num_eval=12)


def test_a_tool_task_runs_its_tools_in_process_and_ends_on_its_stop_condition():
    env = make("adds")
    opening = env.reset({"vf_index": 3})
    assert opening == [{"role": "system", "content": "Use the add tool."}, {"role": "user", "content": "3*7="}]
    assert [fn.__name__ for fn in env.tools] == ["add"]
    assert env.step(CALL) == Observation([{"role": "tool", "name": "add", "content": "7"}])
    # the second call fires `two_calls` before the model speaks again: called (weight 2) is 1, correct 0
    assert env.step(CALL.replace("3", "7").replace("4", "14")) == Done(2.0, {"called": 1.0, "correct": 0.0})
    assert env.trace.state.arguments == [[3, 4], [7, 14]] and env.trace.stop_condition == "two_calls"
    again = make("adds")  # a fresh episode: fresh state; a reply without a call ends it
    again.reset({"vf_index": 3})
    assert again.trace.state.calls == 0
    assert isinstance(again.step(CALL), Observation)
    assert again.step("21") == Done(3.0, {"called": 1.0, "correct": 1.0})  # 2*1 + 1*1
    assert again.counts["calls"] == 1


def test_bad_loads_are_errors_naming_the_field():
    for load, message in ((f"{SETS}:not_a_taskset", "gave a list, not a verifiers Taskset"),
                          (f"{SETS}:nowhere", "cannot import"), (None, "expected 'module:function'")):
        with pytest.raises(ValueError, match=f"env.kwargs.load: .*{message}"):
            environment_factory(VF, {"load": load})()
    with pytest.raises(ValueError, match="row: vf_index=99 names no task"):
        make("sums").reset({"prompt": "nope", "vf_index": 99})


def test_an_environment_that_raises_ends_its_own_episodes_and_is_counted():
    # fragiles: scoring raises where the answer is odd (a=1: 1+1+1=3) and scores where it is even (a=2: 2+2+0=4)
    rows = [{"prompt": "", "vf_index": 1}, {"prompt": "", "vf_index": 2}]
    make_env = environment_factory(VF, {"load": f"{SETS}:fragiles"})
    out = run_episodes(ScriptedEngine(TURN), TOK, make_env, rows, 2, max_turns=3, max_episode_tokens=50,
                       max_new_tokens=8)
    ended = [e["ended"] for e in out.episodes]
    assert all(why.startswith("error: step raised: TaskError: task Fragile scoring: ValueError: cannot score 3")
               for why in ended[:2])
    assert ended[2:] == ["done", "done"]
    assert [e["reward"] for e in out.episodes] == [None, None, 0.0, 0.0]  # "ab" is not 4
    assert episode_metrics(out.episodes)["env/errors"] == 2


class ForcedCall:
    """A verifiers tool episode whose first model turn always calls `add` (a random model would not), so that
    the episode has a tool reply between two model turns."""

    def __init__(self):
        self.inner, self.turns = make("adds"), 0
        self.tools, self.counts = self.inner.tools, self.inner.counts

    def reset(self, row):
        return self.inner.reset(row)

    def step(self, text):
        self.turns += 1
        return self.inner.step(text + CALL if self.turns == 1 else text.replace("<tool_call>", ""))


def test_trainer_logprobs_equal_the_samplers_across_a_verifiers_tool_episode(tiny_random_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_random_dir)
    engine = HFRolloutEngine(model, tok, temperature=0.7, max_new_tokens=5)
    rows = [{"prompt": "", "vf_index": i} for i in (0, 3, 5)]  # openings of different lengths: padding differs
    out = run_episodes(engine, tok, ForcedCall, rows, 2, max_turns=2, max_episode_tokens=200, max_new_tokens=5)
    assert [e["ended"] for e in out.episodes] == ["done"] * 6 and all(e["turns"] == 2 for e in out.episodes)
    assert all(e["reward"] == 2.0 for e in out.episodes)  # called, never correct in five random characters
    batch = layout_batch(out.prompt_ids, out.completion_ids, 2, tok.pad_token_id, out.logprobs, out.loss_masks)
    trainer = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=10_000)  # [N, T-1]
    mask = batch.completion_mask.bool()
    # the tool's reply is in the completion and out of the loss
    assert mask.sum() == sum(map(sum, out.loss_masks)) < sum(map(len, out.completion_ids))
    p_pad = pad_probability(model, batch, model.config.pad_token_id, temperature=0.7)  # the sampler's renormalisation
    torch.testing.assert_close(trainer[mask] - torch.log1p(-p_pad[mask]), batch.sampler_logprobs[mask],
                               atol=2e-5, rtol=0)


def test_env_verifiers_config_takes_the_tasksets_rows_as_the_task():
    cfg = compose(["env=verifiers", f"env.kwargs.load={SETS}:sums"])
    assert cfg.env.name == VF and cfg.task.builtin == "env"
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("math_accuracy", 0.0)]
    with pytest.raises(ConfigError, match="task.builtin=env: the rows come from the environment; set env.name"):
        compose(["task.builtin=env"])


def steps_of(lines):
    return [m for m in lines if "train/loss" in m]


@pytest.mark.slow
def test_grpo_train_env_verifiers_logs_each_rubric_function_and_their_weighted_sum(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "vf", "env=verifiers", f"env.kwargs.load={SETS}:sums",
                  "env.kwargs.num_eval=2", "train.max_steps=3", "rollout.max_episode_tokens=40")
    steps = steps_of(lines)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["env/turns_mean"] == 1 and m["env/errors"] == 0 and m["reward/env_none_frac"] == 0
        # every episode's reward is correct + 0.5 * even, so their means over the step are too
        assert m["reward/env_mean"] == pytest.approx(m["reward/correct_mean"] + 0.5 * m["reward/even_mean"],
                                                     abs=1e-9)
        assert m["reward/even_mean"] > 0  # so that the sum shows even's weight (four-character replies: even)
        assert "reward/reply_chars_mean" not in m  # a metric, not a reward


def test_per_environment_figures_are_over_that_environments_episodes_alone():
    records = [{"route": "calc", "scores": {}}, {"route": "calc", "scores": {}},
               {"route": "sums", "scores": {"correct": 1.0, "even": 0.0}},
               {"route": "sums", "scores": {"correct": 0.0, "even": 1.0}}]
    columns = environment_figures(records, [1.0, 0.0, 1.0, 0.5], taken={"math_accuracy", "env", "even"})
    assert columns == {"calc/total": [1.0, 0.0, None, None], "sums/total": [None, None, 1.0, 0.5],
                       "correct": [None, None, 1.0, 0.0], "sums/correct": [None, None, 1.0, 0.0],
                       "env_even": [None, None, 0.0, 1.0], "sums/even": [None, None, 0.0, 1.0]}
    stats = ScoredBatch(total=[], per_reward=columns).metrics()
    # calc: (1 + 0) / 2; sums: (1 + 0.5) / 2
    assert stats["reward/calc/total_mean"] == 0.5 and stats["reward/sums/total_mean"] == 0.75
    # two batches where one lacks a column: None fills it
    assert join_columns({"a": [1.0]}, 1, {"b": [2.0, 3.0]}, 2) == {"a": [1.0, None, None], "b": [None, 2.0, 3.0]}


ROUTES = ("env.kwargs.routes={calc: {name: calculator}, sums: {name: '" + VF + "', kwargs: {load: '"
          + SETS + ":sums'}}}")


def test_a_rows_column_chooses_its_environment_and_a_group_never_mixes_them():
    make_env = environment_factory("routed", {"routes": {"calc": {"name": "calculator"},
                                                         "sums": {"name": VF, "kwargs": {"load": f"{SETS}:sums"}},
                                                         "adds": {"name": VF, "kwargs": {"load": f"{SETS}:adds"}}}})
    rows = [{"prompt": "2+2=", "env": "calc", "vf_index": 0}, {"prompt": "", "env": "sums", "vf_index": 3},
            {"prompt": "", "env": "adds", "vf_index": 1}, {"prompt": "1+1=", "env": "nowhere", "vf_index": 0}]
    out = run_episodes(ScriptedEngine(TURN), TOK, make_env, rows, 2, max_turns=3, max_episode_tokens=80,
                       max_new_tokens=8)
    assert [e["route"] for e in out.episodes] == ["calc", "calc", "sums", "sums", "adds", "adds", None, None]
    # the calculator leaves the reward to the task; "ab" is wrong and of even length: sums 1 * 0 + 0.5 * 1,
    # adds 1 * 0 (wrong) + 2 * 0 (no call)
    assert [e["reward"] for e in out.episodes[:6]] == [None, None, 0.5, 0.5, 0.0, 0.0]
    assert out.episodes[6]["ended"].startswith("error: reset raised: ValueError: row: its 'env' column is 'nowhere'")
    # each row's opening shows the tools of the environment its column chose
    assert TOK.decode(out.prompt_ids[0]).startswith("<tools>calculate</tools><user>2+2=")
    assert TOK.decode(out.prompt_ids[1]).startswith("<user>3+4=")
    assert TOK.decode(out.prompt_ids[2]).startswith("<tools>add</tools><system>Use the add tool.")


def test_a_row_naming_no_route_is_refused_before_training(tmp_path, tiny_random_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2", "env": "calc"}) + "\n"
                    + json.dumps({"prompt": "1+2=", "answer": "3", "env": "sum"}) + "\n")
    with pytest.raises(ConfigError, match="task \\(train split\\): row 1: its 'env' column is 'sum'; "
                                          "env.kwargs.routes has calc, sums"):
        train(tmp_path, tiny_random_dir, "typo", "env=routed", ROUTES, "task.builtin=null", f"task.train_file={data}",
              "train.max_steps=1")


@pytest.mark.slow
def test_a_run_mixing_the_calculator_and_a_verifiers_taskset_by_row(tmp_path, tiny_random_dir):
    sums = make("sums").rows(f"{SETS}:sums")["train"]
    rows = [{**r, "env": "sums"} for r in sums[:4]] + [
        {"prompt": f"{a}+{a}=", "answer": str(2 * a), "vf_index": 0, "env": "calc"} for a in range(4)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = train(tmp_path, tiny_random_dir, "mixed", "env=routed", ROUTES, "task.builtin=null",
                  f"task.train_file={data}", "train.max_steps=3",
                  "rollout.max_episode_tokens=40", "train.prompts_per_step=4")
    steps = steps_of(lines)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["env/errors"] == 0
        # sums' episodes carry their rubric's parts, the calculator's none
        assert {"reward/sums/total_mean", "reward/sums/correct_mean", "reward/sums/even_mean"} <= m.keys()
        assert not any(k.startswith("reward/calc/") and "total" not in k for k in m)
    assert any("reward/calc/total_mean" in m for m in steps)
