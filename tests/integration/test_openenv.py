"""OpenEnv's environments (grpo/envs/adapters/openenv.py) run through OpenEnv's own app and client: episodes by
hand on both transports (the return as the Done reward, the observation as the next user turn, the row's seed and
columns reaching reset), the sampler's log-probs equal to the trainer's over a served environment's turns, an
environment that raises ending its episode alone, the server stopped with the run (also when the trainer is
killed), and `env=openenv` through the real GRPO loop over HTTP. The environments are in openenv_envs.py."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.cli import train_from_config
from grpo.core.batch import layout_batch
from grpo.envs import Done, Environment, Observation, end_run, environment_factory
from grpo.envs.chat import render
from grpo.errors import ConfigError
from grpo.model.loading import load_tokenizer
from grpo.rollout.episodes import episode_metrics, run_episodes
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.update import score_logprobs
from tests.conftest import ROOT, compose, requires
from tests.integration.test_episodes import train
from tests.integration.test_trainer import pad_probability

HAS_OPENENV = importlib.util.find_spec("openenv") is not None
openenv_adapter = importlib.import_module("grpo.envs.adapters.openenv") if HAS_OPENENV else None
pytestmark = requires(HAS_OPENENV, "openenv-core is not installed (pip install -e '.[envs]')")

OPENENV = "grpo.envs.adapters.openenv:OpenEnvEnvironment"
ANSWER = "grpo.envs.adapters.openenv_answer:AnswerEnvironment"
ENVS = "tests.integration.openenv_envs"
ECHO = {"environment": f"{ENVS}:Echo", "observation_field": "echoed_message"}
TRANSPORTS = ["inprocess", "http"]


@pytest.fixture(autouse=True)
def servers_stop():
    """Each test's servers stop at its end, as a run's do, so no test reuses another's."""
    yield
    end_run()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_answer_episodes_by_hand_score_the_return_on_both_transports(transport):
    make = environment_factory(OPENENV, {"environment": ANSWER, "transport": transport})
    env = make()
    assert isinstance(env, Environment) and env.tools == []
    row = {"prompt": "12+34=", "answer": "46"}
    assert env.reset(row) == [{"role": "user", "content": "12+34="}]  # the observation's only field, as text
    assert env.step("45") == Observation([{"role": "user", "content": "Wrong. Try again."}])
    assert env.step("so it is 46") == Done(0.5)  # 0 for the wrong answer + 1/2 for the right second one
    env.close()
    for turns, reward in ((["46"], 1.0), (["1", "2"], 0.0)):
        env = make()
        env.reset(row)
        results = [env.step(t) for t in turns]
        assert results[-1] == Done(reward) and all(isinstance(r, Observation) for r in results[:-1])
        env.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_return_sums_every_steps_reward_and_the_observation_is_the_next_user_turn(transport):
    env = environment_factory(OPENENV, {**ECHO, "transport": transport, "system": "Echo."})()
    assert env.reset({"prompt": "1+1="}) == [{"role": "system", "content": "Echo."},
                                            {"role": "user", "content": "Echo environment ready!"}]
    assert env.step("abc") == Observation([{"role": "user", "content": "abc"}])
    assert env.step("d") == Done(0.5)  # two steps of 0.25 each, summed (the last alone would be 0.25)
    env.close()
    # without observation_field, the observation's two fields are shown as JSON
    env = environment_factory(OPENENV, {"environment": f"{ENVS}:Echo", "transport": transport})()
    env.reset({"prompt": "1+1="})
    assert env.step("ab") == Observation([{"role": "user", "content": '{"echoed_message": "ab", "message_length": 2}'}])
    env.close()


