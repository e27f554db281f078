"""Offline DPO on the shared loop: the loss types by hand, the batches of the shuffled stream, the config's
checks, the tokenisation, and runs that learn, follow the derived schedule and resume exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.algorithms.dpo import num_steps, step_pairs, tokenise_pairs
from grpo.config import validate_world
from grpo.core.losses import dpo_loss
from grpo.errors import ConfigError
from grpo.rollout.hf import HFRolloutEngine
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[2]

# Two pairs, summed log-probs chosen, rejected, chosen, rejected. Log-ratios to the reference:
# pair 1: chosen -2 - (-3) = +1, rejected -6 - (-5) = -1, so h = 2;
# pair 2: chosen -4 - (-3) = -1, rejected -2 - (-2) = 0, so h = -1. With beta 0.5 the margins are [1, -0.5].
POLICY, REF = torch.tensor([-2.0, -6.0, -4.0, -2.0]), torch.tensor([-3.0, -5.0, -3.0, -2.0])


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))]),  # -log sigmoid(beta h): 0.3133, 0.9741
    ("ipo", [(2 - 1 / (2 * 0.5)) ** 2, (-1 - 1.0) ** 2]),  # (h - 1/(2 beta))^2: 1, 4
    ("hinge", [0.0, 1.5]),  # max(0, 1 - beta h): 1 - 1 = 0, 1 + 0.5 = 1.5
])
def test_each_loss_type_by_hand(loss_type, expected):
    loss, margin = dpo_loss(POLICY, REF, beta=0.5, loss_type=loss_type)
    assert margin.tolist() == [1.0, -0.5]
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)


def test_the_hinge_gives_no_gradient_to_a_pair_past_its_margin():
    policy = POLICY.clone().requires_grad_(True)
    loss, _ = dpo_loss(policy, REF, beta=0.5, loss_type="hinge")
    loss.sum().backward()
    # pair 1 sits at the hinge's corner (beta h = 1): relu's gradient there is 0; pair 2: d/dpolicy of
    # 1 - 0.5 (logratio_w - logratio_l) is -0.5 for its chosen, +0.5 for its rejected
    assert policy.grad.tolist() == [0.0, 0.0, -0.5, 0.5]


def test_config_refuses_an_unknown_loss_type_naming_the_field():
    with pytest.raises(ConfigError, match=r"algorithm.dpo.loss_type: 'robust' is not one of hinge, ipo, sigmoid"):
        compose(["algorithm=dpo", "algorithm.dpo.loss_type=robust"])
    assert compose(["algorithm=dpo", "algorithm.dpo.loss_type=ipo"]).algorithm.dpo.loss_type == "ipo"


def test_the_pair_batch_must_split_evenly_over_the_ranks():
    cfg = compose(["algorithm=dpo", "backend=ddp", "algorithm.dpo.batch_size=6", "train.prompts_per_step=8"])
    validate_world(cfg, 2, 100)
    with pytest.raises(ConfigError, match="algorithm.dpo.batch_size: 6 pairs do not split evenly over 4 ranks"):
        validate_world(cfg, 4, 100)


def test_the_step_count_is_epochs_times_pairs_over_the_batch_rounded_up():
    assert num_steps(100, 1.0, 32) == 4  # 3.125 -> 4
    assert num_steps(96, 1.0, 32) == 3
    assert num_steps(100, 2.5, 32) == 8  # 7.8125 -> 8
    assert num_steps(5, 1.0, 32) == 1


def test_each_epoch_shuffles_every_pair_once_and_a_batch_may_straddle_two():
    P, B = 12, 4
    batches = [step_pairs(P, B, seed=0, step=s) for s in range(1, 7)]  # two epochs of 3 steps
    assert all(len(b) == B for b in batches)
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(P))  # every pair once per epoch
    assert first != second and first != list(range(P))  # reshuffled each epoch, not the file order
    assert step_pairs(P, B, seed=0, step=5) == batches[4]  # a function of the step: resuming takes the same
    assert step_pairs(P, B, seed=1, step=1) != batches[0]  # the run's seed sets the order
    straddling = step_pairs(10, B, seed=0, step=3)  # positions 8..11: the end of epoch 0, the start of epoch 1
    assert straddling[:2] == step_pairs(10, 10, seed=0, step=1)[8:]
    assert straddling[2:] == step_pairs(10, 10, seed=0, step=2)[:2]


def test_pairs_are_tokenised_as_the_engine_samples(tiny_random_dir):
    tok = AutoTokenizer.from_pretrained(tiny_random_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir)
    engine = HFRolloutEngine(model, tok, max_new_tokens=6)
    torch.manual_seed(0)
    out = engine.generate(["12+34=", "7+8="], 4)
    stopped = [i for i, t in enumerate(out.truncated) if not t and out.texts[i]]
    assert stopped, "no sampled completion stopped at EOS"
    i = stopped[0]
    pairs = tokenise_pairs([{"prompt": ["12+34=", "7+8="][i // 4], "chosen": out.texts[i], "rejected": "5"}], tok)
    assert pairs.prompt_ids[0] == out.prompt_ids[i // 4]  # the prompt exactly as the engine tokenised it
    assert pairs.chosen_ids[0] == out.completion_ids[i]  # a stopped sample's text, then EOS: its sampled ids
    assert pairs.rejected_ids[0][-1] == tok.eos_token_id


SMALL = ["algorithm=dpo", "algorithm.dpo.num_prompts=40", "algorithm.dpo.batch_size=8", "task.arithmetic.num_eval=20",
         "task.arithmetic.num_ood=10", "task.arithmetic.num_val=20", "tracking.progress_bar=false",
         "tracking.plot=false", "threads=1", "optim.lr=1e-3"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.learning
@pytest.mark.slow
def test_dpo_run_learns_on_the_shared_loop_with_the_derived_schedule(tmp_path, warm_tiny_dir):
    from grpo.cli import train_from_config

    # 40 prompts x 8 samples: a pair per prompt whose samples are right and wrong (the warm model's
    # overflowing sums, about half); batches of 8 pairs make several optimiser steps of them
    cfg = compose([*SMALL, f"run_dir={tmp_path}", "train.eval_every=2", "optim.schedule=linear",
                   "checkpoint.keep_best=true", "train.samples_every=1"])
    train_from_config(cfg)
    rows = lines(tmp_path)
    assert rows[0]["step"] == 0 and rows[0]["dpo/generated_samples"] == 40 * 8 and rows[0]["dpo/pairs"] > 0
    assert rows[0]["time/generate_s"] > 0 and "eval/accuracy" in rows[0]
    steps = [r for r in rows if r["step"] > 0]
    S = num_steps(rows[0]["dpo/pairs"], 1.0, 8)
    assert [r["step"] for r in steps] == list(range(1, S + 1))  # train.max_steps (100) is not DPO's length
    # The first step's policy is its reference: every margin 0, so the loss is exactly log 2 (hand value).
    assert abs(steps[0]["train/loss"] - math.log(2)) < 1e-5 and abs(steps[0]["train/dpo_margin"]) < 1e-5
    assert steps[-1]["train/dpo_margin"] != 0.0  # the policy moved away from the reference
    # linear decay over the S derived steps: step s runs at lr x (1 - (s-1)/S), the last at lr / S
    assert steps[-1]["optim/lr"] == pytest.approx(1e-3 / S, rel=1e-6)
    assert "eval/ood_accuracy" in steps[-1] and "val/best_accuracy" in steps[-1]
    assert (tmp_path / "checkpoints" / "latest").exists() and (tmp_path / "checkpoints" / "best").exists()
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["step"] == 1


@pytest.mark.slow
def test_a_resumed_dpo_run_equals_the_uninterrupted_one(tmp_path, warm_tiny_dir):
    from grpo.cli import train_from_config

    # about 27 pairs, 1.5 epochs of batches of 8: 6 steps, the 4th across the epochs' boundary
    common = [*SMALL, "algorithm.dpo.epochs=1.5", "train.eval_every=0", "checkpoint.every_steps=2",
              "checkpoint.keep_last=5", "optim.schedule=cosine"]
    straight = tmp_path / "straight"
    train_from_config(compose([*common, f"run_dir={straight}"]))

    resumed = tmp_path / "resumed"  # killed in step 4, after the step-2 checkpoint, as if the machine died
    cmd = [sys.executable, "-m", "grpo.train", *common, f"run_dir={resumed}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRPO_KILL_AT": "mid_step@4"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and (resumed / "checkpoints" / "step_2").is_dir(), proc.stderr[-2000:]
    (built,) = (resumed / "pairs").glob("*.jsonl")
    stamp = built.stat().st_mtime_ns
    history = train_from_config(compose([*common, f"run_dir={resumed}", "resume=auto"]))
    assert built.stat().st_mtime_ns == stamp  # the pairs built before the crash, read again, not resampled
    a, b = lines(straight), lines(resumed)
    S = len([r for r in a if r["step"] > 0])
    assert S >= 5 and [h["step"] for h in history] == list(range(3, S + 1))
    assert [r["step"] for r in b] == list(range(S + 1))  # continuous, nothing doubled
    for ra, rb in zip(a[3:], b[3:]):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], abs=1e-6)
        assert rb["optim/lr"] == pytest.approx(ra["optim/lr"], abs=1e-12)
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / "checkpoints" / f"step_{S}" / "policy")
              for d in (straight, resumed))
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=0, msg=name)


def test_a_dpo_step_raises_the_chosen_completions_margin_over_the_rejected(tmp_path, tiny_random_dir):
    from grpo.algorithms import dpo
    from grpo.training.run import build_run
    from tests.integration.test_online_dpo import preference_margins

    pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b)[::-1], "rejected": str(a + b + 1)[::-1]}
             for a, b in [(12, 34), (5, 9), (40, 2), (7, 71)]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = compose(["algorithm=dpo", f"algorithm.dpo.pairs_file={tmp_path / 'pairs.jsonl'}",
                   "algorithm.dpo.batch_size=4", "model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32",
                   "optim.lr=1e-3", "optim.warmup_steps=0", "tracking.progress_bar=false", "task.arithmetic.num_eval=8",
                   f"run_dir={tmp_path / 'run'}"])
    run = build_run(cfg)
    tokenised = dpo.prepare_pairs(run)
    dpo.train_step(run, 1, tokenised)  # batch_size 4: every pair, once
    run.tracker.close(plot=False)
    tok = run.tokenizer  # the file's texts tokenised here, apart from the run's own pairs

    def ids(col):
        return [tok(p[col], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in pairs]

    args = (tokenised.prompt_ids, ids("chosen"), ids("rejected"), cfg.rollout.temperature)
    before, after = preference_margins(run.ref_model, *args), preference_margins(run.policy, *args)
    # step 1 starts at the reference: the loss's gradient is -beta/(2P) times that of the summed margins of the
    # file's chosen over its rejected, so the step raises them (and lowers them with the two swapped)
    assert float((after - before).mean()) > 1e-3, (after - before).tolist()
