"""best-of-n and self-refine against a scripted backend, and best-of-n with a tiny local reward model."""

from __future__ import annotations

import logging
import re

import pytest
from scripted_backend import ScriptedBackend
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from icpo_infer.backends.base import encode_prompt
from icpo_infer.config import ConfigError
from icpo_infer.data import Problem
from icpo_infer.icpo import run_method
from icpo_infer.infer_config import InferConfig
from icpo_infer.prompts import render_prompt
from icpo_infer.reward_model import RewardModel
from icpo_train.e2e.tiny_lm import train_tokenizer

BOXED = re.compile(r"\\boxed\{(\d+)\}")
TAG = re.compile(r"\[(s\d+)\]")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        f"Q{i}: find the number. [s{i}] work so \\boxed{{{i}}} feedback on answer {i}" for i in range(20)
    ]
    return train_tokenizer(texts, vocab_size=300)


def problems(n: int) -> list[Problem]:
    return [Problem(f"q{i}", f"Q{i}: find the number.", "7") for i in range(n)]


def config(tmp_path, **overrides) -> InferConfig:
    fields = {
        "model": "scripted",
        "dataset": "scripted",
        "output_dir": str(tmp_path),
        "k": 4,
        "max_new_tokens": 64,
        "context_length": 4096,
        **overrides,
    }
    return InferConfig(**fields)


def samples_script(answers: list[str | None]):
    """Every question answers ``answers``; response j is tagged [sj]."""

    def respond(prompt, params):
        return [
            f"[s{j}] work " + ("no answer" if a is None else f"so \\boxed{{{a}}}")
            for j, a in enumerate(answers)
        ]

    return respond


def test_best_of_n_picks_the_most_confident_answered_sample(tokenizer, tmp_path):
    cfg = config(tmp_path, method="best-of-n")
    # The answerless sample is the most confident of all, and is no pick.
    confidence = {"s0": -2.0, "s1": -0.5, "s2": -0.1, "s3": -1.0}
    backend = ScriptedBackend(
        tokenizer,
        samples_script(["3", "7", None, "3"]),
        confidence=lambda prompt, completion: confidence[TAG.search(completion)[1]],
    )
    results = run_method(backend, problems(3), cfg)
    for result in results:
        assert result.pick.scorer == "mean_logprob"
        assert result.pick.scores == pytest.approx([-2.0, -0.5, -0.1, -1.0])
        assert result.pick.chosen == 1 and result.pick.correct
        assert result.metrics["best"] == 1.0 and result.metrics["maj"] == 0.0  # the vote says 3
    # ONE scoring call over every sample of every question, each scored after its question's prompt.
    [scored] = backend.scored
    prompt = render_prompt(tokenizer, problems(1)[0].problem, [], "integer")
    assert len(scored) == 3 * 4 and scored[0] == (prompt, results[0].final.texts[0])
    assert len(backend.calls) == 1 and backend.usage.engine_calls == 2


def test_best_of_n_without_any_answer_picks_among_all(tokenizer, tmp_path):
    cfg = config(tmp_path, method="best-of-n", k=2)
    backend = ScriptedBackend(
        tokenizer,
        samples_script([None, None]),
        confidence=lambda prompt, completion: -1.0 if "[s0]" in completion else -0.5,
    )
    [result] = run_method(backend, problems(1), cfg)
    assert result.pick.chosen == 1 and not result.pick.correct and result.metrics["best"] == 0.0


def refine_script(moves: dict[str, str]):
    """Initial answers 3 and 7; feedback names the answer it reviews; a refinement turns answer a into moves[a]."""

    def respond(prompt, params):
        if prompt.rstrip().endswith("Feedback:"):
            return [f"feedback on answer {BOXED.findall(prompt)[-1]}"]
        if "Feedback on that attempt" in prompt:
            answer = BOXED.findall(prompt)[-1]  # the feedback holds no box: this is the attempt's answer
            return [f"[s9] work so \\boxed{{{moves[answer]}}}"]
        return ["[s0] work so \\boxed{3}", "[s1] work so \\boxed{7}"][: params.n]

    return respond


