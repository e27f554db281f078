"""The learned reward model: preference data, the built-in set, scoring as a reward, and training."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch

from grpo.builtin.arithmetic_preferences import ArithmeticPreferences, build_arithmetic_preferences, pair_completions
from grpo.errors import ConfigError
from reward_models.data import check_preferences, read_preference_file, split_by_prompt
from reward_models.scorer import encode, read_reward_model, score_texts, token_budget_batches
from reward_models.train import bradley_terry_loss, pair_metrics
from rewards import RewardConfigError, RewardScorer, RewardSpec, get_reward
from tests.conftest import TORCH_THREADS


@pytest.fixture(scope="module")
def random_rm_dir(tiny_random_dir, tmp_path_factory):
    """An untrained reward model (random score head) over the random tiny model, saved as a directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_random_dir), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_random_dir))
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("random_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- preference pairs -------------------------------------------------------------------------------------


def test_pair_completions_pairs_right_against_distinct_wrong():
    completions = ["12", "12", "13", " ", "14", "13", "15"]
    scores = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, None]  # " " is empty, "15" unscored: both left out
    pairs = pair_completions("p", completions, scores, pairs_per_prompt=5, rng=random.Random(0))
    assert sorted(pairs) == [("12", "13"), ("12", "14")]  # duplicates merged: one pair per distinct wrong answer
    assert len(pair_completions("p", completions, scores, pairs_per_prompt=1, rng=random.Random(0))) == 1
    assert pair_completions("p", ["12", "12"], [1.0, 1.0], 2, random.Random(0)) == []  # no wrong answer
    assert pair_completions("p", ["13", "14"], [0.0, 0.0], 2, random.Random(0)) == []  # no right answer


@pytest.mark.learning
def test_builtin_preferences_pair_right_against_wrong_on_training_prompts(warm_tiny_dir):
    from grpo.builtin.arithmetic import Arithmetic

    torch.set_num_threads(1)
    spec = ArithmeticPreferences(num_prompts=60, samples_per_prompt=8, pairs_per_prompt=2, seed=1)
    rows = build_arithmetic_preferences(warm_tiny_dir, spec, log=lambda *_: None)
    assert len(rows) >= 10  # the warm-started model is right on ~20% of samples: many prompts have both kinds
    held_out = {r["prompt"] for r in Arithmetic().eval_rows()}
    accuracy = get_reward("math_accuracy")
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    assert accuracy(prompts, [r["chosen"] for r in rows], answer=answers) == [1.0] * len(rows)
    assert accuracy(prompts, [r["rejected"] for r in rows], answer=answers) == [0.0] * len(rows)
    assert not held_out & set(prompts)
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(r["rejected"])
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in per_prompt.values())
    check_preferences(rows, "built-in")  # the set passes the same checks as a user's file


def test_bad_preference_rows_fail_with_the_row_number(tmp_path):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    with pytest.raises(ConfigError, match=r"prefs: row 1 has no column 'chosen'"):
        check_preferences([good, {"prompt": "x", "rejected": "y"}], "prefs")
    with pytest.raises(ConfigError, match=r"prefs: row 2, column 'rejected': empty rejected text"):
        check_preferences([good, good, {**good, "rejected": "  "}], "prefs")
    with pytest.raises(ConfigError, match=r"row 0, column 'prompt': expected text, got int"):
        check_preferences([{**good, "prompt": 3}], "prefs")
    with pytest.raises(ConfigError, match=r"no column 'question'"):
        check_preferences([good], "prefs", prompt_column="question")
    renamed = check_preferences([{"q": "a", "good": "b", "bad": "c", "id": 7}], "prefs", prompt_column="q",
                                chosen_column="good", rejected_column="bad")
    assert renamed == [{"prompt": "a", "chosen": "b", "rejected": "c", "id": 7}]
    with pytest.raises(ConfigError, match="does not exist"):
        read_preference_file(str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"broken.jsonl:2: not valid JSON"):
        read_preference_file(str(broken))


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    rows = [{"prompt": f"p{i % 20}", "chosen": "a", "rejected": f"b{i}"} for i in range(60)]
    train, held = split_by_prompt(rows, 0.25, seed=0)
    assert len({r["prompt"] for r in held}) == 5 and len(train) + len(held) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


# --- loss and metrics -------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    # pairs: r_c - r_r = 1 and 0 -> (log(1 + e^-1) + log 2) / 2 = (0.3132617 + 0.6931472) / 2 = 0.5032044
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(0.5032044), atol=1e-6, rtol=0)
    # a tie counts as wrong: accuracy 1/3; margins 1, 0, -1 -> mean 0
    m = pair_metrics([1.0, 0.0, 2.0], [0.0, 0.0, 3.0])
    assert m["rm/eval_pair_accuracy"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["rm/eval_margin"] == pytest.approx(0.0, abs=1e-12)
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(1))) / 3
    assert m["rm/eval_loss"] == pytest.approx(expected, abs=1e-12)


