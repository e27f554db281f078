"""Per-token log-probs and entropy of given tokens under a causal LM, chunked over rows.

The full logits of a batch are `[B, T, V]`; with a 150k vocabulary and float32 that is the
largest tensor of a training step by far. `sequence_logprobs` runs the model's backbone once,
then applies the output embedding to at most `chunk_size` positions at a time, so only one
chunk's `[chunk_size, V]` float32 logits exist at any moment, in the forward pass and in the
backward pass alike (each chunk is recomputed in backward under activation checkpointing).
By default a chunk holds `LOGITS_CHUNK_ELEMENTS // V` positions (64 MiB of float32 logits:
~110 positions of a 151,936-token vocabulary, the whole batch of a 100-token one). When the
whole batch fits in one chunk nothing is checkpointed: recomputing it would save no memory.

Conventions, shared by both functions here:

- `logprobs[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1])`, shape `[B, T-1]`.
- The distribution is the tempered one, `softmax(logits / temperature)`, computed in float32;
  `entropy[:, t] = -sum_v p_v log p_v` of that distribution, a metric returned without a graph.
- Columns before `logits_to_keep_from`, and columns whose target token is padding, are skipped and
  returned as zeros (not dropped), so the outputs stay aligned with `input_ids[:, 1:]` and with any mask
  built over it; the output embedding runs on the scored positions only, in every layout. For a prompt block
  of width P followed by completions, pass `logits_to_keep_from=P - 1`: column P-1 scores the
  first completion token.
- Position ids default to `attention_mask.cumsum(-1) - 1` clamped at 0, and are always passed to
  the backbone explicitly. This is what transformers' `generate` uses under left padding
  (`GenerationMixin._prepare_position_ids_for_generation`: `cumsum(-1) - 1`, then padding set to 0;
  each new token gets the previous position + 1), so the trainer scores a completion at the
  positions the sampler produced it at. The two differ only at padding that follows real tokens
  (0 there, the last position here), which is masked out and cannot affect earlier tokens.
- `packing="sequences"` or `"groups"` (`backend.packing`, `grpo.core.packing`) forwards a padding-free
  layout of the same rows and scatters its log-probs back into these columns.

`sequence_jsd` is the same walk for distillation over the whole vocabulary (GKD): the student's and the
teacher's logits exist one chunk of positions at a time, the teacher's hidden states having been computed
once (`scored_hidden`), so a large vocabulary costs one chunk's `[chunk_size, V]` of each model. Both forward in
any layout; their scored positions meet in the padded layout's order.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from grpo.core.losses import generalized_jsd
from grpo.core.packing import layout_refusal, pack

# Logits elements per chunk: 64 MiB in float32. Above 32 MiB on purpose: glibc's malloc serves
# blocks over 32 MiB (its largest mmap threshold) by mmap and returns them to the system on free,
# while smaller blocks stay in its heap. `python -m scripts.bench.logprob_memory --methods ours --chunk-size N`:
# peak RSS growth 3866 MiB at 55 positions (31.9 MiB), 834 MiB at 56 (32.4 MiB), 770 MiB at the default.
LOGITS_CHUNK_ELEMENTS = 2**24


def _score_in_chunks(head, rows, targets, temperature: float, with_entropy: bool, chunk_size: int,
                     num_chunks: int = 0):
    """Log-prob (and entropy) chunks of `rows` [R, H] under the output embedding `head`, `chunk_size` rows at
    a time, at least `num_chunks` chunks (the extra ones empty); each chunk checkpointed when gradients are on and
    there is more than one."""
    in_backward = False  # set once every chunk has been scored: later calls are recomputations

    def score(h, y):
        # The entropy is a detached metric: recomputing it in backward would be wasted work.
        return _score_logits(head(h), y, temperature, with_entropy and not in_backward)

    starts = _chunk_starts(rows.shape[0], chunk_size, num_chunks)
    recompute = torch.is_grad_enabled() and len(starts) > 1  # padded or not: as many head calls on every rank
    lp_chunks, ent_chunks = [], []
    for start in starts:
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        lp, ent = checkpoint(score, h, y, use_reentrant=False) if recompute else score(h, y)
        lp_chunks.append(lp)
        ent_chunks.append(ent)
    in_backward = True
    return lp_chunks, ent_chunks


def _chunk_starts(rows: int, chunk_size: int, num_chunks: int) -> list[int]:
    """The first row of each chunk: one per `chunk_size` of `rows`, then empty chunks (starting past the last row)
    up to `num_chunks`. E.g. 7 rows, chunks of 3, num_chunks 4: [0, 3, 6, 7]."""
    starts = list(range(0, rows, chunk_size))
    return starts + [rows] * (num_chunks - len(starts))


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    logits_to_keep_from: int = 0,
    packing: str = "padded",
    num_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optionally entropy) of `input_ids[:, 1:]`, chunked over positions.

    Runs the backbone of `model` (a transformers `*ForCausalLM`, not wrapped in DDP) to get the last
    hidden states, then the output embedding on `chunk_size` of the scored positions at a time (those from
    column `logits_to_keep_from` on whose target is a real token; default `LOGITS_CHUNK_ELEMENTS // V`).
    Differentiable; when gradients are enabled and there is more than one chunk, each chunk is
    checkpointed, so backward also holds one chunk's logits at a time.

    Returns `(logprobs [B, T-1], entropy [B, T-1] or None)`, float32, zeros before column `logits_to_keep_from`
    and where the target is padding (see the module docstring). With `packing` other than `padded`, the rows are
    forwarded in that padding-free layout (`grpo.core.packing`; positions are its own). `num_chunks`: at least this
    many chunks, the extra ones empty: under ZeRO-3 each chunk gathers the partitioned output embedding, so every
    rank must score as many (`head_chunks`, the largest count over ranks: `grpo.backends.LogProbModel`)."""
    _check_args(input_ids, attention_mask, temperature, logits_to_keep_from)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_plain_head(model)
    backbone = _backbone(model)
    head = model.get_output_embeddings()
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size(head))
    if packing != "padded":
        if position_ids is not None:
            raise ValueError(f"packing={packing!r} lays out its own position ids: pass position_ids=None")
        return _packed_logprobs(model, backbone, head, input_ids, attention_mask, packing, temperature=temperature,
                                chunk_size=chunk_size, with_entropy=with_entropy,
                                logits_to_keep_from=logits_to_keep_from, num_chunks=num_chunks)
    if position_ids is None:
        position_ids = _position_ids(attention_mask)

    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, T, H]

    B, T = input_ids.shape
    k = logits_to_keep_from
    # The head sees only positions whose next token is real: padding inside the completion block never
    # reaches the vocabulary projection (the largest matmul of a small model's step).
    scored = attention_mask[:, k + 1 :].reshape(-1).nonzero().squeeze(-1)  # [M] of B*L, L = T-1-k
    rows = hidden[:, k : T - 1].reshape(-1, hidden.shape[-1])[scored]  # [M, H]
    targets = input_ids[:, k + 1 :].reshape(-1)[scored]  # [M]
    lp_chunks, ent_chunks = _score_in_chunks(head, rows, targets, temperature, with_entropy, chunk_size, num_chunks)

    def scatter(values):  # [M] -> [B, T-1]: zeros before column k and where the target is padding
        return _left_zeros(values.new_zeros(B * (T - 1 - k)).index_copy(0, scored, values).view(B, T - 1 - k), k)

    return scatter(_cat_rows(lp_chunks, rows)), scatter(_cat_rows(ent_chunks, rows)) if with_entropy else None


