"""`python -m scripts.bench.realistic`: its workload, its planned completion lengths on every sampler, its counts
of what each arm's forwards run and their FLOPs, the arms' equal gradients, and a smoke run of every arm at its
smallest configuration (no timing is asserted: the point is that the benchmark keeps running and reports every
arm)."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation import ContinuousBatchingConfig

from grpo.config import BackendConfig
from grpo.rollout.hf import HFRolloutEngine
from scripts.bench import realistic
from scripts.bench.arms import SteppedTrainer, accepts_auto
from scripts.bench.common import Timers, build_trl, random_model_dir
from scripts.bench.flops import Shapes, training_flops
from scripts.bench.forced_lengths import ForcedLengths, LengthPlan, planned_request_lengths
from scripts.bench.realistic import (
    MINI,
    Workload,
    alternate,
    arm_names,
    bench_config,
    main,
    make_workload,
    measure,
    memory_missing,
    memory_phase,
    one_at_a_time_records,
    parse_args,
    quiet_process,
    setup,
    timed,
    train_round,
    training_arms,
    workload_batch,
)

TINY = ["--model", "mini", "--prompts", "2", "--group", "2", "--prompt-len", "20", "--max-new-tokens", "16",
        "--median", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def mini_path():
    return random_model_dir("realistic-mini", "float32", MINI)


def test_the_workload_is_fixed_by_its_seed():
    args = parse_args(["--prompts", "3", "--group", "4", "--max-new-tokens", "50", "--median", "20"])
    a, b = make_workload(args, 512, eos=1), make_workload(args, 512, eos=1)
    assert a == b
    assert len(a.prompt_ids) == 3 and all(180 <= len(p) <= 220 for p in a.prompt_ids)
    assert [len(t) for t in a.prompt_texts] == [len(p) for p in a.prompt_ids]  # one character per token
    assert len(a.completion_ids) == 12
    for c in a.completion_ids:  # EOS last and nowhere else, unless cut at the cap
        assert 1 <= len(c) <= 50 and (c[-1] == 1 or len(c) == 50) and 1 not in c[:-1]
    for g in range(3):  # standardised within each group
        group = a.advantages[g * 4 : (g + 1) * 4]
        assert statistics.fmean(group) == pytest.approx(0.0, abs=1e-9)
        assert statistics.pstdev(group) == pytest.approx(1.0, abs=1e-3)


def test_the_length_plan_raises_short_lengths_and_names_an_unknown_prompt():
    plan = LengthPlan.of([[5, 6], [7]], [1, 3, 9, 2], group=2, cap=8)
    # 1 -> 2 (a shared prefill cannot end one row at its first token), 9 -> the cap 8
    assert plan.lengths == [[2, 3], [8, 2]] and plan.total() == 15
    # rows of one prompt take its lengths in order, and again from the start if it is drawn twice
    assert plan.row_lengths([[7], [5, 6], [7], [7]]) == [8, 2, 2, 8]
    with pytest.raises(ValueError, match="tokenised a prompt differently"):
        plan.row_lengths([[5]])


def test_every_sampler_generates_the_planned_lengths(mini_path):
    """Catches: the hook mapping rows by position after our engine drops finished rows (lengths off, or its
    row-count check raising), the shared prefill not expanded to G rows, continuous batching left at the cap."""
    model = AutoModelForCausalLM.from_pretrained(mini_path).eval()
    tok = AutoTokenizer.from_pretrained(mini_path)
    prompts, G, cap = [[5, 6, 7, 8], [9, 10, 11]], 3, 6
    plan = LengthPlan.of(prompts, [2, 5, 3, 6, 2, 4], G, cap)  # the 6 is the cap: no EOS
    expected = [2, 5, 3, 6, 2, 4]
    torch.manual_seed(0)
    engine = HFRolloutEngine(model, tok, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=cap)
    with ForcedLengths(plan, eos=1, pad=0):
        ours = engine.generate_from_ids(prompts, G).completion_ids
    assert [len(c) for c in ours] == expected
    assert [c[-1] == 1 for c in ours] == [n < cap for n in expected] and all(1 not in c[:-1] for c in ours)

    repeated = [p for p in prompts for _ in range(G)]
    enc = tok.pad([{"input_ids": p} for p in repeated], padding_side="left", return_tensors="pt")
    sampling = GenerationConfig(do_sample=True, max_new_tokens=cap, top_k=0, pad_token_id=0, eos_token_id=1)
    with ForcedLengths(plan, eos=1, pad=0), torch.no_grad():
        new = model.generate(**enc, generation_config=sampling)[:, enc["input_ids"].shape[1]:].tolist()
    assert [row.index(1) + 1 if 1 in row else len(row) for row in new] == expected

    paged = ContinuousBatchingConfig(page_size=32, num_blocks=8, max_batch_tokens=128)
    with planned_request_lengths(plan):
        out = model.generate_batch(repeated, generation_config=sampling, continuous_batching_config=paged)
    assert [len(o.generated_tokens) for o in out.values()] == expected


def test_flops_of_a_small_case_by_hand():
    """Catches: backward not counted as 2 x forward, attention counted per position instead of per pair (W not W^2),
    key/value projections sized by the query heads, the head's FLOPs from the backbone's positions."""
    s = Shapes(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
    # weights per position and layer: q, o 4*2*2 = 16 each; k, v 4*2*1 = 8 each; gate, up, down 4*8 = 32 each
    assert s.layer_weights() == 16 + 16 + 8 + 8 + 3 * 32 == 144
    out = training_flops(s, forwards=[(2, 3)], head_positions=5)
    # forward: backbone 2 * 6 positions * 1 layer * 144 = 1728; attention 2 * 2 * (2 rows * 3 * 3 pairs) * 1 * 2 * 2
    # = 288; head 2 * 5 * 4 * 10 = 400; forward + backward = 3 x forward
    assert out == {"backbone_flops": 3 * 1728, "attention_flops": 3 * 288, "head_flops": 3 * 400,
                   "flops": 3 * (1728 + 288 + 400)}


@pytest.fixture(scope="module")
def one_group(mini_path, tmp_path_factory):
    """One prompt of 3 tokens with G=2 completions of 2 and 1 tokens: padded 2 rows x 5 columns; a near-zero
    learning rate, so every arm sees the same weights. Returns the args, config and workload."""
    args = parse_args([*TINY, "--prompts", "1", "--packing", "sequences"])
    cfg = bench_config(args, mini_path, str(tmp_path_factory.mktemp("run")))
    cfg.optim.lr = 1e-30  # AdamW moves no float32 weight by lr * O(1)
    return args, cfg, Workload([[5, 6, 7]], ["abc"], [[8, 1], [1]], [1.0, -1.0], 2)


@pytest.fixture(scope="module")
def one_group_arms(mini_path, one_group):
    """Every training arm on `one_group`, all in this process (the in-process mode), one step each."""
    args, cfg, workload = one_group
    with quiet_process(args):
        arms, skipped = training_arms(args, cfg, mini_path, workload_batch(workload, pad=0),
                                      [{"prompt": "abc", "answer": ""}])
        records, _ = alternate(arms, 0, 1, timed)
    return {name: recs[0] for name, recs in records.items()}, skipped


def test_the_arms_count_what_their_forwards_run(one_group_arms):
    """Catches: the head counted at the logits of every position for ours (4 + 4, not the 3 completion tokens),
    the diagnostic patch not reaching TRL's head (8, not 3), accumulation not splitting the batch."""
    records, skipped = one_group_arms
    counted = {name: (r["forwards"], r["head_positions"]) for name, r in records.items()}
    assert counted["ours_padded"] == ([[2, 5]], 3)  # ours scores the 3 completion tokens
    assert counted["ours_sequences"] == ([[2, 5]], 3)  # 5 and 4 tokens, first-fit into rows of the longest (5)
    assert counted["ours_groups"] == ([[1, 6]], 3)  # the prompt once, then 2 + 1 completion tokens
    assert counted["ours_sequences_checkpointing"] == ([[2, 5]], 3)  # --packing sequences
    assert counted["trl"] == ([[2, 5]], 8)  # on CPU every position but the last: 2 x 4
    assert counted["trl_accumulation_1x2"] == ([[1, 5], [1, 5]], 8)  # slices of the whole padded batch
    assert counted["trl_checkpointing"] == ([[2, 5]], 8)
    assert counted["trl_gpu_head"] == ([[2, 5]], 3)
    assert set(skipped) >= {"trl_accumulation_4"}  # 2 sequences do not split into 4
    assert ("ours_auto" in records) == accepts_auto()
    if accepts_auto():  # sdpa attention: a run resolves auto to groups
        assert counted["ours_auto"] == counted["ours_groups"]


