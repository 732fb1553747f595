"""Prompt rendering for ME-ICPO, shared by inference and training.

The trainer renders trajectory rows with these same functions, so the prompts a model is trained
on and the prompts it sees at test time are identical token for token. Rendering is a pure
function of (tokenizer, question, history, answer type, templates).

Layout of the question prompt (the history part only from round 2 on)::

    <answer-format instruction> <history instruction>

    Problem:
    <question>

    Ideas with reward 1 ...:      <- earlier attempts that agree with the consensus (or are correct)
    - <summary> The answer is \\boxed{<answer>}.
    Ideas with reward 0 ...:
    - (none yet)

Models with a chat template get it as one user message (plus an optional system message); base
models get the text after their BOS token, followed by a cue such as "Solution:" (also those whose
tokenizer ships a chat template, with ``prompt_format: plain``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from icpo_infer.config import check, check_keys, load_recipe
from icpo_infer.grading import choice_letter

ANSWER_TYPES = ("integer", "expression", "choice")
PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass(frozen=True)
class Attempt:
    """One history entry: an earlier attempt's summary (or text), its answer and its reward (0 or 1)."""

    text: str
    answer: str | None
    reward: int

    def __post_init__(self) -> None:
        if self.reward not in (0, 1):
            raise ValueError(f"Attempt.reward must be 0 or 1, got {self.reward!r}")