@torch.no_grad()
def scored_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  logits_to_keep_from: int = 0, packing: str = "padded") -> torch.Tensor:
    """The last hidden states [M, H] of `model` (a bare causal LM) at the positions `sequence_logprobs` scores
    (column `logits_to_keep_from` on, target not padding), in the padded layout's row-major order whatever layout
    `packing` forwards; no gradient. The teacher's side of `sequence_jsd`."""
    _check_args(input_ids, attention_mask, 1.0, logits_to_keep_from)
    return _scored_states(model, input_ids, attention_mask, logits_to_keep_from, packing)[0]  # [M, H]


def sequence_jsd(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 teacher_rows: torch.Tensor, teacher_head: nn.Module, beta: float, temperature: float = 1.0,
                 chunk_size: int | None = None, logits_to_keep_from: int = 0, packing: str = "padded",
                 num_chunks: int = 0) -> torch.Tensor:
    """The generalised JSD (`grpo.core.losses.generalized_jsd`, `beta`) between the student `model`'s and the
    teacher's next-token distributions at each scored position, `[B, T-1]` float32, zeros where
    `sequence_logprobs` puts zeros. `teacher_rows` [M, H_t] are the teacher's hidden states there
    (`scored_hidden`, on the teacher's device, in any layout), `teacher_head` its output embedding. Both
    distributions are tempered by `temperature`. Differentiable in the student; chunked over positions
    (`chunk_size`, default `LOGITS_CHUNK_ELEMENTS // V`) and checkpointed per chunk as `sequence_logprobs` is; the
    student forwarded in the layout `packing`. `num_chunks`: at least this many chunks, the extra ones empty: under
    ZeRO-3 each chunk gathers the partitioned output embedding (forward, recomputation and backward), so every rank
    must score as many (`head_chunks`, the largest count over ranks)."""
    _check_args(input_ids, attention_mask, temperature, logits_to_keep_from)
    _check_plain_head(model)
    head = model.get_output_embeddings()
    if vocab_size(teacher_head) != vocab_size(head):
        raise ValueError(f"the teacher's vocabulary ({vocab_size(teacher_head)}) is not the student's "
                         f"({vocab_size(head)})")
    chunk_size = chunk_size or default_chunk_size(vocab_size(head))
    rows, dest = _scored_states(model, input_ids, attention_mask, logits_to_keep_from, packing)  # [M, H], [M]
    if teacher_rows.shape[0] != rows.shape[0]:
        raise ValueError(f"teacher_rows holds {teacher_rows.shape[0]} positions, the batch scores {rows.shape[0]}")

    def score(h, t):
        s_logp = F.log_softmax(head(h).float() / temperature, dim=-1)  # [c, V]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher_head(t).float() / temperature, dim=-1).to(s_logp.device)  # [c, V]
        return generalized_jsd(s_logp, t_logp, beta)  # [c]

    starts = _chunk_starts(rows.shape[0], chunk_size, num_chunks)
    recompute = torch.is_grad_enabled() and len(starts) > 1
    chunks = [checkpoint(score, rows[i : i + chunk_size], teacher_rows[i : i + chunk_size], use_reentrant=False)
              if recompute else score(rows[i : i + chunk_size], teacher_rows[i : i + chunk_size]) for i in starts]
    B, T = input_ids.shape
    values = _cat_rows(chunks, rows)  # [M]
    return values.new_zeros(B * (T - 1)).index_copy(0, dest, values).view(B, T - 1)


