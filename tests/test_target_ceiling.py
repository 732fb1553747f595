"""icpo_train/e2e/target_ceiling.py: ME-ICPO run by the exact ICPO target policy."""

from __future__ import annotations

import json
import math
import random

import pytest

from icpo_train.e2e import target_ceiling


def single_row(answer: str, answers: list[str | None]) -> dict:
    return {"id": answer, "answer": answer, "method": "single", "final": {"answers": answers}}


def test_the_target_reweighs_pi_ref_by_the_in_context_reward():
    reference = {"5": 0.5, "6": 0.3, None: 0.2}
    assert target_ceiling.target_policy(reference, [], eta=2.0) == pytest.approx(reference)
    # "6" shown twice under reward 1 and once under reward 0: R = +1; "5" under reward 0: R = -1.
    history = [("6", 1), ("6", 1), ("6", 0), ("5", 0)]
    policy = target_ceiling.target_policy(reference, history, eta=2.0)
    weights = {"5": 0.5 * math.exp(-2), "6": 0.3 * math.exp(2), None: 0.2}
    total = sum(weights.values())
    assert policy == pytest.approx({a: w / total for a, w in weights.items()})


def test_a_reference_that_is_always_right_stays_right_and_eta_zero_stays_where_it_starts():
    rows = [single_row("7", ["7"] * 4), single_row("9", ["9", "8", "8", None])]
    always = target_ceiling.ceiling(rows[:1], 2.0, rounds=3, k=8, entropy_k=4, final_k=8, repeats=2, seed=0)
    assert always == [100.0] * 4
    # eta 0: the history changes nothing, every round samples pi_ref (25% right on the second question).
    flat = target_ceiling.ceiling(rows, 0.0, rounds=2, k=8, entropy_k=4, final_k=8, repeats=200, seed=0)
    assert flat == pytest.approx([62.5] * 3, abs=2.0)


def test_rewarding_the_majority_in_context_moves_the_policy_to_it():
    # pi_ref right 60% of the time and wrong in four ways: the majority is the gold answer, so a
    # target that trusts its reward-1 entries converges to it.
    row = single_row("12", ["12"] * 6 + ["11", "13", "14", "10"])
    accuracy = target_ceiling.ceiling([row], 4.0, rounds=3, k=8, entropy_k=4, final_k=8, repeats=100, seed=0)
    assert accuracy[0] == pytest.approx(60.0, abs=3.0)
    assert min(accuracy[1:]) > accuracy[0] + 20
    # Seeded: the same call gives the same numbers.
    assert accuracy == target_ceiling.ceiling([row], 4.0, 3, 8, 4, 8, repeats=100, seed=0)


def test_the_command_prints_one_line_per_eta_and_refuses_other_results(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(single_row(str(a), [str(a)] * 3 + ["0"])) for a in (3, 4)))
    assert target_ceiling.main([str(results), "--eta", "1", "2", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["eta", "round", "1", "round", "2", "round", "3", "final", "self-impr."]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]
    other = tmp_path / "me-icpo.jsonl"
    other.write_text(json.dumps({**single_row("3", ["3"]), "method": "me-icpo"}))
    with pytest.raises(SystemExit):
        target_ceiling.main([str(other)])
    assert "--method single" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        target_ceiling.main([str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_simulate_is_a_function_of_its_rng():
    reference = {"1": 0.5, "2": 0.5}
    runs = [
        target_ceiling.simulate(reference, "1", 2.0, 3, 8, 4, 8, random.Random(seed)) for seed in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 4
