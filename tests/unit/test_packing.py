"""`backend.packing`: padding-free layouts of the log-prob forward (grpo/core/packing.py).

- the layouts, worked by hand: rows, positions, the groups mask, the micro-batch plan;
- packed log-probs, entropy and the update's parameter gradients equal the padded ones (float32
  rounding), on a ragged batch with left padding, multi-turn environment tokens and several
  micro-batches, under sdpa and eager attention, on a plain and on a LoRA policy;
- no leak: changing one packed sequence's tokens moves no other sequence's log-probs;
- a groups forward saves its attention mask for backward once, not once per layer;
- each value through the real loop (`train_step`), a bad value and flash attention refused by name;
- `auto` (the default) resolved by attention implementation, once, when the run is built: the loop's forwards
  and `config.yaml` see the concrete layout;
- the PPO critic's values equal the padded ones, and one PPO update (policy and critic) gives the padded
  update's gradients with the critic's forward seen running on the packed layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo.algorithms import grpo as trainer
from grpo.algorithms.ppo import ValueModel, critic_values, load_critic
from grpo.backends import LogProbModel
from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model
from grpo.config import AlgorithmConfig
from grpo.core.batch import layout_batch
from grpo.core.logprobs import sequence_logprobs
from grpo.core.packing import auto_packing, greedy_batches, micro_batches, pack, plan_micro_batches
from grpo.errors import ConfigError
from grpo.training.run import check_packing
from grpo.training.update import score_logprobs, update_policy
from tests.conftest import compose
from tests.distributed.data_parallel_step import with_random_adapters
from tests.distributed.ppo_data_parallel_step import ppo_update
from tests.distributed.test_distributed import assert_same_ppo_update
from tests.integration.test_supervised import spy_on_packing

PACKED = ("sequences", "groups")


class RecordingBackend:
    """A fake TrainBackend: keeps each optimiser step's accumulated gradients instead of stepping."""

    def __init__(self, model, forward=None):
        self.policy = model
        self.model = forward or model
        self.grads = []

    def backward(self, loss):
        loss.backward()

    def step(self, skip: bool = False):
        self.grads.append({n: p.grad.clone() for n, p in self.policy.named_parameters() if p.grad is not None})
        self.policy.zero_grad(set_to_none=True)
        return {"grad_norm": 0.0, "lr": 0.0, "skipped": False}


