"""Prompt rendering: layout, chat vs plain models, and token-identical re-rendering for training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest
from conftest import read_benchmark
from transformers import AutoTokenizer

from icpo_infer.backends.base import encode_prompt
from icpo_infer.config import ConfigError
from icpo_infer.prompts import (
    Attempt,
    PromptTemplates,
    answer_type_of,
    render_feedback_prompt,
    render_prompt,
    render_refine_prompt,
    render_summary_prompt,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "infer" / "templates.yaml"
QUESTION = "Find $x$ such that $\\frac{x}{2} = \\{answer\\}$ and {answer} holds."  # braces must survive
HISTORY = [
    Attempt("Halve both sides.", "4", 1),
    Attempt("Guess and check.", "\\frac{1}{2}", 0),
    Attempt("Cross-multiply, then simplify.", "4.0", 1),
    Attempt("Ran out of time.", None, 0),
]


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_model_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def positions(text: str, parts: list[str]) -> list[int]:
    found = [text.find(part) for part in parts]
    assert -1 not in found, [p for p, i in zip(parts, found, strict=True) if i == -1]
    return found


def test_history_is_rendered_as_two_ordered_buckets(plain_tokenizer):
    t = PromptTemplates()
    prompt = render_prompt(plain_tokenizer, QUESTION, HISTORY, "integer")
    order = [
        t.answer_format_integer,
        t.history_instruction,
        QUESTION,
        t.reward_1_heading,
        "- Halve both sides. The answer is \\boxed{4}.",
        "- Cross-multiply, then simplify. The answer is \\boxed{4.0}.",
        t.reward_0_heading,
        "- Guess and check. The answer is \\boxed{\\frac{1}{2}}.",
        "- Ran out of time.",
        t.plain_cue,
    ]
    found = positions(prompt, order)
    assert found == sorted(found)
    assert t.empty_bucket not in prompt


def test_round_one_is_the_plain_question_prompt(plain_tokenizer):
    t = PromptTemplates()
    prompt = render_prompt(plain_tokenizer, QUESTION, [], "expression")
    assert (
        prompt
        == f"{plain_tokenizer.bos_token}{t.answer_format_expression}\n\nProblem:\n{QUESTION}\n\nSolution:\n"
    )
    for absent in (t.history_instruction, t.reward_1_heading, t.reward_0_heading):
        assert absent not in prompt


def test_an_empty_bucket_keeps_its_heading(plain_tokenizer):
    t = PromptTemplates()
    prompt = render_prompt(plain_tokenizer, "What is 2+2?", [Attempt("Add.", "4", 1)])
    found = positions(prompt, [t.reward_1_heading, "Add.", t.reward_0_heading, t.empty_bucket])
    assert found == sorted(found)
    assert prompt.count(t.empty_bucket) == 1


def test_answer_format_follows_the_answer_type(plain_tokenizer):
    t = PromptTemplates()
    for answer_type, instruction in [
        ("integer", t.answer_format_integer),
        ("expression", t.answer_format_expression),
        ("choice", t.answer_format_choice),
    ]:
        prompt = render_prompt(plain_tokenizer, "Q", [], answer_type)
        assert instruction in prompt and "\\boxed{}" in prompt
    with pytest.raises(ConfigError, match="answer_type 'number'"):
        render_prompt(plain_tokenizer, "Q", [], "number")


def test_answer_types_of_the_real_benchmarks():
    assert {answer_type_of(row["answer"]) for row in read_benchmark("aime2024")} == {"integer"}  # "025"
    assert {answer_type_of(row["answer"]) for row in read_benchmark("amc")} == {"integer"}  # "142.0"
    math500 = {row["answer"]: answer_type_of(row["answer"]) for row in read_benchmark("math500")}
    assert math500["9"] == "integer"
    assert math500["\\frac{14}{3}"] == "expression"
    assert math500["\\text{Evelyn}"] == "expression"
    assert [answer_type_of(g) for g in ("C", "(B)", "\\text{(E)}", "-3", "2.5")] == [
        "choice",
        "choice",
        "choice",
        "integer",
        "expression",
    ]


def test_base_model_prompt_starts_with_bos(plain_tokenizer):
    assert plain_tokenizer.chat_template is None and plain_tokenizer.bos_token
    for prompt in (
        render_prompt(plain_tokenizer, QUESTION, HISTORY),
        render_summary_prompt(plain_tokenizer, "Q", "R"),
    ):
        assert prompt.startswith(plain_tokenizer.bos_token)
        ids = encode_prompt(plain_tokenizer, prompt)
        assert ids[0] == plain_tokenizer.bos_token_id and ids.count(plain_tokenizer.bos_token_id) == 1


def test_chat_model_prompt_uses_the_chat_template(chat_tokenizer):
    prompt = render_prompt(chat_tokenizer, QUESTION, HISTORY, "integer")
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert PromptTemplates().plain_cue not in prompt and not prompt.startswith(chat_tokenizer.bos_token)
    assert PromptTemplates().reward_0_heading in prompt
    with_system = render_prompt(
        chat_tokenizer, QUESTION, HISTORY, "integer", PromptTemplates(system="Be brief.")
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n" + prompt


def test_summary_prompt_holds_question_and_response(plain_tokenizer, chat_tokenizer):
    response = "We halve both sides, so $x = 4$ and the answer is \\boxed{4}."
    for tokenizer in (plain_tokenizer, chat_tokenizer):
        prompt = render_summary_prompt(tokenizer, QUESTION, response)
        found = positions(prompt, [QUESTION, response, "Summarise the key idea"])
        assert found == sorted(found)
    assert render_summary_prompt(plain_tokenizer, "Q", response).endswith("Summary:\n")


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_training_rerenders_the_same_tokens(which, plain_tokenizer, chat_tokenizer):
    """Training renders history read back from a trajectory table; the token ids must not change."""
    tokenizer = plain_tokenizer if which == "plain" else chat_tokenizer
    original = encode_prompt(tokenizer, render_prompt(tokenizer, QUESTION, HISTORY, "integer"))
    assert encode_prompt(tokenizer, render_prompt(tokenizer, QUESTION, HISTORY, "integer")) == original

    rows = json.loads(json.dumps([dataclasses.asdict(a) for a in HISTORY]))
    from_json = [Attempt(**row) for row in rows]
    assert encode_prompt(tokenizer, render_prompt(tokenizer, QUESTION, from_json, "integer")) == original

    table = datasets.Dataset.from_list([{"question": QUESTION, "history": rows}])
    row = table[0]
    from_table = [Attempt(**entry) for entry in row["history"]]
    assert (
        encode_prompt(tokenizer, render_prompt(tokenizer, row["question"], from_table, "integer")) == original
    )


def test_reward_must_be_zero_or_one():
    with pytest.raises(ValueError, match="reward"):
        Attempt("text", "1", 2)


def test_example_template_file_holds_every_default():
    assert PromptTemplates.from_yaml(RECIPE) == PromptTemplates()
    assert set(RECIPE.read_text().split()) >= {f"{f.name}:" for f in dataclasses.fields(PromptTemplates)}


def test_yaml_overrides_templates(tmp_path, plain_tokenizer):
    path = tmp_path / "templates.yaml"
    path.write_text(
        "reward_1_heading: 'Accepted ideas:'\n"
        "entry: '* {text} => \\boxed{{answer}}'\n"
        "problem: |-\n  Question: {question}\n"
    )
    templates = PromptTemplates.from_yaml(path)
    assert templates.reward_0_heading == PromptTemplates().reward_0_heading  # untouched keys keep defaults
    prompt = render_prompt(plain_tokenizer, "What is 2+2?", [Attempt("Add.", "4", 1)], templates=templates)
    assert "Question: What is 2+2?" in prompt
    assert "Accepted ideas:\n* Add. => \\boxed{4}" in prompt


def test_self_refine_prompts_show_the_attempt_and_its_feedback(tmp_path, plain_tokenizer, chat_tokenizer):
    path = tmp_path / "templates.yaml"
    path.write_text("feedback: 'Check: {response}'\nrefine: 'Q {question} A {response} F {feedback}'\n")
    templates = PromptTemplates.from_yaml(path)
    attempt, feedback = "x = \\frac{1}{2} so \\boxed{4}", "Step 2 is {wrong}."
    prompt = render_feedback_prompt(plain_tokenizer, "What is 2+2?", attempt, templates)
    assert prompt.endswith(f"Check: {attempt}\n\nFeedback:\n")
    prompt = render_refine_prompt(plain_tokenizer, "What is 2+2?", attempt, feedback, "integer", templates)
    # the answer-format instruction first; braces in the texts stay literal
    expected = f"{PromptTemplates().answer_format_integer}\n\nQ What is 2+2? A {attempt} F {feedback}"
    assert prompt.endswith(f"{expected}\n\nSolution:\n")
    chat = render_refine_prompt(chat_tokenizer, "What is 2+2?", attempt, feedback, "integer", templates)
    assert expected in chat and chat.startswith("<|im_start|>user")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("reward_one_heading: 'x'\n", "unknown key 'reward_one_heading'"),
        ("entry: '- {answer}'\n", "'entry' must contain \\{text\\}"),
        ("reward_1_heading: 'Ideas for {question}'\n", "'reward_1_heading' uses \\['question'\\]"),
        ("plain_cue: 3\n", "'plain_cue' must be a string"),
        ("refine: '{question} {response}'\n", "'refine' must contain \\{feedback\\}"),
    ],
)
def test_bad_template_files_are_config_errors(tmp_path, yaml_text, message):
    path = tmp_path / "templates.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        PromptTemplates.from_yaml(path)


def test_prompt_format_forces_plain_text_or_the_chat_template(plain_tokenizer, chat_tokenizer):
    plain = PromptTemplates(prompt_format="plain")
    forced = render_prompt(chat_tokenizer, QUESTION, HISTORY, "integer", plain)
    assert "<|im_start|>" not in forced and forced.endswith(PromptTemplates().plain_cue + "\n")
    assert forced == render_prompt(plain_tokenizer, QUESTION, HISTORY, "integer", plain)
    assert "<|im_start|>" not in render_summary_prompt(chat_tokenizer, QUESTION, "R", plain)
    chat = PromptTemplates(prompt_format="chat")
    assert render_prompt(chat_tokenizer, QUESTION, HISTORY, "integer", chat) == render_prompt(
        chat_tokenizer, QUESTION, HISTORY, "integer"
    )
    with pytest.raises(ConfigError, match="has no chat template; use prompt_format auto or plain"):
        render_prompt(plain_tokenizer, QUESTION, HISTORY, "integer", chat)
    with pytest.raises(ConfigError, match="'prompt_format' is 'text'; use one of auto, chat, plain"):
        PromptTemplates(prompt_format="text")
