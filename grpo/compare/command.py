"""`grpo-compare`: several algorithms on the same task, model, seeds and sampling budget; one table, one plot.

    grpo-compare out_dir=runs/compare   # GRPO, Dr. GRPO, CISPO, PPO-RLHF, DPO, online DPO, RFT, SFT, distillation
    grpo-compare algorithms='[grpo,ppo]' seeds='[0,1,2,3,4]' budget_samples=25600 run_overrides='[optim.lr=1e-4]'

Each algorithm runs once per seed, each run an ordinary `grpo-train` run (`<out_dir>/<name>/seed_<s>/`, its own
process, so its peak memory is its own), given the same `run_overrides`, prompts per step and group size; the
seed sets both the run's seed and its warm start's. The budget is counted in generated completions: GRPO and
PPO sample `prompts_per_step x group_size` per step and run `budget_samples / (prompts_per_step x group_size)`
steps (RFT samples as GRPO does; SFT trains on as many demonstrations per step and samples nothing); DPO spends
the whole budget up front, sampling `budget_samples / samples_per_prompt` training problems
to build its preference pairs, then trains one epoch on them. Every run is evaluated by the same harness
(`grpo.training.evaluate.evaluate_splits`: greedy, the same held-out and out-of-distribution rows) every
`eval_every_samples` samples (DPO: every `dpo_eval_every` optimiser steps). PPO-RLHF scores with a reward
model: `reward_model_path`, or one trained first by `grpo-rm-train` on the built-in preference set (its cost is
reported beside the table, not in PPO's row).

On-policy distillation (`distill`, `grpo.algorithms.distill`) samples as GRPO does, the same budget, and descends
the per-token reverse KL to a teacher: `teacher_path`, or one trained first (`teacher_for`), once per comparison
and in its own `grpo-train` run, from the first seed's warm start with the comparison's `run_overrides`, so it
shares the student's tokenizer, task and training split. Its cost (wall, steps) and held-out accuracy are reported
beside the table, not in the distillation row, as the reward model's are. The teacher is SFT on the training
split's gold answers (`algorithm=sft`, the same demonstrations per step as the SFT arm) for `TEACHER_STEPS` times
the arms' steps, then `teacher_overrides`. Why SFT rather than a longer GRPO run: it samples nothing, so a step
costs one forward and backward (the default comparison's SFT arm took 1.4 wall minutes for its 50 steps where GRPO
took 3.7), and at equal steps it was the strongest arm there (held out 0.944 against GRPO's 0.867); it trains on
the training prompts only, the held-out prompts being kept out of every split's training rows. The teacher knows
the carries the warm start forgets, so the reverse KL on the student's own carried and uncarried answers says
which tokens to move. One teacher serves every seed (the reward model's rule); the arms of seeds other than the
first start from their own warm start, which shares its tokenizer.

Outputs in `out_dir` (`grpo.compare.report`): `compare.md` and `compare.csv` (per arm, the mean over seeds with
a 95% interval (`grpo.compare.intervals`: seeds and problems crossed) of final and best held-out accuracy, final
out-of-distribution accuracy on new problems and the gap; samples and minutes to the best, wall minutes, peak
memory), the paraphrase splits' accuracies apart, the differences between arms paired by seed and problem and
which of them Holm's family-wise rule supports, `runs.csv` (every run) and `compare.png` (mean accuracy over seeds
against samples and against minutes, with the seeds' range). Minutes to the best are training time: the sum of
the run's step times (sampling, updates, evaluation; DPO's includes building its pairs), which leaves out process
start and model loading; the wall column has everything.

A comparison that stops (a crash, a kill, a machine taken back) loses only the run it was in: each finished
run leaves `compare_run.json` in its directory (its overrides, wall seconds, peak memory), and the same
command again reuses those runs and launches the rest with `resume=auto`, so an interrupted run continues from
its last checkpoint (its wall then counts its last launch only). A directory whose record names other
overrides belongs to another comparison and is refused. A comparison directory copied or moved elsewhere is
reused as it stands: a record's paths under the directory it ran in are read as under the new one
(`relocated`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from grpo.builtin.arithmetic import OOD_SPLITS
from grpo.cli import run_cli, train_from_config
from grpo.compare.report import curve, differences, outcomes_at, plot, summarise_arm, summarise_run, write_report
from grpo.config import CONFIG_DIR, register_configs, validate
from grpo.errors import ConfigError
from grpo.training.checkpoint import latest_checkpoint

log = logging.getLogger("grpo.compare.command")
RUN_RECORD = "compare_run.json"  # written in a run's directory once it finished: what a rerun reuses

# What each name runs: grpo-train overrides. `{rm}` is the reward model directory, `{teacher}` the teacher's.
ALGORITHMS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "dr_grpo": ["algorithm=dr_grpo"],
    "cispo": ["algorithm=cispo"],  # the clipped-weight REINFORCE loss, with its recipe's 4 optimiser steps per batch
    "ppo_rlhf": ["algorithm=ppo", "reward.functions=[{name:reward_model,weight:1.0,kwargs:{path:'{rm}'}}]"],
    "ppo": ["algorithm=ppo"],  # PPO on the task's own (verifiable) reward
    "dpo": ["algorithm=dpo"],
    "online_dpo": ["algorithm=online_dpo"],  # pairs from the current policy, ranked by the task's reward
    "rft": ["algorithm=rft"],  # supervised on the policy's own samples that reach the reward bar
    "sft": ["algorithm=sft"],  # supervised on the dataset's demonstrations (the gold answers)
    "distill": ["algorithm=distill", "algorithm.teacher.path='{teacher}'"],  # reverse KL to a teacher, own samples
}
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "cispo": "CISPO", "ppo_rlhf": "PPO-RLHF (learned RM)",
          "ppo": "PPO (verifiable reward)", "dpo": "DPO (offline pairs)", "online_dpo": "online DPO",
          "rft": "RFT (own correct samples)", "sft": "SFT (demonstrations)", "distill": "On-policy distillation"}
TEACHER_RECIPE = ["algorithm=sft"]  # the teacher trained when no teacher_path is given (see the docstring)
TEACHER_STEPS = 2  # its steps per step of the arms: cheap for SFT, and past the SFT arm it is compared with


@dataclass
class CompareConfig:
    out_dir: str = field(default="runs/compare", metadata={"help": "directory of the comparison"})
    algorithms: list[str] = field(default_factory=lambda: ["grpo", "dr_grpo", "cispo", "ppo_rlhf", "dpo", "online_dpo",
                                                           "rft", "sft", "distill"],
                                  metadata={"help": "names from grpo.compare.command.ALGORITHMS, run in this order"})
    budget_samples: int = field(default=12800, metadata={"help": "generated completions each algorithm may use"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step of the online algorithms"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (DPO: samples per problem)"})
    eval_every_samples: int = field(default=1600, metadata={"help": "samples between evaluations (online algorithms)"})
    dpo_eval_every: int = field(default=10, metadata={"help": "DPO optimiser steps between evaluations"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "every algorithm runs once per seed (its run seed and warm-start seed); intervals need >= 2"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per run; 0 = torch's default"})
    jobs: int = field(default=1, metadata={
        "help": "runs at a time, each its own process (e.g. one per core at threads=1); 1: one after another"})
    run_overrides: list[str] = field(default_factory=list, metadata={"help": "grpo-train overrides given to every run"})
    reward_model_path: str | None = field(default=None, metadata={"help": "ppo_rlhf's RM; null: train one first"})
    rm_overrides: list[str] = field(default_factory=list, metadata={"help": "grpo-rm-train overrides when training it"})
    teacher_path: str | None = field(default=None, metadata={
        "help": "distill's teacher, a transformers directory with the students' tokenizer; null: train one first"})
    teacher_overrides: list[str] = field(default_factory=list, metadata={
        "help": "grpo-train overrides of the teacher's run when training it, after its recipe and sizing"})
    paraphrase_splits: list[str] = field(default_factory=lambda: ["spaced", "question"], metadata={
        "help": "OOD splits that rephrase held-out problems: reported apart, never pooled as new problems"})
    in_process: bool = field(default=False, metadata={
        "help": "run the training runs, the teacher's too, in this process (tests): faster, shared peak memory; "
                "the reward model trains in its own"})


def validate_compare(cfg: CompareConfig) -> CompareConfig:
    unknown = [a for a in cfg.algorithms if a not in ALGORITHMS]
    if unknown or not cfg.algorithms:
        raise ConfigError(f"algorithms: {unknown or '[]'} not among {', '.join(ALGORITHMS)}")
    per_step = cfg.prompts_per_step * cfg.group_size
    if cfg.budget_samples < per_step:
        raise ConfigError(f"budget_samples: {cfg.budget_samples} is less than one step ({per_step} samples)")
    if cfg.eval_every_samples <= 0 or cfg.dpo_eval_every <= 0:
        raise ConfigError("eval_every_samples, dpo_eval_every: must be > 0")
    stray = [name for name in cfg.paraphrase_splits if name not in OOD_SPLITS]
    if stray:
        raise ConfigError(f"paraphrase_splits: {stray} not among the task's OOD splits {', '.join(OOD_SPLITS)}")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs: must be >= 1, got {cfg.jobs}")
    if cfg.jobs > 1 and cfg.in_process:
        raise ConfigError("jobs: runs at a time need their own processes; set in_process=false or jobs=1")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: need at least one seed and no repeats, got {list(cfg.seeds)}")
    if cfg.teacher_path and "distill" in cfg.algorithms and not (Path(cfg.teacher_path) / "config.json").is_file():
        raise ConfigError(f"teacher_path: {cfg.teacher_path} is not a transformers model directory (no config.json); "
                          "give a checkpoint's policy/ directory, or null to train a teacher first")
    return cfg


def run_dir(cfg: CompareConfig, name: str, seed: int) -> Path:
    return Path(cfg.out_dir) / name / f"seed_{seed}"


def run_overrides(cfg: CompareConfig, name: str, models: dict[str, str | None], seed: int) -> list[str]:
    """The grpo-train overrides of one algorithm's run on one seed (the warm start is seeded alike); `models` fills
    the placeholders of ALGORITHMS (`rm`, `teacher`)."""
    algo = ALGORITHMS[name]
    for placeholder, path in models.items():
        algo = [o.replace("{" + placeholder + "}", str(path)) for o in algo]
    # the algorithm group first, so experiment overrides (in run_overrides) apply on top of it
    return algo[:1] + common_overrides(cfg, run_dir(cfg, name, seed), seed) + algo[1:] + sizing(cfg, name)


def common_overrides(cfg: CompareConfig, directory: Path, seed: int) -> list[str]:
    """What every training run of the comparison gets, before its algorithm's and sizing's overrides."""
    return [f"run_dir={directory}", f"seed={seed}", f"model.warm_start.seed={seed}", f"threads={cfg.threads}",
            "tracking.progress_bar=false", "tracking.plot=false", *cfg.run_overrides]


def sizing(cfg: CompareConfig, name: str) -> list[str]:
    """The budget in an algorithm's terms: steps of `prompts_per_step x group_size` samples, DPO's pairs."""
    per_step = cfg.prompts_per_step * cfg.group_size
    if name == "dpo":
        return [f"algorithm.dpo.num_prompts={cfg.budget_samples // cfg.group_size}",
                f"algorithm.dpo.samples_per_prompt={cfg.group_size}", f"train.eval_every={cfg.dpo_eval_every}"]
    return [f"train.max_steps={cfg.budget_samples // per_step}", f"train.prompts_per_step={cfg.prompts_per_step}",
            f"algorithm.group_size={cfg.group_size}", f"train.eval_every={max(1, cfg.eval_every_samples // per_step)}"]


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name=config_name, overrides=overrides))


def launch(module: str, overrides: list[str], log_path: Path, in_process: bool) -> tuple[float, float]:
    """Run `python -m module overrides`, or with `in_process` a grpo.train run in this process; returns
    (wall seconds, peak RSS MiB). The reward model is always trained in its own process (`reward_models`
    builds on `grpo`, not the other way round)."""
    start = time.perf_counter()
    if in_process and module == "grpo.train":
        register_configs()
        train_from_config(validate(_compose("config", overrides)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return time.perf_counter() - start, peak
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *overrides], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the max over all children
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{module} {' '.join(overrides)} failed; see {log_path}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def finished_run(directory: Path, overrides: list[str]) -> dict | None:
    """The record of a run that finished in `directory` with these `overrides`, or None if it never finished.
    Refuses a record with other overrides: the directory belongs to another comparison."""
    path = directory / RUN_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:  # cut short by a crash of an older version, which wrote it in place: run it again
        log.warning("%s is not readable JSON; the run is launched again (resume=auto continues it)", path)
        return None
    if relocated(record["overrides"], overrides) != overrides:
        raise ConfigError(f"out_dir: {path} records a run with other overrides than this comparison's "
                          f"({' '.join(record['overrides'])}); choose another out_dir")
    return record


def relocated(recorded: list[str], overrides: list[str]) -> list[str]:
    """`recorded` with the comparison directory it ran in replaced by this one's, so a copied or moved comparison
    reuses its runs. That directory is what the two `run_dir`s differ by before their common tail
    (`/old/cmp/grpo/seed_0` and `/new/cmp/grpo/seed_0`: `/old/cmp` for `/new/cmp`); every recorded path under it
    (the reward model's, the teacher's) moves with it. Unchanged when the `run_dir`s agree."""
    def directory(items: list[str]) -> Path | None:
        return next((Path(o.removeprefix("run_dir=")) for o in items if o.startswith("run_dir=")), None)

    old, new = directory(recorded), directory(overrides)
    if old is None or new is None or old == new:
        return recorded
    tail = 0
    while tail < min(len(old.parts), len(new.parts)) - 1 and old.parts[-1 - tail] == new.parts[-1 - tail]:
        tail += 1
    if not tail:
        return recorded
    old_root, new_root = (str(Path(*p.parts[:len(p.parts) - tail])) for p in (old, new))
    return [o.replace(f"={old_root}/", f"={new_root}/").replace(f"'{old_root}/", f"'{new_root}/")
            .replace(f":{old_root}/", f":{new_root}/") for o in recorded]


def launch_once(module: str, overrides: list[str], directory: Path, log_path: Path, in_process: bool) -> dict:
    """The record of `python -m module overrides` run into `directory`: reused if it finished before, else
    launched (with `resume=auto` for training runs: an interrupted one continues) and recorded."""
    record = finished_run(directory, overrides)
    if record is not None:
        log.info("%s: reused (finished earlier, %s)", directory, RUN_RECORD)
        return {**record, "reused": True}
    extra = ["resume=auto"] if module == "grpo.train" else []
    started = time.time()
    wall, peak = launch(module, [*overrides, *extra], log_path, in_process)
    record = {"overrides": overrides, "wall_s": wall, "peak_mib": peak, "started": started, "finished": time.time()}
    tmp = directory / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, directory / RUN_RECORD)  # whole or absent: a crash here never leaves half a record
    return {**record, "reused": False}


def reward_model_for(cfg: CompareConfig) -> tuple[str | None, list[str]]:
    """The RM directory ppo_rlhf scores with (trained here, on the first seed, unless given) and notes."""
    if "ppo_rlhf" not in cfg.algorithms:
        return None, []
    if cfg.reward_model_path:
        return cfg.reward_model_path, [f"PPO-RLHF reward model: {cfg.reward_model_path} (given)"]
    rm_dir = Path(cfg.out_dir) / "reward_model_run"
    overrides = [f"run_dir={rm_dir}", f"seed={cfg.seeds[0]}", f"threads={cfg.threads}", "progress_bar=false",
                 *cfg.rm_overrides]
    wall = launch_once("reward_models.train", overrides, rm_dir, Path(cfg.out_dir) / "logs" / "reward_model.log",
                       cfg.in_process)["wall_s"]
    rows = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    acc = next((r["rm/eval_pair_accuracy"] for r in reversed(rows) if "rm/eval_pair_accuracy" in r), None)
    note = (f"PPO-RLHF reward model: trained by grpo-rm-train on the built-in preference set in {wall / 60:.1f} min "
            f"(not counted in PPO-RLHF's row; one model for every seed), held-out pair accuracy "
            f"{'n/a' if acc is None else f'{acc:.3f}'}")
    return str(rm_dir / "reward_model"), [note]


def teacher_for(cfg: CompareConfig) -> tuple[str | None, list[str]]:
    """The teacher distill learns from (trained here unless `teacher_path` is given: SFT from the first seed's warm
    start on the training split, `TEACHER_STEPS` x the arms' steps) and notes: its cost and held-out accuracy."""
    if "distill" not in cfg.algorithms:
        return None, []
    if cfg.teacher_path:
        return cfg.teacher_path, [f"On-policy distillation's teacher: {cfg.teacher_path} (given)"]
    teacher_dir, seed = Path(cfg.out_dir) / "teacher_run", cfg.seeds[0]
    steps = TEACHER_STEPS * (cfg.budget_samples // (cfg.prompts_per_step * cfg.group_size))
    overrides = [*TEACHER_RECIPE, *common_overrides(cfg, teacher_dir, seed), f"train.max_steps={steps}",
                 f"train.prompts_per_step={cfg.prompts_per_step}", f"algorithm.group_size={cfg.group_size}",
                 f"train.eval_every={steps}", *cfg.teacher_overrides]
    wall = launch_once("grpo.train", overrides, teacher_dir, Path(cfg.out_dir) / "logs" / "teacher.log",
                       cfg.in_process)["wall_s"]
    rows = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = next(r for r in reversed(rows) if r.get("eval/accuracy") is not None)
    start = next(r for r in rows if r.get("eval/accuracy") is not None)
    note = (f"On-policy distillation's teacher: trained by grpo-train {' '.join(TEACHER_RECIPE)} on the training "
            f"split's gold answers from seed {seed}'s warm start, {final['step']} steps of "
            f"{cfg.prompts_per_step * cfg.group_size} demonstrations in {wall / 60:.1f} min wall (not counted in the "
            f"distillation row; one teacher for every seed), held-out accuracy {start['eval/accuracy']:.3f} -> "
            f"{final['eval/accuracy']:.3f}")
    return str(latest_checkpoint(teacher_dir) / "policy"), [note]


def best_note(runs: dict[str, list[dict]]) -> str:
    """How the best evaluation was chosen: on validation (unbiased on test), or on test itself (biased up)."""
    if all(r["best_chosen_on"] == "val" for seed_runs in runs.values() for r in seed_runs):
        return ("best acc: test accuracy at the evaluation with the best val/accuracy "
                "(a validation split apart from test)")
    return "best acc: chosen on the test split itself (some run had no validation split), so biased upwards"


def launch_runs(cfg: CompareConfig, models: dict[str, str | None]) -> dict[tuple[int, str], dict]:
    """Every (seed, algorithm) run's record, launched seed-major (a comparison stopped early has every arm on its
    first seeds), `jobs` at a time. A failed run stops nothing else: the others finish and keep their records,
    then the first failure is raised."""
    def one(seed: int, name: str) -> dict:
        overrides = run_overrides(cfg, name, models, seed)
        log.info("%s, seed %d: grpo-train %s", name, seed, " ".join(overrides))
        return launch_once("grpo.train", overrides, run_dir(cfg, name, seed),
                           Path(cfg.out_dir) / "logs" / f"{name}_seed{seed}.log", cfg.in_process)

    plan = [(seed, name) for seed in cfg.seeds for name in cfg.algorithms]
    if cfg.jobs == 1:  # in this thread: an in-process run installs signal handlers, which only the main thread may
        return {key: one(*key) for key in plan}
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        futures = {key: pool.submit(one, *key) for key in plan}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        raise failed[0]
    return {key: f.result() for key, f in futures.items()}


def compare(cfg: CompareConfig) -> list[dict]:
    """Run every algorithm on every seed, then write the table and the plot; returns the arms' rows."""
    validate_compare(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rm_path, notes = reward_model_for(cfg)
    teacher, teacher_notes = teacher_for(cfg)
    notes += teacher_notes
    per_step = cfg.prompts_per_step * cfg.group_size
    runs: dict[str, list[dict]] = {LABELS[name]: [] for name in cfg.algorithms}
    curves: dict[str, list[list[dict]]] = {LABELS[name]: [] for name in cfg.algorithms}
    outcomes: dict[str, list[dict]] = {LABELS[name]: [] for name in cfg.algorithms}  # per seed: final, best
    paraphrases = tuple(cfg.paraphrase_splits)
    records = launch_runs(cfg, {"rm": rm_path, "teacher": teacher})
    reused = 0
    for seed in cfg.seeds:
        for name in cfg.algorithms:
            record = records[seed, name]
            wall, peak, reused = record["wall_s"], record["peak_mib"], reused + record["reused"]
            points = curve(run_dir(cfg, name, seed) / "metrics.jsonl", per_step, offline=name == "dpo",
                           paraphrases=paraphrases)
            curves[LABELS[name]].append(points)
            final = outcomes_at(run_dir(cfg, name, seed), points[-1]["step"])
            summary = summarise_run(LABELS[name], seed, points, wall, peak, final, paraphrases)
            best = outcomes_at(run_dir(cfg, name, seed), summary["best_step"])
            outcomes[LABELS[name]].append({"final": final, "best": best})
            runs[LABELS[name]].append(summary)
            log.info("%s, seed %d: final held-out accuracy %.3f, %.1f min", name, seed,
                     runs[LABELS[name]][-1]["final_accuracy"], wall / 60)
    arms = [summarise_arm(label, seed_runs, outcomes[label], paraphrases) for label, seed_runs in runs.items()]
    diffs = differences(runs, outcomes, paraphrases)
    notes += [f"budget {cfg.budget_samples:,} generated samples per algorithm and seed; seeds {list(cfg.seeds)} "
              f"(each seeds its run and its warm start); whole comparison "
              f"{(time.perf_counter() - start) / 60:.1f} min wall"
              + (f" ({reused} of {len(cfg.seeds) * len(cfg.algorithms)} runs reused from an earlier invocation)"
                 if reused else ""),
              "intervals: 95%, seeds and problems crossed (one draw of the problems shared by every seed and "
              "arm; each variance part scaled by its own Student quantile; Wilson floor for accuracies); "
              "differences paired by seed, and by problem where both runs logged which of the same problems "
              "they solved (grpo/compare/intervals.py)",
              best_note(runs),
              f"OOD: the splits of new problems, pooled; paraphrases of held-out problems "
              f"({', '.join(paraphrases) or 'none'}) reported apart, not pooled"]
    if cfg.in_process:
        notes.append("in_process: peak memory is the comparison process's, not each run's")
    md = write_report(arms, [r for seed_runs in runs.values() for r in seed_runs], diffs, out, notes)
    plot(curves, out / "compare.png")
    (out / "compare.json").write_text(json.dumps(
        {"arms": arms, "runs": runs, "differences": diffs, "curves": curves, "notes": notes}, indent=2, default=str))
    log.info("table: %s; plot: %s", md, out / "compare.png")
    return arms


def main() -> None:
    """`grpo-compare`: the comparison the composed `configs/compare/config.yaml` describes."""
    run_cli(compare, config_name="compare/config", load=OmegaConf.to_object,
            register=lambda: ConfigStore.instance().store(name="compare_schema", node=CompareConfig))


if __name__ == "__main__":
    main()