def ragged_batch(group_size=4, groups=3, seed=0):
    """Prompts of 2..12 tokens (left padding), completions of 0..30 with a long tail, some with
    environment tokens (loss mask 0) inside them, random advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 13, (groups,), generator=g)]
    lengths = [int(k) for k in (torch.rand(groups * group_size, generator=g) ** 3 * 31).long()]
    lengths[0], lengths[1], lengths[5] = 12, 0, 30  # an empty completion, one at the cap
    completions = [torch.randint(3, 60, (k,), generator=g).tolist() for k in lengths]
    loss_masks = [[int(not (i % 2 == 0 and 2 <= t < 5)) for t in range(k)] for i, k in enumerate(lengths)]
    batch = layout_batch(prompts, completions, group_size, pad_id=0, loss_masks=loss_masks)
    batch.advantages = torch.randn(len(completions), generator=g)
    return batch


def tiny(attention="sdpa", lora=False):
    model = build_tiny_model(len(build_char_tokenizer()), seed=0).float()
    model.set_attn_implementation(attention)
    return with_random_adapters(model, 4) if lora else model  # B random: A gets a gradient too


def test_layouts_by_hand():
    batch = layout_batch([[5, 6], [7]], [[1, 2, 3], [4], [8, 9], []], group_size=2, pad_id=0)
    # ids [[5 6 1 2 3] [5 6 4 . .] [. 7 8 9 .] [. 7 . . .]], P = 2; sequence lengths 5, 3, 3, 1
    seq = pack(batch.input_ids, batch.attention_mask, batch.prompt_width, "sequences")
    # first fit by decreasing length into width 5: [s0], [s1 s3 .], [s2 . .]
    assert seq.input_ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 7, 0], [7, 8, 9, 0, 0]]
    assert seq.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 0, 1]]
    assert seq.attention_mask is None
    # scored: s0 at packed 1, 2, 3 -> its tokens 1, 2, 3; s1 at 6 -> 4; s2 at 10, 11 -> 8, 9 (s3 has no completion)
    assert seq.source.tolist() == [1, 2, 3, 6, 10, 11] and seq.targets.tolist() == [1, 2, 3, 4, 8, 9]
    # into the padded [4, 4] log-prob columns: row 0 columns 1..3, row 1 column 1, row 2 columns 1, 2
    assert seq.dest.tolist() == [1, 2, 3, 5, 9, 10]

    grp = pack(batch.input_ids, batch.attention_mask, batch.prompt_width, "groups")
    assert grp.input_ids.tolist() == [[5, 6, 1, 2, 3, 4], [7, 8, 9, 0, 0, 0]]
    assert grp.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 2, 0, 1, 2]]
    # the first token of both completions of group 0 is scored from the prompt's last position (1);
    # group 1's prompt is one token, at flat index 6
    assert grp.source.tolist() == [1, 2, 3, 1, 6, 7] and grp.targets.tolist() == [1, 2, 3, 4, 8, 9]
    assert grp.dest.tolist() == [1, 2, 3, 5, 9, 10]
    m = grp.attention_mask[0, 0].int()  # [6, 6] row 0: the second completion (column 5) sees the prompt and itself
    assert m[5].tolist() == [1, 1, 0, 0, 0, 1] and m[4].tolist() == [1, 1, 1, 1, 1, 0]
    assert grp.attention_mask[1, 0, 4].int().tolist() == [1, 0, 0, 1, 1, 0]  # padding sees the prompt and padding


def test_micro_batch_plans_cost_the_packed_layout():
    batch = layout_batch([[5, 6], [7, 8]], [[1, 2, 3], [4, 5, 6], [9]], group_size=2, pad_id=0)
    ids, mask = batch.input_ids, batch.attention_mask
    # groups: [0, 1] is one row of 2 + 3 + 3 = 8 tokens; adding row 2 makes two rows of 8: 16 > 8
    assert plan_micro_batches(ids, mask, 2, 8, "groups") == [[0, 1], [2]]
    # sequences: real tokens 5, 5, 3: [0] 5, [0, 1] would be 10 > 9; [1, 2] is 8
    assert plan_micro_batches(ids, mask, 2, 9, "sequences") == [[0], [1, 2]]
    assert micro_batches(batch, 10, "padded") == [[0, 1], [2]]  # padded: 5 columns per row


@pytest.mark.parametrize("attention,lora", [("sdpa", False), ("eager", False), ("sdpa", True)],
                         ids=["sdpa", "eager", "sdpa-lora"])
def test_packed_logprobs_and_gradients_equal_padded(attention, lora):
    batch = ragged_batch()
    assert batch.completion_mask.sum() < batch.attention_mask[:, batch.prompt_width:].sum()  # env tokens inside
    budget = 60
    model = tiny(attention, lora)
    mask = batch.completion_mask.bool()
    padded = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=budget)  # [N, T-1]
    ref_lp, ref_ent = sequence_logprobs(model, batch.input_ids, batch.attention_mask, temperature=0.7,
                                        with_entropy=True, logits_to_keep_from=batch.prompt_width - 1)
    algo = AlgorithmConfig(group_size=4, loss_agg="seq_mean_token_mean")
    backends = {}
    for packing in ("padded", *PACKED):
        assert len(micro_batches(batch, budget, packing)) >= 3
        if packing != "padded":
            lp = score_logprobs(model, batch, temperature=0.7, micro_batch_tokens=budget, packing=packing)
            torch.testing.assert_close(lp[mask], padded[mask], atol=2e-6, rtol=0)
            lp, ent = sequence_logprobs(model, batch.input_ids, batch.attention_mask, temperature=0.7,
                                        with_entropy=True, logits_to_keep_from=batch.prompt_width - 1,
                                        packing=packing)
            torch.testing.assert_close(lp[mask], ref_lp[mask], atol=2e-6, rtol=0)
            torch.testing.assert_close(ent[mask], ref_ent[mask], atol=5e-6, rtol=0)
        backends[packing] = RecordingBackend(model, LogProbModel(model))  # through the DeepSpeed/ddp forward
        update_policy(backends[packing], batch, algo, temperature=0.7, micro_batch_tokens=budget, max_new_tokens=30,
                      packing=packing)
    expected = backends["padded"].grads[0]
    assert len(expected) > 0 and all(".lora_" in n for n in expected) == lora
    assert sum(int(g.abs().sum() > 0) for g in expected.values()) > len(expected) // 2
    for packing in PACKED:
        got = backends[packing].grads[0]
        assert set(got) == set(expected)
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, atol=2e-6, rtol=0, msg=f"{packing}: {name}")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", PACKED)
def test_no_attention_crosses_a_packed_sequence(packing, attention):
    """For each sequence: change every other sequence's completion; its own log-probs stay put."""
    batch = ragged_batch()
    model = tiny(attention)
    P, n = batch.prompt_width, len(batch)
    assert pack(batch.input_ids, batch.attention_mask, P, packing).input_ids.shape[0] < n  # sequences share rows
    mask = batch.completion_mask.bool()  # [n, T-1]
    kwargs = dict(logits_to_keep_from=P - 1, packing=packing)
    with torch.no_grad():
        before, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask, **kwargs)
        for target in range(n):
            others = torch.ones(n, dtype=torch.bool)
            others[target] = False
            changed = batch.input_ids.clone()
            completions = changed[:, P:]  # [n, C] a view
            completions[others] = torch.where(batch.attention_mask[others, P:].bool(),
                                              (completions[others] + 7) % 60 + 3, completions[others])
            after, _ = sequence_logprobs(model, changed, batch.attention_mask, **kwargs)
            assert (after - before)[others][mask[others]].abs().max() > 0.1  # the others did change
            torch.testing.assert_close(after[target][mask[target]], before[target][mask[target]], atol=1e-6, rtol=0,
                                       msg=f"sequence {target}")


