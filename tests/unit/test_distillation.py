"""Distillation's math on hand-built tensors: the per-token reverse-KL advantage through the policy loss, GKD's
generalised JSD at beta 0, 1 and in between, its chunked computation against full logits, the same JSD, GKD loss
and gradient in every `backend.packing` layout, and GKD's mixture."""

import math
from types import SimpleNamespace

import pytest
import torch

from grpo.algorithms.gkd import jsd_update, mixture_rows, on_policy_count
from grpo.backends import LogProbModel
from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model
from grpo.core.logprobs import scored_hidden, sequence_jsd
from grpo.core.losses import POLICY_LOSSES, aggregate, generalized_jsd, reverse_kl_advantages
from grpo.core.packing import micro_batches
from grpo.errors import ConfigError
from grpo.training.sampling import Groups
from tests.conftest import compose
from tests.unit.test_logprobs import VOCAB, left_padded
from tests.unit.test_packing import RecordingBackend, ragged_batch

transformers = pytest.importorskip("transformers")

ATOL = 1e-6
LOG = math.log


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------- distill: the per-token reverse KL


def test_reverse_kl_advantage_loss_and_gradient_by_hand():
    # student log-probs of the sampled tokens, teacher's; row 0's last column is padding (teacher -9 there, and a
    # student 0 that must not leak into the advantage)
    student = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -3.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[-2.0, -1.0, -9.0], [-0.5, -1.0, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # A = -(student - teacher) on the mask: row 0 [-1, 1, 0], row 1 [0, 2, -3]
    adv = reverse_kl_advantages(student, teacher, mask)
    close(adv, [[-1.0, 1.0, 0.0], [0.0, 2.0, -3.0]])
    assert not adv.requires_grad  # a constant of the policy-gradient loss
    # ppo_clip with old = the student itself (ratio 1): per-token loss -A; token mean over 5 tokens:
    # (1 - 1 - 2 + 3 + 0) / 5 = 0.2 = the sampled reverse-KL estimate sum(student - teacher) / 5
    per_token, _ = POLICY_LOSSES["ppo_clip"](student, student.detach(), adv, mask, clip_low=0.2, clip_high=0.2,
                                             ratio_level="token")
    loss = aggregate(per_token, mask, "token_mean")
    close(loss, 0.2)
    loss.backward()
    # d loss / d log pi(y_t) = -A_t / 5 = (log pi - log q) / 5: row 0 [0.2, -0.2, 0], row 1 [0, -0.4, 0.6]
    close(student.grad, [[0.2, -0.2, 0.0], [0.0, -0.4, 0.6]])


# ---------------------------------------------------------------- gkd: the generalised JSD

# Two-token vocabulary: student p = [0.5, 0.5], teacher q = [0.75, 0.25].
P, Q = [0.5, 0.5], [0.75, 0.25]


def kl(a, b):
    return sum(x * LOG(x / y) for x, y in zip(a, b))


@pytest.mark.parametrize("beta, expected", [
    # beta 0, forward KL(q || p) = 0.75 log 1.5 + 0.25 log 0.5 = 0.1308120
    (0.0, 0.75 * LOG(1.5) + 0.25 * LOG(0.5)),
    # beta 1, reverse KL(p || q) = 0.5 log(2/3) + 0.5 log 2 = 0.1438410
    (1.0, 0.5 * LOG(2 / 3) + 0.5 * LOG(2)),
    # beta 0.5: M = [0.625, 0.375]; 0.5 KL(q || M) + 0.5 KL(p || M) = 0.5 x 0.0353749 + 0.5 x 0.0322693 = 0.0338221
    (0.5, 0.5 * kl(Q, [0.625, 0.375]) + 0.5 * kl(P, [0.625, 0.375])),
    # beta 0.25: M = 0.25 q + 0.75 p = [0.5625, 0.4375]; 0.25 KL(q || M) + 0.75 KL(p || M) = 0.0248700
    (0.25, 0.25 * kl(Q, [0.5625, 0.4375]) + 0.75 * kl(P, [0.5625, 0.4375])),
])
def test_generalized_jsd_hand_values(beta, expected):
    value = generalized_jsd(torch.tensor(P).log(), torch.tensor(Q).log(), beta)
    close(value, expected)


def test_generalized_jsd_gradients_by_hand():
    # beta 0: d KL(q || softmax(z)) / dz = p - q = [-0.25, 0.25]
    # beta 1: d KL(p || q) / dz_i = p_i (log p_i - log q_i - KL(p || q)) = 0.5 x [-0.5493061, 0.5493061]
    for beta, expected in ((0.0, [-0.25, 0.25]), (1.0, [-0.2746531, 0.2746531])):
        z = torch.zeros(2, requires_grad=True)  # softmax(0, 0) = p
        generalized_jsd(z.log_softmax(-1), torch.tensor(Q).log(), beta).backward()
        close(z.grad, expected)


def test_generalized_jsd_is_zero_between_equal_distributions_and_refuses_a_bad_beta():
    logp = torch.tensor([[0.2, 0.3, 0.5]]).log()
    for beta in (0.0, 0.3, 1.0):
        close(generalized_jsd(logp, logp, beta), [0.0])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logp, logp, 1.5)


