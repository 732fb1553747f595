"""Plots and tables from metrics.json: accuracy against round, runs compared side by side, accuracy
against cost, and ME-ICPO's self-reward diagnostics.

`icpo-infer compare BASE TRAINED ...` is how a user sees how much training improved test-time
self-improvement (the differences are taken against the first directory), and what each method's
accuracy costs in generated tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from icpo_infer.config import check
from icpo_infer.infer_config import ROUND_METHODS
from icpo_infer.results import METRICS_FILE, RESULTS_FILE, read_results


def accuracy_key(method: str) -> str:
    """The metrics.json key of a method's own accuracy: majority answers by its vote, best-of-n by its
    pick, the others by the average of their final samples."""
    return {"majority": "maj@k", "best-of-n": "best@k"}.get(method, "mean@k")


def accuracy_limits(values: Iterable[float | None]) -> tuple[float, float]:
    """y limits for accuracies (fractions): the data's range with a margin, at least 0.2 wide, within
    [0, 1] (plus a little, so that points at 0 and 1 stay visible): curves near 0.1 are not flattened."""
    values = [v for v in values if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(0.05, (0.2 - (high - low)) / 2)
    return max(low - pad, -0.02), min(high + pad, 1.02)


def accuracy_curve(metrics: dict[str, Any]) -> tuple[list[str], list[float], list[float]]:
    """x labels and mean@k / maj@k per round; methods with rounds end with the final samples."""
    if metrics["config"]["method"] not in ROUND_METHODS:
        return ["samples"], [metrics["mean@k"]], [metrics["maj@k"]]
    labels = [str(r) for r in range(1, len(metrics["mean_per_round"]) + 1)] + ["final"]
    return (
        labels,
        [*metrics["mean_per_round"], metrics["mean@k"]],
        [*metrics["maj_per_round"], metrics["maj@k"]],
    )


def plot_accuracy(metrics: dict[str, Any], path: str | Path) -> Figure:
    """PNG of mean@k and maj@k against round for one run (a method without rounds: its two accuracies)."""
    labels, mean, maj = accuracy_curve(metrics)
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.subplots()
    k = metrics["k"]
    config = metrics["config"]
    if len(labels) > 1:
        ax.plot(labels, mean, marker="o", label=f"mean@{k}")
        ax.plot(labels, maj, marker="s", linestyle="--", label=f"maj@{k}")
        ax.set(xlabel="round")
        ax.legend()
    else:  # no rounds: no round axis
        ax.bar([f"mean@{k}", f"maj@{k}"], [mean[0], maj[0]], color=["C0", "C1"])
    ax.set(ylabel="accuracy (fraction correct)", ylim=accuracy_limits([*mean, *maj, 0.0]))
    ax.set_title(
        f"{config['method']} on {Path(config['dataset']).name} ({metrics['num_questions']} questions)"
    )
    figure.savefig(path, dpi=120)
    return figure


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


def incomplete(run: dict[str, Any]) -> str | None:
    """How much of an unfinished run is done ("3 of 12 questions done"); None for a finished run (or one
    written before runs recorded how many questions they ask)."""
    total = run.get("total_questions")
    if total is None or run["num_questions"] >= total:
        return None
    return f"{run['num_questions']} of {total} questions done"


def setting_differences(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> list[str]:
    """Settings in which a run differs from the first and which move its figures without changing what
    they measure: the backend, the dtype and the history reward."""
    notes = []
    for label, run in zip(labels[1:], runs[1:], strict=True):
        for key in ("backend", "dtype", "reward"):
            first, other = runs[0]["config"].get(key), run["config"].get(key)
            if first != other:
                notes.append(f"{label} ran with {key} {other!r}, the first run with {first!r}")
    return notes


def accuracy(run: dict[str, Any]) -> float:
    """A run's accuracy as its method answers: maj@k for majority, best@k for best-of-n, else mean@k."""
    return run[accuracy_key(run["config"]["method"])]


def generated_per_question(run: dict[str, Any]) -> float:
    return run["generated_tokens"] / max(run["num_questions"], 1)


