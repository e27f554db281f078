"""The warm start's criterion: met, recorded, re-measured on the saved model, and a clear error when missed."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.builtin.arithmetic import Arithmetic, overflows, teacher_mode, write
from grpo.builtin.tiny import build_char_tokenizer, save_tiny
from grpo.builtin.warmstart import (
    WarmStart,
    WarmStartError,
    kept_weights,
    teacher_agreement,
    train_warm_start,
    warm_start_report,
)
from grpo.model.loading import load_policy, load_tokenizer, pad_left
from tests.conftest import compose


def test_teacher_mode_drops_the_overflowing_digit_only_when_the_teacher_mostly_does():
    # 57+68=125 overflows 2 digits; 12+30=42 does not
    assert teacher_mode(57, 68, 2, drop_carry=0.7) == 25
    assert teacher_mode(57, 68, 2, drop_carry=0.3) == 125
    assert teacher_mode(12, 30, 2, drop_carry=0.7) == 42


@pytest.mark.learning
def test_the_cached_warm_start_met_its_criterion_and_the_saved_model_still_does(warm_tiny_dir):
    report = warm_start_report(warm_tiny_dir)
    spec = WarmStart(**report["spec"])
    assert report["anneal_step"] <= spec.max_steps and report["anneal_step"] % spec.check_every == 0
    assert report["steps"] == report["anneal_step"] + spec.anneal_steps
    assert report["met_step"] == (report["steps"] if report["kept"] == "annealed" else report["anneal_step"])
    assert min(report["shown_agreement"], report["held_out_agreement"]) >= spec.target
    assert report["wall_s"] > 0 and report["kernels"]

    # Re-measured on the model as saved, on held-out problems the criterion did not check (the last 300)
    model = AutoModelForCausalLM.from_pretrained(warm_tiny_dir).eval()
    tokenizer = load_tokenizer(warm_tiny_dir)
    task = Arithmetic(digits=spec.digits, reverse=spec.reverse)
    held = task.held_out_problems()[-300:]
    figures = teacher_agreement(model, tokenizer, task, held, spec.drop_carry)
    assert figures["agreement"] >= spec.target, figures
    # The teacher drops the overflowing digit 70% of the time, so greedy answers are right on the sums that
    # do not overflow (about half) and wrong on the others: the room GRPO has to climb.
    no_overflow = sum(not overflows(a, b, spec.digits) for a, b in held) / len(held)
    assert abs(figures["exact_match"] - no_overflow) <= 1 - spec.target, (figures, no_overflow)

    # ... while the right answer to an overflowing sum is still sampled: its probability is near 1 - 0.7.
    over = [(a, b) for a, b in held if overflows(a, b, spec.digits)][:100]
    texts = [task.prompt(a, b) + write(a + b, spec.reverse) for a, b in over]
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [N, T-1]
    prompt_len = len(task.prompt(0, 0))
    p_right = logp[:, prompt_len - 1:].sum(-1).exp()  # [N] probability of the whole right answer and its end
    assert 0.15 < p_right.mean().item() < 0.45, p_right.mean().item()


def test_a_warm_start_that_misses_its_criterion_names_both_figures():
    # 100 steps is inside the plateau before the model learns to add: agreement is near 0 on both sets
    spec = WarmStart(max_steps=100, check_every=50, warmup_steps=10, anneal_steps=10)
    with pytest.raises(WarmStartError) as err:
        train_warm_start(spec, log=lambda _: None)
    message = str(err.value)
    assert "after 100 steps (model.warm_start.max_steps)" in message
    shown, held = re.search(r"on ([0-9.]+) of the problems shown and ([0-9.]+) of held-out", message).groups()
    assert float(shown) < spec.anneal_at and float(held) < spec.anneal_at
    assert "annealing starts at 0.8 on both (model.warm_start.anneal_at)" in message


def test_a_warm_start_that_anneals_short_of_its_target_names_both_figures():
    # a target of 1.01 cannot be met: the check after annealing fails and says so
    spec = WarmStart(max_steps=100, check_every=50, warmup_steps=10, anneal_at=0.0, anneal_steps=5, target=1.01)
    with pytest.raises(WarmStartError, match=r"after annealing \(steps 51-55\) the greedy answers agree with the "
                                             r"teacher on [0-9.]+ of the problems shown and [0-9.]+ of held-out "
                                             r"problems, and at its start on [0-9.]+ and [0-9.]+; the criterion "
                                             r"\(model.warm_start.target\) is 1.01 on both"):
        train_warm_start(spec, log=lambda _: None)


def test_annealing_keeps_its_own_weights_when_they_meet_the_target_and_else_those_it_started_from():
    def checks(shown, held):
        return {"agreement": shown}, {"agreement": held}
    assert kept_weights(checks(0.98, 0.97), checks(0.90, 0.85), 0.8) == "annealed"  # met: annealing's, even if worse
    assert kept_weights(checks(0.98, 0.97), checks(0.865, 0.77), 0.8) == "anneal_start"  # the avx2 seed-2 case
    assert kept_weights(checks(0.85, 0.79), checks(0.865, 0.77), 0.8) is None  # neither meets it on both sets
    assert kept_weights(checks(0.80, 0.80), checks(0.0, 0.0), 0.8) == "anneal_start"  # the target is inclusive


@pytest.mark.parametrize("override, message", [
    ("model.warm_start.target=1.5", "model.warm_start.target: must be in [0, 1], got 1.5"),
    ("model.warm_start.max_steps=0", "model.warm_start.max_steps: must be > 0, got 0"),
    ("model.warm_start.drop_carry=-0.1", "model.warm_start.drop_carry: must be in [0, 1], got -0.1"),
])
def test_a_bad_warm_start_setting_is_refused_with_its_name(override, message):
    from grpo.errors import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([override])


def test_two_processes_asking_for_the_same_warm_start_train_it_once(tmp_path, monkeypatch):
    # Two builders at once (two runs, two test workers): the second waits on the cache entry's lock and
    # returns the first one's model. Without the lock both train (here: 2 calls) and one rename fails.
    import threading
    import time

    from grpo.builtin import warmstart
    from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model

    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    calls = []

    def slow_training(spec, log=print):  # the real fit takes minutes; what it returns is a real tiny model
        calls.append(spec)
        time.sleep(1.0)  # long enough for the other thread to reach the lock
        tok = build_char_tokenizer()
        return build_tiny_model(len(tok), seed=0), tok, {"met": True}

    monkeypatch.setattr(warmstart, "train_warm_start", slow_training)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(warmstart.warm_started_tiny(WarmStart(), log=print)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert warmstart.is_saved_model(paths[0]) and not list(tmp_path.glob("*.tmp*"))


def test_the_trainer_reads_the_tiny_models_tokenizer_as_the_warm_start_wrote_it(tmp_path):
    """The tiny model's directory saves its character tokenizer as a tokenizer.json alone; transformers 5's
    AutoTokenizer builds Qwen2's tokenizer class for it instead (the model's type), whose pre-tokenizer drops every
    space. Catches: `load_policy` (or the vLLM server's or the preference builder's loader) reading it through
    AutoTokenizer again, so that a prompt with spaces reaches the policy otherwise than the warm start taught it."""
    path = save_tiny(tmp_path / "tiny")
    text = "What is 12 + 34? Answer: 46"
    expected = build_char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert len(expected) == len(text)
    assert AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"] != expected  # the trap
    _, tokenizer = load_policy(str(path), compose([]))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == text and tokenizer.padding_side == "left"
    assert load_tokenizer(str(path))(text, add_special_tokens=False)["input_ids"] == expected


def test_pad_left_pads_prompts_on_the_left_with_eos_only_where_the_tokenizer_has_no_pad_token():
    """Catches: a tokenizer's own pad token replaced by EOS (a pad token the model was trained to read would become
    the end of a sequence), or right padding, which would put padding between a prompt and its completion."""
    own = pad_left(build_char_tokenizer())
    assert own.pad_token_id != own.eos_token_id and own.padding_side == "left"
    bare = build_char_tokenizer()
    bare.pad_token, bare.padding_side = None, "right"
    assert pad_left(bare).pad_token_id == bare.eos_token_id and bare.padding_side == "left"
    ids = bare(["ab", "abcd"], add_special_tokens=False, padding=True)["input_ids"]
    assert ids[0][:2] == [bare.eos_token_id] * 2 and ids[0][2:] == ids[1][:2]
