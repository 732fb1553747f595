"""A synthetic question/answer task family for the end-to-end CPU proof: sums of a few small numbers.

Questions read "What is three + eight + one + nine?" (answer ``21``). Why this family:

- A tiny transformer trained for minutes gets the sum roughly right and often off by one or two, so
  its answers spread over a few neighbours of the right sum, which is usually the most frequent:
  majority votes are informative and an in-context history is worth reading.
- Operands are words and answers digits, so the digits a history shows (earlier answers) never look
  like the operands being added.

The train split also holds *reading* questions ("What is 37?", answer ``37``): answering them means
copying digits from the prompt, the copying circuit that language models get from natural text and
that in-context use of a history builds on. Validation and test splits hold sums only.

Splits are written as JSONL files with ``id``, ``problem`` and ``answer``, so
:func:`icpo_infer.data.load_problems` reads them like any benchmark.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from icpo_infer.config import check, option
from icpo_infer.data import Problem
from icpo_infer.results import write_text_atomic

SPLITS = ("train", "validation", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_READING_NUMBER = 99


@dataclass
class SyntheticTaskConfig:
    """Which sums, how many questions per split, and the share of reading questions in the train split."""

    seed: int = option(0, "Seed of the splits (and, in the pipeline, of every stage of the first seed).")
    min_operands: int = option(3, "Fewest digits in a sum.")
    max_operands: int = option(6, "Most digits in a sum.")
    train_size: int = option(3000, "Questions of the train split (pretraining).")
    validation_size: int = option(300, "Questions of the validation split (trajectories).")
    test_size: int = option(100, "Questions of the test split (evaluation).")
    reading_fraction: float = option(
        0.2, 'Share of train questions that repeat a number ("What is 37?") instead of a sum.'
    )

    def __post_init__(self) -> None:
        check(
            2 <= self.min_operands <= self.max_operands,
            f"min_operands={self.min_operands}, max_operands={self.max_operands}: "
            "use 2 <= min_operands <= max_operands.",
        )
        for split, size in self.split_sizes().items():
            check(size >= 0, f"{split}_size={size}: use a size >= 0.")
        check(
            0 <= self.reading_fraction < 1,
            f"reading_fraction={self.reading_fraction}: use a fraction in [0, 1).",
        )
        # Sums are unique up to operand order; ask for at most half of them so that sampling stays fast.
        distinct = sum(math.comb(len(NUMBER_WORDS) + n - 1, n) for n in self.operand_counts())
        check(
            self.num_sums() <= distinct // 2,
            f"the splits need {self.num_sums()} distinct sums but only {distinct} sums of "
            f"{self.min_operands} to {self.max_operands} operands exist: ask for at most {distinct // 2} "
            "(train_size, validation_size, test_size) or allow more operands (max_operands).",
        )

    def split_sizes(self) -> dict[str, int]:
        return {split: getattr(self, f"{split}_size") for split in SPLITS}

    def operand_counts(self) -> range:
        return range(self.min_operands, self.max_operands + 1)

    def num_reading(self) -> int:
        return round(self.train_size * self.reading_fraction)

    def num_sums(self) -> int:
        return sum(self.split_sizes().values()) - self.num_reading()


def generate_splits(config: SyntheticTaskConfig) -> dict[str, list[Problem]]:
    """Seeded splits; no sum (up to operand order) is in two splits."""
    rng = random.Random(config.seed)
    seen: set[tuple[int, ...]] = set()

    def new_sum() -> tuple[str, str]:
        while True:
            operands = [rng.randrange(len(NUMBER_WORDS)) for _ in range(rng.choice(config.operand_counts()))]
            key = tuple(sorted(operands))
            if key not in seen:
                seen.add(key)
                words = " + ".join(NUMBER_WORDS[x] for x in operands)
                return f"What is {words}?", str(sum(operands))

    def reading() -> tuple[str, str]:
        number = rng.randint(0, MAX_READING_NUMBER)
        return f"What is {number}?", str(number)

    splits = {}
    for split, size in config.split_sizes().items():
        num_reading = config.num_reading() if split == "train" else 0
        questions = [new_sum() for _ in range(size - num_reading)] + [reading() for _ in range(num_reading)]
        rng.shuffle(questions)
        splits[split] = [
            Problem(id=f"{split}-{i:05d}", problem=question, answer=answer)
            for i, (question, answer) in enumerate(questions)
        ]
    return splits


def write_problems(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as JSONL atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ({"id": problem.id, "problem": problem.problem, "answer": problem.answer} for problem in problems)
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_splits(splits: dict[str, list[Problem]], directory: str | Path) -> dict[str, Path]:
    """Write each split as ``DIRECTORY/{split}.jsonl``; returns their paths."""
    return {
        split: write_problems(problems, Path(directory) / f"{split}.jsonl")
        for split, problems in splits.items()
    }
