"""Paired statistics for `icpo-infer compare`: bootstrap intervals for the difference between two
methods or models run on the same questions, and the per-round wrong-to-right / right-to-wrong
transitions a self-correction paper reports (SCoRe, arXiv 2409.12917).

Everything is read from results.jsonl, one row per question, whose ``metrics`` hold ``mean`` and
``maj`` of the final samples and ``mean_per_round`` and ``maj_per_round``; how the samples answer (no
answer, repeats of attempts tagged 0) is read from the samples themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icpo_infer.config import check
from icpo_infer.grading import is_equivalent
from icpo_infer.infer_config import ROUND_METHODS
from icpo_infer.results import RESULTS_FILE, read_results

RESAMPLES = 10_000
DIGITS = 6  # points are rounded to 1e-6: below any meaningful difference, above float noise


def _answers(row: dict[str, Any]) -> dict[str, Any]:
    """How one question's samples answer: per stage (each round, then the final samples; the final
    samples alone for methods without rounds) the share with no answer the grader reads, and over every
    prompt whose history shows attempts all tagged 0, how many samples it had and how many repeat one of
    those attempts' answers."""
    stages = [(record.get("history", []), record["samples"]) for record in row.get("rounds", [])]
    if row["method"] in ROUND_METHODS or not stages:
        stages.append((row.get("history", []), row["final"]))
    no_answer, shown, repeats = [], 0, 0
    for history, samples in stages:
        answers = samples["answers"]
        no_answer.append(sum(a is None for a in answers) / len(answers))
        if history and all(attempt["reward"] == 0 for attempt in history):
            shown += len(answers)
            repeats += sum(any(is_equivalent(a, h["answer"]) for h in history) for a in answers)
    return {"no_answer_per_stage": no_answer, "reward_0_samples": shown, "reward_0_repeats": repeats}


def _read(directory: str | Path) -> dict[str, dict[str, Any]]:
    """The per-question metrics of one run and how its samples answer (:func:`_answers`), keyed by
    question id (ids as results.jsonl writes them)."""
    path = Path(directory) / RESULTS_FILE
    rows = read_results(path)
    check(bool(rows), f"{path} has no finished questions; pass output directories of `icpo-infer run`.")
    by_id = {str(row["id"]): {**row["metrics"], "method": row["method"], **_answers(row)} for row in rows}
    check(len(by_id) == len(rows), f"{path} holds some question ids twice; rerun with --overwrite.")
    return by_id


def _answer_behaviour(run: dict[str, dict[str, Any]], ids: Sequence[str]) -> dict[str, float | None]:
    """One run's round-1 accuracy (mean@k) and no-answer shares in round 1 and the final samples (means
    over questions), and the share of samples shown only attempts tagged 0 that repeat one of them."""
    shown = sum(run[i]["reward_0_samples"] for i in ids)
    return {
        "round_1_accuracy": float(np.mean([run[i]["mean_per_round"][0] for i in ids])),
        "no_answer_round_1": float(np.mean([run[i]["no_answer_per_stage"][0] for i in ids])),
        "no_answer_final": float(np.mean([run[i]["no_answer_per_stage"][-1] for i in ids])),
        "reward_0_repeat_rate": sum(run[i]["reward_0_repeats"] for i in ids) / shown if shown else None,
        "reward_0_samples": shown,
    }


def _correct_per_stage(run: dict[str, dict[str, Any]], ids: Sequence[str]) -> np.ndarray:
    """(questions, stages) booleans: majority answer right at round 1, 2, ... and in the final samples;
    methods without rounds have the final samples alone."""

    def stages(m: dict[str, Any]) -> list[float]:
        return [*m["maj_per_round"], m["maj"]] if m["method"] in ROUND_METHODS else [m["maj"]]

    return np.array([stages(run[i]) for i in ids]) == 1.0  # maj is stored as 0.0 or 1.0