def test_every_training_arm_computes_the_same_gradient(one_group_arms):
    """TRL's loss under accumulation, as it scales it, gives the whole batch's gradient, and so does ours in every
    layout. Catches: `current_gradient_accumulation_steps` left at 1 (TRL's dapo normaliser halves: 2x the
    gradient), a layout or the diagnostic patch changing what is computed."""
    records, _ = one_group_arms
    norms = {name: r["grad_norm"] for name, r in records.items()}
    reference = norms["trl"]
    for name, norm in norms.items():
        assert norm == pytest.approx(reference, rel=1e-5, abs=0), name


@pytest.mark.slow
def test_every_arm_of_every_phase_runs_once(tmp_path):
    out = tmp_path / "realistic.json"
    main([*TINY, "--reps", "1", "--warmup", "0", "--gen-rounds", "1", "--step-reps", "1", "--no-memory",
          "--out", str(out)])
    results = json.loads(out.read_text())
    train = results["training"]
    ours = {"ours_padded", "ours_sequences", "ours_groups", f"ours_{BackendConfig().packing}_checkpointing"}
    theirs = {"trl", "trl_accumulation_1x4", "trl_accumulation_2x2", "trl_checkpointing", "trl_gpu_head"}
    assert set(train["arms"]) == ours | theirs | ({"ours_auto"} if accepts_auto() else set())
    for arm in train["arms"].values():
        assert arm["positions"] > 0 and arm["head_positions"] > 0 and arm["flops"] > 0 and arm["vs_trl_best"] > 0
    assert train["arms"]["trl_gpu_head"]["diagnostic"].startswith("DIAGNOSTIC")
    assert train["arms"]["trl_gpu_head"]["head_positions"] == train["completion_tokens"]
    assert not any(a.get("trl_best_step_s") for a in train["arms"].values() if a["diagnostic"])
    assert sorted(map(sorted, train["round_orders"])) == [sorted(train["arms"])]  # one round, every arm once
    planned = results["step"]["planned_tokens"]
    assert {a["tokens_per_round"] for a in results["generation"].values()} == {planned}
    assert set(results["step"]["arms"]) == {"ours", "trl", "trl_continuous_batching"}
    for arm in results["step"]["arms"].values():
        assert arm["tokens"] == planned and arm["head_positions"] > 0 and arm["flops"] > 0
    assert {"training_speedup_default", "training_speedup_best", "generation_speedup", "step_speedup",
            "gpu_flop_ratio_sequences", "gpu_flop_ratio_groups"} <= set(results["ratios"])
    env = results["environment"]
    assert env["cpu_capability"] and env["trl"] and len(env["load_average_end"]) == 3 and env["torch_threads"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert env["commit"].removesuffix("+changes") == (head.stdout.strip() if head.returncode == 0 else "unknown")


def test_each_arm_alone_records_what_it_records_among_the_others(mini_path, one_group, one_group_arms):
    """What `--train-round` runs in each fresh process of the one-at-a-time mode (here in this process, arm by
    arm): the arm alone, its warm-up step, then `timed`'s record. Catches: `arm_names` naming arms the in-process
    mode does not build (or missing one), a child building another arm than the one named (other forwards or head
    positions), a record whose keys differ from the in-process mode's."""
    args, cfg, workload = one_group
    in_process, skipped = one_group_arms
    names, left_out = arm_names(args, 2)
    assert set(names) == set(in_process) and set(left_out) == set(skipped)
    with quiet_process(args):
        alone = {name: train_round(name, args, cfg, mini_path, workload, [{"prompt": "abc", "answer": ""}], 0)
                 for name in names}
    for name, out in alone.items():
        # The resident-set counters the peak is read from are synced lazily (in batches of pages per thread), so a
        # step of this tiny model that frees what it allocates can read a fraction of a MiB below its base.
        assert out["arm"] == name and out["peak_mb"] > -1.0, name
        record, reference = out["record"], in_process[name]
        assert record.keys() == reference.keys(), name
        for key in ("forwards", "positions", "head_positions"):  # e.g. trl: [[2, 5]], 10, 8 (the test above)
            assert record[key] == reference[key], (name, key)
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5, abs=0), name
        assert out["info"]["side"] == name.split("_")[0]


