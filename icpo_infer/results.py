"""The output directory of `icpo-infer run`: results.jsonl, metrics.json, config.json, chunk_state.json
and log.txt.

results.jsonl gets one line per finished question (appended and fsynced as questions finish);
chunk_state.json holds the chunk in progress after its last finished round (rewritten atomically);
config.json pins what the results measure, so a rerun into the same directory resumes only when
nothing result-changing differs; metrics.json is rewritten atomically after every question and round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from icpo_infer.backends.base import Usage
from icpo_infer.config import check, to_dict
from icpo_infer.infer_config import RUN_ONLY_FIELDS, InferConfig
from icpo_infer.records import QuestionResult
from icpo_infer.run_log import LOG_FILE

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "accuracy_vs_round.png"
STATE_FILE = "chunk_state.json"
TRAJECTORIES_CONFIG_FILE = "build_config.json"
TRAINING_CONFIG_FILE = "icpo_config.json"
# The file that marks each command's output folder (its config), so that no command writes into another's.
COMMAND_MARKERS = {
    CONFIG_FILE: "icpo-infer run",
    TRAJECTORIES_CONFIG_FILE: "icpo-train build-trajectories",
    TRAINING_CONFIG_FILE: "icpo-train train",
}
SPEND_KEYS = ("prompt_tokens", "generated_tokens", "engine_calls", "wall_time_s")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``, with the permissions
    a plain ``open()`` gives (a temporary file is readable by its owner alone)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:  # Ctrl-C or SIGTERM while writing a large state: leave no partial file behind
            os.unlink(tmp.name)
            raise
    os.chmod(tmp.name, plain_mode(0o666))
    os.replace(tmp.name, path)


def plain_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open()`` or ``mkdir()`` would give a new file or folder,
    for one made private by ``tempfile``."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and make it durable before returning."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of results.jsonl; a last line cut short by a crash is dropped from the file."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            check(
                number == len(lines),
                f"{path} line {number} is not valid JSON; fix or delete the file, or pass --overwrite.",
            )
            logger.warning(
                "%s: dropping an incomplete last line (the run was interrupted while writing)", path
            )
            path.write_text("".join(lines[:-1]))
    return rows


class ChunkState:
    """The chunk in progress, saved after each of its rounds and cleared once its results are written.

    ``after_save`` runs after each save (e.g. to record what the saved rounds cost).
    """

    def __init__(self, path: Path, after_save: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.after_save = after_save

    def load(self) -> dict[str, Any] | None:
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def save(self, state: dict[str, Any]) -> None:
        write_text_atomic(self.path, json.dumps(state))
        if self.after_save is not None:
            self.after_save()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def pooled_self_reward(per_question: list[list[dict[str, Any]]]) -> dict[str, list[float | None]]:
    """Per round, the self-reward diagnostics pooled over questions (None where nothing was counted):
    pseudo-label accuracy (over questions), reward accuracy (over candidates), the accuracy of the
    pick among 2 or more candidates beside the candidates' own accuracy (about what a random pick scores),
    and the share of reward-1 history entries that are correct."""

    def ratio(rounds: list[dict[str, Any]], hits: str, total: str | None) -> float | None:
        if total is None:  # hits are booleans, or None where not counted
            counted = [r[hits] for r in rounds if r[hits] is not None]
            return sum(counted) / len(counted) if counted else None
        denominator = sum(r[total] for r in rounds)
        return sum(r[hits] for r in rounds) / denominator if denominator else None

    per_round = list(zip(*per_question, strict=True))
    return {
        name: [ratio(list(rounds), hits, total) for rounds in per_round]
        for name, hits, total in (
            ("pseudo_label_accuracy", "pseudo_label_correct", None),
            ("reward_accuracy", "rewards_right", "candidates"),
            ("pick_accuracy", "pick_correct", None),
            ("candidate_accuracy", "candidates_correct", "candidates"),
            ("reward_1_history_precision", "reward_1_entries_correct", "reward_1_entries"),
        )
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over questions: mean@k, maj@k, pass@k of the final samples (best@k: of best-of-n's
    pick), per-round curves, self-improvement (final mean@k minus round-1 mean@k) and, for the ICPO
    methods, the self-reward diagnostics per round."""
    n = max(len(rows), 1)
    per_question = [row["metrics"] for row in rows]

    def average(key: str) -> float:
        return sum(m[key] for m in per_question) / n

    def per_round(key: str) -> list[float]:
        return [sum(values) / n for values in zip(*(m[key] for m in per_question), strict=True)]

    mean_per_round = per_round("mean_per_round")
    summary = {
        "mean@k": average("mean"),
        "maj@k": average("maj"),
        "pass@k": average("pass"),
        "mean_per_round": mean_per_round,
        "maj_per_round": per_round("maj_per_round"),
        "self_improvement": average("mean") - mean_per_round[0] if mean_per_round else 0.0,
    }
    if per_question and "best" in per_question[0]:
        summary["best@k"] = average("best")
    if per_question and "self_reward" in per_question[0]:
        summary["self_reward"] = pooled_self_reward([m["self_reward"] for m in per_question])
    return summary


