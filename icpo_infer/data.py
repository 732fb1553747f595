"""Benchmark problems from a local JSON / JSONL / Parquet file, a Hugging Face dataset, or a benchmark
by name (``aime24``, ``amc``, ``math500``: :data:`BENCHMARKS`), via `datasets`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from icpo_infer.config import ConfigError, check

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Benchmark:
    """A public benchmark on the Hub and how its columns map to a problem."""

    hub_id: str
    split: str
    description: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str = "id"


# Column names and splits as the datasets' cards list them.
BENCHMARKS = {
    "aime24": Benchmark(
        "HuggingFaceH4/aime_2024", "train", "AIME 2024 I and II, 30 problems, integer answers"
    ),
    "amc": Benchmark(
        "AI-MO/aimo-validation-amc",
        "train",
        "AMC 12 2022 and 2023, 83 problems, answers stored as floats (142.0)",
    ),
    "math500": Benchmark(
        "HuggingFaceH4/MATH-500", "test", "MATH-500, 500 problems of the MATH test set", id_field="unique_id"
    ),
}
BENCHMARK_ALIASES = {"aime2024": "aime24", "amc23": "amc", "math-500": "math500"}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str  # the reference answer, as a string (AMC's float 142.0 becomes "142.0")


def _open(source: str, split: str | None) -> datasets.Dataset:
    """One split of ``source``: a local file (a single split) or anything ``load_dataset`` accepts
    (a Hub id, a local dataset folder). Without ``split`` the dataset must have exactly one."""
    builder = LOCAL_FORMATS.get(Path(source).suffix.lower())
    check(
        builder is None or Path(source).is_file(),
        f"--dataset: file '{source}' does not exist; pass an existing .json, .jsonl or .parquet file "
        "or a Hub dataset id.",
    )
    if builder and Path(source).stat().st_size == 0:
        raise ConfigError(f"--dataset: '{source}' is empty; pass a file with one problem per row.")
    try:
        if builder:
            splits = datasets.load_dataset(builder, data_files=source)
        else:
            splits = datasets.load_dataset(source, split=split)
    except DatasetGenerationError as err:
        raise ConfigError(_unreadable(source, builder, err)) from err
    except (FileNotFoundError, ConnectionError) as err:
        raise ConfigError(
            f"--dataset: '{source}' is not a local .json/.jsonl/.parquet file and could not be loaded "
            f"as a Hub dataset ({err}); check the path or the dataset id."
        ) from err
    except ValueError as err:
        if builder:  # a local file that does not parse
            raise ConfigError(_unreadable(source, builder, err)) from err
        if split is None:
            raise
        raise ConfigError(f"--split: {err}") from err  # datasets' 'Unknown split "x"' error
    if isinstance(splits, datasets.Dataset):
        return splits
    if split is None:
        check(len(splits) == 1, f"--split: '{source}' has splits {list(splits)}; choose one with --split.")
        split = next(iter(splits))
    check(split in splits, f"--split: '{source}' has no split '{split}'; its splits are {list(splits)}.")
    return splits[split]


def _unreadable(source: str, builder: str | None, err: Exception) -> str:
    where = _bad_json_line(source) if builder == "json" else None
    return f"--dataset: could not read '{source}' ({where or err.__cause__ or err}); fix the file."


def _bad_json_line(path: str) -> str | None:
    """Where a JSON Lines file stops parsing ("line N: ..."), for an error a person can act on."""
    lines = Path(path).read_text(errors="replace").splitlines()
    if path.lower().endswith(".json") and lines and lines[0].lstrip().startswith("["):
        return None  # one JSON document: datasets' own message says where
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON: {err.msg}"
    return None


def load_problems(
    source: str | Path,
    split: str | None = None,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str = "id",
    limit: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Problem], int]:
    """The first ``limit`` valid problems of ``source`` and the number of invalid rows skipped.

    Ids come from ``id_field`` (stringified), or are the row index when the dataset has no such
    column; they must be unique, since runs resume by id. A row without a problem or an answer is
    a ConfigError naming the row, unless ``skip_invalid`` (then it is skipped and counted).
    """
    check(limit is None or limit >= 1, f"--limit: {limit} is invalid; use a positive number of problems.")
    source = str(source)
    dataset = _open(source, split)
    columns = dataset.column_names
    for field, flag in ((problem_field, "--problem-field"), (answer_field, "--answer-field")):
        check(
            field in columns,
            f"{flag}: '{source}' has no column '{field}'; its columns are {columns}. Pass {flag} COLUMN.",
        )
    has_ids = id_field in columns
    fields = [problem_field, answer_field, *([id_field] if has_ids else [])]
    rows = dataset.select_columns(fields)

    problems: list[Problem] = []
    row_of_id: dict[str, int] = {}
    skipped = 0
    for index, row in enumerate(rows):
        if limit is not None and len(problems) == limit:
            break
        empty = [field for field in fields if _is_empty(row[field])]
        if empty:
            if skip_invalid:
                skipped += 1
                continue
            raise ConfigError(
                f"'{source}': row {index} has no '{empty[0]}'. Map the right columns with "
                "--problem-field/--answer-field/--id-field, or pass --skip-invalid to skip such rows."
            )
        problem_id = str(row[id_field]) if has_ids else str(index)
        check(
            problem_id not in row_of_id,
            f"--id-field: '{source}' rows {row_of_id.get(problem_id)} and {index} share the id '{problem_id}'; "
            "ids must be unique: choose a column of unique ids with --id-field.",
        )
        row_of_id[problem_id] = index
        problems.append(Problem(problem_id, str(row[problem_field]), str(row[answer_field]).strip()))
    check(bool(problems), f"--dataset: '{source}' has no valid problems ({skipped} invalid rows skipped).")
    return problems, skipped


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def benchmark_name(dataset: str) -> str | None:
    """The name in :data:`BENCHMARKS` that ``dataset`` names (case-insensitive, aliases allowed), or
    None when it is no benchmark name or an existing local path (a local file or folder always wins)."""
    if Path(dataset).exists():
        return None
    name = BENCHMARK_ALIASES.get(dataset.lower(), dataset.lower())
    return name if name in BENCHMARKS else None


def load_run_problems(config: Any) -> tuple[list[Problem], int]:
    """:func:`load_problems` with the options a run's config carries (``dataset``, ``split``, the field
    names, ``limit``, ``skip_invalid``); a run needs at least one question.

    A benchmark name as ``dataset`` loads its Hub dataset with its split and column mapping; a split or
    field the config sets to other than its default overrides the benchmark's.
    """
    source, split = config.dataset, config.split
    fields = {name: getattr(config, name) for name in ("problem_field", "answer_field", "id_field")}
    name = benchmark_name(config.dataset)
    if name is not None:
        benchmark = BENCHMARKS[name]
        source, split = benchmark.hub_id, split or benchmark.split
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in fields}
        for name, value in fields.items():
            if value == defaults.get(name):
                fields[name] = getattr(benchmark, name)
    problems, skipped = load_problems(
        source, split=split, limit=config.limit, skip_invalid=config.skip_invalid, **fields
    )
    check(bool(problems), f"dataset '{config.dataset}' has no questions to run; check --dataset and --split.")
    return problems, skipped