@pytest.mark.slow
def test_the_one_at_a_time_mode_runs_each_arm_in_a_fresh_process_every_round(one_group_arms):
    """One arm, two rounds, two fresh processes (each ~15-45 s on a loaded 2-core machine: the imports). Catches:
    a round's arm skipped or run twice (records per arm != --reps), `--warmup` not passed to the child (it warms up
    by the default 1 step, not 2: the parent's check raises), a child's output misread (keys, counts, its side and
    diagnostic)."""
    args = parse_args([*TINY, "--prompts", "1", "--packing", "sequences", "--reps", "2", "--warmup", "2"])
    in_process, _ = one_group_arms
    batch = workload_batch(make_workload(args, MINI["vocab_size"], eos=1), pad=0)
    infos, records, skipped, peaks, orders = one_at_a_time_records(args, batch, only=["trl_gpu_head"])
    assert orders == [["trl_gpu_head"]] * 2
    assert list(infos) == ["trl_gpu_head"] and "trl_gpu_head" not in skipped
    assert len(records["trl_gpu_head"]) == 2 and len(peaks["trl_gpu_head"]) == 2
    assert all(p is not None and p >= 0 for p in peaks["trl_gpu_head"])
    assert infos["trl_gpu_head"]["side"] == "trl" and infos["trl_gpu_head"]["diagnostic"].startswith("DIAGNOSTIC")
    first, second = records["trl_gpu_head"]
    assert first.keys() == in_process["trl_gpu_head"].keys()
    # the head on completion positions only, the same in both rounds (TINY, one prompt: 2 completions)
    assert first["head_positions"] == second["head_positions"] == int(batch.completion_mask.sum())