def refuse_foreign_output(directory: Path, own_marker: str, flag: str) -> None:
    """Refuse ``directory`` when another command's output is there (its :data:`COMMAND_MARKERS` file)."""
    for marker, command in COMMAND_MARKERS.items():
        check(
            marker == own_marker or not (Path(directory) / marker).is_file(),
            f"{directory} holds the output of `{command}` ({marker}); choose another {flag}.",
        )


def prepare_resumable(
    directory: Path,
    settings: dict[str, Any],
    *,
    overwrite: bool,
    outputs: Sequence[str],
    ignore: Collection[str],
    what: str,
    flag: str,
    config_file: str = CONFIG_FILE,
    defaults: dict[str, Any] | None = None,
    write: bool = True,
) -> bool:
    """Make ``directory`` ready for a run with ``settings``; True when its earlier results can be resumed.
    ``write=False`` only checks, changing nothing: a run checks before it loads its model and writes after.

    ``overwrite`` deletes ``outputs``. Otherwise a stored config must agree with ``settings`` on every key
    outside ``ignore`` (each difference is named), and results without a stored config are refused,
    since nothing says how they were made. ``outputs[0]`` is the file holding the results. A key of
    ``defaults`` that the stored config lacks is a setting added since it was written: the stored run
    had its default.
    """
    refuse_foreign_output(directory, config_file, flag)
    stored = directory / config_file
    resumed = False
    if overwrite:
        for name in outputs if write else ():
            (directory / name).unlink(missing_ok=True)
    elif stored.is_file():
        previous = {**(defaults or {}), **json.loads(stored.read_text())}
        changed = [
            f"{key} ({previous.get(key)!r} there, {settings.get(key)!r} now)"
            for key in sorted(set(previous) | set(settings))
            if key not in ignore and previous.get(key) != settings.get(key)
        ]
        check(
            not changed,
            f"{directory} holds {what} with other settings: {'; '.join(changed)}. "
            f"Use the same values to resume, another {flag}, or --overwrite to start over.",
        )
        resumed = True
    else:
        check(
            not (directory / outputs[0]).is_file(),
            f"{directory / outputs[0]} exists without {config_file}, so it cannot be resumed safely; "
            f"pass --overwrite or choose another {flag}.",
        )
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stored, settings)
    return resumed


class RunDirectory:
    """One run's output directory; :meth:`open` resumes it (or starts over with ``overwrite``)."""

    def __init__(self, config: InferConfig) -> None:
        self.config = config
        self.path = Path(config.output_dir)
        self.rows: list[dict[str, Any]] = []
        self.spent_before = dict.fromkeys(SPEND_KEYS, 0)  # what earlier, interrupted runs spent

    def _prepare(self, write: bool) -> bool:
        return prepare_resumable(
            self.path,
            to_dict(self.config),
            overwrite=self.config.overwrite,
            outputs=(RESULTS_FILE, METRICS_FILE, PLOT_FILE, STATE_FILE, LOG_FILE),
            ignore=RUN_ONLY_FIELDS,
            what="a run",
            flag="--output-dir",
            defaults={
                f.name: f.default
                for f in dataclasses.fields(InferConfig)
                if f.default is not dataclasses.MISSING
            },
            write=write,
        )

    def check(self) -> None:
        """Refuse a directory that holds a run with other settings, writing nothing."""
        self._prepare(write=False)

    def open(self) -> set[str]:
        """Prepare the directory and return the ids of the questions already finished."""
        resumed = self._prepare(write=True)
        if resumed:
            self.rows = read_results(self.path / RESULTS_FILE)
            metrics = self.path / METRICS_FILE
            if metrics.is_file():
                previous = json.loads(metrics.read_text())
                self.spent_before = {key: previous.get(key, 0) for key in SPEND_KEYS}
        return {row["id"] for row in self.rows}

    def add(self, result: QuestionResult) -> None:
        row = dataclasses.asdict(result)
        append_line(self.path / RESULTS_FILE, row)
        self.rows.append(row)

    def write_metrics(self, usage: Usage, wall_time_s: float, skipped: int, total: int) -> dict[str, Any]:
        """metrics.json over every finished question of the ``total`` the run asks, with the spend of this
        and earlier runs."""
        spent_now = {**dataclasses.asdict(usage), "wall_time_s": wall_time_s}
        metrics = {
            "k": self.config.eval_k,
            **summarize(self.rows),
            **{key: self.spent_before[key] + spent_now[key] for key in SPEND_KEYS},
            "num_questions": len(self.rows),
            "total_questions": total,
            "skipped": skipped,
            "config": to_dict(self.config),
        }
        write_json_atomic(self.path / METRICS_FILE, metrics)
        return metrics