def test_self_refine_chains_answer_feedback_and_refine(tokenizer, tmp_path):
    cfg = config(tmp_path, method="self-refine", k=2, rounds=2, feedback_max_tokens=16)
    backend = ScriptedBackend(tokenizer, refine_script({"3": "5", "5": "7", "7": "7"}))
    [result] = run_method(backend, problems(1), cfg)
    assert [record.samples.answers for record in result.rounds] == [["3", "7"], ["5", "7"]]
    assert [record.samples.texts for record in result.rounds] == [
        ["[s0] work so \\boxed{3}", "[s1] work so \\boxed{7}"],
        ["[s9] work so \\boxed{5}", "[s9] work so \\boxed{7}"],
    ]
    assert result.rounds[0].feedback == ["feedback on answer 3", "feedback on answer 7"]
    assert result.rounds[1].feedback == ["feedback on answer 5", "feedback on answer 7"]
    assert result.final.answers == ["7", "7"]
    assert result.metrics["mean_per_round"] == [0.5, 0.5] and result.metrics["mean"] == 1.0
    assert result.history == [] and result.pick is None and "self_reward" not in result.metrics
    # sample, then per round one feedback call and one refine call over both chains
    assert [len(call) for call in backend.calls] == [1, 2, 2, 2, 2]
    feedback_params = [p for _, p in backend.calls[1]]
    refine_params = [p for _, p in backend.calls[2]]
    assert all(p.n == 1 and p.max_new_tokens == 16 for p in feedback_params)
    assert all(p.n == 1 and p.max_new_tokens == 64 for p in refine_params)
    assert all(p.temperature == cfg.temperature for p in feedback_params + refine_params)
    assert len({p.seed for call in backend.calls for _, p in call}) == 5  # one seed per phase


def test_self_refine_chain_keeps_its_response_when_the_feedback_prompt_overflows(tokenizer, tmp_path, caplog):
    question = problems(1)[0].problem
    bare = len(encode_prompt(tokenizer, render_prompt(tokenizer, question, [], "integer")))
    cfg = config(tmp_path, method="self-refine", k=2, rounds=1, context_length=bare + 4)
    backend = ScriptedBackend(tokenizer, refine_script({}))
    with caplog.at_level(logging.WARNING):
        [result] = run_method(backend, problems(1), cfg)
    assert result.rounds[0].feedback == [None, None]
    assert result.final.answers == ["3", "7"]
    assert len(backend.calls) == 1  # no feedback fitted, so nothing was refined
    assert "the chain keeps its response" in caplog.text


def test_reward_model_scores_do_not_depend_on_batching(tiny_reward_model_dir):
    questions = ["Q1: find the number."] * 3 + ["Q2: find the number, a longer one."]
    responses = ["so \\boxed{1}", "[s2] work so \\boxed{2} and more work", "", "so \\boxed{7}"]
    alone = [
        RewardModel(str(tiny_reward_model_dir), device="cpu", dtype="float32", max_batch_tokens=1).score(
            [q], [r]
        )[0]
        for q, r in zip(questions, responses, strict=True)
    ]
    model = RewardModel(str(tiny_reward_model_dir), device="cpu", dtype="float32")
    together = model.score(questions, responses)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 4
    assert model.usage.engine_calls == 1 and model.usage.prompt_tokens > 0


def test_best_of_n_with_a_reward_model_picks_its_top_score(tokenizer, tiny_reward_model_dir, tmp_path):
    cfg = config(tmp_path, method="best-of-n", reward_model=str(tiny_reward_model_dir))
    reward_model = RewardModel(str(tiny_reward_model_dir), device="cpu", dtype="float32")
    backend = ScriptedBackend(tokenizer, samples_script(["3", "7", "5", "1"]))
    [result] = run_method(backend, problems(1), cfg, reward_model=reward_model)
    expected = reward_model.score([problems(1)[0].problem] * 4, result.final.texts)
    assert result.pick.scorer == str(tiny_reward_model_dir)
    assert result.pick.scores == pytest.approx(expected)
    assert result.pick.chosen == max(range(4), key=expected.__getitem__)
    assert backend.scored == []  # the generator scored nothing


def test_a_classifier_with_several_labels_is_no_reward_model(tiny_reward_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_labels=3,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has 3 output labels; a reward model has one"):
        RewardModel(str(tmp_path), device="cpu")
