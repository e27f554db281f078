"""`python -m scripts.bench.realistic`: its length model, its EOS hook, its workload, and a smoke run of its
smallest configuration (no timing is asserted: the point is that the benchmark keeps running)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts.bench.common import random_model_dir
from scripts.bench.realistic import MINI, EosHazard, eos_hazard, main, make_workload, parse_args


def lognormal_cdf(x: float, median: float, sigma: float) -> float:
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def test_the_hazard_gives_the_log_normal_lengths():
    # P(L > k) = prod_{j<=k} (1 - h_j) must be the log-normal's survival at k (L = ceil X)
    median, sigma = 60.0, 1.0
    hazard = eos_hazard(median, sigma, 512)
    survival = 1.0
    for k in (1, 2, 10, 60, 200, 511):
        survival = math.prod(1 - h for h in hazard[:k])
        assert survival == pytest.approx(1 - lognormal_cdf(k, median, sigma), rel=1e-9, abs=1e-12)
    assert survival == pytest.approx(0.0163, abs=5e-4)  # P(X > 511): about 1.6% reach the cap of 512
    assert hazard[0] == pytest.approx(lognormal_cdf(1, median, sigma), rel=1e-9)


@pytest.fixture(scope="module")
def mini_model():
    return AutoModelForCausalLM.from_pretrained(random_model_dir("realistic-mini", "float32", MINI)).eval()


def test_the_hook_sets_the_eos_probability_to_the_hazard_when_sampling_only(mini_model):
    hazard = [0.05, 0.2, 0.5, 0.9]
    ids = torch.randint(3, 90, (3, 7))
    with EosHazard(eos=1, pad=0, hazard=hazard), torch.no_grad():
        prefill = mini_model(input_ids=ids, use_cache=True, logits_to_keep=1)
        step1 = mini_model(input_ids=torch.tensor([[5], [6], [7]]), past_key_values=prefill.past_key_values,
                           use_cache=True)
        step2 = mini_model(input_ids=torch.tensor([[8], [9], [10]]), past_key_values=step1.past_key_values,
                           use_cache=True)
    for out, h in ((prefill, 0.05), (step1, 0.2), (step2, 0.5)):  # the k-th generated token: hazard[k-1]
        torch.testing.assert_close(out.logits[:, -1].softmax(-1)[:, 1], torch.full((3,), h), atol=1e-6, rtol=0)
    plain = mini_model(input_ids=ids).logits[:, -1]
    with EosHazard(eos=1, pad=0, hazard=hazard):
        trained = mini_model(input_ids=ids).logits[:, -1]  # gradients on: a training forward, left alone
    torch.testing.assert_close(trained, plain, atol=0, rtol=0)


def test_the_workload_is_fixed_by_its_seed():
    args = parse_args(["--prompts", "3", "--group", "4", "--max-new-tokens", "50", "--median", "20"])
    a, b = make_workload(args, 512, eos=1), make_workload(args, 512, eos=1)
    assert a == b
    assert len(a.prompt_ids) == 3 and all(180 <= len(p) <= 220 for p in a.prompt_ids)
    assert len(a.completion_ids) == 12
    for c in a.completion_ids:  # EOS last and nowhere else, unless cut at the cap
        assert 1 <= len(c) <= 50 and (c[-1] == 1 or len(c) == 50) and 1 not in c[:-1]
    for g in range(3):  # standardised within each group
        group = a.advantages[g * 4 : (g + 1) * 4]
        assert statistics.fmean(group) == pytest.approx(0.0, abs=1e-9)
        assert statistics.pstdev(group) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_the_smallest_configuration_runs_every_phase(tmp_path):
    out = tmp_path / "realistic.json"
    main(["--model", "mini", "--prompts", "2", "--group", "2", "--prompt-len", "20", "--max-new-tokens", "16",
          "--median", "4", "--reps", "1", "--warmup", "0", "--gen-rounds", "1", "--step-reps", "1",
          "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results["ratios"]) == {"training_speedup", "step_speedup", "training_memory_ratio"}
    train = results["training"]
    assert train["real_tokens"] > 0
    # ours trims each micro-batch's padding; TRL forwards the whole padded batch
    assert 0 < train["ours"]["positions"] <= train["trl"]["positions"]
    assert results["generation"]["ours"]["tokens_per_s"] > 0 and results["generation"]["generate"]["tokens_per_s"] > 0
    assert results["step"]["ours"]["tokens"] > 0 and results["step"]["trl"]["tokens"] > 0


def test_the_benchmark_leaves_the_process_logging_and_threads_as_they_were():
    """`main` quiets logging and sets torch's threads while it runs; the tests after it still see their logs."""
    import logging

    import torch

    from scripts.bench.realistic import quiet_process

    threads = torch.get_num_threads()
    with quiet_process(parse_args(["--threads", "1"])):
        assert torch.get_num_threads() == 1 and logging.root.manager.disable == logging.WARNING
    assert torch.get_num_threads() == threads and logging.root.manager.disable == logging.NOTSET