def qwen(seed: int):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                      num_key_value_heads=1, head_dim=32, intermediate_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).float().eval()


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])  # 1000: one chunk, nothing checkpointed
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_jsd_and_its_gradient_equal_full_logits(chunk_size, beta):
    student, teacher = qwen(0), qwen(1)
    g = torch.Generator().manual_seed(2)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12)])
    k = 3  # completions from column 4: column 3 scores the first completion token
    rows = scored_hidden(teacher, ids, mask, logits_to_keep_from=k)
    jsd = sequence_jsd(student, ids, mask, teacher_rows=rows, teacher_head=teacher.get_output_embeddings(), beta=beta,
                       temperature=0.7, chunk_size=chunk_size, logits_to_keep_from=k)  # [3, T-1]
    weights = torch.rand(jsd.shape, generator=g)
    (jsd * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # the reference: every position's full logits at once, the JSD where a real token follows, from column k on
    s_logits, t_logits = (m(input_ids=ids, attention_mask=mask).logits[:, :-1] for m in (student, teacher))
    full = generalized_jsd((s_logits / 0.7).log_softmax(-1), (t_logits.detach() / 0.7).log_softmax(-1), beta)
    keep = mask[:, 1:].bool() & (torch.arange(ids.shape[1] - 1) >= k)
    full = torch.where(keep, full, 0.0)
    (full * weights).sum().backward()
    torch.testing.assert_close(jsd.detach(), full.detach(), atol=1e-5, rtol=0)
    assert float(full.detach().abs().sum()) > 0.1  # two different models: a real divergence
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, atol=1e-5, rtol=0, msg=name)


LAYOUTS = ("padded", "sequences", "groups")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gkd_jsd_loss_and_gradients_are_the_same_in_every_layout(attention):
    """GKD's JSD at every position, its loss and its gradient on one ragged batch (3 groups of 4 with left padding,
    an empty completion, environment tokens masked inside completions), student and teacher each forwarded padded,
    in packed sequences or in prompt groups, over 3-5 micro-batches: the padded layout's values.
    Catches: the packed positions scattered back in the packed rows' order rather than the padded one (`dest`
    unsorted: the JSD lands on the wrong columns, 8e-3 off; masked columns then count, loss 1.4e-5 and gradient
    4e-4 off through the sequences layout, whose micro-batch of rows 4-5 packs row 5 first), or a teacher's
    rows taken in the packed order while the student's are in the padded one (each position against another
    position's teacher: 1.5e-2 off).
    Tolerances, float32: a packed forward rounds its hidden states differently; measured (sdpa and eager, AVX-512)
    JSD 4.8e-8 apart at values ~0.02 (25 ulps), losses 9e-10, gradients 3.3e-9 at sizes up to 0.013 (4 ulps); the
    bounds are 10-15x those, far under the mutations' gaps."""
    batch = ragged_batch()
    student, teacher = (build_tiny_model(len(build_char_tokenizer()), seed=seed).float() for seed in (0, 1))
    for model in (student, teacher):
        model.set_attn_implementation(attention)
    mask, k = batch.completion_mask.bool(), batch.prompt_width - 1
    head = teacher.get_output_embeddings()
    jsd = {}
    for s_layout in LAYOUTS:
        for t_layout in LAYOUTS:  # a teacher whose attention cannot take the student's layout runs padded
            rows = scored_hidden(teacher, batch.input_ids, batch.attention_mask, logits_to_keep_from=k,
                                 packing=t_layout)
            with torch.no_grad():
                jsd[s_layout, t_layout] = sequence_jsd(student, batch.input_ids, batch.attention_mask,
                                                       teacher_rows=rows, teacher_head=head, beta=0.5,
                                                       temperature=0.7, chunk_size=7, logits_to_keep_from=k,
                                                       packing=s_layout)  # [N, T-1]
    expected = jsd["padded", "padded"]
    assert float(expected[mask].min()) > 1e-3  # two different random models: a divergence at every token
    for key, values in jsd.items():
        torch.testing.assert_close(values[mask], expected[mask], atol=5e-7, rtol=0, msg=str(key))
    out = {}
    for layout in LAYOUTS:
        cfg = compose(["algorithm=gkd", "algorithm.teacher.path=/unused", f"backend.packing={layout}",
                       "backend.micro_batch_tokens=75", "rollout.temperature=0.7", "algorithm.gkd.beta=0.5",
                       "algorithm.teacher.chunk_size=7"])
        assert len(micro_batches(batch, 75, layout)) >= 3
        backend = RecordingBackend(student, LogProbModel(student))  # through the DeepSpeed/ddp forward
        metrics = jsd_update(SimpleNamespace(cfg=cfg, backend=backend, teacher=teacher), batch)
        out[layout] = metrics["gkd/jsd"], backend.grads[0]
    loss, grads = out["padded"]
    # the token mean of the masked JSD, worked from the padded map above
    assert abs(loss - float(expected[mask].mean())) < 1e-7
    assert sum(int(g.abs().sum() > 0) for g in grads.values()) > len(grads) // 2  # a real gradient
    for layout in LAYOUTS[1:]:
        assert abs(out[layout][0] - loss) < 1e-7, layout
        for name, g in grads.items():
            torch.testing.assert_close(out[layout][1][name], g, atol=5e-8, rtol=0, msg=f"{layout}: {name}")


