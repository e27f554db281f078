"""grpo-compare's curve: the OOD accuracy it plots is the table's, over new problems only, by hand."""

from __future__ import annotations

import json

from grpo.compare.report import curve, new_problem_accuracy


def test_the_plotted_ood_accuracy_pools_new_problems_only_weighted_by_their_rows(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "data/carries/rows": 200.0, "data/longer/rows": 100.0, "data/spaced/rows": 100.0,
             "data/question/rows": 100.0},
            {"step": 4, "time/step_s": 30.0, "eval/accuracy": 0.8, "eval/problems": 500.0,
             "eval/ood/carries_accuracy": 0.1, "eval/ood/longer_accuracy": 0.3, "eval/ood/spaced_accuracy": 0.9,
             "eval/ood/question_accuracy": 0.0, "eval/ood_accuracy": 0.28, "eval/ood_problems": 500.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (point,) = curve(metrics, samples_per_step=256, offline=False, paraphrases=("spaced", "question"))
    # (0.1 x 200 + 0.3 x 100) / 300 = 1/6 over 300 problems; the paraphrases (and the run's own pooled 0.28,
    # which counts them) left out. Mutations: paraphrases pooled (0.28), splits averaged unweighted (0.2)
    assert abs(point["ood_accuracy"] - 1 / 6) < 1e-12 and point["ood_problems"] == 300
    assert (point["samples"], point["minutes"]) == (1024, 0.5)
    assert new_problem_accuracy({"eval/ood/spaced_accuracy": 0.9}, {}, ("spaced",)) == (None, None)