@dataclass(frozen=True)
class PromptTemplates:
    """All the wording of the prompts. Placeholders are written ``{name}`` and everything else is
    literal text, so LaTeX needs no escaping: ``\\boxed{{answer}}`` renders ``\\boxed{42}``."""

    system: str = ""  # a system message for chat models; empty = none
    # auto: the chat template when the tokenizer has one; chat: always (an error without one); plain:
    # never. Base models such as Qwen2.5-Math ship a chat template but are prompted with plain text.
    prompt_format: str = "auto"
    answer_format_integer: str = (
        "Solve the following math problem. The answer is an integer. "
        "Reason step by step and put your final answer within \\boxed{}."
    )
    answer_format_expression: str = (
        "Solve the following math problem. Reason step by step and put your final answer, "
        "in simplest form, within \\boxed{}."
    )
    answer_format_choice: str = (
        "Solve the following multiple-choice problem. Reason step by step and put the letter "
        "of the correct option within \\boxed{}, for example \\boxed{C}."
    )
    history_instruction: str = (
        "Below the problem are key ideas from your earlier attempts at it. Each idea is tagged "
        "with reward 1 (its answer agrees with the consensus of your attempts or is correct) "
        "or reward 0 (it does not). Build on the reward-1 ideas and avoid the mistakes of the "
        "reward-0 ideas."
    )
    problem: str = "Problem:\n{question}"
    reward_1_heading: str = "Ideas with reward 1 (agree with the consensus or correct):"
    reward_0_heading: str = "Ideas with reward 0:"
    entry: str = "- {text} The answer is \\boxed{{answer}}."
    entry_without_answer: str = "- {text}"
    empty_bucket: str = "- (none yet)"
    plain_cue: str = "Solution:"  # ends the prompt of a model without a chat template
    summary: str = (
        "Here is a math problem and one attempt at solving it.\n\n"
        "Problem:\n{question}\n\n"
        "Attempt:\n{response}\n\n"
        "Summarise the key idea of this attempt in a few sentences: the approach and the "
        "decisive steps, without detailed calculations and without stating the final answer."
    )
    summary_plain_cue: str = "Summary:"
    # self-refine: the model reviews one of its attempts, then rewrites it with that feedback.
    feedback: str = (
        "Here is a math problem and one attempt at solving it.\n\n"
        "Problem:\n{question}\n\n"
        "Attempt:\n{response}\n\n"
        "Review this attempt step by step. Point out every error in its reasoning or calculations "
        "and say how to fix it; if it is correct, say so. Do not write a new solution."
    )
    feedback_plain_cue: str = "Feedback:"
    refine: str = (
        "Problem:\n{question}\n\n"
        "Your earlier attempt:\n{response}\n\n"
        "Feedback on that attempt:\n{feedback}\n\n"
        "Write an improved solution that takes the feedback into account."
    )

    def __post_init__(self) -> None:
        check(
            self.prompt_format in PROMPT_FORMATS,
            f"prompt template 'prompt_format' is '{self.prompt_format}'; use one of {', '.join(PROMPT_FORMATS)}.",
        )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check(isinstance(value, str), f"prompt template '{field.name}' must be a string, got {value!r}.")
            allowed, required = _PLACEHOLDERS.get(field.name, ((), ()))
            used = set(_PLACEHOLDER.findall(value))
            unexpected = used - set(allowed)
            check(
                not unexpected,
                f"prompt template '{field.name}' uses {sorted(unexpected)}; it may use only "
                f"{sorted(allowed) or 'no placeholders'}.",
            )
            missing = set(required) - used
            check(
                not missing, f"prompt template '{field.name}' must contain {{{', '.join(sorted(missing))}}}."
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> PromptTemplates:
        """Defaults overridden by the keys of a YAML file (unknown keys are a ConfigError)."""
        overrides = load_recipe(path, flag="--templates")
        check_keys(cls, list(overrides), f"prompt templates '{path}'")
        return cls(**overrides)

    def answer_format(self, answer_type: str) -> str:
        check(
            answer_type in ANSWER_TYPES, f"answer_type '{answer_type}' is unknown; use one of {ANSWER_TYPES}."
        )
        return getattr(self, f"answer_format_{answer_type}")


# Per template: (placeholders it may use, placeholders it must use).
_PLACEHOLDERS = {
    "problem": (("question",), ("question",)),
    "entry": (("text", "answer"), ("text",)),
    "entry_without_answer": (("text",), ("text",)),
    "summary": (("question", "response"), ("response",)),
    "feedback": (("question", "response"), ("response",)),
    "refine": (("question", "response", "feedback"), ("question", "response", "feedback")),
}
_PLACEHOLDER = re.compile(r"\{(question|text|answer|response|feedback)\}")


def _fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders in one pass, so braces inside the values (LaTeX) and any
    ``{name}`` text they contain are left untouched."""
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)


def answer_type_of(gold: str) -> str:
    """The answer type of a reference answer: "integer" (``25``, ``025``, AMC's ``142.0``),
    "choice" (an option letter such as ``C``, ``(C)`` or ``\\text{(C)}``, see
    :func:`icpo_infer.grading.choice_letter`) or "expression"."""
    gold = str(gold).strip().strip("$").strip()
    if re.fullmatch(r"[-+]?\d+(?:\.0*)?", gold):
        return "integer"
    if choice_letter(gold):
        return "choice"
    return "expression"


def _chat_or_plain(
    tokenizer: PreTrainedTokenizerBase, user: str, cue: str, templates: PromptTemplates
) -> str:
    """The final prompt string: the chat template (``templates.prompt_format``: auto when the tokenizer has
    one, or chat), else BOS + text + cue."""
    check(
        templates.prompt_format != "chat" or bool(tokenizer.chat_template),
        "prompt_format 'chat': the model's tokenizer has no chat template; use prompt_format auto or plain.",
    )
    if tokenizer.chat_template and templates.prompt_format != "plain":
        system = [{"role": "system", "content": templates.system}] if templates.system else []
        messages = [*system, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [templates.system, user, cue]
    return (tokenizer.bos_token or "") + "\n\n".join(part for part in parts if part) + "\n"


def _bucket(heading: str, attempts: list[Attempt], templates: PromptTemplates) -> str:
    lines = [heading]
    for attempt in attempts:
        if attempt.answer is None:
            lines.append(_fill(templates.entry_without_answer, text=attempt.text.strip()))
        else:
            lines.append(_fill(templates.entry, text=attempt.text.strip(), answer=attempt.answer))
    if not attempts:
        lines.append(templates.empty_bucket)
    return "\n".join(lines)


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    history: Sequence[Attempt] = (),
    answer_type: str = "expression",
    templates: PromptTemplates | None = None,
) -> str:
    """The prompt for one round: instructions, the question, then the reward-1 and reward-0
    buckets of ``history`` (each in its original order). Without history it is the plain
    question prompt of round 1."""
    templates = templates or PromptTemplates()
    instructions = templates.answer_format(answer_type)
    sections = [_fill(templates.problem, question=question.strip())]
    if history:
        instructions += " " + templates.history_instruction
        for reward, heading in ((1, templates.reward_1_heading), (0, templates.reward_0_heading)):
            sections.append(_bucket(heading, [a for a in history if a.reward == reward], templates))
    user = "\n\n".join([instructions, *sections])
    return _chat_or_plain(tokenizer, user, templates.plain_cue, templates)


def render_summary_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    response: str,
    templates: PromptTemplates | None = None,
) -> str:
    """The prompt asking the model to compress ``response`` into its key idea. The answer is not
    part of the summary: the history entry shows it (``templates.entry``)."""
    templates = templates or PromptTemplates()
    user = _fill(templates.summary, question=question.strip(), response=response.strip())
    return _chat_or_plain(tokenizer, user, templates.summary_plain_cue, templates)


def render_feedback_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    response: str,
    templates: PromptTemplates | None = None,
) -> str:
    """self-refine: the prompt asking the model to review its own ``response``."""
    templates = templates or PromptTemplates()
    user = _fill(templates.feedback, question=question.strip(), response=response.strip())
    return _chat_or_plain(tokenizer, user, templates.feedback_plain_cue, templates)


def render_refine_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    response: str,
    feedback: str,
    answer_type: str = "expression",
    templates: PromptTemplates | None = None,
) -> str:
    """self-refine: the answer-format instruction, then the request to rewrite ``response`` with ``feedback``."""
    templates = templates or PromptTemplates()
    filled = _fill(
        templates.refine, question=question.strip(), response=response.strip(), feedback=feedback.strip()
    )
    user = "\n\n".join([templates.answer_format(answer_type), filled])
    return _chat_or_plain(tokenizer, user, templates.plain_cue, templates)
