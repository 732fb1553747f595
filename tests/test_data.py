"""Loading problems from the real benchmark files and from malformed or differently shaped files."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
from conftest import benchmark_file

from icpo_infer.config import ConfigError
from icpo_infer.data import Problem, benchmark_name, load_problems, load_run_problems
from icpo_infer.infer_config import InferConfig


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_real_benchmarks():
    aime, skipped = load_problems(benchmark_file("aime2024"))
    assert skipped == 0 and len(aime) == 30
    assert aime[1] == Problem(id="1", problem=aime[1].problem, answer="025")
    amc, _ = load_problems(benchmark_file("amc"))
    assert len(amc) == 83 and amc[0].answer == "142.0"
    math500, _ = load_problems(str(benchmark_file("math500")))
    assert len(math500) == 500 and len({p.id for p in math500}) == 500
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_limit_keeps_the_first_problems(problems_file):
    first, _ = load_problems(problems_file, limit=3)
    every, _ = load_problems(problems_file)
    assert first == every[:3] and len(every) > 3
    with pytest.raises(ConfigError, match="--limit"):
        load_problems(problems_file, limit=0)


def test_parquet_with_field_mapping_and_float_answers(tmp_path):
    path = tmp_path / "bench.parquet"
    datasets.Dataset.from_list(
        [{"question": "What is 71 * 2?", "final": 142.0}, {"question": "What is 1 + 1?", "final": 2.0}]
    ).to_parquet(path)
    problems, skipped = load_problems(path, problem_field="question", answer_field="final")
    assert skipped == 0
    # No id column: ids are row indices; answers are strings.
    assert problems == [Problem("0", "What is 71 * 2?", "142.0"), Problem("1", "What is 1 + 1?", "2.0")]


def test_json_array_with_mixed_answer_types_and_custom_ids(tmp_path):
    path = tmp_path / "bench.json"
    rows = [
        {"uid": 7, "problem": "p0", "answer": 5},
        {"uid": 9, "problem": "p1", "answer": "\\frac{1}{2}"},
        {"uid": 3, "problem": "p2", "answer": 0.25},
    ]
    path.write_text(json.dumps(rows))
    problems, _ = load_problems(path, id_field="uid")
    assert [(p.id, p.answer) for p in problems] == [("7", "5"), ("9", "\\frac{1}{2}"), ("3", "0.25")]


def test_invalid_rows_are_errors_naming_row_and_field_or_are_skipped(tmp_path):
    path = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            {"id": "a", "problem": "p0", "answer": "1"},
            {"id": "b", "problem": "p1"},
            {"id": "c", "problem": "   ", "answer": "3"},
            {"id": "d", "problem": "p3", "answer": None},
            {"id": "e", "problem": "p4", "answer": "5"},
        ],
    )
    with pytest.raises(ConfigError, match=r"row 1 has no 'answer'.*--answer-field.*--skip-invalid"):
        load_problems(path)
    problems, skipped = load_problems(path, skip_invalid=True)
    assert [p.id for p in problems] == ["a", "e"] and skipped == 3
    problems, skipped = load_problems(path, skip_invalid=True, limit=1)
    assert [p.id for p in problems] == ["a"] and skipped == 0  # rows after the limit are not read


def test_problem_field_errors(tmp_path):
    path = write_jsonl(tmp_path / "bench.jsonl", [{"id": "a", "question": "p0", "answer": "1"}])
    with pytest.raises(
        ConfigError, match=r"--problem-field: .* no column 'problem'.*\['id', 'question', 'answer'\]"
    ):
        load_problems(path)
    with pytest.raises(ConfigError, match="row 0 has no 'question'"):
        load_problems(
            write_jsonl(tmp_path / "empty.jsonl", [{"question": None, "answer": "1"}]),
            problem_field="question",
        )
    with pytest.raises(ConfigError, match="no valid problems"):
        load_problems(tmp_path / "empty.jsonl", problem_field="question", skip_invalid=True)


def test_duplicate_ids_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "bench.jsonl", [{"id": 1, "problem": "p", "answer": "1"}] * 2)
    with pytest.raises(ConfigError, match="rows 0 and 1 share the id '1'"):
        load_problems(path)


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "problem": "p", "answer": "1"}\n{"id": 2, "problem": \n')
    with pytest.raises(ConfigError, match="could not read"):
        load_problems(broken)


def test_dataset_folders_go_through_load_dataset_with_splits(tmp_path):
    """Anything that is not a single local file goes to `datasets.load_dataset` (Hub ids, folders)."""
    folder = tmp_path / "bench"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"problem": "train p", "answer": "1"}])
    write_jsonl(folder / "test.jsonl", [{"problem": "test p", "answer": "2"}])
    problems, _ = load_problems(folder, split="test")
    assert problems == [Problem("0", "test p", "2")]
    with pytest.raises(ConfigError, match=r"--split: .*has splits \['train', 'test'\]"):
        load_problems(folder)
    with pytest.raises(ConfigError, match="--split"):
        load_problems(folder, split="validation")
    with pytest.raises(ConfigError, match="has no split 'test'"):
        load_problems(folder / "train.jsonl", split="test")


# Stand-ins for the Hub datasets: the same columns and split, in a local folder at the path of the Hub id
# (`datasets.load_dataset` reads a local folder of that name before asking the Hub).
STAND_INS = {
    "HuggingFaceH4/aime_2024": (
        "train",
        [{"id": 60, "problem": "p1", "solution": "s", "answer": "204", "url": "u", "year": "2024"}],
    ),
    "AI-MO/aimo-validation-amc": ("train", [{"id": 0, "problem": "p2", "answer": 142.0, "url": "u"}]),
    "HuggingFaceH4/MATH-500": (
        "test",
        [
            {
                "problem": "p3",
                "solution": "s",
                "answer": "\\frac{1}{2}",
                "subject": "Algebra",
                "level": 2,
                "unique_id": "test/algebra/1.json",
            }
        ],
    ),
}


@pytest.fixture
def hub_stand_ins(tmp_path, monkeypatch):
    for hub_id, (split, rows) in STAND_INS.items():
        folder = tmp_path / hub_id
        folder.mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(folder / f"{split}.parquet")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("aime24", Problem("60", "p1", "204")),
        ("AIME2024", Problem("60", "p1", "204")),
        ("amc", Problem("0", "p2", "142.0")),
        ("amc23", Problem("0", "p2", "142.0")),
        ("math500", Problem("test/algebra/1.json", "p3", "\\frac{1}{2}")),
        ("MATH-500", Problem("test/algebra/1.json", "p3", "\\frac{1}{2}")),
    ],
)
def test_benchmarks_by_name_load_their_hub_dataset_split_and_columns(hub_stand_ins, tmp_path, name, expected):
    config = InferConfig(model="m", dataset=name, output_dir=str(tmp_path / "out"))
    assert load_run_problems(config) == ([expected], 0)


def test_a_local_path_wins_over_a_benchmark_name_and_flags_override_its_mapping(hub_stand_ins, tmp_path):
    (tmp_path / "math500").mkdir()  # a local dataset folder of that name
    write_jsonl(tmp_path / "math500" / "data.jsonl", [{"id": "a", "problem": "local", "answer": "1"}])
    config = InferConfig(model="m", dataset="math500", output_dir="out")
    assert load_run_problems(config)[0] == [Problem("a", "local", "1")]
    shutil.rmtree(tmp_path / "math500")
    config = InferConfig(
        model="m", dataset="math500", output_dir="out", id_field="subject", answer_field="solution"
    )
    assert load_run_problems(config)[0] == [Problem("Algebra", "p3", "s")]
    with pytest.raises(ConfigError, match='--split: Unknown split "train"'):
        load_run_problems(InferConfig(model="m", dataset="math500", output_dir="out", split="train"))
    assert benchmark_name("AIME2024") == "aime24"
    assert benchmark_name("aime25") is None  # an unknown name is left to load_dataset (a Hub id)
