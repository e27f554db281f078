"""The `judge` reward without a model: the reply parser, the cache key, the backoff schedule, and the HTTP failure
paths against a real HTTP server on a thread that answers in the chat-completions format with scripted replies
(the real judge, vLLM serving SmolLM2, is in tests/vllm/test_judge_vllm.py)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo.algorithms.online_dpo import judged_pairs
from rewards import RewardConfigError, RewardScorer, RewardSpec, judge
from rewards.judge import (
    JUDGE,
    PAIR_VERDICTS,
    POINT_VERDICTS,
    JudgeUnavailableError,
    backoff_delays,
    cache_key,
    judge_pairs,
    parse_score,
    probe_pairs,
    settings_from,
    verdict_prob_score,
)

YES_NO = tuple(POINT_VERDICTS.items())
A_B = tuple(PAIR_VERDICTS.items())


class ChatServer:
    """A real HTTP server answering /v1/models and /v1/chat/completions; `reply(body) -> (status, text)` decides
    each chat answer (a list of texts: one per choice; a dict is a whole choice, as `first_token` makes). Records
    every chat request and its headers."""

    def __init__(self, reply: Callable[[dict], tuple[int, str]], models: tuple[str, ...] = ("m",)):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                status, text = reply(body)
                texts = text if isinstance(text, list) else [text] * body.get("n", 1)
                choices = [{"index": i, **t} if isinstance(t, dict) else
                           {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                           for i, t in enumerate(texts)]
                self._send(status, {"choices": choices} if status == 200 else {"error": text})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[ChatServer] = []

    def start(reply, **kw) -> ChatServer:
        servers.append(ChatServer(reply, **kw))
        return servers[-1]

    judge._clients.clear()  # each test its own client: no cache or failure count from another
    JUDGE.metrics()
    yield start
    for s in servers:
        s.close()
    judge._clients.clear()


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def first_token(probs: dict[str, float]) -> dict:
    """A one-token choice as OpenAI and vLLM send it with `logprobs: true`: the token drawn and the top ones."""
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs.items()]
    return {"message": {"role": "assistant", "content": top[0]["token"]}, "finish_reason": "length",
            "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}


# --- pure functions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("reply", "expected"), [
    ("Yes.", 1.0),
    ("no, 2 + 2 is 4", 0.0),
    ("The answer is YES", 1.0),
    ("yes and no", 1.0),  # the first verdict wins
    ("no... well, yes", 0.0),
    ("Nope, eyes closed", None),  # whole words only: "nope" and "eyes" are no verdicts
    ("I cannot tell", None),
])
def test_verdict_words(reply, expected):
    assert parse_score(reply, YES_NO) == expected


def test_a_one_letter_verdict_is_matched_as_written():
    # "a" (the article) comes first; matched case-insensitively it would read as verdict A (1.0)
    assert parse_score("a better answer is B", A_B) == 0.0
    assert parse_score("A", A_B) == 1.0
    assert parse_score("Answer A is right", A_B) == 1.0
    assert parse_score("Both are fine", A_B) is None  # no standalone A or B


@pytest.mark.parametrize(("reply", "expected"), [
    ("7", (7 - 1) / 9),  # scale [1, 10]: (x - lo) / (hi - lo)
    ("Score: 10/10", 1.0),  # the first number
    ("1", 0.0),
    ("2.5 out of 10", 1.5 / 9),
    ("11", None),  # out of range is out of format, not clipped
    ("-3", None),
    ("great", None),
])
def test_numbers_in_a_range(reply, expected):
    score = parse_score(reply, YES_NO, scale=(1.0, 10.0))
    assert score == (None if expected is None else pytest.approx(expected, abs=1e-12))


def ln(p: float) -> float:
    return math.log(p)


@pytest.mark.parametrize(("top", "expected"), [
    ([["Yes", ln(0.6)], [" no", ln(0.2)], ["Maybe", ln(0.1)]], 0.75),  # 0.6 / (0.6 + 0.2); "Maybe" is no verdict
    # the variants of a word add up: yes 0.3 + 0.2 + 0.1 = 0.6 against no 0.2 -> 0.75 (one variant alone: 0.6,
    # 0.2 or 0.1 over itself + 0.2 -> 0.6, 0.5 or 0.333)
    ([["Yes", ln(0.3)], [" yes", ln(0.2)], ["yes\n", ln(0.1)], ["NO", ln(0.2)]], 0.75),
    ([["yes", ln(0.5)], ["Nope", ln(0.4)], ["eyes", ln(0.1)]], 1.0),  # whole tokens: "Nope", "eyes" count for none
    ([["Maybe", ln(0.7)], ["I", ln(0.2)]], None),  # no verdict among the top tokens
    ([["No", -9999.0]], None),  # vLLM's floor for an impossible token: no mass, not a division by zero
])
def test_verdicts_scored_by_probability(top, expected):
    score = verdict_prob_score(top, YES_NO)
    assert score == (None if expected is None else pytest.approx(expected, abs=1e-12))


def test_a_one_letter_verdict_by_probability_is_matched_as_written():
    # "a" (the article) is not verdict A: A 0.25 against B 0.25 -> 0.5; read casefolded, 0.75 / 1.0 = 0.75
    assert verdict_prob_score([["a", ln(0.5)], [" B", ln(0.25)], ["A", ln(0.25)]], A_B) == pytest.approx(0.5)


def test_the_cache_key_is_the_request_not_its_key_order():
    a = {"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 1}
    b = {"n": 1, "messages": [{"content": "q", "role": "user"}], "model": "m"}
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**a, "messages": [{"role": "user", "content": "q "}]})
    assert cache_key(a) != cache_key({**a, "n": 2})


def test_backoff_doubles_up_to_its_cap():
    assert backoff_delays(5, 0.5, 3.0) == [0.5, 1.0, 2.0, 3.0, 3.0]  # 0.5 * 2**k, capped at 3
    assert backoff_delays(0, 0.5, 3.0) == []


@pytest.mark.parametrize(("options", "names"), [
    ({"base_url": None}, "base_url"),  # None: left out, as the reward's signature defaults it
    ({"model": ""}, "model"),
    ({"template": "Is {answr} right?"}, "answr"),
    ({"template": "Is it right?"}, "{answer}"),
    ({"verdicts": {"yes": 2.0}}, "'yes'"),
    ({"verdicts": {"yes please": 1.0}}, "'yes please'"),
    ({"scale": [10, 1]}, "scale"),
    ({"samples": 0}, "samples"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"retries": -1}, "retries"),
    ({"score_by": "prob"}, "score_by"),
    ({"score_by": "logprobs", "scale": [1, 10]}, "scale"),
    ({"score_by": "logprobs", "samples": 2}, "samples"),
    ({"top_logprobs": 0}, "top_logprobs"),
    ({"colour": "red"}, "colour"),
])
def test_bad_options_name_the_field(options, names):
    with pytest.raises(RewardConfigError, match=names.replace("{", r"\{").replace("}", r"\}")):
        settings_from({"base_url": "http://x/v1", "model": "m", **options})


# --- against a real HTTP server ------------------------------------------------------------------------------------

def build(url: str, **kwargs) -> RewardScorer:
    return RewardScorer([RewardSpec("judge", 1.0, {"base_url": url, "model": "m", "backoff_s": 0.01, **kwargs})])


def test_scores_through_the_scorer_with_counters(serve):
    # "yes" when the proposed answer is 4: completions "4", "5" score 1, 0
    server = serve(lambda body: (200, "Yes" if "Proposed answer: 4\n" in user_text(body) else "No"))
    scored = build(server.url)(["2+2?", "2+2?"], ["4", "5"])
    assert scored.per_reward["judge"] == [1.0, 0.0]
    metrics = scored.metrics()
    assert metrics["reward/judge_requests"] == 2 and metrics["reward/judge_failures"] == 0
    assert metrics["reward/judge_infra_errors"] == 0 and metrics["reward/judge_seconds"] > 0
    assert "Question: 2+2?" in user_text(server.requests[0])


def test_the_judge_adds_to_a_verifiable_reward_by_weight(serve):
    server = serve(lambda body: (200, "yes"))  # a lenient judge: 1 for everything
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0),
                           RewardSpec("judge", 0.5, {"base_url": server.url, "model": "m"})])
    scored = scorer(["2+2?", "2+2?"], ["4", "5"], {"answer": ["4", "4"]})
    assert scored.total == [1.5, 0.5]  # 1 * math (1, 0) + 0.5 * judge (1, 1)


def test_the_reference_fills_from_the_answer_column(serve):
    server = serve(lambda body: (200, "yes"))
    build(server.url, template="Q: {question}\nGold: {reference}\nA: {answer}\nyes or no?")(
        ["2+2?"], ["4"], {"answer": ["4"]})
    assert user_text(server.requests[0]) == "Q: 2+2?\nGold: 4\nA: 4\nyes or no?"
    with pytest.raises(RewardConfigError, match="no `answer` column"):
        judge.judge(["q"], ["a"], base_url=server.url, model="m", template="{reference} {answer}")


def test_samples_average_the_parsed_replies(serve):
    server = serve(lambda body: (200, ["yes", "no", "yes", "maybe"]))
    scored = build(server.url, samples=4)(["q"], ["a"])
    assert scored.per_reward["judge"] == [pytest.approx(2 / 3, abs=1e-12)]  # yes, no, yes parse: (1 + 0 + 1) / 3
    assert server.requests[0]["n"] == 4  # one request asks for all four
    none_parse = serve(lambda body: (200, ["maybe", "perhaps"]))
    assert build(none_parse.url, samples=2)(["q"], ["a"]).per_reward["judge"] == [None]


def test_transient_errors_are_retried_then_succeed(serve):
    statuses = iter([503, 429, 200])
    server = serve(lambda body: (next(statuses), "yes"))
    scored = build(server.url, retries=2)(["q"], ["a"])
    assert scored.per_reward["judge"] == [1.0]
    assert len(server.requests) == 3 and scored.metrics()["reward/judge_failures"] == 0


def test_a_request_failing_every_retry_is_none_and_counted(serve):
    server = serve(lambda body: (500, "overloaded"))
    scored = build(server.url, retries=2, max_consecutive_failures=5)(["q"], ["a"])
    assert scored.per_reward["judge"] == [None]
    metrics = scored.metrics()
    assert len(server.requests) == 3  # 1 + 2 retries
    assert metrics["reward/judge_failures"] == 1 and metrics["reward/judge_infra_errors"] == 1
    assert metrics["reward/judge_requests"] == 3


def test_a_bad_request_is_not_retried(serve):
    server = serve(lambda body: (400, "bad request"))
    assert build(server.url, retries=3)(["q"], ["a"]).per_reward["judge"] == [None]
    assert len(server.requests) == 1


def test_an_answer_out_of_format_is_none_and_not_an_infra_error(serve):
    server = serve(lambda body: (200, "The proposed answer seems plausible."))
    metrics = (scored := build(server.url)(["q"], ["a"])).metrics()
    assert scored.per_reward["judge"] == [None]
    assert metrics["reward/judge_unparsed"] == 1 and metrics["reward/judge_infra_errors"] == 0


def test_a_deadline_bounds_a_request_that_hangs(serve):
    server = serve(lambda body: (time.sleep(3), (200, "yes"))[1])
    start = time.monotonic()
    scored = build(server.url, timeout_s=0.3, retries=0)(["q"], ["a"])
    assert scored.per_reward["judge"] == [None] and scored.metrics()["reward/judge_failures"] == 1
    assert time.monotonic() - start < 0.3 + 2.5  # its deadline plus slack, well before the 3 s reply


def test_repeats_and_later_calls_come_from_the_cache(serve, tmp_path):
    server = serve(lambda body: (200, "yes"))
    scorer = build(server.url, cache_dir=str(tmp_path / "cache"))
    first = scorer(["q"] * 3, ["a", "a", "b"])
    assert len(server.requests) == 2 and first.metrics()["reward/judge_cache_hits"] == 1  # "a" twice: one request
    second = scorer(["q", "q"], ["a", "b"])
    assert len(server.requests) == 2 and second.metrics()["reward/judge_cache_hits"] == 2
    judge._clients.clear()  # a fresh process: only the disk cache is left
    third = build(server.url, cache_dir=str(tmp_path / "cache"))(["q"], ["b"])
    assert len(server.requests) == 2 and third.per_reward["judge"] == [1.0]


def test_failures_in_a_row_stop_the_judge_naming_the_url(serve):
    server = serve(lambda body: (500, "down"))
    with pytest.raises(JudgeUnavailableError, match=server.url.replace(".", r"\.")):
        judge.judge(["q"] * 10, [f"a{i}" for i in range(10)], base_url=server.url, model="m", retries=0,
                    concurrency=1, max_consecutive_failures=3)
    assert len(server.requests) == 3  # the 7 requests after the third failure are never sent
    assert JUDGE.metrics()["failures"] == 3  # and are not failures of their own


def test_through_the_scorer_a_stopped_judge_masks_the_batch_as_infra_errors(serve):
    server = serve(lambda body: (500, "down"))
    scored = build(server.url, retries=0, concurrency=1, max_consecutive_failures=2)(["q"] * 4, list("abcd"))
    assert scored.per_reward["judge"] == [None] * 4
    assert scored.metrics()["reward/judge_infra_errors"] == 4  # counted once: by the scorer, for the raise


def test_an_unreachable_judge_fails_when_the_reward_is_built_naming_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge._clients.clear()
    with pytest.raises(RewardConfigError, match=rf"http://127\.0\.0\.1:{port}/v1/models"):
        build(f"http://127.0.0.1:{port}/v1")


def test_a_model_the_endpoint_does_not_serve_fails_when_built(serve):
    server = serve(lambda body: (200, "yes"), models=("other",))
    with pytest.raises(RewardConfigError, match=r"does not serve model 'm'.*\['other'\]"):
        build(server.url)


def test_the_api_key_comes_from_the_named_variable(serve, monkeypatch):
    server = serve(lambda body: (200, "yes"))
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(RewardConfigError, match="JUDGE_TEST_KEY"):
        build(server.url, api_key_env="JUDGE_TEST_KEY")
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekrit")
    build(server.url, api_key_env="JUDGE_TEST_KEY")(["q"], ["a"])
    assert server.headers[-1]["Authorization"] == "Bearer sekrit"


def test_pairs_asked_in_both_orders_cancel_a_position_bias(serve):
    biased = serve(lambda body: (200, "A"))  # always the first answer
    assert judge_pairs(["q"], ["right"], ["wrong"], base_url=biased.url, model="m") == [0.5]  # (1 + (1 - 1)) / 2
    assert judge_pairs(["q"], ["right"], ["wrong"], base_url=biased.url, model="m", both_orders=False) == [1.0]

    def picks_right(body):
        text = user_text(body)
        return 200, "A" if text.index("right") < text.index("wrong") else "B"

    fair = serve(picks_right)
    assert judge_pairs(["q", "q"], ["right", "wrong"], ["wrong", "right"], base_url=fair.url, model="m") == [1.0, 0.0]
    assert len(fair.requests) == 2  # the second pair swapped is the first pair: each asked once


def yes_if_four(body):
    """A judge whose first token is yes 0.6, no 0.2 for the answer "4"; for anything else no verdict in its top."""
    if not body.get("logprobs"):
        return 200, "no"  # asked for text: a reply that would score 0
    if "Proposed answer: 4\n" in user_text(body):
        return 200, [first_token({"Yes": 0.6, "Maybe": 0.2, " no": 0.2})]
    return 200, [first_token({"The": 0.5, "I": 0.3})]


def test_score_by_logprobs_asks_one_token_and_scores_its_probability(serve, tmp_path):
    server = serve(yes_if_four)
    scorer = build(server.url, score_by="logprobs", top_logprobs=5, cache_dir=str(tmp_path / "cache"))
    scored = scorer(["2+2?", "2+2?"], ["4", "5"])
    assert scored.per_reward["judge"] == [pytest.approx(0.75), None]  # 0.6 / (0.6 + 0.2); none in the top
    metrics = scored.metrics()
    assert metrics["reward/judge_unparsed"] == 1 and metrics["reward/judge_infra_errors"] == 0
    body = server.requests[0]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (1, True, 5)
    judge._clients.clear()  # a fresh process: the top log-probs come back from the disk cache
    again = build(server.url, score_by="logprobs", top_logprobs=5, cache_dir=str(tmp_path / "cache"))(["2+2?"], ["4"])
    assert again.per_reward["judge"] == [pytest.approx(0.75)] and len(server.requests) == 2


def test_an_endpoint_without_logprobs_is_a_failure_naming_it(serve):
    server = serve(lambda body: (200, "yes"))  # ignores logprobs: a choice with no "logprobs"
    scored = build(server.url, score_by="logprobs")(["q"], ["a"])
    assert scored.per_reward["judge"] == [None]
    metrics = scored.metrics()
    assert metrics["reward/judge_failures"] == 1 and metrics["reward/judge_requests"] == 1  # a retry cannot help
    (client,) = judge._clients.values()
    assert client.last_error.endswith("answered without logprobs; score_by: logprobs needs an endpoint that "
                                      "returns them")


def test_pairs_by_probability_in_both_orders(serve):
    def prefers_right(body):
        text = user_text(body)
        first = {"A": 0.8, "B": 0.2} if text.index("right") < text.index("wrong") else {"A": 0.6, "B": 0.4}
        return 200, [first_token(first)]

    server = serve(prefers_right)
    # forward: p(A) = 0.8; swapped (right is B): p(A) = 0.6, so right's preference 1 - 0.6 = 0.4; mean 0.6
    prefs = judge_pairs(["q"], ["right"], ["wrong"], base_url=server.url, model="m", score_by="logprobs")
    assert prefs == [pytest.approx(0.6)]


# --- online DPO's pairs by a pairwise judge ---------------------------------------------------------------------

def prefers_four(body):
    """A judge that prefers the answer "4", and otherwise always says A (a pure position bias)."""
    text = user_text(body)
    if "Answer A: 4\n" in text:
        return 200, "A"
    return 200, "B" if "Answer B: 4\n" in text else "A"


def test_online_dpo_pairs_each_groups_first_two_distinct_completions_by_the_judge(serve):
    server = serve(prefers_four)
    texts = ["5", "5", "4",      # first two distinct: rows 0 ("5") and 2 ("4"); the judge prefers row 2
             "7", "7", "7",      # all equal: no candidate pair
             "x", "y", "z",      # rows 6, 7: the verdict follows the order (A both ways): 0.5, no pair
             "4", "9", "4"]      # rows 9 ("4"), 10: row 9 chosen
    pairs, undecided = judged_pairs(["2+2?"] * 4, texts, 3, {"base_url": server.url, "model": "m"})
    assert pairs == [(2, 0), (9, 10)]
    assert undecided == 2
    assert len(server.requests) == 6  # three candidate pairs, both orders


def test_a_bad_pair_judge_fails_when_the_config_loads_naming_the_field():
    from grpo.errors import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"algorithm\.dpo\.pair_judge: judge: give model"):
        compose(["algorithm=online_dpo", "+algorithm.dpo.pair_judge={base_url: 'http://127.0.0.1:1/v1'}"])
    judge._clients.clear()
    with pytest.raises(RewardConfigError, match=r"cannot reach the judge at http://127\.0\.0\.1:1/v1/models"):
        probe_pairs({"base_url": "http://127.0.0.1:1/v1", "model": "m"})