# ---------------------------------------------------------------- gkd: the mixture


@pytest.mark.parametrize("prompts, lmbda, expected", [
    (8, 0.0, 0), (8, 1.0, 8), (8, 0.5, 4), (8, 0.3, 2),  # 2.4 -> 2
    (4, 0.625, 2),  # 2.5 -> 2, half to even
    (4, 0.875, 4),  # 3.5 -> 4
])
def test_the_on_policy_share_of_a_ranks_prompts(prompts, lmbda, expected):
    assert on_policy_count(prompts, lmbda) == expected


def test_the_mixture_is_the_samples_then_each_reference_answer_with_eos():
    tok = build_char_tokenizer()
    cfg = SimpleNamespace(algorithm=SimpleNamespace(group_size=2, gkd=SimpleNamespace(column="answer")))
    run = SimpleNamespace(tokenizer=tok, cfg=cfg)
    ids = [tok("1+2=", add_special_tokens=False)["input_ids"], tok("3+4=", add_special_tokens=False)["input_ids"]]
    samples = Groups(rows=[{"prompt": "1+2="}], prompt_ids=[ids[0]], completion_ids=[[5, 6], [7]], texts=["", ""],
                     truncated=[False, False], sampler_logprobs=None, per_reward={}, rewards=[None, None])
    prompts, completions = mixture_rows(run, samples, [{"prompt": "3+4=", "answer": "7"}])
    # G = 2 samples of the on-policy prompt, then the reference row: its prompt, "7" and EOS
    assert prompts == [ids[0], ids[0], ids[1]]
    assert completions == [[5, 6], [7], tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    with pytest.raises(ValueError, match="algorithm.gkd.column"):
        mixture_rows(run, samples, [{"prompt": "3+4="}])


# ---------------------------------------------------------------- the config


@pytest.mark.parametrize("overrides, field", [
    (["algorithm=grpo", "algorithm.teacher.path=/x"], "algorithm.teacher.path"),  # a teacher nothing uses
    (["algorithm=distill", "algorithm.teacher.path=/x", "algorithm.teacher.dtype=float16"], "algorithm.teacher.dtype"),
    (["algorithm=gkd", "algorithm.teacher.path=/x", "algorithm.gkd.lmbda=1.5"], "algorithm.gkd.lmbda"),
    (["algorithm=gkd", "algorithm.teacher.path=/x", "algorithm.gkd.beta=-0.1"], "algorithm.gkd.beta"),
    (["algorithm=gkd", "algorithm.teacher.path=/x", "algorithm.reward_weight=1"], "algorithm.reward_weight"),
    (["algorithm=gkd", "algorithm.teacher.path=/x", "algorithm.beta=0.1"], "algorithm.beta"),  # no reference to load
    (["algorithm=distill", "algorithm.teacher.path=/x", "algorithm.policy_loss=gmpo"], "algorithm.policy_loss"),
])
def test_bad_distillation_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        compose(overrides)


def test_a_distillation_loop_without_a_teacher_names_the_field():
    with pytest.raises(Exception, match="teacher.path"):
        compose(["algorithm=distill"])
