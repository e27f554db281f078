"""The loop's pieces on a tiny random model: batch layout, log-prob parity with the sampler,
exact gradient accumulation, None rewards, dynamic sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.config import AlgorithmConfig
from grpo.core.advantages import compute_advantages
from grpo.core.batch import layout_batch
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.update import score_logprobs, update_policy


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_layout_puts_completions_at_one_column():
    batch = layout_batch([[5, 6], [7]], [[1, 2, 3], [4], [8, 9], []], group_size=2, pad_id=0)
    # prompt width P = 2, completion width C = 3: [pad/prompt | completion | pad]
    assert batch.input_ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 0, 0], [0, 7, 8, 9, 0], [0, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 0, 0]]
    # column t scores token t+1: the completion's tokens are scored in columns 1..
    assert batch.completion_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_trainer_logprobs_are_the_samplers_before_its_pad_suppression_under_left_padding(tiny_random_dir):
    model, tok = load(tiny_random_dir)
    engine = HFRolloutEngine(model, tok, temperature=0.7, max_new_tokens=6)
    prompts = ["1+1=", "12+345=", "9=", "abc def+1="]  # different lengths: left padding differs per row
    out = engine.generate(prompts, n=3)
    batch = layout_batch(out.prompt_ids, out.completion_ids, 3, tok.pad_token_id, out.logprobs)
    trainer = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=10_000)  # [N, T-1]
    mask = batch.completion_mask.bool()
    assert mask.sum() > len(out.completion_ids)  # several tokens per completion
    p_pad = pad_probability(model, batch, tok.pad_token_id, temperature=0.7)  # [N, T-1]
    assert p_pad[mask].min() > 1e-3  # a random model gives pad real mass: the renormalisation is seen
    torch.testing.assert_close(trainer[mask] - torch.log1p(-p_pad[mask]), batch.sampler_logprobs[mask],
                               atol=2e-5, rtol=0)


def pad_probability(model, batch, pad_id: int, temperature: float) -> torch.Tensor:
    """[N, T-1] the policy's probability of pad where column t scores token t+1, by a plain forward. The hf
    sampler never draws pad, so its log-prob of a token is the trainer's minus log(1 - this)."""
    position = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position).logits
    return (logits[:, :-1] / temperature).softmax(-1)[..., pad_id]


class RecordingBackend:
    """A fake TrainBackend: keeps the accumulated gradients of each step instead of stepping."""

    def __init__(self, model):
        self.model = self.policy = model
        self.grads = []

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        self.model.zero_grad(set_to_none=True)
        return {"grad_norm": 0.0, "lr": 0.0, "skipped": False}


def _random_batch(tok, n=8, group_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 7, (n // group_size,), generator=g)]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist()
                   for k in torch.randint(1, 9, (n,), generator=g)]
    batch = layout_batch(prompts, completions, group_size, tok.pad_token_id)
    batch.advantages = torch.randn(n, generator=g)
    return batch


def test_gradient_accumulation_4x2_equals_8x1(tiny_random_dir):
    model, tok = load(tiny_random_dir)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        algo = AlgorithmConfig(loss_agg=agg, group_size=4)
        batch = _random_batch(tok)
        width = batch.input_ids.shape[1]
        whole, split = RecordingBackend(model), RecordingBackend(model)
        update_policy(whole, batch, algo, temperature=1.0, micro_batch_tokens=8 * width, max_new_tokens=8)
        update_policy(split, batch, algo, temperature=1.0, micro_batch_tokens=2 * width, max_new_tokens=8)
        assert len(whole.grads) == len(split.grads) == 1
        for name, g in whole.grads[0].items():
            torch.testing.assert_close(split.grads[0][name], g, atol=1e-6, rtol=0, msg=f"{agg}: {name}")
        assert any(g.abs().sum() > 0 for g in whole.grads[0].values())


def test_none_rewards_leave_the_baseline_and_the_loss():
    # group 1: [1, 0, None, 1] -> valid [1, 0, 1]: mean 2/3; group 2 has no valid reward at all
    adv, valid, values = compute_advantages([1.0, 0.0, None, 1.0, None, None, None, None], 4, "dr_grpo")
    assert valid.tolist() == [True, True, False, True, False, False, False, False]
    assert values[:4].tolist()[:2] == [1.0, 0.0] and values[2].isnan() and values[4:].isnan().all()
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3, 0, 0, 0, 0]), atol=1e-6, rtol=0)


