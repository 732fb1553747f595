"""Paired bootstrap differences and majority-answer transitions of `icpo-infer compare`, on run
directories written by hand, whose differences and transitions are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icpo_infer.cli import main
from icpo_infer.config import ConfigError
from icpo_infer.results import summarize
from icpo_infer.stats import paired_comparison


def write_run(
    directory: Path, questions: dict[str, tuple], method: str = "me-icpo", samples: dict | None = None
) -> str:
    """A finished run: per question id, (mean per round, final mean, maj per round, final maj); metrics.json
    as `icpo-infer run` computes it from the rows. ``samples``: per question id, each stage's (history as
    (answer, reward) pairs, sampled answers), the rounds' and then the final samples'; by default no history
    and four samples answering "1"."""
    directory.mkdir(parents=True)

    def stage(history: list[tuple], answers: list) -> tuple[list[dict], dict]:
        attempts = [{"text": f"answer {a}", "answer": a, "reward": r} for a, r in history]
        return attempts, {"answers": answers}

    rows = []
    for qid, (mean_per_round, mean, maj_per_round, maj) in questions.items():
        rounds = len(mean_per_round) if method != "single" else 0
        default = [([], ["1"] * 4)] * (rounds + 1)
        stages = [stage(*s) for s in (samples or {}).get(qid, default)]
        rows.append(
            {
                "id": qid,
                "method": method,
                "rounds": [{"history": h, "samples": s} for h, s in stages[:-1]],
                "history": stages[-1][0],
                "final": stages[-1][1],
                "metrics": {
                    "mean": mean,
                    "maj": float(maj),
                    "pass": float(mean > 0),
                    "mean_per_round": list(mean_per_round),
                    "maj_per_round": [float(m) for m in maj_per_round],
                },
            }
        )
    (directory / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    rounds = len(next(iter(questions.values()))[0])
    metrics = {
        "k": 4,
        **summarize(rows),
        **dict.fromkeys(("prompt_tokens", "generated_tokens", "engine_calls", "wall_time_s"), 0),
        "num_questions": len(rows),
        "skipped": 0,
        "config": {"method": method, "dataset": "questions.jsonl", "split": None, "rounds": rounds},
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return str(directory)


def constant_run(directory: Path, ids, round_1: float, final: float) -> str:
    """Every question at ``round_1`` mean@k in round 1 (of 2) and ``final`` in the final samples."""
    return write_run(directory, {i: ([round_1, round_1], final, [0, 0], 0) for i in ids})


# finals differ by [+0.25, 0, +0.25, 0] (12.5 points); self-improvement by [+0.25, -0.25, +0.25, -0.25] (0)
A = {
    "q1": ([0.25, 0.25], 0.25, [0, 0], 0),
    "q2": ([0.25, 0.5], 0.5, [0, 1], 1),
    "q3": ([0.0, 0.0], 0.0, [0, 0], 0),
    "q4": ([0.5, 1.0], 1.0, [1, 1], 1),
}
B = {
    "q1": ([0.25, 0.5], 0.5, [0, 1], 1),  # wrong -> right in round 2
    "q2": ([0.5, 0.25], 0.5, [1, 0], 1),  # right -> wrong in round 2, wrong -> right in the final samples
    "q3": ([0.0, 0.25], 0.25, [0, 1], 1),  # wrong -> right in round 2
    "q4": ([0.75, 1.0], 1.0, [1, 1], 0),  # right -> wrong in the final samples
}


@pytest.fixture
def pair(tmp_path) -> tuple[str, str]:
    return write_run(tmp_path / "base", A), write_run(tmp_path / "icpo", B)


def test_point_estimates_are_exact_and_inside_their_intervals(pair):
    result = paired_comparison(*pair)
    assert result["final_accuracy_diff"] == 12.5
    assert result["self_improvement_diff"] == 0.0
    assert (result["final_accuracy_a"], result["final_accuracy_b"]) == (43.75, 56.25)
    for key in ("final_accuracy_diff", "self_improvement_diff"):
        low, high = result[f"{key}_ci95"]
        assert low <= result[key] <= high and low < high
    # 4 questions whose final differences are 0 or 25: no resample can leave [0, 25]
    low, high = result["final_accuracy_diff_ci95"]
    assert low >= 0 and high <= 25
    assert paired_comparison(*pair) == result  # seeded


def test_the_interval_has_the_width_the_spread_of_questions_gives(tmp_path):
    ids = [f"q{i}" for i in range(100)]
    a = constant_run(tmp_path / "a", ids, 0.0, 0.0)
    b = write_run(tmp_path / "b", {i: ([0.0, 0.0], float(n % 2), [0, 0], 0) for n, i in enumerate(ids)})
    low, high = paired_comparison([a], [b])["final_accuracy_diff_ci95"]
    # differences of 0 and 1, half each: standard error 5 points, so about 50 -/+ 1.96 * 5
    assert low == pytest.approx(40.2, abs=1.5) and high == pytest.approx(59.8, abs=1.5)


def test_the_interval_is_a_point_when_every_question_and_seed_differs_by_the_same(tmp_path):
    seeds_a, seeds_b = [], []
    for seed, ids in enumerate([["q1", "q2", "q3"], ["q4", "q5"]]):  # seeds may hold other questions
        seeds_a.append(constant_run(tmp_path / f"a{seed}", ids, 0.25, 0.25))
        seeds_b.append(constant_run(tmp_path / f"b{seed}", ids, 0.25, 0.5))
    result = paired_comparison(seeds_a, seeds_b)
    assert result["final_accuracy_diff"] == 25.0 and result["final_accuracy_diff_ci95"] == [25.0, 25.0]
    assert result["self_improvement_diff"] == 25.0 and result["self_improvement_diff_ci95"] == [25.0, 25.0]
    assert result["seeds"] == 2 and result["questions"] == [3, 2]


def test_seeds_weigh_equally_and_widen_the_interval(tmp_path):
    # seed 0: every question +50 points; seed 1 (more questions): every question 0
    a0 = constant_run(tmp_path / "a0", ["q1", "q2"], 0.0, 0.0)
    b0 = constant_run(tmp_path / "b0", ["q1", "q2"], 0.0, 0.5)
    a1 = constant_run(tmp_path / "a1", ["q3", "q4", "q5", "q6"], 0.0, 0.0)
    b1 = constant_run(tmp_path / "b1", ["q3", "q4", "q5", "q6"], 0.0, 0.0)
    result = paired_comparison([a0, a1], [b0, b1])
    assert result["final_accuracy_diff"] == 25.0  # the mean of the seeds' 50 and 0, not 50 * 2/6
    # within a seed nothing varies, so the interval is the seeds' spread: resamples of 0, 25 or 50
    assert result["final_accuracy_diff_ci95"] == [0.0, 50.0]


def test_swapping_the_sides_negates_every_difference_and_swaps_the_transitions(pair):
    forward, backward = paired_comparison(*pair), paired_comparison(*reversed(pair))
    for key in ("final_accuracy_diff", "self_improvement_diff"):
        assert backward[key] == -forward[key]
        low, high = forward[f"{key}_ci95"]
        assert backward[f"{key}_ci95"] == [-high, -low]
    assert (backward["transitions"], backward["transitions_a"]) == (
        forward["transitions_a"],
        forward["transitions"],
    )
    assert (backward["final_accuracy_a"], backward["final_accuracy_b"]) == (
        forward["final_accuracy_b"],
        forward["final_accuracy_a"],
    )


def test_transitions_count_questions_whose_majority_answer_turns(pair, tmp_path):
    result = paired_comparison(*pair)
    assert result["transitions"] == [
        {
            "round": "2",
            "wrong_to_right": 2,
            "right_to_wrong": 1,
            "wrong_to_right_pct": 50.0,
            "right_to_wrong_pct": 25.0,
        },
        {
            "round": "final",
            "wrong_to_right": 1,
            "right_to_wrong": 1,
            "wrong_to_right_pct": 25.0,
            "right_to_wrong_pct": 25.0,
        },
    ]
    assert [(t["wrong_to_right"], t["right_to_wrong"]) for t in result["transitions_a"]] == [(1, 0), (0, 0)]
    # a method without rounds has none; several seeds add up
    single = write_run(tmp_path / "single", {i: ([m], m, [j], j) for i, (_, m, _, j) in A.items()}, "single")
    assert paired_comparison(single, pair[1])["transitions_a"] == []
    twice = paired_comparison([pair[0], pair[0]], [pair[1], pair[1]])
    assert [(t["wrong_to_right"], t["wrong_to_right_pct"]) for t in twice["transitions"]] == [
        (4, 50.0),
        (2, 25.0),
    ]


def test_round_1_no_answers_and_repeats_of_attempts_tagged_0_are_read_from_the_samples(pair, tmp_path):
    samples = {
        "q1": [
            ([], [None, "3", "3", None]),
            ([("3", 0)], ["3", "4", None, "3"]),  # shown only a 0: 2 of 4 repeat it
            ([("3", 0), ("4", 0)], ["4", "5", "3", None]),  # 2 of 4 repeat one of them
        ],
        "q2": [
            ([], ["7"] * 4),
            ([("7", 1)], ["7"] * 4),  # an attempt tagged 1: not counted
            ([("7", 1), ("2", 0)], ["2"] * 4),  # a mixed history: not counted
        ],
    }
    questions = {"q1": ([0.25, 0.5], 0.5, [0, 1], 1), "q2": ([0.75, 1.0], 1.0, [1, 1], 1)}
    a = write_run(tmp_path / "a", questions, samples=samples)
    b = write_run(tmp_path / "b", questions)  # every sample answers, no history
    result = paired_comparison(a, b)
    assert (result["round_1_accuracy_a"], result["round_1_accuracy_b"]) == (50.0, 50.0)
    assert (result["no_answer_round_1_a"], result["no_answer_final_a"]) == (25.0, 12.5)
    assert (result["no_answer_round_1_b"], result["no_answer_final_b"]) == (0.0, 0.0)
    assert (result["reward_0_repeat_rate_a"], result["reward_0_repeat_rate_b"]) == (50.0, None)
    [seed] = result["per_seed"]
    assert seed["questions"] == 2 and seed["reward_0_samples_a"] == 8 and seed["reward_0_samples_b"] == 0
    assert (seed["final_accuracy_a"], seed["no_answer_round_1_a"]) == (75.0, 25.0)
    # over seeds, each seed weighs the same
    twice = paired_comparison([a, pair[0]], [b, pair[1]])
    assert twice["no_answer_round_1_a"] == 12.5 and twice["round_1_accuracy_a"] == pytest.approx(37.5)


def test_other_questions_or_unequal_seeds_are_clear_errors(pair, tmp_path):
    fewer = write_run(tmp_path / "fewer", {i: A[i] for i in ("q1", "q2", "q3")})
    with pytest.raises(
        ConfigError, match=r"ran other questions \(1 only in the first, e.g. 'q4'.*same questions"
    ):
        paired_comparison(pair[0], fewer)
    with pytest.raises(ConfigError, match="got 2 for A and 1 for B"):
        paired_comparison([pair[0], pair[0]], [pair[1]])


def test_compare_json_prints_one_object_with_the_differences_and_transitions(pair, capsys):
    capsys.readouterr()
    assert main(["compare", *pair, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == paired_comparison(*pair)
    assert {"final_accuracy_diff", "self_improvement_diff", "transitions", "transitions_a"} <= set(result)
    assert len(result["final_accuracy_diff_ci95"]) == len(result["self_improvement_diff_ci95"]) == 2
    assert all({"wrong_to_right", "right_to_wrong"} <= set(t) for t in result["transitions"])
    assert not (Path(pair[0]) / "compare.png").exists()  # --json draws nothing


def test_compare_pairs_seeds_given_with_vs(pair, tmp_path, capsys):
    a1 = write_run(tmp_path / "seed-1" / "base", {"x": A["q1"], "y": A["q2"]})  # another seed's questions
    b1 = write_run(tmp_path / "seed-1" / "icpo", {"x": B["q1"], "y": B["q2"]})
    capsys.readouterr()
    assert main(["compare", pair[0], a1, "--vs", pair[1], b1, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == paired_comparison([pair[0], a1], [pair[1], b1])


def test_compare_table_shows_the_paired_differences_and_transitions(pair, capsys):
    capsys.readouterr()
    assert main(["compare", *pair]) == 0
    out = capsys.readouterr().out
    result = paired_comparison(*pair)
    [row] = [line for line in out.splitlines() if line.startswith("base -> icpo ")]
    for key in ("final_accuracy_diff", "self_improvement_diff"):
        low, high = result[f"{key}_ci95"]
        assert f"{result[key]:+.1f} [{low:+.1f}, {high:+.1f}]" in row
    assert "  icpo: 2: 50.0 / 25.0, final: 25.0 / 25.0" in out
    assert "  base: 2: 25.0 / 0.0, final: 0.0 / 0.0" in out


def test_compare_says_when_a_difference_is_within_the_noise_of_its_questions(tmp_path, capsys):
    ids = [f"q{i}" for i in range(20)]
    a = constant_run(tmp_path / "a", ids, 0.0, 0.0)
    noisy = write_run(
        tmp_path / "noisy", {i: ([0.0, 0.0], float(n == 0), [0, 0], 0) for n, i in enumerate(ids)}
    )
    clear = constant_run(tmp_path / "clear", ids, 0.0, 0.5)
    capsys.readouterr()
    assert main(["compare", a, noisy, clear]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    low, high = paired_comparison(a, noisy)["final_accuracy_diff_ci95"]
    assert low <= 0 <= high
    assert notes == [
        f"note: noisy against a: +5.0 points of final accuracy, within the noise of 20 questions "
        f"(95% interval [{low:+.1f}, {high:+.1f}] holds 0)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a", "--vs", "b", "b"], "1 directories before --vs and 2 after; pass one run directory per seed"),
        (["a", "b", "b", "--json"], "--json compares two sides: pass two directories (got 3)"),
        (["a", "fewer", "--json", "--allow-mismatch"], "a paired comparison needs both runs of a seed"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    write_run(tmp_path / "a", A)
    write_run(tmp_path / "b", B)
    write_run(tmp_path / "fewer", {i: A[i] for i in ("q1", "q2")})
    capsys.readouterr()
    assert main(["compare", *[str(tmp_path / a) if not a.startswith("-") else a for a in args]]) == 2
    err = capsys.readouterr().err
    [error] = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert error.startswith("icpo-infer compare: error: ") and message in error and "Traceback" not in err


def test_with_allow_mismatch_other_questions_leave_the_table_without_paired_differences(
    pair, tmp_path, capsys
):
    fewer = write_run(tmp_path / "fewer", {i: A[i] for i in ("q1", "q2")})
    capsys.readouterr()
    assert main(["compare", pair[0], fewer, "--allow-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "warning: no paired differences" in captured.err and "paired differences" not in captured.out
