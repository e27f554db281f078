"""Server mode without vLLM: the real client (grpo.rollout.remote) and the real server code
(grpo.rollout.serve's HTTP handler and engine host, the gloo weight channel) around a fake engine,
two of them as data-parallel servers. What vLLM itself does in server mode is in test_vllm_server.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest
import torch

from grpo.errors import ConfigError
from grpo.rollout import Completions
from grpo.rollout.remote import ServerRolloutEngine, split_evenly
from grpo.rollout.serve import EngineHost, make_handler, parse_args, token_problem
from grpo.rollout.vllm import RolloutEngineError
from grpo.training.run import engine_name, engine_options
from tests.conftest import compose


class FakeEngine:
    """Answers sample k of each prompt with [its server's tag, the prompt's length, k]; keeps the weights it is sent."""

    max_model_len = 64

    def __init__(self, tag: int, hang: threading.Event | None = None):
        self.tag, self.hang = tag, hang
        self.buckets, self.loaded, self.updates = [], {}, 0

    def generate_from_ids(self, prompt_ids, n, *, greedy, max_new_tokens):
        if self.hang is not None:
            self.hang.wait()
        if max_new_tokens > 100:
            raise ValueError("too many tokens")
        ids = [[self.tag, len(p), k] for p in prompt_ids for k in range(n)]
        logprobs = None if greedy else [[-0.5, -0.25, -0.125]] * len(ids)
        return Completions(prompt_ids=prompt_ids, completion_ids=ids, texts=[""] * len(ids),
                           truncated=[False] * len(ids), logprobs=logprobs, metrics={"rollout/prefix_cached_tokens": 1})

    def load_weights(self, weights):
        self.buckets.append([name for name, _ in weights])
        self.loaded |= {name: t.clone() for name, t in weights}

    def finish_weight_update(self):
        self.updates += 1


class JoinTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ",".join(map(str, ids))


def serve_fake(engine, token: str | None = None) -> tuple[str, ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(EngineHost(lambda: engine), token))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture
def two_servers():
    engines = [FakeEngine(0), FakeEngine(1)]
    served = [serve_fake(e) for e in engines]
    yield [url for url, _ in served], engines
    for _, server in served:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_evenly_keeps_order_and_gives_the_first_shares_the_remainder():
    assert split_evenly([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_evenly([1, 2], 3) == [[1], [2], []]
    assert split_evenly(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


def test_prompts_are_split_across_the_servers_and_come_back_in_order(two_servers):
    urls, engines = two_servers
    engine = ServerRolloutEngine(None, JoinTokenizer(), server_urls=urls, timeout_s=10)
    out = engine.generate_from_ids([[7] * k for k in range(1, 6)], 2)
    # 5 prompts over 2 servers: lengths 1-3 to server 0, 4-5 to server 1; n=2 samples each, prompt-major
    assert out.completion_ids == [[0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [0, 3, 0], [0, 3, 1],
                                  [1, 4, 0], [1, 4, 1], [1, 5, 0], [1, 5, 1]]
    assert out.texts[0] == "0,1,0" and out.texts[-1] == "1,5,1"
    assert out.logprobs == [[-0.5, -0.25, -0.125]] * 10 and out.truncated == [False] * 10
    assert out.metrics["rollout/prefix_cached_tokens"] == 2  # one from each server
    assert engine.generate_from_ids([[7]], 1, greedy=True).logprobs is None
    with pytest.raises(RolloutEngineError, match=f"rollout server {urls[0]} failed /generate: ValueError: too many"):
        engine.generate_from_ids([[7], [7, 7]], 1, max_new_tokens=101)
    engine.close()
    with pytest.raises(RolloutEngineError, match="closed"):
        engine.generate_from_ids([[7]], 1)


def test_weights_reach_every_server_bucket_by_bucket_over_the_channel(two_servers):
    urls, engines = two_servers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    # buckets of 32 bytes: weight 0 (12 x 4 = 48 bytes) alone, bias 0 (16) + weight 1 (8 x 2 = 16), bias 1 (4)
    engine = ServerRolloutEngine(model, JoinTokenizer(), server_urls=urls, timeout_s=20, sync_bucket_mb=32 / 2**20)
    for fake in engines:
        assert fake.buckets == [["0.weight"], ["0.bias", "1.weight"], ["1.bias"]] and fake.updates == 1
        for name, p in model.named_parameters():
            assert fake.loaded[name].dtype == p.dtype and torch.equal(fake.loaded[name], p.detach())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert engine.sync_weights(model) > 0
    for fake in engines:
        assert fake.updates == 2
        assert all(torch.equal(fake.loaded[name], p.detach()) for name, p in model.named_parameters())
    engine.close()


def test_a_dead_server_fails_the_weight_push_naming_it(two_servers):
    urls, _ = two_servers
    model = torch.nn.Linear(2, 2)
    engine = ServerRolloutEngine(model, JoinTokenizer(), server_urls=urls, timeout_s=10)
    engine.urls[1] = f"http://127.0.0.1:{_free_port()}"  # server 1 is gone: nothing listens there any more
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=rf"rollout server {engine.urls[1]} is unreachable \(/health"):
        engine.sync_weights(model)
    assert time.perf_counter() - start < 5


def test_a_hung_server_fails_within_the_timeout_naming_it():
    release = threading.Event()
    url, server = serve_fake(FakeEngine(0, hang=release))
    engine = ServerRolloutEngine(None, JoinTokenizer(), server_urls=[url], timeout_s=1.5)
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=rf"rollout server {url}: no answer to /generate within 1.5 s"):
        engine.generate_from_ids([[7]], 1)
    assert 1.5 <= time.perf_counter() - start < 4
    release.set()
    server.shutdown()
    server.server_close()


def test_an_unreachable_url_fails_at_start_naming_it():
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=rf"rollout server {url} is unreachable .*grpo-vllm-serve"):
        ServerRolloutEngine(None, JoinTokenizer(), server_urls=[url], timeout_s=600)
    assert time.perf_counter() - start < 5


def test_server_mode_config_selects_the_client_and_names_bad_fields():
    cfg = compose(["rollout=vllm", "rollout.mode=server", "rollout.server_urls=[http://a:1,http://b:2]",
                   "rollout.timeout_s=30"])
    assert engine_name(cfg.rollout) == "server" and engine_name(compose(["rollout=vllm"]).rollout) == "vllm"
    options = engine_options(cfg)
    assert options["server_urls"] == ["http://a:1", "http://b:2"] and options["timeout_s"] == 30
    assert "model_path" not in options  # the servers load the model themselves
    for overrides, field in [
        (["rollout=vllm", "rollout.mode=server"], "rollout.server_urls: server mode needs"),
        (["rollout.mode=server", "rollout.server_urls=[http://a:1]"], "rollout.mode: server runs vLLM"),
        (["rollout=vllm", "rollout.mode=remote"], "rollout.mode: 'remote' is not one of colocate, server"),
        (["rollout=vllm", "rollout.server_urls=[http://a:1]"], "rollout.server_urls: given, but"),
        (["rollout=vllm", "rollout.mode=server", "rollout.server_urls=[a:1]"], "rollout.server_urls: 'a:1' is not"),
        (["rollout=vllm", "rollout.timeout_s=0"], "rollout.timeout_s: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=field):
            compose(overrides)


TOKEN = "s3cret-token-0123456789"


def post(url: str, path: str, body: dict, headers: dict | None = None) -> int:
    """The status of one POST, sent as a stranger would (no client library)."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_server_with_a_token_refuses_every_call_without_it_and_serves_the_trainer_that_sends_it(caplog, monkeypatch):
    fake = FakeEngine(0)
    url, server = serve_fake(fake, TOKEN)
    generate = {"prompt_ids": [[7]], "n": 1, "greedy": True, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0,
                "top_k": 0, "min_new_tokens": 0, "stop": []}
    caplog.set_level(logging.WARNING, logger="grpo-vllm-serve")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):  # none, another, not Bearer
        assert post(url, "/generate", generate, headers) == 403
        assert post(url, "/weights/close", {}, headers) == 403  # a stranger cannot close the trainer's channel
        assert post(url, "/weights/open", {"host": "127.0.0.1", "port": 1, "rank": 1, "world_size": 2,
                                           "backend": "gloo", "timeout_s": 1}, headers) == 403
        assert post(url, "/weights/bucket", {"params": [["w", "float32", [1]]]}, headers) == 403
    assert fake.buckets == [] and "refused POST /generate from 127.0.0.1" in caplog.text
    assert post(url, "/generate", generate, {"Authorization": f"Bearer {TOKEN}"}) == 200
    # the trainer's client: without the token it fails at start, naming the variable; with it, it is served
    monkeypatch.delenv("GRPO_SERVER_TOKEN", raising=False)
    refused = rf"rollout server {url} refused /check \(403\): set GRPO_SERVER_TOKEN"
    with pytest.raises(RolloutEngineError, match=refused):
        ServerRolloutEngine(None, JoinTokenizer(), server_urls=[url], timeout_s=10)
    monkeypatch.setenv("GRPO_SERVER_TOKEN", TOKEN)
    model = torch.nn.Linear(2, 2)
    engine = ServerRolloutEngine(model, JoinTokenizer(), server_urls=[url], timeout_s=10)
    assert engine.generate_from_ids([[7, 7]], 1).completion_ids == [[0, 2, 0]]  # [tag, prompt length, sample]
    assert fake.updates == 1 and torch.equal(fake.loaded["weight"], model.weight.detach())  # the channel, with it
    engine.close()
    server.shutdown()
    server.server_close()


def test_the_server_listens_on_loopback_by_default_and_elsewhere_only_with_a_token():
    assert parse_args(["--model", "m"]).host == "127.0.0.1"
    assert token_problem("127.0.0.1", "") is None and token_problem("localhost", "") is None
    assert "set a shared secret in $GRPO_SERVER_TOKEN" in token_problem("0.0.0.0", "")
    assert "set a shared secret" in token_problem("node2", "")  # a name may resolve to any interface
    assert token_problem("0.0.0.0", TOKEN) is None
    assert "at least 16" in token_problem("0.0.0.0", "short")
