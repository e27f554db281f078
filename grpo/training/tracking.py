"""Where a run's numbers go: metrics.jsonl always, samples.jsonl, eval_outcomes.jsonl (which evaluation
problems each evaluation solved, for intervals paired by problem), a progress bar, wandb when configured,
and a plot of reward and held-out accuracy at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, resumed: bool = False,
                 progress_bar: bool = True, wandb_config: dict | None = None, run_config: dict | None = None,
                 title: str = ""):
        self.run_dir = Path(run_dir)
        self.title = title  # the plot's: what was trained, on what, with which model
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.outcomes_path = self.run_dir / "eval_outcomes.jsonl"
        for path in (self.metrics_path, self.samples_path, self.outcomes_path):
            # a resumed run continues the same files without doubling the steps it re-runs; a run that
            # starts from scratch (no checkpoint to resume from) starts them afresh
            truncate_after(path, start_step if resumed else -1)
        self._metrics = self.metrics_path.open("a")
        self._samples = self.samples_path.open("a")
        self._outcomes = self.outcomes_path.open("a")
        self.bar = None
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", dynamic_ncols=True)
        self.wandb = None
        if wandb_config is not None:
            import wandb  # about a second at import: paid by the runs that log to it

            self.wandb = wandb.init(
                project=wandb_config["project"], mode=wandb_config["mode"], dir=str(self.run_dir),
                config=run_config, resume="allow", id=wandb_config.get("id"),
            )

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length, when the loop learns it after the tracker opened (offline DPO: from its pairs)."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {"reward": metrics.get("train/reward_mean"), "step_s": metrics.get("time/step_s")}
            if "eval/accuracy" in metrics:
                self.last_accuracy = metrics["eval/accuracy"]
            if getattr(self, "last_accuracy", None) is not None:
                shown["eval_acc"] = self.last_accuracy
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
            self.bar.n = step
            self.bar.refresh()

    def log_samples(self, step: int, prompts: list[str], completions: list[str], rewards: list) -> None:
        for p, c, r in zip(prompts, completions, rewards):
            self._samples.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}) + "\n")
        self._samples.flush()

    def log_outcomes(self, step: int, outcomes: dict[str, dict]) -> None:
        """One evaluation's per-problem outcomes: split -> {"solved": "0110..." (one character per problem, in
        row order), "digest": the split's prompts' fingerprint, "keys": each problem's `problem_key`, in row order}."""
        self._outcomes.write(json.dumps({"step": step, **outcomes}) + "\n")
        self._outcomes.flush()

    def close(self, plot: bool = True) -> None:
        self._metrics.close()
        self._samples.close()
        self._outcomes.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plot:
            plot_metrics(self.metrics_path, self.run_dir / "plot.png", title=self.title)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log written after `step` (steps a crashed run did not checkpoint),
    and a last line cut short by the crash; the file is replaced atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line the crash cut short
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Training reward and held-out accuracy against step, as a PNG titled `title` (the run: algorithm, task,
    model)."""
    metrics_figure(read_metrics(metrics_path), title).savefig(out_path, dpi=100)
    return Path(out_path)


def metrics_figure(rows: list[dict], title: str = "") -> Figure:
    """The figure `plot_metrics` saves, from the metrics lines."""
    fig = Figure(figsize=(7, 4))  # no pyplot: no GUI backend, no global state
    ax = fig.subplots()
    steps = [r["step"] for r in rows if r.get("train/reward_mean") is not None]
    ax.plot(steps, [r["train/reward_mean"] for r in rows if r.get("train/reward_mean") is not None],
            color="tab:blue", alpha=0.6, label="train reward (mean)")
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:red", label="held-out accuracy (greedy)")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward / accuracy")
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
