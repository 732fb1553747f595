"""Does a model read its history? Sample answers after one history entry and count copies.

    python -m icpo_train.e2e.history_probe --seed-dir runs/e2e-full/seed-0 [--models base icpo sft mse] \\
        [--questions 80] [--k 8] [--templates recipes/e2e/templates.yaml]

For each test question of an `icpo-train pipeline` seed directory, the prompt shows no history, or
one entry with the gold answer or a wrong one (the gold answer +-1..3), tagged reward 1 or 0. A model
that uses rewards in context answers the number shown under reward 1 more often than without a
history, and the one shown under reward 0 less often. Prints, per model and history, the share of
samples that give the gold answer and the shown wrong answer.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, SamplingParams
from icpo_infer.data import load_problems
from icpo_infer.grading import extract_answer, is_equivalent
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt
from icpo_train.e2e.pretrain import near_miss

HISTORIES = {  # name -> the entries shown, as (which answer, reward)
    "none": [],
    "gold, reward 1": [("gold", 1)],
    "wrong, reward 1": [("wrong", 1)],
    "gold, reward 0": [("gold", 0)],
    "wrong, reward 0": [("wrong", 0)],
}


def probe(
    seed_dir: Path,
    models: Sequence[str],
    questions: int,
    k: int,
    templates: PromptTemplates | None,
    seed: int,
) -> dict[str, dict[str, tuple[float, float]]]:
    """model -> history -> (share of gold answers, share of the shown wrong answer)."""
    problems = load_problems(str(seed_dir / "data" / "test.jsonl"))[0][:questions]
    rng = random.Random(seed)
    wrong = [near_miss(p.answer, rng) for p in problems]
    backend = make_backend("hf", BackendOptions(model=str(seed_dir / "base"), device="cpu"))
    params = SamplingParams(n=k, temperature=1.0, max_new_tokens=8, seed=seed)
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for model in models:
        adapter = None if model == "base" else str(seed_dir / "adapters" / model)
        table[model] = {}
        for name, entries in HISTORIES.items():
            prompts = []
            for problem, wrong_answer in zip(problems, wrong, strict=True):
                shown = {"gold": problem.answer, "wrong": wrong_answer}
                history = [Attempt(f"\\boxed{{{shown[a]}}}", shown[a], reward) for a, reward in entries]
                prompts.append(
                    render_prompt(backend.tokenizer, problem.problem, history, "integer", templates)
                )
            generations = backend.generate(prompts, params, adapter=adapter)
            gold = copied = 0
            for problem, wrong_answer, generation in zip(problems, wrong, generations, strict=True):
                answers = [extract_answer(c.text) for c in generation.completions]
                gold += sum(is_equivalent(a, problem.answer) for a in answers)
                copied += sum(is_equivalent(a, wrong_answer) for a in answers)
            total = len(problems) * k
            table[model][name] = (gold / total, copied / total)
    return table


def format_table(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    width = max(len("model"), *map(len, table)) + 1
    lines = [f"{'model':<{width}}" + "".join(f"{name:>18}" for name in HISTORIES)]
    lines.append(" " * width + "".join(f"{'gold / wrong':>18}" for _ in HISTORIES))
    for model, row in table.items():
        lines.append(f"{model:<{width}}" + "".join(f"{g:>11.2f} / {w:.2f}" for g, w in row.values()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed-dir", required=True, type=Path, help="DIR/seed-N of `icpo-train pipeline`.")
    parser.add_argument("--models", nargs="+", default=["base", "icpo", "sft", "mse"])
    parser.add_argument("--questions", type=int, default=80, help="First N test questions.")
    parser.add_argument("--k", type=int, default=8, help="Samples per prompt.")
    parser.add_argument(
        "--templates", default="recipes/e2e/templates.yaml", help="The pipeline's prompt wording."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    templates = PromptTemplates.from_yaml(args.templates) if args.templates else None
    print(format_table(probe(args.seed_dir, args.models, args.questions, args.k, templates, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
