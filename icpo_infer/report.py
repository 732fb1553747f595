"""Plots and tables from metrics.json: accuracy against round, and runs compared side by side.

`icpo-infer compare BASE TRAINED ...` is how a user sees how much training improved test-time
self-improvement: the differences are taken against the first directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from icpo_infer.config import check
from icpo_infer.results import METRICS_FILE

ACCURACY_RANGE = (-0.02, 1.02)  # a little margin, so that points at 0 and 1 stay visible


def accuracy_curve(metrics: dict[str, Any]) -> tuple[list[str], list[float], list[float]]:
    """x labels and mean@k / maj@k per round; ICPO methods end with the final samples."""
    if not metrics["config"]["method"].endswith("icpo"):
        return ["samples"], [metrics["mean@k"]], [metrics["maj@k"]]
    labels = [str(r) for r in range(1, len(metrics["mean_per_round"]) + 1)] + ["final"]
    return (
        labels,
        [*metrics["mean_per_round"], metrics["mean@k"]],
        [*metrics["maj_per_round"], metrics["maj@k"]],
    )


def plot_accuracy(metrics: dict[str, Any], path: str | Path) -> None:
    """PNG of mean@k and maj@k against round for one run."""
    labels, mean, maj = accuracy_curve(metrics)
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.subplots()
    k = metrics["k"]
    ax.plot(labels, mean, marker="o", label=f"mean@{k}")
    ax.plot(labels, maj, marker="s", linestyle="--", label=f"maj@{k}")
    config = metrics["config"]
    ax.set(xlabel="round", ylabel="accuracy", ylim=ACCURACY_RANGE)
    ax.set_title(
        f"{config['method']} on {Path(config['dataset']).name} ({metrics['num_questions']} questions)"
    )
    ax.legend()
    figure.savefig(path, dpi=120)


def load_metrics(directories: Sequence[str | Path]) -> list[dict[str, Any]]:
    runs = []
    for directory in directories:
        path = Path(directory) / METRICS_FILE
        check(path.is_file(), f"{path} does not exist; pass output directories of `icpo-infer run`.")
        runs.append(json.loads(path.read_text()))
    return runs


def run_labels(directories: Sequence[str | Path]) -> list[str]:
    """Directory names, or full paths where names repeat."""
    names = [Path(d).name for d in directories]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, directories, strict=True)]


def compare_table(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> str:
    """Accuracy and self-improvement of each run, in percent, with differences against the first."""
    columns = [
        ("mean@k", "mean@k"),
        ("maj@k", "maj@k"),
        ("pass@k", "pass@k"),
        ("self-impr.", "self_improvement"),
    ]
    width = max(len(label) for label in [*labels, "run"])
    header = f"{'run':<{width}}  {'method':<11}" + "".join(
        f"  {title:>10}  {'diff':>7}" for title, _ in columns
    )
    lines = [header, "-" * len(header)]
    for label, run in zip(labels, runs, strict=True):
        line = f"{label:<{width}}  {run['config']['method']:<11}"
        for _, key in columns:
            line += f"  {100 * run[key]:>10.1f}  {100 * (run[key] - runs[0][key]):>+7.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot_comparison(labels: Sequence[str], runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of mean@k against round for several runs; runs without rounds are horizontal lines."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
        x, mean, _ = accuracy_curve(run)
        style = {"color": f"C{i}", "label": f"{label} ({run['config']['method']})"}
        if len(x) == 1:
            ax.axhline(mean[0], linestyle=":", **style)
        else:
            ax.plot(x, mean, marker="o", **style)
    ax.set(xlabel="round", ylabel="mean@k", ylim=ACCURACY_RANGE, title="accuracy against round")
    ax.legend()
    figure.savefig(path, dpi=120)