def test_a_groups_forward_saves_one_mask_for_every_layer():
    """One group under sdpa with gradients on: prompt 5 tokens, 4 completions of 8, so one row of W = 5 + 4 x 8 = 37
    tokens and a [1, 1, 37, 37] mask. Every one of the tiny model's 4 layers saves that mask for backward, and it
    must be one tensor: the model's float32, additive (0 where the bool layout mask allows, float32's minimum
    elsewhere), its rows 40 elements apart (37 rounded up to a multiple of 8: CUDA's memory-efficient sdpa copies
    a mask with other strides in each layer).
    Catches: the bool mask passed to the model (sdpa makes a float copy in each layer and saves it: 4 storages of
    4 x 37 x 37 bytes where one should be), a mask of another dtype than the attention's, the alignment dropped
    (row stride 37)."""
    P, W, layers = 5, 37, 4
    batch = layout_batch([[3, 4, 5, 6, 7]], [[8 + i + j for j in range(8)] for i in range(4)], 4, pad_id=0)
    model = tiny("sdpa")
    assert model.config.num_hidden_layers == layers
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        sequence_logprobs(model, batch.input_ids, batch.attention_mask, logits_to_keep_from=P - 1, packing="groups")
    masks = [t for t in saved if t.shape == (1, 1, W, W)]
    assert len(masks) == layers
    assert len({t.untyped_storage().data_ptr() for t in masks}) == 1
    mask = masks[0]
    assert mask.dtype == torch.float32 and mask.stride(-2) == 40
    allowed = pack(batch.input_ids, batch.attention_mask, P, "groups").attention_mask  # [1, 1, 37, 37] bool
    assert torch.equal(mask, torch.zeros(()).masked_fill(~allowed, torch.finfo(torch.float32).min))


def test_groups_refuse_an_attention_without_custom_masks():
    model = tiny()
    model.config._attn_implementation = "flash_attention_2"  # the check comes before any kernel is needed
    batch = ragged_batch()
    with pytest.raises(ValueError, match="backend.packing=groups.*flash_attention_2"):
        sequence_logprobs(model, batch.input_ids, batch.attention_mask, logits_to_keep_from=batch.prompt_width - 1,
                          packing="groups")


def test_the_run_refuses_a_packing_its_attention_cannot_take_before_any_forward():
    model = tiny()
    model.config._attn_implementation = "flash_attention_2"
    cfg = compose(["backend.packing=groups"])
    with pytest.raises(ConfigError, match="backend.packing=groups.*flash_attention_2"):
        check_packing(cfg, model)
    check_packing(compose(["backend.packing=sequences"]), model)  # flash separates sequences by position ids


def test_a_bad_packing_names_the_field():
    # Catches: the value check dropped from BackendConfig.validate (compose would accept "rows")
    with pytest.raises(ConfigError, match="backend.packing: 'rows' is not one of auto, padded, sequences, groups"):
        compose(["backend.packing=rows"])


def test_auto_is_the_default_and_a_value_of_its_own():
    # Catches: the default left at padded; auto missing from the accepted values (compose refuses it)
    assert compose([]).backend.packing == "auto"
    assert compose(["backend.packing=auto"]).backend.packing == "auto"