def transitions(correct: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Per stage after the first ("2", ..., "final"): how many questions went from a wrong to a right
    majority answer and back, summed over seeds, and as a percentage of all questions of all seeds."""
    check(
        len({c.shape[1] for c in correct}) == 1,
        "the runs of one side have different numbers of rounds; compare runs of the same --rounds.",
    )
    stacked = np.concatenate(correct)
    stages = stacked.shape[1]
    labels = [*map(str, range(2, stages)), "final"] if stages > 1 else []
    entries = []
    for s, label in enumerate(labels, 1):
        before, after = stacked[:, s - 1], stacked[:, s]
        counts = {
            "wrong_to_right": int(np.sum(~before & after)),
            "right_to_wrong": int(np.sum(before & ~after)),
        }
        entries.append(
            {
                "round": label,
                **counts,
                **{f"{key}_pct": round(100 * n / len(stacked), DIGITS) for key, n in counts.items()},
            }
        )
    return entries


def _hierarchical_bootstrap(
    differences: Sequence[np.ndarray], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(resamples, statistics): the mean over drawn seeds of the mean over drawn questions.

    ``differences`` holds one (questions, statistics) array per seed. Each resample draws as many seeds
    as there are, with replacement, then for each draw that seed's questions, with replacement and
    independently of the other draws (the standard two-stage bootstrap); one seed is a plain bootstrap
    over questions. Only shapes decide the draws, so the same seed and runs give the same draws.
    """
    seeds = len(differences)
    picked = rng.integers(0, seeds, size=(resamples, seeds))
    means = np.empty((resamples, seeds, differences[0].shape[1]))
    for s, d in enumerate(differences):
        rows, slots = np.nonzero(picked == s)
        questions = rng.integers(0, len(d), size=(len(rows), len(d)))
        means[rows, slots] = np.stack([d[:, j][questions].mean(axis=1) for j in range(d.shape[1])], axis=1)
    return means.mean(axis=1)


def paired_comparison(
    runs_a: str | Path | Sequence[str | Path],
    runs_b: str | Path | Sequence[str | Path],
    *,
    resamples: int = RESAMPLES,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """B against A, in percentage points: the difference in final accuracy (mean@k of the final samples,
    whatever the method) and in self-improvement (final mean@k minus round-1 mean@k), each with a 95%
    percentile interval of a paired bootstrap, and each side's majority-vote transitions per round.

    ``runs_a[i]`` and ``runs_b[i]`` are the output directories of the same seed (the same questions);
    with one directory per side (a list of one, or the path itself) this is a plain paired bootstrap
    over questions. Pairing is by question id within a seed: every resample keeps each question's A
    and B together. With several seeds, seeds are resampled as clusters, then questions within each
    drawn seed (:func:`_hierarchical_bootstrap`), so the interval counts the spread over questions and
    over training/sampling seeds; the point estimate weighs every seed equally (the mean over seeds of
    the mean over that seed's questions), as the pipeline's report does. With few seeds (2 or 3) the
    seed level has few distinct resamples, so read the interval as rough. Deterministic:
    ``resamples`` draws of ``numpy.random.default_rng(bootstrap_seed)``.

    A question is right at a round when the majority answer of that round's samples is equivalent to
    the gold answer (``maj_per_round``; ``maj`` for the final samples). ``transitions`` (B) and
    ``transitions_a`` list, per round after the first and then the final samples, the questions that
    went wrong to right and right to wrong against the round before (counts over all seeds, and as a
    percentage of all their questions); methods without rounds have none.

    How each side's samples answer (``*_a`` and ``*_b``, percent, means over seeds): ``round_1_accuracy``,
    ``no_answer_round_1`` and ``no_answer_final`` (samples with no answer the grader reads) and
    ``reward_0_repeat_rate`` (of the samples whose history shows attempts all tagged 0, those repeating one
    of their answers); ``per_seed`` holds each seed's figures and counts.

    Raises :class:`~icpo_infer.config.ConfigError` for unequal numbers of seeds or a seed whose two runs
    ran other questions.
    """
    runs_a, runs_b = ([runs] if isinstance(runs, (str, Path)) else list(runs) for runs in (runs_a, runs_b))
    check(
        len(runs_a) == len(runs_b) and len(runs_a) > 0,
        f"a paired comparison needs one run directory per seed on each side, in the same seed order; got "
        f"{len(runs_a)} for A and {len(runs_b)} for B.",
    )
    differences, correct_a, correct_b, values, per_seed = [], [], [], [], []
    for dir_a, dir_b in zip(runs_a, runs_b, strict=True):
        a, b = _read(dir_a), _read(dir_b)
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        check(
            not only_a and not only_b,
            f"{dir_a} and {dir_b} ran other questions ({len(only_a)} only in the first, e.g. "
            f"{(only_a or ['-'])[0]!r}; {len(only_b)} only in the second, e.g. {(only_b or ['-'])[0]!r}); "
            "a paired comparison needs both runs of a seed on the same questions: rerun one with the "
            "other's --dataset, --split and --limit.",
        )
        ids = sorted(a)  # a fixed order, so the draws do not depend on the order questions finished in
        # per question, per side: final mean@k and self-improvement
        side = [
            np.array([[r[i]["mean"], r[i]["mean"] - r[i]["mean_per_round"][0]] for i in ids]) for r in (a, b)
        ]
        values.append([s.mean(axis=0) for s in side])
        differences.append(side[1] - side[0])
        correct_a.append(_correct_per_stage(a, ids))
        correct_b.append(_correct_per_stage(b, ids))
        seed = {"questions": len(ids)}
        for label, run, means in (("a", a, values[-1][0]), ("b", b, values[-1][1])):
            figures = {"final_accuracy": float(means[0]), **_answer_behaviour(run, ids)}
            seed.update({f"{key}_{label}": value for key, value in figures.items()})
        per_seed.append(seed)

    def points(x: Any) -> Any:
        return np.round(100 * np.asarray(x), DIGITS).tolist()

    estimate = np.mean([d.mean(axis=0) for d in differences], axis=0)
    boot = _hierarchical_bootstrap(differences, resamples, np.random.default_rng(bootstrap_seed))
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    side_a, side_b = (np.mean([v[s] for v in values], axis=0) for s in (0, 1))
    return {
        "a": [str(d) for d in runs_a],
        "b": [str(d) for d in runs_b],
        "seeds": len(runs_a),
        "questions": [len(d) for d in differences],
        "unit": "percentage points",
        "final_accuracy_a": points(side_a[0]),
        "final_accuracy_b": points(side_b[0]),
        "self_improvement_a": points(side_a[1]),
        "self_improvement_b": points(side_b[1]),
        "final_accuracy_diff": points(estimate[0]),
        "final_accuracy_diff_ci95": points([low[0], high[0]]),
        "self_improvement_diff": points(estimate[1]),
        "self_improvement_diff_ci95": points([low[1], high[1]]),
        "bootstrap": {
            "resamples": resamples,
            "seed": bootstrap_seed,
            "interval": "95% percentile",
            "pairing": "question id within a seed; seeds resampled, then questions within each"
            if len(runs_a) > 1
            else "question id; questions resampled",
        },
        "transitions": transitions(correct_b),
        "transitions_a": transitions(correct_a),
        **{key: _seed_mean(per_seed, key) for key in BEHAVIOUR_KEYS},
        "per_seed": [{key: _percent(key, value) for key, value in seed.items()} for seed in per_seed],
    }


BEHAVIOUR_KEYS = [
    f"{key}_{side}"
    for key in ("round_1_accuracy", "no_answer_round_1", "no_answer_final", "reward_0_repeat_rate")
    for side in ("a", "b")
]


def _percent(key: str, value: Any) -> Any:
    """Shares in percent (rounded as the differences are); counts as they are."""
    is_count = key == "questions" or key.startswith("reward_0_samples")
    return value if is_count or value is None else round(100 * value, DIGITS)


def _seed_mean(per_seed: list[dict[str, Any]], key: str) -> float | None:
    """The mean over seeds of one figure in percent (None where no seed has it), each seed weighing the
    same, as the final accuracy does."""
    values = [seed[key] for seed in per_seed if seed[key] is not None]
    return _percent(key, float(np.mean(values))) if values else None


def difference_with_interval(comparison: dict[str, Any], key: str) -> str:
    """One difference of :func:`paired_comparison` with its interval: "+1.2 [-3.4, +5.6]" (points)."""
    low, high = comparison[f"{key}_ci95"]
    return f"{comparison[key]:+.1f} [{low:+.1f}, {high:+.1f}]"


def paired_table(comparisons: Sequence[tuple[str, str, dict[str, Any]]]) -> str:
    """The paired differences (B minus A, with their intervals) of (label A, label B, comparison) and
    each side's transitions, in percentage points / percent of questions."""

    pairs = [f"{a} -> {b}" for a, b, _ in comparisons]
    width = max(len(p) for p in [*pairs, "A -> B"])
    first = comparisons[0][2]
    seeds = (
        f"seeds, then questions within each ({first['seeds']} seeds)" if first["seeds"] > 1 else "questions"
    )
    header = f"{'A -> B':<{width}}  {'final mean@k':>22}  {'self-improvement':>22}"
    lines = [
        f"paired differences, B minus A, in points [95% interval; bootstrap over {seeds}, "
        f"{first['bootstrap']['resamples']} resamples]:",
        header,
        "-" * len(header),
    ]
    for pair, (_, _, comparison) in zip(pairs, comparisons, strict=True):
        lines.append(
            f"{pair:<{width}}  {difference_with_interval(comparison, 'final_accuracy_diff'):>22}  "
            f"{difference_with_interval(comparison, 'self_improvement_diff'):>22}"
        )
    lines.append(
        "majority-answer transitions, % of questions going wrong -> right / right -> wrong against the "
        "round before:"
    )
    sides = {a: c["transitions_a"] for a, _, c in comparisons} | {
        b: c["transitions"] for _, b, c in comparisons
    }
    for label, entries in sides.items():
        cells = [
            f"{e['round']}: {e['wrong_to_right_pct']:.1f} / {e['right_to_wrong_pct']:.1f}" for e in entries
        ]
        lines.append(f"  {label}: {', '.join(cells) or 'no rounds'}")
    return "\n".join(lines)
