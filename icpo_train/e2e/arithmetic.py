"""One-digit arithmetic facts in several phrasings: a task family for SmolLM2-135M-Instruct.

Questions read "What is 7 times 8?", "What is the product of 8 and 7?", "What is 6 + 9?", ... (answers
``56``, ``56``, ``15``). Why this family: the 135M instruct model knows these facts only partly, so one
sample is right on a fair share of questions and wrong on the rest with answers that vary between
samples (a neighbouring product, an operand, a fact of another table): majority votes and an in-context
history have something to work with. Harder arithmetic (two-digit operands, subtraction, division) is
right in fewer than one sample in seven (``docs/smollm2.md`` measures each).

A *fact* is an operation and its two operands up to order; each fact is asked in every phrasing of its
operation and in both operand orders, and all of its questions are in one split: no fact is in two
splits. Splits are JSONL files with ``id``, ``problem`` and ``answer`` that
:func:`icpo_infer.data.load_problems` reads like any benchmark; an id names the operation and the
phrasing (``multiplication-x-test-00012``), so results can be read per variant.

    python -m icpo_train.e2e.arithmetic --output_dir runs/arithmetic
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from icpo_infer.config import check, option, parse_config
from icpo_infer.data import Problem
from icpo_train.e2e.synthetic import SPLITS, write_splits

OPERANDS = range(10)
# Per operation: its answer and its phrasings by name ("{a}" and "{b}" are the operands).
OPERATIONS = {
    "multiplication": (
        lambda a, b: a * b,
        {
            "times": "What is {a} times {b}?",
            "x": "What is {a} x {b}?",
            "product": "What is the product of {a} and {b}?",
        },
    ),
    "addition": (
        lambda a, b: a + b,
        {
            "plus": "What is {a} plus {b}?",
            "sign": "What is {a} + {b}?",
            "sum": "What is the sum of {a} and {b}?",
        },
    ),
}
FACTS = [
    (operation, a, b)
    for operation in OPERATIONS
    for a, b in itertools.combinations_with_replacement(OPERANDS, 2)
]


@dataclass
class ArithmeticTaskConfig:
    """How many facts per split (all phrasings and operand orders of a fact go with it), and the seed."""

    seed: int = option(0, "Seed of the splits.")
    train_facts: int = option(70, "Facts of the train split (trajectories).")
    validation_facts: int = option(20, "Facts of the validation split.")
    test_facts: int = option(20, "Facts of the test split (evaluation).")
    output_dir: str = option("runs/arithmetic", "Where the splits are written.")

    def __post_init__(self) -> None:
        for split, size in self.split_facts().items():
            check(size >= 0, f"{split}_facts={size}: use a size >= 0.")
        check(
            sum(self.split_facts().values()) <= len(FACTS),
            f"the splits ask for {sum(self.split_facts().values())} facts but the family holds {len(FACTS)}: "
            "ask for fewer (train_facts, validation_facts, test_facts).",
        )

    def split_facts(self) -> dict[str, int]:
        return {split: getattr(self, f"{split}_facts") for split in SPLITS}


def generate_splits(config: ArithmeticTaskConfig) -> dict[str, list[Problem]]:
    """Seeded splits of facts, each fact asked in every phrasing and operand order, questions shuffled."""
    rng = random.Random(config.seed)
    facts = list(FACTS)
    rng.shuffle(facts)
    splits, start = {}, 0
    for split, size in config.split_facts().items():
        questions = []
        for operation, a, b in facts[start : start + size]:
            answer, phrasings = OPERATIONS[operation]
            for (name, phrasing), (x, y) in itertools.product(
                phrasings.items(), dict.fromkeys([(a, b), (b, a)])
            ):
                questions.append((f"{operation}-{name}", phrasing.format(a=x, b=y), str(answer(x, y))))
        rng.shuffle(questions)
        splits[split] = [
            Problem(id=f"{variant}-{split}-{i:05d}", problem=question, answer=answer)
            for i, (variant, question, answer) in enumerate(questions)
        ]
        start += size
    return splits


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(ArithmeticTaskConfig, argv, prog="python -m icpo_train.e2e.arithmetic")
    splits = generate_splits(config)
    for split, path in write_splits(splits, config.output_dir).items():
        print(f"{split}: {config.split_facts()[split]} facts, {len(splits[split])} questions in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