def test_none_rewards_shrink_the_group_for_the_std_and_the_leave_one_out_factor():
    # [1, 0, None, 1] is a group of k = 3: mean 2/3, deviations (1/3, -2/3, 1/3), unbiased std
    # sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3) = 0.5774 -> grpo (0.5774, -1.1547, 0, 0.5774)
    adv, _, _ = compute_advantages([1.0, 0.0, None, 1.0], 4, "grpo")
    s = (1 / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([(1 / 3) / s, (-2 / 3) / s, 0.0, (1 / 3) / s]), atol=1e-5, rtol=0)
    # RLOO: k/(k-1) = 3/2 times the deviation: 1 - mean(0, 1) = 0.5 for each 1, 0 - 1 = -1 for the 0
    adv, _, _ = compute_advantages([1.0, 0.0, None, 1.0], 4, "rloo")
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    # equal valid rewards carry no signal, exactly, even where their float mean is off by an ulp
    adv, _, _ = compute_advantages([0.3] * 6 + [None], 7, "grpo")
    assert adv.tolist() == [0.0] * 7


def test_a_group_of_equal_rewards_and_a_none_is_not_informative():
    from grpo.training.sampling import nonzero_std_groups

    assert nonzero_std_groups([1.0, None, 1.0, 1.0, 1.0, 0.0, None, None], 4) == [False, True]
    assert nonzero_std_groups([None, None, None, 1.0], 4) == [False]


def test_one_step_moves_the_parameters_towards_positive_samples(tiny_random_dir):
    from grpo.backends.torch_backend import TorchBackend

    model, tok = load(tiny_random_dir)
    batch = layout_batch([[10, 11, 12]], [[20, 21, 1], [30, 31, 1]], group_size=2, pad_id=tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0])
    before = score_logprobs(model, batch, temperature=1.0, micro_batch_tokens=1000)
    backend = TorchBackend(model, lr=1e-3)
    update_policy(backend, batch, AlgorithmConfig(group_size=2), temperature=1.0, micro_batch_tokens=1000,
                  max_new_tokens=8)
    after = score_logprobs(model, batch, temperature=1.0, micro_batch_tokens=1000)
    mask = batch.completion_mask
    delta = ((after - before) * mask).sum(1)  # [2] change of each sequence's log-prob
    assert delta[0] > 0 > delta[1]


class ScriptedEngine:
    """A fake RolloutEngine: completion j of prompt "p" is str(answers[p][j]), lengths[p][j] tokens long
    (2 when not given) (ten lines, no inheritance)."""

    def __init__(self, answers, lengths=None):
        self.answers, self.lengths, self.calls = answers, lengths or {}, 0

    def generate(self, prompts, n, *, greedy=False):
        from grpo.rollout import Completions

        self.calls += 1
        texts = [self.answers[p][j] for p in prompts for j in range(n)]
        ids = [[2] * self.lengths.get(p, [2] * n)[j] for p in prompts for j in range(n)]
        return Completions([[1] for _ in prompts], ids, texts, [False] * len(texts))

    def sync_weights(self, model):
        return 0.0


def _fake_run(algo_overrides, answers, rows, *overrides, lengths=None):
    from types import SimpleNamespace

    from grpo.data.loading import PromptSampler
    from grpo.training.run import Run
    from rewards import RewardScorer, RewardSpec
    from tests.conftest import compose

    cfg = compose([f"algorithm.{k}={v}" for k, v in algo_overrides.items()] + ["algorithm.group_size=2", *overrides])
    return Run(cfg=cfg, tokenizer=SimpleNamespace(pad_token_id=0), policy=None, ref_model=None,
               engine=ScriptedEngine(answers, lengths), backend=None,
               scorer=RewardScorer([RewardSpec("math_accuracy")]), eval_scorer=None, train_rows=rows, eval_rows=[],
               sampler=PromptSampler(len(rows), seed=0), tracker=None)


def test_dynamic_sampling_drops_equal_reward_groups_and_refills():
    from grpo.training.sampling import sample_groups

    # prompts a, b: both completions right or both wrong (no signal); c, d: one right, one wrong
    rows = [{"prompt": p, "answer": "1"} for p in "abcd"]
    answers = {"a": ["1", "1"], "b": ["0", "0"], "c": ["1", "0"], "d": ["0", "1"]}
    run = _fake_run({"dynamic_sampling": "true", "max_resample": 5}, answers, rows)
    groups, metrics = sample_groups(run, 2)
    assert sorted(r["prompt"] for r in groups.rows) == ["c", "d"]
    assert groups.rewards in ([1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0])
    assert metrics["train/kept_groups"] == 2 and metrics["train/resample_rounds"] >= 1

    # bounded: with no informative prompt at all it gives up after max_resample extra rounds
    run = _fake_run({"dynamic_sampling": "true", "max_resample": 3}, answers, rows[:2])
    groups, metrics = sample_groups(run, 2)
    assert run.engine.calls == 4 and groups.rows == [] and metrics["train/zero_std_frac"] == 1.0


