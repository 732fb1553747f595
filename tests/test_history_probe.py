"""`icpo_train.e2e.history_probe` on a real tiny model that answers in \\boxed{} (no mocks of the backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from boxed_model import teach_boxed_answers
from conftest import PROBLEMS_FILE, fixture_problems
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, SamplingParams, encode_completion, encode_prompt
from icpo_infer.data import Problem
from icpo_infer.grading import extract_answer, is_equivalent
from icpo_infer.prompts import Attempt, answer_type_of, render_prompt
from icpo_train.e2e import history_probe

KEYS = {
    "tag_discrimination",
    "tag_discrimination_right",
    "tag_discrimination_wrong",
    "logp_gold_no_history",
    "answer_rate",
    "accuracy",
    "mean_tokens",
    "questions",
    "seconds",
    "pairs_right",
    "pairs_wrong",
}
SETTINGS = {"k": 4, "max_new_tokens": 6, "seed": 0, "gold_completion": "\\boxed{{gold}}"}


@pytest.fixture(scope="module")
def boxed_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Answers every prompt with \\boxed{d}, d mostly 5: the first fixture answers are 5, 6 and 1, so its
    responses hold right and wrong answers."""
    questions = [row["problem"] for row in fixture_problems()[:3]]
    return teach_boxed_answers(tiny_model_dir, tmp_path_factory.mktemp("boxed"), questions)


def zero_lora(model_dir: Path, directory: Path, b_scale: float = 0.0) -> Path:
    """A LoRA adapter of ``model_dir`` whose B weights are ``b_scale`` x random (0: the base model itself)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(directory)
    weights = load_file(directory / "adapter_model.safetensors")
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = b_scale * torch.randn_like(tensor)
    save_file(weights, directory / "adapter_model.safetensors")
    return directory


def problems() -> list[Problem]:
    return [Problem(row["id"], row["problem"], row["answer"]) for row in fixture_problems()[:3]]


def logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion + EOS | prompt) from one plain forward pass of the unpadded sequence."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = encode_completion(tokenizer, completion)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    predicted = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    return predicted.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).sum().item()


def test_the_figures_are_the_definitions_worked_out_by_hand(boxed_dir):
    table = history_probe.probe(str(boxed_dir), problems(), **SETTINGS)
    assert list(table) == ["base"] and set(table["base"]) == KEYS
    base = table["base"]

    # The base responses, drawn again with the probe's seeds (a seeded sample is a function of the prompt).
    backend = make_backend("hf", BackendOptions(str(boxed_dir), device="cpu"))
    bare = [render_prompt(backend.tokenizer, p.problem, [], answer_type_of(p.answer)) for p in problems()]
    params = SamplingParams(n=4, max_new_tokens=6, seed=0)
    samples = [
        (p, c) for p, g in zip(problems(), backend.generate(bare, params), strict=True) for c in g.completions
    ]
    backend.close()
    answered = [(p, c.text, extract_answer(c.text)) for p, c in samples if extract_answer(c.text) is not None]
    right = [is_equivalent(answer, p.answer) for p, _, answer in answered]
    assert base["answer_rate"] == len(answered) / 12
    assert base["accuracy"] == sum(right) / 12
    assert base["mean_tokens"] == sum(c.num_tokens for _, c in samples) / 12
    assert (base["pairs_right"], base["pairs_wrong"]) == (sum(right), len(right) - sum(right))
    assert base["pairs_right"] > 0 and base["pairs_wrong"] > 0  # the boxed model gives both kinds

    # Teacher-forced log-probs from plain forward passes, one sequence at a time (no padding, no batching).
    tokenizer = AutoTokenizer.from_pretrained(boxed_dir)
    model = AutoModelForCausalLM.from_pretrained(boxed_dir, dtype=torch.float32).eval()
    differences = []
    for p, text, answer in answered:
        tagged = [
            render_prompt(tokenizer, p.problem, [Attempt(text, answer, reward)], answer_type_of(p.answer))
            for reward in (1, 0)
        ]
        differences.append(
            logprob(model, tokenizer, tagged[0], text) - logprob(model, tokenizer, tagged[1], text)
        )
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert base["tag_discrimination"] == pytest.approx(mean(differences), abs=1e-5)
    assert base["tag_discrimination_right"] == pytest.approx(
        mean([d for d, r in zip(differences, right, strict=True) if r]), abs=1e-5
    )
    assert base["tag_discrimination_wrong"] == pytest.approx(
        mean([d for d, r in zip(differences, right, strict=True) if not r]), abs=1e-5
    )
    gold = [
        logprob(model, tokenizer, prompt, f"\\boxed{{{p.answer}}}")
        for prompt, p in zip(bare, problems(), strict=True)
    ]
    assert base["logp_gold_no_history"] == pytest.approx(mean(gold), abs=1e-5)


def test_an_adapter_with_zero_b_weights_gives_the_base_figures_and_json_holds_every_model(
    boxed_dir, tmp_path, capsys
):
    zero = zero_lora(boxed_dir, tmp_path / "zero")
    moved = zero_lora(boxed_dir, tmp_path / "moved", b_scale=0.5)
    out = tmp_path / "probe" / "figures.json"
    argv = ["--model", str(boxed_dir), "--questions", str(PROBLEMS_FILE)]
    argv += ["--limit", "3", "--k", "4", "--max-new-tokens", "6", "--gold-completion", "\\boxed{{gold}}"]
    assert (
        history_probe.main([*argv, "--adapter", str(zero), "--adapter", str(moved), "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    table = json.loads(out.read_text())
    assert list(table) == ["base", "zero", "moved"]
    assert all(name in printed for name in table) and "tag disc." in printed
    for row in table.values():
        assert set(row) == KEYS and row["questions"] == 3
        assert all(math.isfinite(value) for value in row.values())
    without_time = [{key: v for key, v in table[name].items() if key != "seconds"} for name in table]
    # B = 0: the adapter is the base model. Its samples are the base's; PEFT adds its zero product to each
    # layer, which leaves the tiny model's log-probs bit for bit and moved SmolLM2's by ~1e-6 nats.
    assert without_time[1] == pytest.approx(without_time[0], rel=1e-6, abs=1e-6)
    assert without_time[1]["accuracy"] == without_time[0]["accuracy"]
    assert without_time[1]["mean_tokens"] == without_time[0]["mean_tokens"]
    assert without_time[2]["logp_gold_no_history"] != pytest.approx(without_time[0]["logp_gold_no_history"])

    # The function, given the problems themselves and one adapter: the same figures.
    again = history_probe.probe(str(boxed_dir), problems(), [str(zero)], **SETTINGS)
    assert {key: v for key, v in again["zero"].items() if key != "seconds"} == without_time[1]


def test_bad_adapters_fail_before_any_work(boxed_dir, tmp_path, capsys):
    argv = ["--model", str(boxed_dir), "--questions", str(PROBLEMS_FILE)]
    with pytest.raises(SystemExit) as error:
        history_probe.main([*argv, "--adapter", str(boxed_dir)])  # a full model, not an adapter
    assert error.value.code == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    assert history_probe.model_names(["a/final", "b/final", "c/icpo"]) == {
        "base": None,
        "a/final": "a/final",
        "b/final": "b/final",
        "icpo": "c/icpo",
    }
