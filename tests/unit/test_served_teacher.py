"""The served distillation teacher (`algorithm.teacher.url`, grpo.model.served_teacher) without a server: reading
vLLM's prompt log-probs from literal replies, placing them in the batch's columns as the local teacher's, the
config's refusals, and an unreachable server named at build time and during a step. The real server is in
tests/vllm/test_judge_vllm.py."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest
import torch

from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model
from grpo.core.batch import layout_batch
from grpo.errors import ConfigError, TeacherUnavailableError
from grpo.model.served_teacher import (
    ServedTeacher,
    parse_prompt_logprobs,
    place_logprobs,
    row_sequences,
    server_root,
)
from grpo.training.run import build_teacher
from grpo.training.update import score_logprobs
from tests.conftest import compose

URL = "http://teacher:8000/v1/completions"


def test_a_literal_reply_gives_each_sequences_token_logprobs_in_request_order():
    """Mutations caught: the `null` first entry kept (an error or a shifted list), choices taken in reply order
    instead of by `index`, the most likely token's log-prob read instead of the sampled token's."""
    # vLLM's shape for prompt_logprobs: entry j maps token ids (strings) to {"logprob", "rank", "decoded_token"}
    reply = {"id": "cmpl-1", "object": "text_completion", "choices": [
        {"index": 1, "text": "!", "prompt_logprobs": [
            None, {"8": {"logprob": -0.25, "rank": 1, "decoded_token": "b"}}]},
        {"index": 0, "text": "?", "prompt_logprobs": [
            None,
            {"7": {"logprob": -1.5, "rank": 3, "decoded_token": "a"}, "3": {"logprob": -0.1, "rank": 1}},
            {"9": {"logprob": -2.0, "rank": 2, "decoded_token": "c"}}]},
    ]}
    # sequence 0 = [5, 7, 9]: log p(7 | 5) = -1.5, log p(9 | 5 7) = -2.0; sequence 1 = [5, 8]: log p(8 | 5) = -0.25
    assert parse_prompt_logprobs(reply, [[5, 7, 9], [5, 8]], URL) == [[-1.5, -2.0], [-0.25]]


@pytest.mark.parametrize("choice, message", [
    ({"index": 0, "text": "x", "logprobs": None}, "without the prompt's log-probs"),  # a server without the extra
    ({"index": 0, "prompt_logprobs": [None]}, "1 entries for 2 tokens"),
    ({"index": 0, "prompt_logprobs": [None, {"3": {"logprob": -0.1}}]}, "without the log-prob of its token 8"),
    ({"index": 0, "prompt_logprobs": [None, {"8": {"logprob": 2.5}}]}, "which is no log-prob"),  # a raw logit
])
def test_a_reply_without_the_sampled_tokens_logprobs_is_refused_naming_the_url(choice, message):
    """Mutation caught: a missing, short or out-of-range entry read as 0 (a perfect teacher) instead of refused."""
    with pytest.raises(ValueError, match=message) as e:
        parse_prompt_logprobs({"choices": [choice]}, [[5, 8]], URL)
    assert URL in str(e.value)


def test_placed_logprobs_land_in_the_columns_the_local_teacher_fills():
    """Mutations caught: a placement one column off, the prompt's log-probs kept, the left padding not skipped.
    The 'server' here is the tiny model itself, run on each unpadded sequence as vLLM runs a prompt."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(len(tokenizer)).eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("12+3=", "7+8=")]
    completions = [[5, 6, 7], [8], [], [9, 10, 11, 12]]  # G = 2 per prompt; an empty one is not sent
    batch = layout_batch(prompts, completions, 2, tokenizer.pad_token_id)
    rows = row_sequences(batch)
    assert [row for row, _, _ in rows] == [0, 1, 3]
    assert rows[2][2] == prompts[1] + [9, 10, 11, 12]
    choices = []
    for i, (_, _, seq) in enumerate(rows):
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].log_softmax(-1)  # [L, V]
        entries = [None] + [{str(t): {"logprob": float(logp[j - 1, t]), "rank": 1}} for j, t in enumerate(seq) if j]
        choices.insert(0, {"index": i, "prompt_logprobs": entries})
    logprobs = parse_prompt_logprobs({"choices": choices}, [seq for _, _, seq in rows], URL)
    served = torch.zeros(batch.completion_mask.shape)  # [N, T-1]
    for (row, start, _), lp in zip(rows, logprobs):
        place_logprobs(served, row, start, batch.prompt_width, lp)
    local = score_logprobs(model, batch, temperature=1.0, micro_batch_tokens=4096)  # [N, T-1]
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(served[mask], local[mask], atol=1e-5, rtol=0)  # padding's float32 rounding only
    assert (served[~mask] == 0).all()


def test_place_by_hand():
    # P = 3, row 0's prompt has 2 tokens (starts at column 1), 2 completion tokens at columns 3, 4. The reply's
    # log-probs score the tokens of columns 2, 3, 4: [a, b, c]; out column t scores token t+1, so b -> 2, c -> 3
    out = torch.zeros(1, 4)
    place_logprobs(out, 0, 1, 3, [-1.0, -2.0, -3.0])
    assert out.tolist() == [[0.0, 0.0, -2.0, -3.0]]


