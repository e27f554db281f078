"""reasoning-gym's procedural tasks (`task=reasoning_gym`): rows deterministic per seed, splits that share no
question (and a contamination report of 0 exact overlap), the `reasoning_gym` reward scoring as each dataset's
own `score_answer` (hand-checked cases, and every generated row of several datasets), config checks naming
the field, and `task=reasoning_gym` through the real GRPO loop."""

from __future__ import annotations

import json

import pytest
import reasoning_gym

from grpo.data.contamination import decontaminate
from grpo.data.loading import load_task, load_val_split
from grpo.data.reasoning_gym import SEED_STRIDE, SPLIT_OFFSETS, ReasoningGym
from grpo.errors import ConfigError
from rewards import RewardConfigError, RewardScorer, RewardSpec, get_reward
from rewards.reasoning_tasks import dump_entry, load_entry
from tests.conftest import compose
from tests.integration.test_episodes import train

# Sums of two one-digit numbers: a small space (19 * 19 operands, + or -), so repeats across seeds are certain.
SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "allow_parentheses": False}


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("rg_dataset", "rg_entry", "rg_options")}


def score(completions: list[str], rows: list[dict], **kwargs) -> list[float | None]:
    return get_reward("reasoning_gym")([""] * len(rows), completions, **columns(rows), **kwargs)


def test_rows_are_deterministic_per_seed_and_differ_across_seeds():
    gen = lambda seed: ReasoningGym(["chain_sum", "leg_counting"], size=20, num_eval=5, num_val=5,  # noqa: E731
                                    seed=seed).splits()
    a, b, c = gen(0), gen(0), gen(1)
    assert a == b
    assert [len(a[s]) for s in ("train", "test", "val")] == [40, 10, 10]
    assert {r["prompt"] for r in a["test"]}.isdisjoint({r["prompt"] for r in c["test"]})
    row = a["test"][0]
    assert row["rg_dataset"] == "chain_sum" and json.loads(row["rg_options"]) == {}
    entry = load_entry(row["rg_entry"])
    assert entry["question"] == row["prompt"] and entry["answer"] == row["answer"]


def test_neighbouring_seeds_would_share_items_so_splits_draw_from_distant_seed_ranges():
    # reasoning_gym draws item i from Random(seed + i): seed 1's item 0 is seed 0's item 1.
    s0, s1 = (list(reasoning_gym.create_dataset("chain_sum", size=3, seed=s)) for s in (0, 1))
    assert s0[1]["question"] == s1[0]["question"]
    assert sorted(SPLIT_OFFSETS.values()) == [0, 2**40, 2**41] and SEED_STRIDE == 2**44


def test_splits_share_no_question_even_in_a_small_problem_space():
    splits = ReasoningGym(["basic_arithmetic"], size=300, num_eval=100, num_val=100, seed=0,
                          options={"basic_arithmetic": SMALL}).splits()
    prompts = {name: [r["prompt"] for r in rows] for name, rows in splits.items()}
    assert len(prompts["test"]) == 100 and len(prompts["val"]) == 100  # found among up to 4x as many draws
    assert 0 < len(prompts["train"]) < 300  # the repeats of the held-out questions were left out
    for name, p in prompts.items():
        assert len(set(p)) == len(p), name
    assert set(prompts["test"]).isdisjoint(prompts["val"])
    assert set(prompts["train"]).isdisjoint(prompts["test"] + prompts["val"])
    _, _, report = decontaminate(splits["train"], {"eval": splits["test"], "val": splits["val"]}, 8, True)
    assert report["eval"]["exact_overlap"] == 0 and report["val"]["exact_overlap"] == 0
    assert report["eval"]["exact_dropped"] == 0 and report["train"]["duplicates_dropped"] == 0


def hand_row(question: str, answer: str) -> dict:
    entry = {"question": question, "answer": answer, "metadata": {}}
    return {"rg_dataset": "basic_arithmetic", "rg_entry": dump_entry(entry), "rg_options": "{}"}


def test_the_reward_scores_as_the_dataset_does_on_hand_checked_answers():
    row = hand_row("Calculate 5 - 3 - 6.", "-4")
    # reasoning_gym's default check: 1.0 for the gold exactly; else len(gold) / len(answer) if the gold is
    # inside the answer ("-4" in "-4.0": 2 / 4); else 0. The answer is the last <answer> tag's, stripped.
    completions = ["<answer>-4</answer>", "<answer>4</answer>", "<answer>-4.0</answer>", "-4",
                   "<answer>7</answer> no, <answer> -4 </answer>"]
    assert score(completions, [row] * 5) == [1.0, 0.0, 0.5, 0.0, 1.0]
    assert score(["-4", " -4\n", "x -4"], [row] * 3, answer_tag=None) == [1.0, 1.0, 0.5]
    assert score(["-4"], [{"rg_dataset": None, "rg_entry": None, "rg_options": None}]) == [None]


def test_the_reward_equals_each_datasets_own_score_on_generated_rows():
    names = ["basic_arithmetic", "leg_counting", "arc_agi", "graph_color", "word_sorting"]
    rows = ReasoningGym(names, size=1, num_eval=4, num_val=0, seed=3).splits()["test"]
    assert len(rows) == 20
    # the generating datasets themselves (the test split draws up to 4x num_eval items from its seed range)
    seed = 3 * SEED_STRIDE + SPLIT_OFFSETS["test"]
    made = {name: reasoning_gym.create_dataset(name, size=16, seed=seed) for name in names}
    original = {e["question"]: e for ds in made.values() for e in ds}
    for wrong in (False, True):
        answers = ["0" if wrong or r["answer"] is None else r["answer"] for r in rows]
        got = score([f"<answer>{a}</answer>" for a in answers], rows)
        assert got == [made[r["rg_dataset"]].score_answer(a, original[r["prompt"]]) for r, a in zip(rows, answers)]
        if not wrong:  # every gold answer scores 1; graph_color has no single gold (any valid colouring)
            assert [s for s, r in zip(got, rows) if r["answer"] is not None] == [1.0] * 16


