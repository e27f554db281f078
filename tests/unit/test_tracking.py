"""The run's plot says what it shows: axes labelled, and a title naming the algorithm, task and model."""

from grpo.training.run import run_title
from grpo.training.tracking import metrics_figure, plot_metrics
from tests.conftest import compose


def test_the_plot_labels_its_axes_and_names_the_run(tmp_path):
    rows = [{"step": 1, "train/reward_mean": 0.25}, {"step": 2, "train/reward_mean": 0.5, "eval/accuracy": 0.75}]
    title = run_title(compose(["algorithm=dr_grpo", "run_dir=runs/a"]))
    assert title == "dr_grpo on arithmetic, model tiny (a)"
    ax = metrics_figure(rows, title).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("training step", "mean reward / accuracy", title)
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.25, 0.5], [0.75]]
    (tmp_path / "metrics.jsonl").write_text("".join(f"{r}\n".replace("'", '"') for r in rows))
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plot.png", title).stat().st_size > 0


def test_a_run_from_a_model_directory_is_named_by_the_directory():
    cfg = compose(["model=hf", "model.path=/models/SmolLM2-135M-Instruct", "run_dir=/runs/smol"])
    assert run_title(cfg) == "grpo on arithmetic, model SmolLM2-135M-Instruct (smol)"