def head_chunks(attention_mask: torch.Tensor, logits_to_keep_from: int, vocab: int, chunk_size: int | None) -> int:
    """How many chunks `sequence_logprobs` and `sequence_jsd` score a micro-batch in (its `[B, T]`
    `attention_mask`, a vocabulary of `vocab`): one per `chunk_size` (default `default_chunk_size(vocab)`) of its
    scored positions. A packed layout scores no more (it also skips a real target after padding, which the update's
    batches, prompts left-padded, never hold), so the largest count over ranks still covers every rank."""
    chunk_size = chunk_size or default_chunk_size(vocab)
    return -(-int(attention_mask[:, logits_to_keep_from + 1 :].sum()) // chunk_size)


def default_chunk_size(vocab: int) -> int:
    """Positions a chunk holds by default: `LOGITS_CHUNK_ELEMENTS // vocab`, at least one."""
    return max(1, LOGITS_CHUNK_ELEMENTS // vocab)


def vocab_size(head: nn.Module) -> int:
    """The rows of the output embedding `head`, also while ZeRO-3 holds its weight partitioned (the tensor on a
    rank is then empty; DeepSpeed keeps the full shape as `ds_shape`)."""
    return getattr(head.weight, "ds_shape", head.weight.shape)[0]


def _scored_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int,
                   packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`model`'s last hidden states [M, H] at the scored positions (column k on, target real), forwarded in the
    layout `packing`, and their flat indices [M] into the padded `[B, T-1]` columns; in the padded layout's
    row-major order, so that a teacher's rows line up with a student's whatever layout each ran in."""
    backbone = _backbone(model)
    B, T = input_ids.shape
    if packing != "padded":
        out, packed = packed_forward(model, backbone, input_ids, attention_mask, k + 1, packing,
                                     model.get_output_embeddings().weight.dtype)
        hidden = out.last_hidden_state  # [R, W, H]
        order = packed.dest.argsort()  # `source` runs in the packed rows' order
        return hidden.reshape(-1, hidden.shape[-1])[packed.source[order]], packed.dest[order]
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask),
                      use_cache=False).last_hidden_state  # [B, T, H]
    L = max(T - 1 - k, 1)  # no completion column: nothing scored, and nothing to divide
    scored = attention_mask[:, k + 1 :].reshape(-1).nonzero().squeeze(-1)  # [M] of B*L
    dest = scored // L * (T - 1) + scored % L + k  # [M] of B*(T-1)
    return hidden[:, k : T - 1].reshape(-1, hidden.shape[-1])[scored], dest


def _packed_logprobs(model, backbone, head, input_ids, attention_mask, packing: str, *, temperature: float,
                     chunk_size: int, with_entropy: bool, logits_to_keep_from: int, num_chunks: int = 0):
    """`sequence_logprobs` through a packed layout: one backbone forward over the packed rows, the head
    on the scored positions only, the results scattered into the padded `[B, T-1]` columns."""
    out, packed = packed_forward(model, backbone, input_ids, attention_mask, logits_to_keep_from + 1, packing,
                                 head.weight.dtype)
    hidden = out.last_hidden_state  # [R, W, H]
    rows = hidden.reshape(-1, hidden.shape[-1])[packed.source]  # [M, H]
    lp_chunks, ent_chunks = _score_in_chunks(head, rows, packed.targets, temperature, with_entropy, chunk_size,
                                             num_chunks)
    B, T = input_ids.shape
    lp = packed.to_padded(_cat_rows(lp_chunks, rows), B, T - 1)  # [B, T-1]
    return lp, packed.to_padded(_cat_rows(ent_chunks, rows), B, T - 1) if with_entropy else None


def packed_forward(model: nn.Module, forward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prompt_width: int, packing: str, dtype: torch.dtype) -> tuple:
    """`forward(input_ids=, attention_mask=, position_ids=, use_cache=False)` (`model` itself, or its backbone)
    over the `packing` layout of the padded micro-batch `input_ids` [n, T] (completions from column
    `prompt_width`), after `model`'s attention is checked against that layout. Returns `(forward's output,
    PackedRows)`: the output's positions `source` are the padded layout's columns `dest` (`PackedRows.to_padded`).
    `dtype`: the model's attention's, which the groups mask is built in (`grpo.core.packing.group_mask`). Shared
    by the policy's log-probs and the critic's values (`grpo.algorithms.ppo.critic_values`)."""
    impl = attention_implementation(model, packing)
    # groups: one additive mask [R, 1, W, W] that every layer uses as it is; sequences: none, the boundaries
    # come from the position ids
    packed = pack(input_ids, attention_mask, prompt_width, packing, one_row="flash" in impl, mask_dtype=dtype)
    out = forward(input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
                  use_cache=False)
    return out, packed


def attention_implementation(model: nn.Module, packing: str) -> str:
    """The model's attention implementation, refused where `packing` cannot isolate its sequences."""
    impl, sliding = attention_of(model)
    refusal = layout_refusal(impl, sliding, packing)
    if refusal is not None:
        raise ValueError(refusal)
    return impl


def attention_of(model: nn.Module) -> tuple[str, bool]:
    """The model's attention implementation, and whether any of its layers attends in a sliding window."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl, "sliding_attention" in (getattr(config, "layer_types", None) or ())


def forward_jsd(model, input_ids, attention_mask, **kwargs):
    """`sequence_jsd` of a micro-batch: through `model`'s own forward when it computes log-probs (a
    `backends.LogProbModel`, alone or inside a DDP or DeepSpeed wrapper, which then sees one forward call), else
    over the bare causal LM."""
    if getattr(model, "computes_logprobs", False):
        return model(input_ids, attention_mask, jsd=kwargs)
    return sequence_jsd(model, input_ids, attention_mask, **kwargs)


def forward_logprobs(model, input_ids, attention_mask, **kwargs):
    """`(logprobs, entropy)` of a micro-batch: through `model`'s own forward when it computes
    log-probs (`backends.LogProbModel`, alone or inside a DeepSpeed engine), else chunked over
    a bare causal LM."""
    if getattr(model, "computes_logprobs", False):
        return model(input_ids, attention_mask, **kwargs)
    return sequence_logprobs(model, input_ids, attention_mask, **kwargs)


def naive_sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_to_keep_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference for `sequence_logprobs`: one full forward, all `[B, T, V]` logits at once.

    Same conventions and outputs as `sequence_logprobs` (columns before `logits_to_keep_from`, and those
    whose target is padding, are computed, then zeroed). It calls `model(...)` itself, so it is exact for any
    head, softcapped or scaled ones included, and is the one to use when memory is not a concern.
    """
    _check_args(input_ids, attention_mask, temperature, logits_to_keep_from)
    if position_ids is None:
        position_ids = _position_ids(attention_mask)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits  # [B, T, V]
    lp, ent = _score_logits(logits[:, :-1], input_ids[:, 1:], temperature, with_entropy)  # [B, T-1]
    padding = attention_mask[:, 1:] == 0  # targets that are padding: zeros, as in sequence_logprobs
    lp, ent = lp.masked_fill(padding, 0.0), (ent.masked_fill(padding, 0.0) if with_entropy else None)
    k = logits_to_keep_from
    return _left_zeros(lp[:, k:], k), (_left_zeros(ent[:, k:], k) if with_entropy else None)


def _score_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` and entropy under `softmax(logits / temperature)`, in float32.

    The entropy is computed without a graph. Were it differentiable but left out of the loss (it is
    a metric here), its saved `[..., V]` tensors would live until the graph is freed, and under
    activation checkpointing the recomputed ones would too: about two logits-sized tensors per chunk.
    """
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x exactly: at the default, no pass over [..., V] (and none in backward)
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)  # [..., V]
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [...]
    ent = None
    if with_entropy:
        with torch.no_grad(), flush_denormals():  # the terms it flushes are below 1e-36: the same sum
            ent = -(logp.exp() * logp).sum(-1)  # [...]
    return lp, ent


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as transformers' generate does under left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


def _backbone(model: nn.Module) -> nn.Module:
    """The module of a `*ForCausalLM` that returns `last_hidden_state`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "pass the unwrapped model: calling its submodules bypasses DDP's forward and its gradient sync; "
            "wrap a module whose forward calls sequence_logprobs in DDP instead"
        )
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    if backbone is None or backbone is model:
        backbone = getattr(model, "model", None) or getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"cannot find the backbone of {type(model).__name__}")
    return backbone


