"""The end-to-end proof's foundations: the synthetic task family and the base-model pretraining."""

from __future__ import annotations

from pathlib import Path

import pytest

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, SamplingParams
from icpo_infer.config import ConfigError
from icpo_infer.data import load_problems
from icpo_infer.grading import grade
from icpo_infer.prompts import PromptTemplates, render_prompt
from icpo_train.pretrain import PretrainConfig, pretrain
from icpo_train.synthetic import SyntheticTaskConfig, generate_splits, write_splits

E2E_TEMPLATES = Path(__file__).resolve().parents[1] / "recipes" / "e2e" / "templates.yaml"


def test_splits_are_seeded_disjoint_and_load_like_a_benchmark(tmp_path):
    config = SyntheticTaskConfig(train_size=300, validation_size=50, test_size=50, task_seed=3)
    splits = generate_splits(config)
    assert {name: len(problems) for name, problems in splits.items()} == {
        "train": 300,
        "validation": 50,
        "test": 50,
    }
    assert generate_splits(config) == splits  # seeded
    assert generate_splits(SyntheticTaskConfig(train_size=300, validation_size=50, test_size=50)) != splits

    def operands(problem):  # the question up to operand order
        return tuple(sorted(problem.problem.removeprefix("What is ").removesuffix("?").split(" + ")))

    seen = [set(map(operands, problems)) for problems in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])

    paths = write_splits(config, tmp_path)
    loaded, skipped = load_problems(str(paths["test"]))
    assert skipped == 0 and loaded == splits["test"]
    assert all(grade(f"\\boxed{{{p.answer}}}", p.answer) for p in loaded)


def test_impossible_task_sizes_are_errors_naming_the_fields():
    with pytest.raises(ConfigError, match="min_operands"):
        SyntheticTaskConfig(min_operands=1)
    with pytest.raises(ConfigError, match="at most"):
        SyntheticTaskConfig(min_operands=2, max_operands=2, max_operand=3, train_size=100)


def test_pretraining_saves_a_model_the_hf_backend_loads_and_that_answers_in_the_graded_format(tmp_path):
    splits = generate_splits(SyntheticTaskConfig(train_size=256, validation_size=0, test_size=8))
    config = PretrainConfig(
        vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, pretrain_steps=120, pretrain_batch_size=32
    )
    templates = PromptTemplates.from_yaml(E2E_TEMPLATES)
    model_dir = pretrain(splits["train"], config, tmp_path / "base", templates)
    assert (model_dir / "model.safetensors").is_file()

    backend = make_backend("hf", BackendOptions(model=str(model_dir)))
    prompts = [render_prompt(backend.tokenizer, p.problem, [], "integer", templates) for p in splits["test"]]
    generations = backend.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    texts = [c.text for g in generations for c in g.completions]
    assert all(text.startswith("\\boxed{") for text in texts), texts  # learned the response format
