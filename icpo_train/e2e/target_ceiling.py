"""What ME-ICPO would reach if the model were exactly the ICPO target policy.

    icpo-infer run --model runs/e2e-full/seed-1/base --dataset runs/e2e-full/seed-1/data/test.jsonl \\
        --method single --k 64 --templates recipes/e2e/templates.yaml --output-dir runs/base64
    python -m icpo_train.e2e.target_ceiling runs/base64/results.jsonl [--eta 0.5 2 4] [--rounds 3] [--k 8] \\
        [--entropy-k 4] [--final-k 8] [--repeats 5] [--seed 0]

pi_ref is each question's empirical answer distribution in a `single` run (many samples, no history);
after a history H the target is pi_H(a) ~ pi_ref(a) exp(eta R_H(a)) with R_H(a) = sum over the entries
showing answer a of (2 r - 1), the target the trainer fits. The simulation runs ME-ICPO's loop on
answers with that policy: k samples a round, majority-vote rewards (ties at random), the candidate
whose one-entry extension gives the lowest answer entropy over entropy_k probe samples enters the
history, and final_k samples at the end. The vote and the entropies count icpo_infer's equivalence
classes; rewards, R_H and correctness compare answer strings (exact for canonical answers such as the
synthetic task's integers). No bucket is evicted (at most one entry a round). Prints mean@k per round
and the self-improvement (final - round 1) per eta, averaged over the repeats: the ceiling a perfectly
trained ICPO adapter would reach.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from icpo_infer.grading import vote
from icpo_infer.icpo import answer_entropy

Answer = str | None
History = list[tuple[str, int]]  # (answer, reward)


def target_policy(reference: dict[Answer, float], history: History, eta: float) -> dict[Answer, float]:
    """pi_ref(a) exp(eta R_H(a)), normalised; invalid answers (None) earn no in-context reward."""
    reward = Counter()
    for answer, r in history:
        reward[answer] += 2 * r - 1
    weights = {a: p * math.exp(eta * reward[a]) if a is not None else p for a, p in reference.items()}
    total = sum(weights.values())
    return {a: w / total for a, w in weights.items()}


def simulate(
    reference: dict[Answer, float],
    gold: str,
    eta: float,
    rounds: int,
    k: int,
    entropy_k: int,
    final_k: int,
    rng: random.Random,
) -> list[float]:
    """mean@k of one question in each round and in the final samples."""

    def sample(history: History, n: int) -> list[Answer]:
        policy = target_policy(reference, history, eta)
        return rng.choices(list(policy), weights=list(policy.values()), k=n)

    history: History = []
    accuracy = []
    for _ in range(rounds):
        answers = sample(history, k)
        accuracy.append(sum(a == gold for a in answers) / k)
        majority = vote(answers, rng)
        if majority is None:
            continue
        candidates = [(a, int(a == majority[0])) for a in answers if a is not None]
        scores = [answer_entropy(sample([*history, c], entropy_k)) for c in candidates]
        history.append(candidates[scores.index(min(scores))])
    final = sample(history, final_k)
    return [*accuracy, sum(a == gold for a in final) / final_k]


def ceiling(
    results: Sequence[dict],
    eta: float,
    rounds: int,
    k: int,
    entropy_k: int,
    final_k: int,
    repeats: int,
    seed: int,
) -> list[float]:
    """mean@k (%) per round and final, over the questions and the repeats."""
    questions = []
    for row in results:
        answers = row["final"]["answers"]
        questions.append(({a: c / len(answers) for a, c in Counter(answers).items()}, row["answer"]))
    totals = [0.0] * (rounds + 1)
    for repeat in range(repeats):
        rng = random.Random(f"{seed}:{repeat}")
        for reference, gold in questions:
            for i, value in enumerate(simulate(reference, gold, eta, rounds, k, entropy_k, final_k, rng)):
                totals[i] += value
    return [100 * t / (repeats * len(results)) for t in totals]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", type=Path, help="results.jsonl of an `icpo-infer run --method single` run."
    )
    parser.add_argument("--eta", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--entropy-k", type=int, default=4)
    parser.add_argument("--final-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(
            f"{args.results} does not exist; pass the results.jsonl of an `icpo-infer run --method single`."
        )
    results = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if not results or results[0].get("method") != "single":
        parser.error(f"{args.results} holds no `icpo-infer run --method single` results; run one first.")
    rounds = " ".join(f"{f'round {r + 1}':>8}" for r in range(args.rounds))
    print(f"{'eta':>5}  {rounds} {'final':>8}  self-impr.")
    for eta in args.eta:
        accuracy = ceiling(
            results, eta, args.rounds, args.k, args.entropy_k, args.final_k, args.repeats, args.seed
        )
        cells = " ".join(f"{a:8.1f}" for a in accuracy)
        print(f"{eta:5.2g}  {cells}  {accuracy[-1] - accuracy[0]:+10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