def test_dynamic_sampling_filters_on_accuracy_not_on_the_overlong_penalty():
    from grpo.training.sampling import sample_groups

    # max_new_tokens 4, overlong_buffer 2, penalty 1: 1 token -> +0, 4 tokens -> -1.
    # a: both right, 1 and 4 tokens: accuracy [1, 1] (no signal), shaped total [1, 0] (a signal from length alone)
    # c: one right, one wrong, 1 token each: accuracy and total [1, 0]
    rows = [{"prompt": p, "answer": "1"} for p in "ac"]
    answers, lengths = {"a": ["1", "1"], "c": ["1", "0"]}, {"a": [1, 4], "c": [1, 1]}
    dapo = {"dynamic_sampling": "true", "max_resample": 1, "overlong_buffer": 2}
    run = _fake_run(dapo, answers, rows, "rollout.max_new_tokens=4", lengths=lengths)
    groups, metrics = sample_groups(run, 2)
    assert [r["prompt"] for r in groups.rows] == ["c", "c"]  # a dropped twice, c kept from both rounds
    assert groups.rewards == [1.0, 0.0, 1.0, 0.0] and metrics["train/resample_rounds"] == 1
    assert metrics["train/zero_std_frac"] == 0.0  # the shaped rewards the advantages see differ in both groups

    run = _fake_run({**dapo, "dynamic_sampling_on": "total"}, answers, rows, "rollout.max_new_tokens=4",
                    lengths=lengths)
    groups, metrics = sample_groups(run, 2)
    assert [r["prompt"] for r in groups.rows] == ["a", "c"] and groups.rewards == [1.0, 0.0, 1.0, 0.0]
    assert metrics["train/resample_rounds"] == 0


def test_dynamic_sampling_on_names_a_reward_of_the_run():
    from grpo.errors import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"algorithm.dynamic_sampling_on: .*'format'.*\['math_accuracy'\]"):
        compose(["algorithm=dapo", "algorithm.dynamic_sampling_on=format"])
    with pytest.raises(ConfigError, match=r"reward.accuracy: .*'code_tests'"):
        compose(["algorithm=dapo", "reward.accuracy=code_tests"])
    with pytest.raises(ConfigError, match=r"reward.accuracy: 'math_accuracy' has weight 0"):  # reward=rm's ground truth
        compose(["algorithm=dapo", "reward=rm"])
    compose(["algorithm=dapo", "reward=rm", "algorithm.dynamic_sampling_on=reward_model"])
    compose(["algorithm=dapo", "algorithm.dynamic_sampling_on=total"])
    compose(["algorithm.dynamic_sampling_on=format"])  # dynamic sampling off: nothing filters on it


def test_without_dynamic_sampling_every_group_is_kept():
    from grpo.training.sampling import sample_groups

    rows = [{"prompt": p, "answer": "1"} for p in "ab"]
    run = _fake_run({}, {"a": ["1", "1"], "b": ["0", "1"]}, rows)
    groups, metrics = sample_groups(run, 2)
    assert len(groups.rows) == 2 and metrics["train/zero_std_frac"] == 0.5


def test_mini_batches_cover_every_row_even_when_they_do_not_divide_it():
    from grpo.training.update import mini_batch_rows

    assert mini_batch_rows(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert mini_batch_rows(1, 2) == [[], [0]]
    assert mini_batch_rows(4, 4) == [[0], [1], [2], [3]]


def test_the_remainder_rows_are_trained_and_fewer_rows_than_mini_batches_is_no_error(tiny_random_dir):
    model, tok = load(tiny_random_dir)
    algo = AlgorithmConfig(group_size=1, mini_batches=2)
    batch = _random_batch(tok, n=3, group_size=1)
    backend = RecordingBackend(model)
    update_policy(backend, batch, algo, temperature=1.0, micro_batch_tokens=10_000, max_new_tokens=8)
    # rows [0] then [1, 2]: the second optimiser step's gradient is that of rows 1 and 2 alone
    alone = RecordingBackend(model)
    update_policy(alone, batch.select([1, 2]), AlgorithmConfig(group_size=1), temperature=1.0,
                  micro_batch_tokens=10_000, max_new_tokens=8)
    for name, g in alone.grads[0].items():
        torch.testing.assert_close(backend.grads[1][name], g, atol=1e-6, rtol=0, msg=name)
    one = RecordingBackend(model)
    update_policy(one, _random_batch(tok, n=1, group_size=1), algo, temperature=1.0, micro_batch_tokens=10_000,
                  max_new_tokens=8)
    assert len(one.grads) == 1  # the empty mini-batch took no optimiser step


def test_a_step_whose_every_token_is_masked_is_a_no_op_with_a_reason(tmp_path, tiny_random_dir, caplog):
    from grpo.cli import train_from_config
    from tests.conftest import compose

    # min_new_tokens = max_new_tokens: EOS is held back, every completion is truncated, and
    # mask_truncated masks them all
    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32", "train.max_steps=2",
                   "train.eval_every=0",
                   "train.eval_before=false", "rollout.max_new_tokens=2", "rollout.min_new_tokens=2",
                   "algorithm.mask_truncated=true", "tracking.progress_bar=false", "train.prompts_per_step=4"])
    cfg.run_dir = str(tmp_path / "run")
    before = {n: p.detach().clone() for n, p in load(tiny_random_dir)[0].named_parameters()}
    history = train_from_config(cfg)
    assert history == [] or all("train/loss" not in h for h in history)  # no update on any step
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"train/loss"' not in line and "NaN" not in line for line in lines)  # steps 0-2
    assert caplog.text.count("every completion token is masked") == 2
    from grpo.training.checkpoint import latest_checkpoint

    after = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "run") / "policy")
    for name, p in after.named_parameters():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0, msg=name)


