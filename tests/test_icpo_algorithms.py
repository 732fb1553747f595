"""ME-ICPO and its baselines against a scripted backend whose answers make every decision predictable."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Callable

import pytest
from scripted_backend import ScriptedBackend

from icpo_infer.backends.base import encode_prompt
from icpo_infer.config import ConfigError
from icpo_infer.data import Problem
from icpo_infer.icpo import answer_entropy, run_method
from icpo_infer.infer_config import InferConfig
from icpo_infer.prompts import Attempt, render_prompt
from icpo_infer.results import summarize
from icpo_train.e2e.tiny_lm import train_tokenizer

QUESTION = re.compile(r"Q(\d+):")
RESPONSE_TAG = re.compile(r"\[(q\d+\.r\d+\.s\d+)\]")
IDEA = re.compile(r"idea-(q\d+\.r\d+\.s\d+)")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Q{i}: find the number. [q{i}.r1.s0] work so \\boxed{{{i}}} idea-q0" for i in range(20)]
    return train_tokenizer(texts, vocab_size=300)


def problems(n: int, gold: str = "7") -> list[Problem]:
    return [Problem(f"q{i}", f"Q{i}: find the number.", gold) for i in range(n)]


def config(tmp_path, **overrides) -> InferConfig:
    fields = {
        "model": "scripted",
        "dataset": "scripted",
        "output_dir": str(tmp_path),
        "method": "me-icpo",
        "rounds": 1,
        "k": 3,
        "entropy_k": 4,
        "final_k": 2,
        "max_new_tokens": 64,
        "summary_max_tokens": 64,
        "context_length": 4096,
        **overrides,
    }
    return InferConfig(**fields)


def boxed(answer: str | None) -> str:
    return "no answer here" if answer is None else f"so \\boxed{{{answer}}}"


class Script:
    """Responses by phase, told apart by their sampling parameters (k, entropy_k, final_k differ).

    samples[qid][r] are the answers of round r+1 (the last list repeats); a response is
    "[qid.rR.sJ] ... \\boxed{a}" and its summary "idea-qid.rR.sJ", so a probe prompt shows which
    ideas it holds. probe(qid, ideas) gives the probe's answers; final[qid] the final answers.
    """

    def __init__(
        self,
        cfg: InferConfig,
        samples: dict[str, list[list[str | None]]],
        probe: Callable[[str, tuple[str, ...]], list[str | None]] | None = None,
        final: dict[str, list[str | None]] | None = None,
    ) -> None:
        self.cfg, self.samples, self.probe, self.final = cfg, samples, probe, final or {}
        self.rounds_seen: Counter[str] = Counter()

    def __call__(self, prompt: str, params) -> list[str]:
        if params.temperature == self.cfg.summary_temperature:
            return [f"idea-{RESPONSE_TAG.search(prompt)[1]}"]
        qid = f"q{QUESTION.search(prompt)[1]}"
        if params.n == self.cfg.k:
            r = self.rounds_seen[qid]
            self.rounds_seen[qid] += 1
            rounds = self.samples[qid]
            answers = rounds[min(r, len(rounds) - 1)]
            return [f"[{qid}.r{r + 1}.s{j}] work {boxed(a)}" for j, a in enumerate(answers)]
        if params.n == self.cfg.entropy_k:
            return [boxed(a) for a in self.probe(qid, tuple(IDEA.findall(prompt)))]
        return [boxed(a) for a in self.final.get(qid, ["7"] * params.n)]


def run(tokenizer, cfg, script, n_questions=1, **kwargs):
    backend = ScriptedBackend(tokenizer, script)
    return run_method(backend, problems(n_questions), cfg, **kwargs), backend


def test_answer_entropy_counts_equivalence_classes_and_penalises_invalid_answers():
    assert answer_entropy(["5", "5", "5", "5"]) == 0
    assert answer_entropy(["0.5", "\\frac{1}{2}", "1/2", "0.5"]) == 0  # one class
    assert answer_entropy(["6", "6", "5", "5"]) == pytest.approx(1.0)
    assert answer_entropy(["5", "5", None, None]) == pytest.approx(1.0)  # 0 + log2(4) * 1/2
    assert answer_entropy(["5", "5", None, None], invalid_penalty=False) == 0
    assert answer_entropy([None] * 4) == pytest.approx(10.0)  # 5 * log2(4), with or without penalty
    assert answer_entropy([None] * 4, invalid_penalty=False) == pytest.approx(10.0)


def test_majority_pseudo_label_rewards_and_summaries(tokenizer, tmp_path):
    cfg = config(tmp_path, k=4)
    script = Script(cfg, {"q0": [["7", "\\frac{14}{2}", "3", None]]}, probe=lambda q, ideas: ["7"] * 4)
    [result], _ = run(tokenizer, cfg, script)
    record = result.rounds[0]
    assert record.history == []
    assert record.samples.answers == ["7", "\\frac{14}{2}", "3", None]
    assert record.pseudo_label == "7"
    assert record.rewards == [1, 1, 0, None]  # 14/2 votes with 7; no answer is no candidate
    assert record.summaries == ["idea-q0.r1.s0", "idea-q0.r1.s1", "idea-q0.r1.s2", None]
    assert record.chosen == 0 and record.chosen_summary == "idea-q0.r1.s0"
    assert result.history == [Attempt("idea-q0.r1.s0", "7", 1)]


def test_ground_truth_reward_compares_with_the_gold_answer(tokenizer, tmp_path):
    cfg = config(tmp_path, k=4, reward="gt")
    script = Script(cfg, {"q0": [["3", "3", "7", None]]}, probe=lambda q, ideas: ["7"] * 4)
    [result], _ = run(tokenizer, cfg, script)
    record = result.rounds[0]
    assert record.samples.majority == "3"
    assert record.pseudo_label == "7"
    assert record.rewards == [0, 0, 1, None]


def test_ties_are_broken_by_a_seeded_per_question_generator(tokenizer, tmp_path):
    cfg = config(tmp_path, k=2, batch_questions=12)
    samples = {f"q{i}": [["1", "2"]] for i in range(24)}

    def labels(seed, done_ids=()):
        c = config(tmp_path, k=2, batch_questions=12, seed=seed)
        script = Script(c, samples, probe=lambda q, ideas: ["1"] * 4)
        results, _ = run(tokenizer, c, script, n_questions=24, done_ids=done_ids)
        return {r.id: r.rounds[0].pseudo_label for r in results}

    first = labels(cfg.seed)
    assert set(first.values()) == {"1", "2"}  # both tied answers win for some questions
    assert labels(cfg.seed) == first
    assert labels(cfg.seed + 1) != first
    resumed = labels(cfg.seed, done_ids=[f"q{i}" for i in range(12)])
    assert resumed == {qid: label for qid, label in first.items() if int(qid[1:]) >= 12}


def test_minimum_entropy_candidate_is_chosen(tokenizer, tmp_path):
    cfg = config(tmp_path)
    probes = {
        "q0.r1.s0": ["5", "5", "5", "5"],  # entropy 0: the model is sure with this idea
        "q0.r1.s1": ["6", "6", "5", "5"],  # 1 bit
        "q0.r1.s2": ["6", "5", None, None],  # 1 bit + penalty 2 * 1/2
    }
    script = Script(cfg, {"q0": [["5", "6", "6"]]}, probe=lambda q, ideas: probes[ideas[-1]])
    [result], _ = run(tokenizer, cfg, script)
    record = result.rounds[0]
    assert record.rewards == [0, 1, 1]
    assert record.entropies == pytest.approx([0.0, 1.0, 2.0])
    assert record.chosen == 0  # lowest entropy wins even against the majority
    assert result.history == [Attempt("idea-q0.r1.s0", "5", 0)]


@pytest.mark.parametrize(("penalty", "chosen"), [(True, 1), (False, 0)])
def test_invalid_answer_penalty_decides_between_candidates(tokenizer, tmp_path, penalty, chosen):
    cfg = config(tmp_path, entropy_penalty=penalty)
    probes = {
        "q0.r1.s0": ["5", "5", None, None],  # 0 bits, half invalid: 1.0 with the penalty
        "q0.r1.s1": ["5", "5", "5", "6"],  # 0.811 bits
        "q0.r1.s2": [None, None, None, None],  # all invalid: 5 * log2(4)
    }
    script = Script(cfg, {"q0": [["5", "5", "6"]]}, probe=lambda q, ideas: probes[ideas[-1]])
    [result], _ = run(tokenizer, cfg, script)
    record = result.rounds[0]
    assert record.entropies[1] == pytest.approx(0.8113, abs=1e-4)
    assert record.entropies[2] == pytest.approx(10.0)
    assert record.chosen == chosen


def test_epsilon_explores_random_candidates(tokenizer, tmp_path):
    samples = {f"q{i}": [["5", "6", "7"]] for i in range(12)}
    probes = {"s0": ["5"] * 4, "s1": ["5", "6"] * 2, "s2": ["5", "6", "7", "8"]}

    def chosen(epsilon):
        cfg = config(tmp_path, epsilon=epsilon)
        script = Script(cfg, samples, probe=lambda q, ideas: probes[ideas[-1][-2:]])
        results, _ = run(tokenizer, cfg, script, n_questions=12)
        return [r.rounds[0].chosen for r in results]

    assert chosen(0.0) == [0] * 12
    assert set(chosen(1.0)) == {0, 1, 2}


def eviction_run(tokenizer, tmp_path, method):
    """Two rounds whose chosen ideas both get reward 1 with max_keep=1: the bucket overflows in round 2."""
    cfg = config(tmp_path, method=method, rounds=2, k=2, max_keep=1)

    def probe(qid, ideas):
        if ideas == ("q0.r1.s0",):  # round-2 eviction probe that keeps only the round-1 idea
            return ["4"] * 4
        return ["4", "5", "6", "7"]

    script = Script(cfg, {"q0": [["4", "4"]]}, probe=probe)
    [result], backend = run(tokenizer, cfg, script)
    return result, backend


def test_eviction_removes_the_entry_whose_removal_gives_the_lowest_entropy(tokenizer, tmp_path):
    result, _ = eviction_run(tokenizer, tmp_path, "me-icpo")
    round2 = result.rounds[1]
    assert round2.history == [Attempt("idea-q0.r1.s0", "4", 1)]
    assert round2.chosen_summary == "idea-q0.r2.s0"
    # Removing the old entry leaves the new one (2 bits); removing the new one leaves a sure model.
    assert round2.eviction_entropies == pytest.approx([2.0, 0.0])
    assert round2.evicted == Attempt("idea-q0.r2.s0", "4", 1)
    assert result.history == [Attempt("idea-q0.r1.s0", "4", 1)]


def test_eviction_without_probe_removes_the_oldest(tokenizer, tmp_path):
    result, backend = eviction_run(tokenizer, tmp_path, "random-icpo")
    round2 = result.rounds[1]
    assert round2.eviction_entropies == []
    assert round2.evicted.text.startswith("idea-q0.r1.")
    assert [a.text[: len("idea-q0.r2.")] for a in result.history] == ["idea-q0.r2."]
    assert all(p.n != 4 for call in backend.calls for _, p in call)  # random-icpo never probes


@pytest.mark.parametrize(
    ("method", "expected_calls"),
    [("me-icpo", 12), ("random-icpo", 7), ("single", 1), ("best-of-n", 2), ("self-refine", 7)],
)
def test_engine_calls_per_run_do_not_grow_with_questions_or_k(tokenizer, tmp_path, method, expected_calls):
    # Every round picks a reward-1 idea (all probes agree), so from round 2 the bucket overflows
    # (max_keep=1): me-icpo = 3 rounds x (sample, summarise, probe) + 2 evictions + final.
    # best-of-n: sample, score; self-refine: sample + 3 rounds x (feedback, refine).
    calls = set()
    for n_questions in (2, 5):
        for k in (2, 4):
            cfg = config(tmp_path, method=method, rounds=3, k=k, entropy_k=3, final_k=5, max_keep=1)
            samples = {f"q{i}": [["1"] * (k - 1) + ["2"]] for i in range(n_questions)}
            script = Script(cfg, samples, probe=lambda q, ideas: ["1"] * 3, final={})
            backend = ScriptedBackend(tokenizer, script, confidence=lambda prompt, completion: -1.0)
            results = run_method(backend, problems(n_questions), cfg)
            assert len(results) == n_questions
            assert backend.usage.engine_calls == len(backend.calls) + len(backend.scored)
            calls.add(backend.usage.engine_calls)
    assert calls == {expected_calls}


def test_self_reward_diagnostics_compare_rewards_with_the_gold_answer(tokenizer, tmp_path):
    cfg = config(tmp_path, rounds=2, k=4, entropy_k=2)  # the script tells phases apart by n
    samples = {
        # round 1: the majority (3) is wrong, so the self-rewards invert the gold ones; round 2: it is right
        "q0": [["3", "3", "7", None], ["7", "7", "3", "7"]],
        "q1": [["7", "7", "7", "7"]],
    }

    def probe(qid, ideas):  # the newest idea from sample 0 leaves the model sure: sample 0 is picked
        return ["1", "1"] if ideas[-1].endswith("s0") else ["1", "2"]

    results, _ = run(tokenizer, cfg, Script(cfg, samples, probe=probe), n_questions=2)
    q0 = results[0]
    assert [record.chosen for record in q0.rounds] == [0, 0]
    assert q0.history == [Attempt("idea-q0.r1.s0", "3", 1), Attempt("idea-q0.r2.s0", "7", 1)]
    assert q0.metrics["self_reward"] == [
        {
            "pseudo_label_correct": False,
            "candidates": 3,
            "candidates_correct": 1,
            "rewards_right": 0,
            "pick_correct": False,
            "reward_1_entries": 1,  # the history after round 1 holds the wrong 3 under reward 1
            "reward_1_entries_correct": 0,
        },
        {
            "pseudo_label_correct": True,
            "candidates": 4,
            "candidates_correct": 3,
            "rewards_right": 4,
            "pick_correct": True,
            "reward_1_entries": 2,
            "reward_1_entries_correct": 1,
        },
    ]
    pooled = summarize([dataclasses.asdict(result) for result in results])["self_reward"]
    assert pooled == {
        "pseudo_label_accuracy": [0.5, 1.0],
        "reward_accuracy": [pytest.approx(4 / 7), 1.0],  # pooled over the 3 + 4 candidates of round 1
        "pick_accuracy": [0.5, 1.0],
        "candidate_accuracy": [pytest.approx(5 / 7), pytest.approx(7 / 8)],
        "reward_1_history_precision": [0.5, 0.75],
    }


def test_self_reward_diagnostics_leave_out_what_was_not_counted(tokenizer, tmp_path):
    cfg = config(tmp_path, method="random-icpo", rounds=1, k=3)
    [result], _ = run(tokenizer, cfg, Script(cfg, {"q0": [["7", None, None]]}))
    [counts] = result.metrics["self_reward"]
    assert counts["pick_correct"] is None  # one candidate: nothing was picked among others
    pooled = summarize([dataclasses.asdict(result)])["self_reward"]
    assert pooled["pick_accuracy"] == [None]
    assert pooled["reward_accuracy"] == [1.0] and pooled["reward_1_history_precision"] == [1.0]


def test_questions_are_processed_in_chunks(tokenizer, tmp_path):
    cfg = config(tmp_path, method="single", batch_questions=2)
    finished = []
    results, backend = run(
        tokenizer,
        cfg,
        Script(cfg, {f"q{i}": [["7"] * 3] for i in range(5)}),
        n_questions=5,
        on_chunk=finished.append,
    )
    assert [len(call) for call in backend.calls] == [len(chunk) for chunk in finished] == [2, 2, 1]
    assert (
        [r.id for chunk in finished for r in chunk] == [r.id for r in results] == [f"q{i}" for i in range(5)]
    )


def test_without_summaries_the_truncated_response_enters_the_history(tokenizer, tmp_path):
    cfg = config(tmp_path, summary=False, summary_max_tokens=5)
    script = Script(cfg, {"q0": [["5", "5", "6"]]}, probe=lambda q, ideas: ["5"] * 4)
    [result], backend = run(tokenizer, cfg, script)
    response = result.rounds[0].samples.texts[0]
    truncated = tokenizer.decode(encode_prompt(tokenizer, response)[:5])
    assert result.rounds[0].summaries[0] == truncated != response
    assert result.history == [Attempt(truncated, "5", 1)]
    assert all(p.temperature != cfg.summary_temperature for call in backend.calls for _, p in call)


def test_prompt_overflowing_the_context_drops_the_oldest_history(tokenizer, tmp_path, caplog):
    question = problems(1)[0].problem
    first, second = (Attempt(f"idea-q0.r{r}.s0", "5", 1) for r in (1, 2))
    both = len(encode_prompt(tokenizer, render_prompt(tokenizer, question, [first, second], "integer")))
    cfg = config(tmp_path, rounds=3, k=1, context_length=both)  # round 3: no room left with both ideas
    script = Script(cfg, {"q0": [["5"]]})
    with caplog.at_level(logging.WARNING):
        [result], backend = run(tokenizer, cfg, script)
    assert [r.history for r in result.rounds] == [[], [first], [second]]
    assert "dropped the 1 oldest history entries" in caplog.text
    round3_prompt, round3_params = backend.calls[-3][
        0
    ]  # sample, summarise, final: no probe with one candidate
    assert round3_params.max_new_tokens == both - len(encode_prompt(tokenizer, round3_prompt))


def test_empty_and_answerless_generations_are_invalid_not_errors(tokenizer, tmp_path):
    cfg = config(tmp_path, rounds=2)
    backend = ScriptedBackend(
        tokenizer, lambda prompt, params: ["" if i % 2 else "no box" for i in range(params.n)]
    )
    [result] = run_method(backend, problems(1), cfg)
    assert all(r.rewards == [None] * 3 and r.chosen is None for r in result.rounds)
    assert result.history == []
    nothing_to_reward = {
        "pseudo_label_correct": False,
        "candidates": 0,
        "candidates_correct": 0,
        "rewards_right": 0,
        "pick_correct": None,
        "reward_1_entries": 0,
        "reward_1_entries_correct": 0,
    }
    assert result.metrics == {
        "mean": 0,
        "maj": 0,
        "pass": 0,
        "mean_per_round": [0, 0],
        "maj_per_round": [0, 0],
        "self_reward": [nothing_to_reward] * 2,
    }
    assert len(backend.calls) == 3  # two rounds of sampling and the final: nothing to summarise or probe


def test_metrics_of_the_final_and_round_samples(tokenizer, tmp_path):
    cfg = config(tmp_path, rounds=2, k=4, final_k=3)
    script = Script(
        cfg,
        {"q0": [["3", "3", "3", "7"], ["7", "7", "3", "7"]]},
        probe=lambda q, ideas: ["7"] * 4,
        final={"q0": ["7", "7", "2"]},
    )
    [result], _ = run(tokenizer, cfg, script)
    assert result.metrics["mean"] == pytest.approx(2 / 3)
    assert result.metrics["maj"] == 1 and result.metrics["pass"] == 1
    assert result.metrics["mean_per_round"] == [0.25, 0.75]
    assert result.metrics["maj_per_round"] == [0, 1]


def test_single_and_majority_sample_k_without_history(tokenizer, tmp_path):
    for method in ("single", "majority"):
        cfg = config(tmp_path, method=method, k=3)
        [result], backend = run(tokenizer, cfg, Script(cfg, {"q0": [["7", "2", "2"]]}))
        assert result.rounds == [] and result.history == []
        assert result.final.answers == ["7", "2", "2"] and result.final.majority == "2"
        assert result.metrics["mean_per_round"] == [pytest.approx(1 / 3)]
        assert result.metrics["maj_per_round"] == [0]
        assert len(backend.calls) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "beam"}, "single, majority, best-of-n, self-refine, random-icpo, me-icpo"),
        ({"method": "me-icpo", "reward_model": "rm"}, "only best-of-n uses --reward-model"),
        ({"feedback_max_tokens": 0}, "feedback_max_tokens >= 1"),
        ({"method": "best-of-n", "reward_model": "no/such/dir"}, "is no directory, nor a Hub repo id"),
        ({"backend": "tgi"}, "hf, vllm"),
        ({"reward": "oracle"}, "self, gt"),
        ({"entropy_k": 1}, "entropy_k >= 2"),
        ({"k": 0}, "k >= 1"),
        ({"epsilon": 1.5}, "0 <= epsilon <= 1"),
        ({"top_p": 0}, "top_p"),
        ({"summary_temperature": -1}, "--summary-temperature"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(tmp_path, **overrides)
