"""The end-to-end proof's foundations: the synthetic task family and the base-model pretraining."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, SamplingParams, encode_prompt
from icpo_infer.config import ConfigError
from icpo_infer.data import load_problems
from icpo_infer.grading import grade
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt
from icpo_train.e2e.pretrain import NEAR_MISSES, PretrainConfig, near_miss, pretrain, training_example
from icpo_train.e2e.synthetic import NUMBER_WORDS, SyntheticTaskConfig, generate_splits, write_splits

E2E_TEMPLATES = Path(__file__).resolve().parents[1] / "recipes" / "e2e" / "templates.yaml"


def operands(problem) -> tuple[str, ...]:
    """A question up to operand order."""
    return tuple(sorted(problem.problem.removeprefix("What is ").removesuffix("?").split(" + ")))


def test_splits_are_seeded_disjoint_and_load_like_a_benchmark(tmp_path):
    config = SyntheticTaskConfig(
        train_size=300, validation_size=50, test_size=50, reading_fraction=0.2, seed=3
    )
    splits = generate_splits(config)
    assert {name: len(problems) for name, problems in splits.items()} == {
        "train": 300,
        "validation": 50,
        "test": 50,
    }
    assert generate_splits(config) == splits  # seeded
    assert generate_splits(SyntheticTaskConfig(train_size=300, validation_size=50, test_size=50)) != splits

    sums = {name: [p for p in problems if "+" in p.problem] for name, problems in splits.items()}
    seen = [set(map(operands, problems)) for problems in sums.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for problem in sums["test"]:
        assert int(problem.answer) == sum(NUMBER_WORDS.index(word) for word in operands(problem))
    # Reading questions ("What is 37?") only in the train split, in the asked proportion.
    assert len(splits["train"]) - len(sums["train"]) == 60
    assert sums["validation"] == splits["validation"] and sums["test"] == splits["test"]

    paths = write_splits(generate_splits(config), tmp_path)
    loaded, skipped = load_problems(str(paths["test"]))
    assert skipped == 0 and loaded == splits["test"]
    assert all(grade(f"\\boxed{{{p.answer}}}", p.answer) for p in loaded)


def test_impossible_task_sizes_are_errors_naming_the_fields():
    with pytest.raises(ConfigError, match="min_operands"):
        SyntheticTaskConfig(min_operands=1)
    with pytest.raises(ConfigError, match="at most"):
        SyntheticTaskConfig(min_operands=2, max_operands=2, train_size=100)
    with pytest.raises(ConfigError, match="reading_fraction"):
        SyntheticTaskConfig(reading_fraction=1.0)


def test_a_near_miss_is_close_wrong_and_never_negative():
    rng = random.Random(0)
    for answer in ["0", "1", "2", "17"]:
        misses = {near_miss(answer, rng) for _ in range(200)}
        expected = {str(int(answer) + d) for d in NEAR_MISSES if int(answer) + d >= 0}
        assert misses == expected and answer not in misses


def test_pretraining_histories_mix_uninformative_and_copying_texts_in_the_configured_shares():
    problems = generate_splits(SyntheticTaskConfig(train_size=200, validation_size=0, test_size=0))["train"]
    config = PretrainConfig(pretrain_history_fraction=0.25, pretrain_copy_fraction=0.5)
    rng = random.Random(0)
    kinds = {"bare": 0, "uninformative": 0, "copy": 0}
    copied_under = {0: 0, 1: 0}
    for problem in problems * 10:
        history, answer = training_example(problem, problems, config, rng)
        answers = [attempt.answer for attempt in history]
        near = {str(int(problem.answer) + d) for d in NEAR_MISSES} | {problem.answer}
        if not history:
            kinds["bare"] += 1
            assert answer == problem.answer
        elif set(answers) <= near and answer in answers:  # attempts at this question, one repeated
            kinds["copy"] += 1
            copied_under[rng.choice([a.reward for a in history if a.answer == answer])] += 1
        else:  # answers of other questions: the response is still the gold answer
            kinds["uninformative"] += 1
            assert answer == problem.answer
    total = len(problems) * 10
    # (an uninformative history can look like a copying one by chance: a few points of slack)
    assert abs(kinds["bare"] / total - 0.25) < 0.03, kinds
    assert abs(kinds["copy"] / total - 0.5) < 0.05, kinds
    # The repeated attempt is picked whatever its tag: reward 0 as often as reward 1.
    assert abs(copied_under[1] / sum(copied_under.values()) - 0.5) < 0.05, copied_under
    with pytest.raises(ConfigError, match="pretrain_copy_fraction"):
        PretrainConfig(pretrain_history_fraction=0.6, pretrain_copy_fraction=0.5)


def test_copying_texts_repeat_an_attempt_with_the_configured_probability_else_give_the_gold_answer():
    problems = generate_splits(SyntheticTaskConfig(train_size=200, validation_size=0, test_size=0))["train"]
    rng = random.Random(0)
    for probability in (1.0, 0.3, 0.0):
        config = PretrainConfig(
            pretrain_history_fraction=0, pretrain_copy_fraction=1, pretrain_copy_probability=probability
        )
        wrong = 0
        for problem in problems * 10:
            history, answer = training_example(problem, problems, config, rng)
            assert history  # every text shows attempts at its own question
            assert answer == problem.answer or answer in [a.answer for a in history]
            wrong += answer != problem.answer
        # Half the attempts are near misses, so a copy repeats a wrong answer about half the time.
        assert abs(wrong / (len(problems) * 10) - probability / 2) < 0.03, (probability, wrong)
    with pytest.raises(ConfigError, match="pretrain_copy_probability"):
        PretrainConfig(pretrain_copy_probability=1.5)


def test_pretraining_saves_a_model_the_hf_backend_loads_and_that_answers_in_the_graded_format(tmp_path):
    splits = generate_splits(SyntheticTaskConfig(train_size=256, validation_size=0, test_size=8))
    config = PretrainConfig(
        vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, pretrain_steps=120, pretrain_batch_size=32
    )
    templates = PromptTemplates.from_yaml(E2E_TEMPLATES)
    model_dir = pretrain(splits["train"], config, tmp_path / "base", templates)
    assert (model_dir / "model.safetensors").is_file()

    backend = make_backend("hf", BackendOptions(model=str(model_dir)))
    test = splits["test"]
    history = [Attempt("\\boxed{12}", "12", 1), Attempt("\\boxed{7}", "7", 0)]
    prompts = [
        render_prompt(backend.tokenizer, p.problem, h, "integer", templates)
        for p in test
        for h in ([], history)
    ]
    generations = backend.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    texts = [c.text for g in generations for c in g.completions]
    # The response format is learned, with and without a history in the prompt.
    assert all(text.startswith("\\boxed{") for text in texts), texts
    # The tokenizer knows the history wording: a history entry costs a few tokens, not one per byte.
    bare, with_history = (len(encode_prompt(backend.tokenizer, prompts[i])) for i in (0, 1))
    assert with_history - bare < 60, (bare, with_history)  # about 130 byte by byte