def _dropout_model_dir(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo.builtin.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, attention_dropout=0.5,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "dropout_model")
    tok.save_pretrained(tmp_path / "dropout_model")
    return tmp_path / "dropout_model"


def test_policy_dropout_is_off_unless_asked_for(tmp_path):
    from grpo.model.loading import load_policy
    from tests.conftest import compose

    path = _dropout_model_dir(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for keep, expect_equal in ((False, True), (True, False)):
        cfg = compose(["model=hf", f"model.path={path}", "model.dtype=float32", f"model.dropout={str(keep).lower()}"])
        model, _ = load_policy(str(path), cfg)
        model.train()  # as the backend trains it
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(first, second) == expect_equal, keep


def test_the_ppo_critic_has_no_dropout(tmp_path, tiny_random_dir):
    from types import SimpleNamespace

    from grpo.algorithms.ppo import build_critic
    from tests.conftest import compose

    path = _dropout_model_dir(tmp_path)
    cfg = compose(["algorithm=ppo", "model=hf", f"model.path={path}", "model.dtype=float32"])
    critic, _ = build_critic(SimpleNamespace(cfg=cfg), str(path))
    torch.nn.init.normal_(critic.score.weight)  # a trained head: its input's dropout would show
    critic.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(critic(input_ids=ids).logits, critic(input_ids=ids).logits)


def quarter_none(prompts, completions, **_):
    """1, 0, 1, None, ... (used by name below)."""
    return [None if i % 4 == 3 else float(i % 2 == 0) for i in range(len(completions))]


def test_every_reward_metric_the_readme_lists_reaches_metrics_jsonl(tmp_path, tiny_random_dir):
    import json

    from grpo.cli import train_from_config
    from tests.conftest import compose

    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32", "train.max_steps=1",
                   "train.eval_before=false", "train.eval_every=0", "tracking.progress_bar=false",
                   "train.prompts_per_step=2", "algorithm.group_size=4", "task.arithmetic.num_eval=2",
                   "reward.functions=[{name: 'tests.integration.test_trainer:quarter_none'},"
                   "{name: 'tests.integration.test_reliability:always_raises', weight: 0.0},"
                   "{name: math_accuracy, weight: 0.0, timeout_s: 30}]",
                   "reward.max_infra_error_frac=1.0"])  # always_raises fails every sample: keep the run going
    cfg.run_dir = str(tmp_path / "run")
    train_from_config(cfg)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # quarter_none on 8 samples: 1, 0, 1, None, 1, 0, 1, None -> mean 4/6, std sqrt(2/9), 2 of 8 None
    assert line["reward/tests.integration.test_trainer:quarter_none_none_frac"] == 0.25
    assert (abs(line["reward/tests.integration.test_trainer:quarter_none_mean"] - 4 / 6) < 1e-9
            and abs(line["reward/tests.integration.test_trainer:quarter_none_std"] - (2 / 9) ** 0.5) < 1e-9)
    assert (line["reward/tests.integration.test_reliability:always_raises_error_frac"] == 1.0
            and line["reward/tests.integration.test_reliability:always_raises_none_frac"] == 1.0)
    assert line["reward/tests.integration.test_trainer:quarter_none_error_frac"] == 0.0
    assert line["reward/math_accuracy_deadline_misses"] == 0.0
