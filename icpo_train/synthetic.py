"""A synthetic question/answer task family for the end-to-end CPU proof: sums of a few integers.

Why sums: a tiny transformer trained for minutes learns the units digit fast and the carries slowly,
so an undertrained model answers with a distribution centred on the right sum and varied wrong
answers (off by ten, twenty ...). The right answer is then often its most frequent answer, which is
what makes majority-vote rewards informative and an in-context history worth reading.

Splits are written as JSONL files with ``id``, ``problem`` and ``answer``, so
:func:`icpo_infer.data.load_problems` reads them like any benchmark.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from icpo_infer.config import check
from icpo_infer.data import Problem

SPLITS = ("train", "validation", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class SyntheticTaskConfig:
    """Which sums, and how many questions per split. Split sizes may be 0 (the split file is then empty)."""

    task_seed: int = 0
    min_operands: int = 3
    max_operands: int = 6
    min_operand: int = 0
    max_operand: int = 9
    train_size: int = 20000
    validation_size: int = 500
    test_size: int = 200
    spell_operands: bool = True
    modulus: int = 0

    def __post_init__(self) -> None:
        check(
            2 <= self.min_operands <= self.max_operands,
            f"min_operands={self.min_operands}, max_operands={self.max_operands}: use 2 <= min_operands <= max_operands.",
        )
        check(
            0 <= self.min_operand < self.max_operand,
            f"min_operand={self.min_operand}, max_operand={self.max_operand}: use 0 <= min_operand < max_operand.",
        )
        sizes = self.split_sizes()
        for split, size in sizes.items():
            check(size >= 0, f"{split}_size={size}: use a size >= 0.")
        # Questions are unique up to operand order; ask for at most half of them so sampling stays fast.
        values = self.max_operand - self.min_operand + 1
        distinct = sum(math.comb(values + n - 1, n) for n in range(self.min_operands, self.max_operands + 1))
        check(
            sum(sizes.values()) <= distinct // 2,
            f"train_size + validation_size + test_size = {sum(sizes.values())} but only {distinct} distinct "
            f"sums of {self.min_operands} to {self.max_operands} operands in [{self.min_operand}, {self.max_operand}] exist: ask for "
            f"at most {distinct // 2} questions, or widen the operand range.",
        )

    def split_sizes(self) -> dict[str, int]:
        return {split: getattr(self, f"{split}_size") for split in SPLITS}


def generate_splits(config: SyntheticTaskConfig) -> dict[str, list[Problem]]:
    """Disjoint splits drawn from one seeded stream: no question (up to operand order) is in two splits."""
    rng = random.Random(config.task_seed)
    seen: set[tuple[int, ...]] = set()
    splits: dict[str, list[Problem]] = {}
    for split, size in config.split_sizes().items():
        problems = []
        while len(problems) < size:
            count = rng.randint(config.min_operands, config.max_operands)
            operands = [rng.randint(config.min_operand, config.max_operand) for _ in range(count)]
            key = tuple(sorted(operands))
            if key in seen:
                continue
            seen.add(key)
            expression = " + ".join(NUMBER_WORDS[x] if config.spell_operands else str(x) for x in operands)
            answer = sum(operands)
            if config.modulus:
                expression, answer = f"({expression}) mod {config.modulus}", answer % config.modulus
            problems.append(
                Problem(
                    id=f"{split}-{len(problems):05d}", problem=f"What is {expression}?", answer=str(answer)
                )
            )
        splits[split] = problems
    return splits


def write_problems(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as JSONL atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        for problem in problems:
            row = {"id": problem.id, "problem": problem.problem, "answer": problem.answer}
            handle.write(json.dumps(row) + "\n")
    os.replace(handle.name, path)
    return path


def write_splits(config: SyntheticTaskConfig, directory: str | Path) -> dict[str, Path]:
    """Generate the splits and write ``DIRECTORY/{train,validation,test}.jsonl``; returns their paths."""
    splits = generate_splits(config)
    return {
        split: write_problems(problems, Path(directory) / f"{split}.jsonl")
        for split, problems in splits.items()
    }