def test_the_rows_seed_and_the_columns_reset_names_reach_it():
    make = environment_factory(OPENENV, {**ECHO, "transport": "inprocess"})
    a, b, c = make(), make(), make()
    a.reset({"prompt": "12+34=", "answer": "46"})
    b.reset({"prompt": "12+34=", "answer": "46"})
    c.reset({"prompt": "5+5=", "seed": 7, "answer": "10"})
    # reset names seed and prompt, not answer; one row's episodes get one seed (a hash of the prompt), a
    # `seed` column is the seed
    assert a.session.env.seen == b.session.env.seen == {"seed": a.session.env.seen["seed"], "prompt": "12+34="}
    assert isinstance(a.session.env.seen["seed"], int)
    assert c.session.env.seen == {"seed": 7, "prompt": "5+5="}


def test_bad_settings_are_errors_naming_the_field():
    cases = [({**ECHO, "transport": "docker"}, "env.kwargs.transport: 'docker' is not one of http, inprocess"),
             ({"environment": "grpo.envs.tools:ToolEnvironment"}, "env.kwargs.environment: .* is not a subclass"),
             ({**ECHO, "action_field": "text"}, "env.kwargs.action_field: 'text' is not a field of EchoAction"),
             ({"environment": f"{ENVS}:OneSession"}, "env.kwargs.environment: .*OneSession does not set "
                                                     "SUPPORTS_CONCURRENT_SESSIONS")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            environment_factory(OPENENV, kwargs)()
    env = environment_factory(OPENENV, {**ECHO, "observation_field": "nope", "transport": "inprocess"})()
    with pytest.raises(ValueError, match="env.kwargs.observation_field: 'nope' is not in the observation "
                                         r"\(echoed_message, message_length\)"):
        env.reset({"prompt": "1"})


def test_env_openenv_config_weighs_the_task_reward_zero():
    cfg = compose(["env=openenv"])
    assert cfg.env.name == OPENENV and cfg.env.kwargs == {"environment": ANSWER, "transport": "http"}
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("math_accuracy", 0.0)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_environment_that_raises_ends_its_episode_alone(transport, tiny_random_dir):
    tok = load_tokenizer(tiny_random_dir)
    engine = HFRolloutEngine(AutoModelForCausalLM.from_pretrained(tiny_random_dir), tok, max_new_tokens=4)
    make = environment_factory(OPENENV, {"environment": f"{ENVS}:Raising", "transport": transport,
                                         "observation_field": "echoed_message"})
    rows = [{"prompt": "1+1="}, {"prompt": "2+2="}, {"prompt": "9+9="}]  # step raises, none, reset raises
    out = run_episodes(engine, tok, make, rows, 2, max_turns=2, max_episode_tokens=100, max_new_tokens=4)
    ended = [e["ended"] for e in out.episodes]
    assert [e.split(":")[0:2] for e in ended] == [["error", " step raised"]] * 2 + [["done"]] * 2 + \
        [["error", " reset raised"]] * 2
    assert "step broke" in ended[0] and "reset broke" in ended[-1]  # in process, or the server's error message
    assert [e["reward"] for e in out.episodes] == [None, None, 0.5, 0.5, None, None]
    assert episode_metrics(out.episodes)["env/errors"] == 4


def test_trainer_logprobs_equal_the_samplers_over_a_served_environments_turns(tiny_random_dir):
    # test_episodes.py's parity check, the environment's replies coming from OpenEnv's server: the echo of the
    # model's own text, tokenised afresh as environment tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    tok = load_tokenizer(tiny_random_dir)
    engine = HFRolloutEngine(model, tok, temperature=0.7, max_new_tokens=5)
    rows = [{"prompt": "1+1="}, {"prompt": "12+345="}, {"prompt": "9="}]
    out = run_episodes(engine, tok, environment_factory(OPENENV, {**ECHO, "transport": "http"}), rows, 2,
                       max_turns=2, max_episode_tokens=200, max_new_tokens=5)
    assert [e["ended"] for e in out.episodes] == ["done"] * 6 and all(e["turns"] == 2 for e in out.episodes)
    batch = layout_batch(out.prompt_ids, out.completion_ids, 2, tok.pad_token_id, out.logprobs, out.loss_masks)
    trainer = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=10_000)  # [N, T-1]
    mask = batch.completion_mask.bool()
    assert mask.sum() == sum(map(sum, out.loss_masks)) and mask.sum() < sum(map(len, out.completion_ids))
    p_pad = pad_probability(model, batch, model.config.pad_token_id, temperature=0.7)
    torch.testing.assert_close(trainer[mask] - torch.log1p(-p_pad[mask]), batch.sampler_logprobs[mask],
                               atol=2e-5, rtol=0)