def test_a_stepped_trainer_runs_one_step_per_call_and_stops_when_closed():
    """TRL's own `train()` paused between steps. Catches: a step call running on past its step (its time would hold
    several), `close` running the remaining max_steps instead of stopping."""
    args = parse_args(TINY)
    with quiet_process(args):
        model_path, cfg, _, rows, _, _ = setup(args)
        timers = Timers("cpu")
        trainer = build_trl(cfg, model_path, "cpu", 50, timers, [], rows)
        stepped = SteppedTrainer(trainer, timers)
        assert trainer.state.global_step == 0  # paused at the start: its setup is not in any step
        for expected in (1, 2):
            stepped.step()
            assert trainer.state.global_step == expected and timers.tokens > 0
        stepped.close()
    assert trainer.state.global_step == 2 and not stepped.thread.is_alive()


def test_a_run_cut_short_resumes_keeping_its_phases_and_refuses_another_workload(tmp_path, capsys):
    """`--resume`: the phases the file holds are kept as they were, the missing ones measured on the same workload.
    Catches: a kept phase measured again (its times change), a missing phase not run, a sampling context that
    cannot be entered a second time (continuous batching's, in the step's second round), the file's other workload
    accepted (a resumed run would set two workloads' arms against each other), the invocation not recorded."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    main([*TINY, "--phases", "generation", "--gen-rounds", "1", "--warmup", "0", "--out", str(first)])
    before = json.loads(first.read_text())
    main([*TINY, "--phases", "generation,step", "--step-reps", "2", "--warmup", "0", "--resume", str(first),
          "--out", str(second)])  # two rounds: each arm's sampling context entered twice
    after = json.loads(second.read_text())
    assert after["generation"] == before["generation"]
    assert set(after["step"]["arms"]) == {"ours", "trl", "trl_continuous_batching"}
    assert "step_speedup" in after["ratios"]
    assert after["resumed"][0]["kept"] == ["generation"] and after["resumed"][0]["args"]["phases"] == "generation,step"
    assert "keeping ['generation']" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="its seed is 0, this run's 1"):
        main([*TINY, "--seed", "1", "--phases", "step", "--resume", str(first)])
    with pytest.raises(SystemExit, match="not a result of this benchmark"):
        main([*TINY, "--phases", "step", "--resume", str(tmp_path / "missing.json")])


def test_an_arm_killed_for_memory_is_left_out_and_the_others_measured(monkeypatch):
    """The memory runs of a training phase measured in one process: an arm whose fresh process the kernel killed
    (`memory_in_fresh_process` returns why) gets `memory_left_out`, the ratios are set on the arms measured, and a
    resumed run that has the memory runs does not run them again. Catches: the reason stored as a peak (a string in
    the ratios: TypeError), the killed arm taken as TRL's lowest, the memory runs repeated on resume, run where the
    training phase measured memory in its own processes."""
    training = {"arms_resident": "all in one process", "arms": {
        "ours_auto": {"side": "ours"}, "trl": {"side": "trl"}, "trl_accumulation_8x4": {"side": "trl"}}}
    peaks = {"ours_auto": 300.0, "trl": "its process failed (exit -9; out of memory?): Killed",
             "trl_accumulation_8x4": 1200.0}
    monkeypatch.setattr(realistic, "memory_in_fresh_process", lambda name, args: peaks[name])
    args = parse_args(TINY)
    assert memory_missing(args, training)
    memory_phase(args, training)
    arms = training["arms"]
    assert "peak_mb" not in arms["trl"] and arms["trl"]["memory_left_out"].startswith("its process failed")
    assert arms["ours_auto"]["memory_vs_trl_best"] == pytest.approx(0.25)  # 300 / 1200
    assert not memory_missing(args, training)
    assert not memory_missing(parse_args([*TINY, "--no-memory"]), {**training, "arms": {"trl": {}}})
    assert not memory_missing(args, {"arms_resident": "one at a time, a fresh process per arm and round",
                                     "arms": {"trl": {}}})


def test_a_memory_run_builds_its_arm_alone(capsys):
    """What `--only-train` runs in each fresh process (here in this one): that arm alone, or a clear error."""
    args = parse_args([*TINY, "--only-train", "trl_accumulation_2x2"])
    with quiet_process(args):
        measure(args)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["arm"] == "trl_accumulation_2x2" and line["peak_mb"] >= 0
    args = parse_args([*TINY, "--only-train", "trl_nope"])
    with quiet_process(args), pytest.raises(SystemExit, match="no such arm"):
        measure(args)


def test_the_benchmark_leaves_the_process_logging_and_threads_as_they_were():
    """`main` quiets logging and sets torch's threads while it runs; the tests after it still see their logs."""
    threads = torch.get_num_threads()
    with quiet_process(parse_args(["--threads", "1"])):
        assert torch.get_num_threads() == 1 and logging.root.manager.disable == logging.WARNING
    assert torch.get_num_threads() == threads and logging.root.manager.disable == logging.NOTSET
