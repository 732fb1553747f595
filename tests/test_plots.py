"""The figures the framework writes, checked on their drawn axes: ticks, limits and titles."""

from __future__ import annotations

import json

import pytest

from icpo_infer.infer_config import InferConfig
from icpo_infer.report import accuracy_limits, plot_accuracy, plot_comparison, plot_cost
from icpo_infer.results import METRICS_FILE, append_line
from icpo_train.callbacks import RESULTS_FILE, SUMMARY_KEYS, CheckpointEvaluator


def run_metrics(method: str, per_round: list[float], final: float, tokens: int) -> dict:
    return {
        "k": 4,
        "mean@k": final,
        "maj@k": final,
        "pass@k": final,
        "mean_per_round": per_round,
        "maj_per_round": per_round,
        "self_improvement": final - per_round[0] if per_round else 0.0,
        "generated_tokens": tokens,
        "engine_calls": 3,
        "num_questions": 10,
        "config": {"method": method, "dataset": "data/arithmetic.jsonl"},
    }


def tick_labels(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def test_accuracy_limits_follow_the_data_within_0_and_1():
    assert accuracy_limits([0.08, 0.12]) == pytest.approx((0.0, 0.2))
    assert accuracy_limits([0.0, 1.0]) == pytest.approx((-0.02, 1.02))
    low, high = accuracy_limits([0.4, 0.5])
    assert low == pytest.approx(0.35) and high == pytest.approx(0.55)


def test_rounds_are_integer_ticks_ending_in_final_and_the_axis_fits_the_data(tmp_path):
    runs = [run_metrics("me-icpo", [0.05, 0.1, 0.12], 0.15, 300), run_metrics("single", [], 0.08, 100)]
    ax = plot_comparison(["icpo", "base"], runs, tmp_path / "compare.png").axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3, 4] and tick_labels(ax.xaxis) == ["1", "2", "3", "final"]
    assert ax.get_ylim() == pytest.approx(accuracy_limits([0.0, 0.05, 0.1, 0.12, 0.15, 0.08]))
    assert ax.get_ylim()[1] < 0.3  # not flattened into a 0-1 axis
    assert ax.get_title() == "accuracy against round on arithmetic.jsonl"


def test_runs_without_rounds_are_bars_without_a_round_axis(tmp_path):
    runs = [run_metrics("single", [], 0.3, 100), run_metrics("majority", [], 0.4, 100)]
    ax = plot_comparison(["a", "b"], runs, tmp_path / "compare.png").axes[0]
    assert tick_labels(ax.xaxis) == ["a\n(single)", "b\n(majority)"] and ax.get_xlabel() == ""
    one = plot_accuracy(runs[0], tmp_path / "one.png").axes[0]
    assert tick_labels(one.xaxis) == ["mean@4", "maj@4"] and one.get_xlabel() == ""


def test_cost_ticks_are_plain_numbers_without_crowded_minor_labels(tmp_path):
    runs = [run_metrics("single", [], 0.3, 260), run_metrics("me-icpo", [0.2, 0.3], 0.35, 1900)]
    ax = plot_cost(["a", "b"], runs, tmp_path / "cost.png").axes[0]
    low, high = ax.get_xlim()
    shown = [t for t, label in zip(ax.get_xticks(), tick_labels(ax.xaxis), strict=True) if low <= t <= high]
    assert shown and set(shown) <= {10, 20, 50, 100, 200, 500}
    assert all(text in ("", *map(str, (10, 20, 50, 100, 200, 500))) for text in tick_labels(ax.xaxis))
    assert not any(label.get_text() for label in ax.xaxis.get_minorticklabels())


def test_the_step_plot_has_integer_steps(tmp_path):
    config = InferConfig(model="m", dataset="data/arithmetic.jsonl", output_dir=str(tmp_path / "eval"))
    for step, final in ((0, 0.1), (3, 0.12), (7, 0.15)):  # what CheckpointEvaluator.evaluate leaves
        directory = tmp_path / "eval" / f"step-{step}"
        directory.mkdir(parents=True)
        metrics = run_metrics("me-icpo", [0.1, 0.11], final, 100)
        (directory / METRICS_FILE).write_text(json.dumps(metrics))
        row = {"step": step, "name": directory.name, "output_dir": str(directory)}
        append_line(tmp_path / "eval" / RESULTS_FILE, row | {key: metrics[key] for key in SUMMARY_KEYS})
    accuracy, improvement = CheckpointEvaluator(tmp_path / "run", config).plot().axes
    for ax in (accuracy, improvement):
        low, high = ax.get_xlim()
        assert all(float(t).is_integer() for t in ax.get_xticks() if low <= t <= high)
        assert ax.get_xlabel() == "training step"
    assert accuracy.get_ylim()[1] < 0.4 and improvement.get_ylabel() == "points"