def _check_plain_head(model: nn.Module) -> None:
    """Refuse heads that transform the logits after the output embedding (the chunked path skips that)."""
    config = getattr(model, "config", None)
    transforms = {
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),  # Gemma 2/3
        "logit_scale": getattr(config, "logit_scale", 1),  # Cohere: logits * scale
        "logits_scaling": getattr(config, "logits_scaling", 1),  # Granite: logits / scale
    }
    for name, value in transforms.items():
        if value is not None and (name == "final_logit_softcapping" or value != 1):
            raise NotImplementedError(
                f"model.config.{name}={value!r}: the chunked head applies the bare output embedding; "
                "use naive_sequence_logprobs for this model"
            )


def _check_args(input_ids, attention_mask, temperature, logits_to_keep_from) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= logits_to_keep_from <= input_ids.shape[1] - 1:
        raise ValueError(
            f"logits_to_keep_from must be in [0, T-1={input_ids.shape[1] - 1}], got {logits_to_keep_from}"
        )


def _left_zeros(tail: torch.Tensor, k: int) -> torch.Tensor:
    """`[B, L]` -> `[B, k + L]`, the k skipped columns as zeros (kept out of the graph)."""
    return torch.cat([tail.new_zeros(tail.shape[0], k), tail], dim=1)


def _cat_rows(chunks: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Concatenate per-chunk results; with no rows at all, an empty tensor still in the graph."""
    return torch.cat(chunks) if chunks else rows[:, 0].float()  # [N]


TINY = torch.tensor([torch.finfo(torch.float32).tiny])  # the smallest normal float32


@contextlib.contextmanager
def flush_denormals():
    """CPU arithmetic inside flushes denormal (below 1.2e-38) inputs and results to zero, then it is back as it
    was. x86 computes denormals several times slower, and a peaked softmax over tens of thousands of tokens is
    full of them: `exp` of log-probs below -87 and products with them (`python -m scripts.bench.step_floor
    --profile`). Use it only where such terms cannot change the result."""
    was_on = bool((TINY * 0.5).item() == 0.0)  # torch has no getter for the flag: probe it
    switched = not was_on and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switched:
            torch.set_flush_denormal(False)