def test_entries_keep_their_tuples_which_some_verifiers_compare():
    entry = next(iter(reasoning_gym.create_dataset("arc_agi", size=1, seed=5)))
    assert load_entry(dump_entry(entry)) == entry
    ds = reasoning_gym.create_dataset("arc_agi", size=1, seed=0)
    assert ds.score_answer(entry["answer"], load_entry(dump_entry(entry))) == 1.0
    assert ds.score_answer(entry["answer"], json.loads(json.dumps(entry))) < 1.0  # plain JSON: lists != tuples
    assert load_entry(dump_entry({"m": {0: (1, 2), "a": [3]}})) == {"m": {0: (1, 2), "a": [3]}}
    with pytest.raises(TypeError, match="set"):
        dump_entry({"m": {1, 2}})


def test_the_options_reach_the_generator_and_the_scorer():
    rows = ReasoningGym(["basic_arithmetic"], size=5, num_eval=5, num_val=0,
                        options={"basic_arithmetic": SMALL}).splits()["test"]
    assert all(len(load_entry(r["rg_entry"])["metadata"]["expression"].split()) == 3 for r in rows)  # "a op b"
    assert all(json.loads(r["rg_options"]) == SMALL for r in rows)
    assert score([f"<answer>{r['answer']}</answer>" for r in rows], rows) == [1.0] * 5


def test_task_reasoning_gym_loads_through_the_config_with_its_reward_and_template():
    cfg = compose(["task=reasoning_gym", "task.reasoning_gym.names=[chain_sum]", "task.reasoning_gym.size=6",
                   "task.reasoning_gym.num_eval=3", "task.reasoning_gym.num_val=2"])
    assert [f.name for f in cfg.reward.functions] == ["reasoning_gym"] and cfg.reward.accuracy == "reasoning_gym"
    scorer = RewardScorer([RewardSpec("reasoning_gym", 1.0)])
    assert scorer.required_columns() == {"rg_dataset", "rg_entry"}
    train_rows, eval_rows = load_task(cfg.task, scorer.required_columns())
    val_rows = load_val_split(cfg.task, scorer.required_columns())
    assert (len(train_rows), len(eval_rows), len(val_rows)) == (6, 3, 2)
    for row in (*eval_rows, *val_rows):
        assert row["prompt"] == load_entry(row["rg_entry"])["question"] + \
            "\nGive your final answer within <answer></answer>."


def test_reasoning_gym_settings_are_checked_naming_the_field():
    with pytest.raises(ConfigError, match="task.reasoning_gym.names"):
        compose(["task=reasoning_gym", "task.reasoning_gym.names=[]"])
    with pytest.raises(ConfigError, match="task.reasoning_gym.size"):
        compose(["task=reasoning_gym", "task.reasoning_gym.size=0"])
    with pytest.raises(ConfigError, match="task.reasoning_gym.options: chain_sum not in"):
        compose(["task=reasoning_gym", "task.reasoning_gym.names=[leg_counting]",
                 "+task.reasoning_gym.options={chain_sum: {max_terms: 2}}"])
    cfg = compose(["task=reasoning_gym", "task.reasoning_gym.names=[no_such_task]"])
    with pytest.raises(ConfigError, match="task.reasoning_gym: 'no_such_task' not among reasoning_gym's"):
        load_task(cfg.task, set())
    with pytest.raises(RewardConfigError, match="answer_tag"):
        RewardScorer([RewardSpec("reasoning_gym", 1.0, {"answer_tag": "<answer>"})])


@pytest.mark.slow
def test_grpo_train_task_reasoning_gym_runs_steps_and_evaluates(tmp_path, tiny_random_dir):
    # The tiny model's context is 64 positions: one-digit sums, asked without the answer-tag instruction.
    lines = train(tmp_path, tiny_random_dir, "rg", "task=reasoning_gym", "task.reasoning_gym.names=[basic_arithmetic]",
                  "task.reasoning_gym.size=40", "task.reasoning_gym.num_eval=6", "task.reasoning_gym.num_val=4",
                  "+task.reasoning_gym.options={basic_arithmetic: {min_terms: 2, max_terms: 2, max_digits: 1}}",
                  "task.prompt_template='{prompt}'",
                  "reward.functions=[{name: reasoning_gym, kwargs: {answer_tag: null}}]",
                  "rollout.max_new_tokens=4", "train.max_steps=2", "train.eval_every=2")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # every sample scored (the rows' own dataset columns reached the reward), and it is the whole reward
    assert all(m["reward/reasoning_gym_none_frac"] == 0 for m in steps)
    assert all(m["reward/reasoning_gym_mean"] == pytest.approx(m["train/reward_mean"], abs=1e-9) for m in steps)
    evals = [m for m in lines if "eval/accuracy" in m]
    assert evals and evals[-1]["eval/problems"] == 6 and "val/accuracy" in evals[-1]
    report = json.loads((tmp_path / "rg" / "contamination.json").read_text())
    assert report["eval"]["exact_overlap"] == 0 and report["val"]["exact_overlap"] == 0