# --- scoring ----------------------------------------------------------------------------------------------


def test_token_budget_batches_by_hand():
    # sorted by length: idx 1 (1), 2 (3), 3 (3), 0 (5); budget 6: [1, 2] (2 x 3 = 6), [3] (3 x 3 = 9 > 6), [0]
    assert token_budget_batches([5, 1, 3, 3], 6) == [[1, 2], [3], [0]]
    assert token_budget_batches([10, 2], 4) == [[1], [0]]  # a row over the budget still goes, alone


def test_scores_do_not_depend_on_batching_and_truncation_keeps_the_end(random_rm_dir):
    model, tokenizer = read_reward_model(random_rm_dir)
    prompts = ["12+34=", "5+6=", "99+99=", "1+2=", "70+8="]
    completions = ["46", "11", "891", "", "87 and more"]
    one_batch = score_texts(model, tokenizer, prompts, completions, batch_tokens=10_000)
    one_by_one = score_texts(model, tokenizer, prompts, completions, batch_tokens=1)
    torch.testing.assert_close(torch.tensor(one_batch), torch.tensor(one_by_one), atol=1e-5, rtol=0)
    assert len(set(one_batch)) == 5  # a random head still tells the texts apart
    # max_length = tokens of "46<eos>": any prompt is cut away entirely, so the prompt no longer matters
    ids, cut = encode(tokenizer, "a long prompt ", "46", max_length=3)
    assert cut and tokenizer.decode(ids) == "46<eos>"
    a, b = score_texts(model, tokenizer, ["12+34=", "completely different "], ["46", "46"], max_length=3)
    assert a == pytest.approx(b, abs=1e-6)


def test_saved_and_reloaded_model_scores_identically(random_rm_dir, tmp_path):
    model, tokenizer = read_reward_model(random_rm_dir)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tokenizer2 = read_reward_model(tmp_path)
    prompts, completions = ["12+34=", "5+6="], ["46", "11"]
    assert score_texts(model, tokenizer, prompts, completions) == score_texts(again, tokenizer2, prompts, completions)


def test_reward_model_options_are_checked_when_the_scorer_is_built(random_rm_dir, tmp_path):
    with pytest.raises(RewardConfigError, match="kwargs.path"):
        RewardScorer([RewardSpec("reward_model")])
    with pytest.raises(RewardConfigError, match="does not exist"):
        RewardScorer([RewardSpec("reward_model", kwargs={"path": str(tmp_path / "nope")})])
    with pytest.raises(RewardConfigError, match="normalize='running' is not one of none, batch"):
        RewardScorer([RewardSpec("reward_model", kwargs={"path": str(random_rm_dir), "normalize": "running"})])
    assert get_reward("reward_model") is get_reward("reward_models.scorer:reward_model")


def test_reward_model_combines_with_math_accuracy_each_logged(random_rm_dir):
    rm = {"path": str(random_rm_dir), "device": "cpu"}
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0), RewardSpec("reward_model", 0.5, rm)])
    assert scorer.required_columns() == {"answer"}
    prompts, completions, answers = (["12+34=", "12+34=", "5+6=", "5+6="], ["64", "65", "11", "7"],
                                     ["64", "64", "11", "11"])
    out = scorer(prompts, completions, {"answer": answers})
    rm_alone = get_reward("reward_model")(prompts, completions, **rm)
    assert out.per_reward["math_accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert out.per_reward["reward_model"] == rm_alone
    for i in range(4):  # total = 1.0 * accuracy + 0.5 * rm score
        assert out.total[i] == pytest.approx(out.per_reward["math_accuracy"][i] + 0.5 * rm_alone[i], abs=1e-12)
    metrics = out.metrics()
    assert metrics["reward/math_accuracy_mean"] == 0.5
    assert metrics["reward/reward_model_mean"] == pytest.approx(sum(rm_alone) / 4, abs=1e-12)
    assert metrics["reward/reward_model_truncated"] == 0.0
    batch = get_reward("reward_model")(prompts, completions, **rm, normalize="batch")
    mean = sum(rm_alone) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in rm_alone) / 4)
    assert batch == pytest.approx([(s - mean) / (std + 1e-6) for s in rm_alone], abs=1e-12)
    assert abs(sum(batch)) < 1e-9


# --- training ---------------------------------------------------------------------------------------------


