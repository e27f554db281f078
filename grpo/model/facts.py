"""Architecture facts of the models the recipes name, so a recipe can be checked (and its memory
planned) before the weights are downloaded.

Values are those of each model's published `config.json` (Qwen2 architecture). The tests build each
model at reduced depth and width from these facts and count the full-size parameters against the
published totals (0.5B: 494,032,768; 1.5B: 1,543,714,304; 7B: 7,615,616,512).
"""

from __future__ import annotations

from transformers import AutoConfig

QWEN2_COMMON = dict(
    model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
)

MODEL_FACTS: dict[str, dict] = {
    "Qwen2.5-0.5B-Instruct": dict(QWEN2_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-1.5B-Instruct": dict(QWEN2_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-7B-Instruct": dict(QWEN2_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                                vocab_size=152064),  # the 7B's embedding is padded to 152064 rows
}


def facts_for(model_path: str) -> dict | None:
    """The facts of a model directory named like a known model (`.../Qwen2.5-7B-Instruct`), else None."""
    name = str(model_path).rstrip("/").rsplit("/", 1)[-1]
    return MODEL_FACTS.get(name)


def transformers_config(facts: dict, **overrides):
    """A transformers config of these facts (overrides shrink it for tests)."""
    values = {k: v for k, v in {**facts, **overrides}.items() if k != "model_type"}
    return AutoConfig.for_model(facts["model_type"], **values)