def compare_table(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> str:
    """Accuracy and self-improvement of each run, in percent, with differences against the first, and
    its cost: generated tokens per question and engine calls."""
    columns = [
        ("mean@k", lambda run: run["mean@k"]),
        ("maj@k", lambda run: run["maj@k"]),
        ("pass@k", lambda run: run["pass@k"]),
        ("self-impr.", lambda run: run["self_improvement"]),
        ("accuracy", accuracy),
    ]
    width = max(len(label) + 1 for label in [*labels, "run"])
    header = (
        f"{'run':<{width}}  {'method':<11}"
        + "".join(f"  {title:>10}  {'diff':>7}" for title, _ in columns)
        + f"  {'gen tok/q':>10}  {'calls':>6}"
    )
    lines = [header, "-" * len(header)]
    unfinished = []
    for label, run in zip(labels, runs, strict=True):
        done = incomplete(run)
        if done:
            unfinished.append(f"{label}: {done}")
            label = f"{label}*"
        line = f"{label:<{width}}  {run['config']['method']:<11}"
        for _, value in columns:
            line += f"  {100 * value(run):>10.1f}  {100 * (value(run) - value(runs[0])):>+7.1f}"
        line += f"  {generated_per_question(run):>10.0f}  {run['engine_calls']:>6}"
        lines.append(line)
    lines.append(
        "accuracies and self-improvement in % of questions (diff: against the first run); accuracy: as "
        "the method answers (maj@k, best@k or mean@k); gen tok/q: generated tokens per question"
    )
    if unfinished:
        lines.append(f"* INCOMPLETE, figures over the finished questions only: {'; '.join(unfinished)}")
    return "\n".join(lines)


def comparability_problems(
    labels: Sequence[str], runs: Sequence[dict[str, Any]], directories: Sequence[str | Path]
) -> list[str]:
    """What makes a run measure something else than the first: another dataset or split, other
    questions, another k, or (between methods with rounds) another number of rounds."""

    def measured(run: dict[str, Any], directory: str | Path) -> dict[str, Any]:
        config = run["config"]
        ids = sorted(str(row["id"]) for row in read_results(Path(directory) / RESULTS_FILE))
        return {
            "dataset": config["dataset"],
            "split": config.get("split"),
            "questions": ids,
            "k": run["k"],
            **({"rounds": config["rounds"]} if config["method"] in ROUND_METHODS else {}),
        }

    first = measured(runs[0], directories[0])
    problems = []
    for label, run, directory in zip(labels[1:], runs[1:], directories[1:], strict=True):
        other = measured(run, directory)
        for key in [key for key in first if key in other and first[key] != other[key]]:
            if key == "questions":
                problems.append(
                    f"{label} ran other questions ({len(other[key])}, {len(set(other[key]) - set(first[key]))} "
                    f"not in the first run's {len(first[key])})"
                )
            else:
                problems.append(f"{label} has {key} {other[key]!r}, the first run {first[key]!r}")
    return problems


SELF_REWARD_COLUMNS = [  # (title, metrics.json key under self_reward)
    ("pseudo-label", "pseudo_label_accuracy"),
    ("reward", "reward_accuracy"),
    ("pick", "pick_accuracy"),
    ("candidates", "candidate_accuracy"),
    ("reward-1 hist.", "reward_1_history_precision"),
]


def self_reward_table(labels: Sequence[str], runs: Sequence[dict[str, Any]]) -> str:
    """Per round, in percent, how well the self-assessed rewards of the ICPO runs match the gold
    answers ("-": nothing to count); empty when no run has them."""
    width = max(len(label) for label in [*labels, "run"])
    header = f"{'run':<{width}}  {'round':>5}" + "".join(f"  {title:>14}" for title, _ in SELF_REWARD_COLUMNS)
    lines = []
    for label, run in zip(labels, runs, strict=True):
        diagnostics = run.get("self_reward")
        if not diagnostics:
            continue
        for r in range(len(diagnostics["reward_accuracy"])):
            cells = [diagnostics[key][r] for _, key in SELF_REWARD_COLUMNS]
            lines.append(
                f"{label:<{width}}  {r + 1:>5}"
                + "".join(f"  {'-':>14}" if v is None else f"  {100 * v:>14.1f}" for v in cells)
            )
    if not lines:
        return ""
    legend = (
        "self-reward per round (%): pseudo-label = majority answer correct; reward = rewards equal to the\n"
        "gold ones; pick = picked candidate correct (2+ candidates); candidates = candidates correct;\n"
        "reward-1 hist. = reward-1 history entries correct"
    )
    return "\n".join([legend, header, "-" * len(header), *lines])


def plot_comparison(labels: Sequence[str], runs: Sequence[dict[str, Any]], path: str | Path) -> Figure:
    """PNG of mean@k against round for several runs; runs without rounds are horizontal lines, and
    without any run with rounds, bars."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    rounds = max((len(accuracy_curve(run)[0]) - 1 for run in runs), default=0)
    final = rounds + 1  # every run's final samples share one place, after the longest run's rounds
    k = runs[0]["k"]
    plotted = [0.0]
    if rounds:
        for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
            x, mean, _ = accuracy_curve(run)
            plotted += mean
            style = {"color": f"C{i}", "label": f"{label} ({run['config']['method']})"}
            if len(x) == 1:
                ax.axhline(mean[0], linestyle=":", **style)
            else:
                ax.plot([*range(1, len(x)), final], mean, marker="o", **style)
        ax.set_xticks(range(1, final + 1), [*map(str, range(1, final)), "final"])
        ax.set(xlabel="round")
        ax.legend()
    else:  # no round axis to draw
        values = [run["mean@k"] for run in runs]
        plotted += values
        ax.bar(range(len(runs)), values, color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(
            range(len(runs)),
            [f"{label}\n({run['config']['method']})" for label, run in zip(labels, runs, strict=True)],
        )
    ax.set(ylabel=f"mean@{k} (fraction correct)", ylim=accuracy_limits(plotted))
    ax.set_title(f"accuracy{' against round' if rounds else ''} on {Path(runs[0]['config']['dataset']).name}")
    figure.savefig(path, dpi=120)
    return figure


def plot_cost(labels: Sequence[str], runs: Sequence[dict[str, Any]], path: str | Path) -> Figure:
    """PNG of each run's accuracy (as its method answers) against generated tokens per question."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
        method = run["config"]["method"]
        ax.scatter(
            generated_per_question(run),
            accuracy(run),
            color=f"C{i}",
            marker="osD^vP*X"[i % 8],  # runs at the same point stay visible
            alpha=0.8,
            label=f"{label} ({method}, {accuracy_key(method)})",
        )
    if all(generated_per_question(run) > 0 for run in runs):
        ax.set_xscale("log")
        # Labels at 1, 2 and 5 of each decade, written 20, 50 ... rather than 2x10^1; none between them.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel="generated tokens per question",
        ylabel="accuracy (fraction correct)",
        ylim=accuracy_limits([0.0, *map(accuracy, runs)]),
        title=f"accuracy against cost on {Path(runs[0]['config']['dataset']).name}",
    )
    ax.legend()
    figure.savefig(path, dpi=120)
    return figure