@pytest.mark.parametrize("impl,sliding,expected", [
    ("sdpa", False, "groups"), ("eager", False, "groups"),  # a custom 4D mask: each prompt once per group
    ("flash_attention_2", False, "sequences"), ("flash_attention_3", False, "sequences"),  # varlen, no 4D mask
    ("flex_attention", False, "sequences"),
    ("sdpa", True, "sequences"),  # sliding-window layers: a custom 4D mask would drop the window
    ("paged|eager", False, "padded"),  # transformers' continuous-batching attention: neither
])
def test_auto_takes_the_first_layout_the_attention_can_isolate(impl, sliding, expected):
    # Catches: sequences tried before groups (sdpa -> sequences), flash sent to padded or to groups, an attention
    # that isolates nothing given a packed layout (paged|eager -> sequences would mix sequences), sliding ignored
    layout, why = auto_packing(impl, sliding)
    assert layout == expected and repr(impl) in why


@pytest.mark.parametrize("impl,expected", [("sdpa", "groups"), ("eager", "groups"),
                                           ("flash_attention_2", "sequences"), ("paged|eager", "padded")])
def test_the_run_resolves_auto_from_the_policy_it_loaded(impl, expected, caplog):
    """`check_packing`, where `build_run` calls it: `auto` becomes the layout, in `cfg`, with one log line.
    Flash attention cannot load on CPU; the check reads the implementation's name before any kernel runs."""
    # Catches: the implementation read from somewhere other than the loaded model (always sdpa), cfg left at auto
    # (every forward would get "auto"), the choice not logged
    model = tiny()
    model.config._attn_implementation = impl
    cfg = compose([])
    with caplog.at_level("INFO", logger="grpo"):
        check_packing(cfg, model)
    assert cfg.backend.packing == expected
    assert f"backend.packing=auto: {expected} (attention implementation {impl!r}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="grpo"):
        check_packing(cfg, model)  # the PPO critic's check comes after: it sees the layout, not auto
    assert cfg.backend.packing == expected and "auto" not in caplog.text


def parity_reward(prompts, completions, **_):
    """1 for an even-length completion, else 0: a reward with a signal on a random model."""
    return [float(len(c) % 2 == 0) for c in completions]


LOOP = ["model=hf", "model.dtype=float32", "train.max_steps=1", "train.eval_before=false", "train.eval_every=0",
        "tracking.progress_bar=false", "train.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "optim.lr=1e-3", "optim.warmup_steps=0", "algorithm.beta=0.04",
        "algorithm.mini_batches=2", "backend.micro_batch_tokens=40",
        "reward.functions=[{name: 'tests.unit.test_packing:parity_reward'}]"]


def test_each_packing_through_the_loop_gives_the_padded_step(tmp_path, tiny_random_dir):
    """One real step per value from the same seed: the same rollout, old and reference log-probs, and
    the same loss, KL and entropy; the weights moved."""
    from grpo.training.run import build_run

    out = {}
    for packing in ("padded", *PACKED):
        cfg = compose([*LOOP, f"model.path={tiny_random_dir}", f"backend.packing={packing}"])
        cfg.run_dir = str(tmp_path / packing)
        run = build_run(cfg)
        before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
        result = trainer.train_step(run, 1)
        assert result.skipped is None, result.skipped
        run.tracker.close(plot=False)
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in run.policy.named_parameters())
        out[packing] = SimpleNamespace(metrics=result.metrics, texts=result.groups.texts, moved=moved)
    base = out["padded"]
    for packing in PACKED:
        assert out[packing].texts == base.texts
        assert out[packing].moved > 1e-4
        for key in ("train/loss", "train/kl", "train/entropy", "train/clip_frac"):
            assert abs(out[packing].metrics[key] - base.metrics[key]) < 1e-5, (packing, key)


