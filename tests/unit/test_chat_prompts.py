"""Chat prompts (grpo/data/loading.py `chat_prompts`, grpo/training/run.py `chat_splits`): single-turn prompts and
rows' `messages` reach the rollout engine as exactly the ids of the tokenizer's chat template, decontamination
compares the task's text, and a model without a template keeps raw prompts."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from grpo.builtin.tiny import save_tiny
from grpo.errors import ConfigError
from grpo.training.run import build_run
from grpo.training.sampling import ScoringTally, score_rows
from tests.conftest import compose

# Printable ASCII only: the tiny model's tokenizer has one token per such character.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
SYSTEM = "You are a careful assistant who checks every sum twice before answering"  # 12 words: an 8-gram


@pytest.fixture
def chat_model_dir(tmp_path):
    """A random tiny model with room for the rendered prompts (256 positions) and a chat template."""
    out = save_tiny(tmp_path / "chat_model", seed=0, max_positions=256)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_task(tmp_path, model_dir, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": 0, "prompt": "What is 2 + 3?", "answer": "5"},
        {"id": 1, "messages": [{"role": "system", "content": "Answer in digits."},
                               {"role": "user", "content": "What is 4 + 4?"}], "answer": "8"},
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": 2, "messages": [{"role": "user", "content": "What is 1 + 6?"}], "answer": "7"},
        {"id": 3, "prompt": "What is 9 + 0?", "answer": "9"},
    ])
    cfg = compose(["model=hf", f"model.path={model_dir}", "model.dtype=float32", "task=jsonl",
                   f"task.train_file={train}", f"task.eval_file={evals}", "task.min_eval_rows=1",
                   "train.prompts_per_step=2", "algorithm.group_size=2", "rollout.max_new_tokens=2",
                   "tracking.progress_bar=false", *extra])
    cfg.run_dir = str(tmp_path / "run")
    return cfg


def test_the_engine_receives_the_chat_templates_ids_of_each_row(tmp_path, chat_model_dir):
    run = build_run(chat_task(tmp_path, chat_model_dir, f"task.system_prompt={SYSTEM}"))
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    system = {"role": "system", "content": SYSTEM}
    expected_messages = {  # task.system_prompt goes first, unless the row has a system message of its own
        0: [system, {"role": "user", "content": "What is 2 + 3?"}],
        1: [{"role": "system", "content": "Answer in digits."}, {"role": "user", "content": "What is 4 + 4?"}],
        2: [system, {"role": "user", "content": "What is 1 + 6?"}],
        3: [system, {"role": "user", "content": "What is 9 + 0?"}],
    }

    def template_ids(row):
        return tokenizer.apply_chat_template(expected_messages[row["id"]], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)

    groups, _ = score_rows(run, run.train_rows, ScoringTally())  # what training samples after
    assert [template_ids(r) for r in groups.rows] == groups.prompt_ids
    first = next(r for r in run.train_rows if r["id"] == 0)
    assert first["prompt"] == f"<system>{SYSTEM}</system><user>What is 2 + 3?</user><assistant>"
    held_out = run.engine.generate([r["prompt"] for r in run.eval_rows], 1, greedy=True)  # what evaluation does
    assert [template_ids(r) for r in run.eval_rows] == held_out.prompt_ids
    # Decontamination compared the task's text: the shared system prompt (an 8-gram of every rendered prompt)
    # does not make the held-out rows overlap training.
    assert run.contamination["eval"]["ngram_overlap"] == 0.0


def test_a_model_without_a_template_keeps_raw_prompts_and_refuses_chat(tmp_path, tiny_random_dir):
    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "task.arithmetic.num_eval=20",
                   "task.arithmetic.num_ood=0", "task.arithmetic.num_val=0"])
    cfg.run_dir = str(tmp_path / "raw")
    run = build_run(cfg)
    assert run.train_rows[0]["prompt"].endswith("=")  # the arithmetic task's own text, e.g. "12+34="
    with pytest.raises(ConfigError, match="task.chat: the model's tokenizer has no chat template"):
        build_run(chat_task(tmp_path, tiny_random_dir, "task.chat=true"))
    with pytest.raises(ConfigError, match=r"train.jsonl \(train\): row 1 carries messages, which need a chat "):
        build_run(chat_task(tmp_path, tiny_random_dir))


def test_a_system_prompt_needs_chat_and_messages_must_be_role_and_content(tmp_path, chat_model_dir):
    with pytest.raises(ConfigError, match="task.system_prompt: a system message needs the chat template"):
        chat_task(tmp_path, chat_model_dir, "task.chat=false", "task.system_prompt=hi")
    cfg = chat_task(tmp_path, chat_model_dir)
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ConfigError, match=r"train.jsonl: row 0, column 'messages': expected a list of"):
        build_run(cfg)
