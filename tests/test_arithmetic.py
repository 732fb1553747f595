"""The one-digit arithmetic task family of SmolLM2-135M-Instruct: seeded splits, disjoint by fact."""

from __future__ import annotations

import re

import pytest

from icpo_infer.config import ConfigError
from icpo_infer.data import load_problems
from icpo_infer.grading import grade
from icpo_train.e2e.arithmetic import FACTS, OPERATIONS, ArithmeticTaskConfig, generate_splits, main

OPERAND = re.compile(r"\d+")


def fact(problem) -> tuple[str, tuple[int, ...]]:
    """The question's operation and operands up to order."""
    operation = problem.id.split("-")[0]
    return operation, tuple(sorted(int(x) for x in OPERAND.findall(problem.problem)))


def test_splits_are_seeded_and_disjoint_by_fact_whatever_the_phrasing():
    config = ArithmeticTaskConfig(seed=3)
    splits = generate_splits(config)
    assert generate_splits(ArithmeticTaskConfig(seed=3)) == splits
    assert generate_splits(ArithmeticTaskConfig(seed=4)) != splits
    facts = {split: {fact(p) for p in problems} for split, problems in splits.items()}
    assert {split: len(f) for split, f in facts.items()} == {"train": 70, "validation": 20, "test": 20}
    assert not (facts["train"] & facts["test"] or facts["train"] & facts["validation"])
    assert not facts["validation"] & facts["test"]
    # Each fact in every phrasing and both operand orders: 6 questions, 3 when both operands are equal.
    for split, problems in splits.items():
        expected = sum(3 if a == b else 6 for _, (a, b) in facts[split])
        assert len(problems) == len({p.problem for p in problems}) == expected


def test_every_question_is_graded_against_its_arithmetic():
    everything = ArithmeticTaskConfig(train_facts=len(FACTS), validation_facts=0, test_facts=0)
    [problems, validation, test] = generate_splits(everything).values()
    assert not validation and not test and len(problems) == 600
    variants = {p.id.rsplit("-", 2)[0] for p in problems}
    assert variants == {f"{op}-{name}" for op, (_, phrasings) in OPERATIONS.items() for name in phrasings}
    for problem in problems:
        operation, _ = fact(problem)
        a, b = (int(x) for x in OPERAND.findall(problem.problem))
        assert int(problem.answer) == OPERATIONS[operation][0](a, b)
        assert grade(f"So that is {problem.answer}.\n\nThe final answer is {problem.answer}.", problem.answer)


def test_the_command_writes_splits_that_load_like_a_benchmark(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--seed", "1"]) == 0
    assert "test: 20 facts" in capsys.readouterr().out
    loaded, skipped = load_problems(str(tmp_path / "test.jsonl"))
    assert skipped == 0 and loaded == generate_splits(ArithmeticTaskConfig(seed=1))["test"]


def test_the_module_reads_its_own_command_line(tmp_path, monkeypatch, capsys):
    # `python -m icpo_train.e2e.arithmetic --output_dir DIR` calls main() with no arguments.
    monkeypatch.setattr("sys.argv", ["arithmetic", "--output_dir", str(tmp_path), "--test_facts", "3"])
    assert main() == 0
    assert "test: 3 facts" in capsys.readouterr().out and (tmp_path / "test.jsonl").is_file()


def test_asking_for_more_facts_than_the_family_holds_is_a_clear_error():
    with pytest.raises(ConfigError, match="holds 110"):
        ArithmeticTaskConfig(train_facts=100)