def test_the_opening_reaches_the_model_rendered_by_the_chat_template(tiny_random_dir):
    tok = load_tokenizer(tiny_random_dir)
    env = environment_factory(OPENENV, {"environment": ANSWER, "transport": "inprocess"})()
    assert render(tok, env.reset({"prompt": "12+34=", "answer": "46"})) == "<user>12+34=<eos><assistant>"


KILLED = """
import sys, time
from grpo.envs import environment_factory
from grpo.envs.adapters import openenv
env = environment_factory("{openenv}", {{"environment": "{env}"}})()
print(next(iter(openenv.SERVERS.values())).process.pid, flush=True)
time.sleep(600)
"""


def test_the_server_dies_with_a_killed_trainer():
    script = KILLED.format(openenv=OPENENV, env=f"{ENVS}:Echo")
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    pid = None
    try:
        pid = int(trainer.stdout.readline())
        assert alive(pid)
        trainer.send_signal(signal.SIGKILL)  # no exit handler runs
        trainer.wait()
        deadline = time.monotonic() + 15  # the parent-death signal is at once; the watcher's poll within 0.5 s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the OpenEnv server outlived its trainer"
    finally:
        trainer.kill()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_grpo_train_env_openenv_over_http_runs_steps_with_its_reward_and_stops_its_server(
        tmp_path, tiny_random_dir, monkeypatch):
    pids = tmp_path / "pids"
    monkeypatch.setenv("GRPO_TEST_OPENENV_PIDS", str(pids))
    lines = train(tmp_path, tiny_random_dir, "openenv", "env=openenv", f"env.kwargs.environment={ENVS}:Echo",
                  "+env.kwargs.observation_field=echoed_message", "train.max_steps=3",
                  "rollout.max_episode_tokens=100")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        # every episode: the opening, a turn, the echo as the next user turn, a turn, done; 0.25 + 0.25
        assert m["env/turns_mean"] == 2 and m["env/errors"] == 0 and m["env/truncated_frac"] == 0
        assert m["reward/env_mean"] == pytest.approx(0.5, abs=1e-9) and m["reward/env_none_frac"] == 0
        assert m["train/reward_mean"] == pytest.approx(0.5, abs=1e-6)  # the task's check weighs 0
        # the sampler's log-probs are the trainer's but for the renormalisation without pad (test_episodes.py)
        assert 0 < m["rollout/logprob_abs_diff"] < 0.02
    served = {int(p) for p in pids.read_text().split()}
    assert served and os.getpid() not in served  # the environments ran in the server process, not here
    assert not any(alive(p) for p in served), "an OpenEnv server outlived its run"


def test_a_run_that_fails_while_it_is_built_stops_the_server_it_started(tmp_path, monkeypatch):
    # the environment (and its server) is built first, the model after it: a model path that does not exist
    # fails the run with the server already up (and no session opened on it yet)
    started = []
    real_start = openenv_adapter.start_server
    monkeypatch.setattr(openenv_adapter, "start_server", lambda *a: started.append(real_start(*a)) or started[-1])
    cfg = compose(["env=openenv", f"env.kwargs.environment={ENVS}:Echo", "model=hf",
                   f"model.path={tmp_path / 'no_model'}", "tracking.progress_bar=false"])
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="no_model does not exist"):
        train_from_config(cfg)
    assert len(started) == 1 and not alive(started[0].process.pid), "an OpenEnv server outlived its failed run"