def test_a_default_run_forwards_in_the_layout_auto_chose_and_records_it(tmp_path, tiny_random_dir, monkeypatch):
    """A run built from the default config (sdpa, the tiny model's attention on CPU) and one real step: every
    log-prob forward (old, reference, update) is packed in groups, and config.yaml says groups.
    Catches: auto not resolved when the run is built (pack would be handed "auto" and raise), resolved after
    config.yaml is written (it would say auto), or the default left at padded (no forward packed)."""
    from grpo.training.run import build_run

    layouts = spy_on_packing(monkeypatch)
    cfg = compose([*LOOP, f"model.path={tiny_random_dir}"])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    assert run.cfg.backend.packing == "groups"
    result = trainer.train_step(run, 1)
    run.tracker.close(plot=False)
    assert result.skipped is None, result.skipped
    # 4 prompts x 4 in 40-token micro-batches: several forwards for old, reference and update log-probs
    assert len(layouts) >= 3 and set(layouts) == {"groups"}
    assert "packing: groups" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_critic_values_in_each_packing_equal_padded(attention, tiny_random_dir):
    """Catches: the critic's packed values read from the wrong positions (`packed.source` off by one, or the
    groups' completions not seeing their prompt), the groups mask dropped (completions see each other), and
    a packing silently ignored (the padded values, nonzero over the prompt, would come back)."""
    batch = ragged_batch()  # 3 groups x 4 sharing a prompt, prompts 2..12 tokens left-padded, an empty completion
    N, T = batch.input_ids.shape
    critic = load_critic(compose([]), str(tiny_random_dir)).float()
    critic.set_attn_implementation(attention)
    # a random head: the loaded one is zero, and all-zero values would agree in every layout
    torch.nn.init.normal_(critic.score.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    # every column that scores a completion token (environment tokens too): from P-1 on, target real
    scored = batch.attention_mask[:, 1:].bool()
    scored[:, : batch.prompt_width - 1] = False  # [N, T-1]
    assert scored.sum() > batch.completion_mask.sum() > 0  # environment tokens are scored, not in the loss
    with torch.no_grad():
        padded = critic_values(critic, batch.input_ids, batch.attention_mask)  # [N, T-1]
        assert padded[~scored].abs().sum() > 0  # the padded forward has values over the prompt
        for packing in PACKED:
            values = ValueModel(critic)(batch.input_ids, batch.attention_mask, prompt_width=batch.prompt_width,
                                        packing=packing)
            assert values.shape == (N, T - 1) == batch.completion_mask.shape and values.dtype == torch.float32
            torch.testing.assert_close(values[scored], padded[scored], atol=1e-5, rtol=0, msg=packing)
            assert values[~scored].abs().sum() == 0, packing  # nothing but completion positions is valued


class ForwardLog:
    """Records what reaches a model's forward: one (tokens forwarded, attention mask's dims) per call."""

    def __init__(self):
        self.calls = []

    def attach(self, model):
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.calls.append((kwargs["input_ids"].numel(), None if mask is None else mask.dim()))


def test_ppo_update_in_groups_gives_the_padded_gradients_and_the_critic_runs_packed(tiny_random_dir):
    """One `PPO.update` (old values, GAE, the policy's and the critic's steps) on 4 groups x 4 (prompts of 2..8
    tokens, left-padded; completions 1..8) in several 40-token micro-batches: the gradients that reach both
    optimisers are the padded update's within float32 rounding, and every critic forward, the old values' and
    the update's, ran on the groups layout (a 4D mask, fewer tokens than padded).
    Catches: `backend.packing` not passed to the critic's old values, or to its update (the log shows 2D
    masks), or the groups mask dropped (no 4D mask); a packed value read from the wrong position (GAE's
    advantages and returns and the value loss move, so both models' gradients do)."""
    grads, metrics, logs = {}, {}, {}
    for packing in ("padded", "groups"):
        logs[packing] = ForwardLog()
        metrics[packing], grads[packing] = ppo_update(str(tiny_random_dir), "torch", 4, packing,
                                                      critic_hook=logs[packing].attach)
    padded, grouped = logs["padded"].calls, logs["groups"].calls
    assert padded and all(dims == 2 for _, dims in padded)
    assert grouped and all(dims == 4 for _, dims in grouped)  # old values and every update micro-batch
    assert sum(n for n, _ in grouped) < sum(n for n, _ in padded)
    assert_same_ppo_update(metrics["padded"], grads["padded"], metrics["groups"], grads["groups"],
                           keys=("train/value_mean", "train/value_loss", "train/loss", "train/kl"))


def test_greedy_batches_cuts_in_order_and_gives_an_oversized_item_a_batch_of_its_own():
    sizes = {0: 3, 1: 4, 2: 9, 3: 1, 4: 2}
    total = lambda rows: sum(sizes[i] for i in rows)  # noqa: E731
    # 3+4 = 7 fits 8, +9 does not; 9 alone is over 8 and still goes; 1+2 = 3
    assert greedy_batches([0, 1, 2, 3, 4], total, 8) == [[0, 1], [2], [3, 4]]
    assert greedy_batches([4, 3, 0], total, 8) == [[4, 3, 0]]  # the order given is kept: 2+1+3 = 6
    assert greedy_batches([], total, 8) == []
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        greedy_batches([0], total, 0)