def test_cli_reports_a_missing_file_in_one_line(tmp_path, monkeypatch, capsys):
    from reward_models.train import main

    monkeypatch.setattr(sys, "argv", ["grpo-rm-train", f"run_dir={tmp_path / 'run'}", "data.builtin=null",
                                      f"data.train_file={tmp_path / 'missing.jsonl'}", "progress_bar=false"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: preference file {tmp_path / 'missing.jsonl'} does not exist"


# ~2,200 pairs; 300 steps of 32 pairs take 25 s on 2 idle cores (5 min on busy ones). Measured held-out pair
# accuracy: 0.61 and 0.52 with this recipe (two splits), 0.55 at lr 3e-4, 0.46 at lr 3e-3; the warm-started LM's
# own log-prob ranks the same pairs right 91% of the time, so the information is there and the recipe is what is
# missing.
TRAIN_SET = dict(num_prompts=2000, samples_per_prompt=8, pairs_per_prompt=2, seed=0)
TRAIN_RECIPE = dict(head="likelihood", sft_steps=400)  # the built-in recipe (configs/rm/config.yaml)
# The bar a trained reward model must clear: measured 0.995 (chance is 0.5, std ~0.03 over ~330 held-out pairs).
MIN_ACCURACY = 0.8


@pytest.mark.learning
@pytest.mark.slow
def test_trained_reward_model_ranks_held_out_pairs(warm_tiny_dir, tmp_path):
    """Train on the built-in set (the warm-started model's own answers); held-out prompts are never trained on."""
    from grpo.config import ModelConfig
    from grpo.training.tracking import read_metrics
    from reward_models.config import PreferenceDataConfig, RMConfig, RMTrainConfig, validate_rm
    from reward_models.train import train_reward_model

    torch.set_num_threads(TORCH_THREADS)
    rows = build_arithmetic_preferences(warm_tiny_dir, ArithmeticPreferences(**TRAIN_SET), log=lambda *_: None)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_rm(RMConfig(
        run_dir=str(tmp_path / "run"), progress_bar=False, model=ModelConfig(path=str(warm_tiny_dir)),
        data=PreferenceDataConfig(builtin=None, train_file=str(data), eval_fraction=0.15),
        train=RMTrainConfig(**TRAIN_RECIPE),
    ))
    final = train_reward_model(cfg)

    assert final["rm/eval_pair_accuracy"] > MIN_ACCURACY, final
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert lines[-1]["rm/eval_pair_accuracy"] == final["rm/eval_pair_accuracy"] and final["rm/scale"] > 0

    # The reward function, through the scorer, ranks chosen above rejected on the held-out pairs on average.
    from reward_models.data import split_by_prompt

    _, held = split_by_prompt(check_preferences(rows, "prefs"), 0.15, seed=0)
    rm = {"path": str(tmp_path / "run" / "reward_model")}
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0), RewardSpec("reward_model", 0.1, rm)])
    prompts = [r["prompt"] for r in held] * 2
    out = scorer(prompts, [r["chosen"] for r in held] + [r["rejected"] for r in held],
                 {"answer": [r["answer"] for r in held] * 2})
    chosen, rejected = out.per_reward["reward_model"][: len(held)], out.per_reward["reward_model"][len(held):]
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(held)
    assert margin == pytest.approx(final["rm/eval_margin"], abs=1e-5)  # the run's figure is the reward's figure
    assert margin > 0
    assert out.per_reward["math_accuracy"] == [1.0] * len(held) + [0.0] * len(held)


def test_bradley_terry_scale_by_hand():
    from reward_models.train import fit_bradley_terry_scale

    # Differences +1 and -1/2: loss(s) = -[log sig(s) + log sig(-s/2)] / 2. Its derivative is zero where
    # sig(-s) = sig(s/2) / 2, i.e. 1/(1+e^s) = 1/(2(1+e^(-s/2))). With x = e^(s/2): 2 + 2/x = 1 + x^2, so
    # x^3 - x - 2 = 0, x = 1.52138 (Newton), s = 2 ln x = 0.83924.
    assert fit_bradley_terry_scale([1.0, -0.5]) == pytest.approx(0.83924, abs=1e-4)
    # Every pair right: the loss falls forever; s stops at a margin of 100 nats on the largest difference.
    assert fit_bradley_terry_scale([2.0, 4.0]) == pytest.approx(25.0, rel=1e-9)


def test_likelihood_head_scores_the_completion_log_likelihood_and_reloads(tiny_random_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reward_models.scorer import LikelihoodRewardModel

    tok = AutoTokenizer.from_pretrained(tiny_random_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_random_dir).eval()
    model = LikelihoodRewardModel(lm, 0.5)
    prompts, completions = ["12+34=", "5+6=", "7+80="], ["46", "11", "78"]
    scores = score_texts(model, tok, prompts, completions, batch_tokens=16)  # several batches

    for p, c, got in zip(prompts, completions, scores):  # by hand: one unpadded forward per row
        ids = tok(p + c + tok.eos_token, add_special_tokens=False)["input_ids"]
        n = len(tok(c + tok.eos_token, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = lm(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # [T-1, V]
        want = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert got == pytest.approx(0.5 * want, abs=1e-4)

    model.save(tmp_path / "rm", tok)
    saved, saved_tok = read_reward_model(tmp_path / "rm")
    assert isinstance(saved, LikelihoodRewardModel) and saved.scale == 0.5
    assert score_texts(saved, saved_tok, prompts, completions) == pytest.approx(scores, abs=1e-6)