def test_the_tokenize_endpoint_is_at_the_servers_root():
    assert server_root("http://h:8000/v1") == "http://h:8000"
    assert server_root("http://h:8000") == "http://h:8000"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


def test_an_unreachable_teacher_fails_the_build_then_a_step_naming_the_url():
    """Mutations caught: build_teacher not probing the server (the run would start and fail at its first step),
    a failed request read as no log-probs instead of stopping the run."""
    url = closed_port_url()
    cfg = compose(["algorithm=distill", f"algorithm.teacher.url={url}", "algorithm.teacher.model=teacher",
                   "algorithm.teacher.retries=0"])
    with pytest.raises(ConfigError, match=f"cannot reach the teacher at {url}/models"):
        build_teacher(cfg, build_char_tokenizer())
    batch = layout_batch([[1, 2]], [[3, 4]], 1, 0)
    with pytest.raises(TeacherUnavailableError, match=f"teacher at {url}/completions"):
        ServedTeacher(url, "teacher", retries=0).score(batch)


@pytest.mark.parametrize("overrides, field", [
    (["algorithm=gkd", "algorithm.teacher.url=http://t/v1", "algorithm.teacher.model=m"], "algorithm.teacher.url"),
    (["algorithm=distill", "algorithm.teacher.path=/x", "algorithm.teacher.url=http://t/v1",
      "algorithm.teacher.model=m"], "algorithm.teacher.url"),  # two teachers
    (["algorithm=distill", "algorithm.teacher.url=http://t/v1"], "algorithm.teacher.model"),
    (["algorithm=distill", "algorithm.teacher.url=t:8000", "algorithm.teacher.model=m"], "algorithm.teacher.url"),
    (["algorithm=distill", "algorithm.teacher.url=http://t/v1", "algorithm.teacher.model=m",
      "rollout.temperature=0.7"], "rollout.temperature"),  # the server scores at temperature 1 only
    (["algorithm=distill", "algorithm.teacher.url=http://t/v1", "algorithm.teacher.model=m",
      "algorithm.teacher.dtype=bfloat16"], "algorithm.teacher.dtype"),  # a local teacher's option
    (["algorithm=distill", "algorithm.teacher.url=http://t/v1", "algorithm.teacher.model=m",
      "algorithm.teacher.batch_size=0"], "algorithm.teacher.batch_size"),
    (["algorithm=grpo", "algorithm.teacher.url=http://t/v1", "algorithm.teacher.model=m"], "algorithm.teacher.url"),
])
def test_bad_served_teacher_settings_name_their_field(overrides, field):
    """Mutations caught: each refusal removed (gkd scoring sampled tokens as distributions, a teacher at another
    temperature than the student's, an option silently ignored)."""
    with pytest.raises(ConfigError, match=field):
        compose(overrides)


def test_a_served_teacher_at_temperature_one_composes():
    cfg = compose(["algorithm=distill", "algorithm.teacher.url=http://t:8000/v1", "algorithm.teacher.model=m"])
    assert (cfg.algorithm.teacher.url, cfg.algorithm.teacher.path, cfg.rollout.temperature) == (
        "http://t:8000/v1", None, 1.0)


@pytest.fixture
def models_endpoint():
    """An HTTP server on localhost answering `GET /v1/models` as vLLM's does, for the model `teacher` with
    `max_model_len` 64; nothing else (the check stops before its other requests where the context is short)."""
    body = json.dumps({"object": "list", "data": [{"id": "teacher", "object": "model", "max_model_len": 64}]})

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's name is the HTTP method's)
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_teacher_served_with_a_shorter_context_than_the_runs_sequences_is_refused_at_build(models_endpoint):
    """The run's longest sequence: its longest prompt (the char tokenizer: one token per character, 60 here) plus
    the completion budget (rollout.max_new_tokens=8): 68 > the served 64. Mutations caught: max_model_len not read
    (the run would stop with HTTP 400 at the first step that samples a long sequence), the prompts or the
    completion budget left out of the length (60 or 8 fit in 64), the client left open on a failed build."""
    cfg = compose(["algorithm=distill", f"algorithm.teacher.url={models_endpoint}", "algorithm.teacher.model=teacher",
                   "rollout.max_new_tokens=8", "algorithm.teacher.retries=0"])
    rows = [{"prompt": "1+1="}, {"prompt": "x" * 60}]
    closed = []
    original = ServedTeacher.close
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ServedTeacher, "close", lambda self: (closed.append(True), original(self)))
        with pytest.raises(ConfigError, match=f"teacher at {models_endpoint} serves 'teacher' with max_model_len=64, "
                                              "and this run's sequences reach 68 tokens"):
            build_teacher(cfg, build_char_tokenizer(), rows)
    assert closed == [True]
    with pytest.raises(ConfigError, match="tokenizer check"):  # 4 + 8 fits: the check goes on to the tokenizer
        build_teacher(cfg, build_char_tokenizer(), rows[:1])
