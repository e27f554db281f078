"""The built-in tiny model: a Qwen2-architecture causal LM with a character-level tokenizer.

Built in code, so tests and the demo need no download. It is an ordinary transformers
directory (config, safetensors, tokenizer), loaded by the same code path as a real model.
The head dimension is 64 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Every printable ASCII character but the vertical whitespace: one token each.
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def build_char_tokenizer(words: tuple[str, ...] = ()):
    """A `PreTrainedTokenizerFast` with one token per printable character, and one per string of `words`
    (ordinary tokens, matched whole before the characters and decoded as their text, as a real tokenizer has
    `<tool_call>` as one token)."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.add_tokens(list(words))
    return tokenizer


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 512,
    max_positions: int = 64,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
    seed: int = 0,
):
    """A randomly initialised `Qwen2ForCausalLM` with head_dim 64 (about 0.8M parameters by default)."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    if config.head_dim != 64:
        raise ValueError(f"tiny model: head_dim is {config.head_dim}; vLLM's CPU attention needs 64")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_tiny(path: str | Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Build the tiny model and tokenizer and save them as a transformers directory."""
    path = Path(path)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        seed=seed, **model_kwargs,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
