"""A small but valid trajectory dataset for the tiny test models, written without the builder.

Responses are plausible hand-written solutions with a right, a wrong or no boxed answer (a random
tiny model would only produce noise without answers); their ``ref_logps`` are real: the hf
backend scores them under the round-1 prompt, exactly as ``icpo-train build-trajectories`` does.
"""

from __future__ import annotations

from pathlib import Path

from conftest import fixture_problems
from datasets import Dataset

from icpo_infer.backends.base import BackendOptions
from icpo_infer.backends.hf import HFBackend
from icpo_infer.grading import extract_answer, grade, is_equivalent
from icpo_infer.prompts import Attempt, PromptTemplates, answer_type_of, render_prompt
from icpo_train.trajectory_data import tokenizer_fingerprint

SOLUTIONS = (
    "Simplify first, then evaluate. The answer is \\boxed{%s}.",
    "Small cases suggest a pattern, so the result is \\boxed{%s}.",
    "Counting carefully gives \\boxed{%s}.",
    "I could not finish this one.",
)


def integer_problems(count: int) -> list[dict]:
    """The first ``count`` fixture problems with integer answers."""
    return [r for r in fixture_problems() if answer_type_of(r["answer"]) == "integer"][:count]


def icl_reward(answer: str | None, history: list[Attempt]) -> float:
    """R_t(y) = sum over history entries s of (2 r_s - 1) [answer(y) equivalent to answer(s)]."""
    if answer is None:
        return 0.0
    return float(
        sum(2 * s.reward - 1 for s in history if s.answer is not None and is_equivalent(answer, s.answer))
    )


def build_trajectories(
    model_dir: Path, num_questions: int = 3, rounds: int = 3, templates: PromptTemplates | None = None
) -> Dataset:
    """Rows for ``num_questions`` questions x ``rounds`` rounds; the first question's group has 3
    members, the others 4, so batches mix group sizes. ``templates``: the prompt wording the rows are
    scored under (the trainer must be given the same)."""
    backend = HFBackend(BackendOptions(model=str(model_dir), device="cpu", dtype="float32"))
    tokenizer = backend.tokenizer
    fingerprint = tokenizer_fingerprint(tokenizer)
    rows = []
    for index, problem in enumerate(integer_problems(num_questions)):
        gold = str(problem["answer"])
        wrong = str(int(float(gold)) + 1)
        answers = [gold, wrong, gold, None] if index else [gold, wrong, None]
        responses = [SOLUTIONS[j] % a if a is not None else SOLUTIONS[3] for j, a in enumerate(answers)]
        answer_type = answer_type_of(gold)
        bare_prompt = render_prompt(tokenizer, problem["problem"], [], answer_type, templates)
        scores = backend.score([bare_prompt] * len(responses), responses)
        extracted = [extract_answer(r) for r in responses]
        full_history = [
            Attempt("Simplifying first gives the value directly.", gold, 1),
            Attempt("Guessing from small cases.", wrong, 0),
        ]
        for round_ in range(1, rounds + 1):
            history = full_history[: round_ - 1]
            rows.append(
                {
                    "question_id": str(problem["id"]),
                    "question": problem["problem"],
                    "answer": gold,
                    "answer_type": answer_type,
                    "round": round_,
                    "history": [{"text": a.text, "answer": a.answer, "reward": a.reward} for a in history],
                    "responses": responses,
                    "ref_logps": [s.logprob for s in scores],
                    "ref_num_tokens": [s.num_tokens for s in scores],
                    "response_answers": extracted,
                    "gold_rewards": [int(grade(r, gold)) for r in responses],
                    "icl_rewards": [icl_reward(a, history) for a in extracted],
                    "tokenizer_fingerprint": fingerprint,
                }
            )
    return Dataset.from_list(rows)


def write_trajectories(model_dir: Path, output_dir: Path, **kwargs) -> Path:
    """:func:`build_trajectories` saved with ``save_to_disk`` (what ``--trajectories`` reads)."""
    build_trajectories(model_dir, **kwargs).save_to_disk(str(output_dir))
    return output_dir
