"""Pretrain the base model of the end-to-end proof: a tiny Llama trained from scratch on question-answer text.

Each training text is exactly what inference shows the model (the prompt of
:func:`icpo_infer.prompts.render_prompt`) followed by the response format that is graded
(``\\boxed{answer}`` then end-of-sequence), tokenized with the same helpers the backends use, with
the loss on the response. So the base model answers in the graded format.

A fraction of the prompts (``pretrain_history_fraction``) carry an *uninformative* history: answers
of other questions under random reward tags. A model trained only on bare prompts is thrown off by
any history (a 3-layer model sums the history's digits too), and the response-level ICPO loss,
which only compares the members of a group with each other, cannot repair a policy that puts its
mass outside the group. Uninformative histories make the base model read the layout and answer the
question whatever the history says; they teach nothing about using it, which is left to ICPO.

Another fraction (``pretrain_copy_fraction``) carry earlier attempts at the *same* question (the
gold answer or a near miss, under random reward tags). With probability ``pretrain_copy_probability``
the response repeats one of them, picked whatever its tag, otherwise it gives the gold answer. This
gives the tiny model what a pretrained LLM brings to in-context learning, copying from its context,
without any preference between the reward buckets: which tag to trust is what ICPO training has to
teach. Off by default; the end-to-end recipes give it a quarter of the texts. Such a base model locks
in wrong answers under ME-ICPO, and ICPO training teaches it which tags to trust
(docs/e2e-findings.md).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from icpo_infer.backends.base import encode_completion, encode_prompt
from icpo_infer.config import check, option
from icpo_infer.data import Problem
from icpo_infer.prompts import Attempt, PromptTemplates, answer_type_of, render_prompt
from icpo_train.e2e.tiny_lm import init_tiny_llama, train_tokenizer

IGNORE_INDEX = -100  # label of prompt tokens: the loss is on the response only
MAX_HISTORY = 4  # entries of a pretraining history: 1 to this many
NEAR_MISSES = (-3, -2, -1, 1, 2, 3)  # offsets of the wrong answers in a history of attempts


@dataclass
class PretrainConfig:
    """The base model's shape and its pretraining budget."""

    vocab_size: int = option(512, "Vocabulary of the tokenizer trained on the task's text.")
    hidden_size: int = option(96, "Hidden size of the tiny Llama.")
    num_layers: int = option(3, "Decoder layers of the tiny Llama.")
    num_heads: int = option(4, "Attention heads (must divide hidden_size).")
    context_length: int = option(512, "Positions of the model; the longest training text must fit.")
    pretrain_steps: int = option(
        1000, "Optimizer steps; the tiny model's accuracy jumps between 650 and 900."
    )
    pretrain_batch_size: int = option(64, "Texts per pretraining step.")
    pretrain_learning_rate: float = option(3e-3, "Peak learning rate (cosine schedule).")
    pretrain_warmup: float = option(0.05, "Warmup, as a fraction of pretrain_steps.")
    pretrain_history_fraction: float = option(
        0.5, "Share of texts whose prompt shows an uninformative history (other questions' answers)."
    )
    pretrain_copy_fraction: float = option(
        0.0, "Share of texts showing earlier attempts at the same question (gold or near misses)."
    )
    pretrain_copy_probability: float = option(
        1.0, "In those texts, the probability that the response repeats an attempt (else the gold answer)."
    )
    seed: int = option(0, "Seed of the texts' histories, the initial weights and the data order.")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "context_length"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: use a positive value.")
        check(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: change one of them.",
        )
        check(self.pretrain_steps >= 1, f"pretrain_steps={self.pretrain_steps}: use at least 1 step.")
        check(
            self.pretrain_batch_size >= 1, f"pretrain_batch_size={self.pretrain_batch_size}: use at least 1."
        )
        check(
            self.pretrain_learning_rate > 0, f"pretrain_learning_rate={self.pretrain_learning_rate}: use > 0."
        )
        check(
            0 <= self.pretrain_history_fraction <= 1,
            f"pretrain_history_fraction={self.pretrain_history_fraction}: use a fraction in [0, 1].",
        )
        check(
            self.pretrain_copy_fraction >= 0
            and self.pretrain_history_fraction + self.pretrain_copy_fraction <= 1,
            f"pretrain_copy_fraction={self.pretrain_copy_fraction}: use a fraction >= 0 that, with "
            f"pretrain_history_fraction={self.pretrain_history_fraction}, sums to at most 1.",
        )
        check(
            0 <= self.pretrain_copy_probability <= 1,
            f"pretrain_copy_probability={self.pretrain_copy_probability}: use a probability in [0, 1].",
        )


def response_text(answer: str) -> str:
    """The response the base model learns to give: the answer in the format the grader extracts."""
    return "\\boxed{" + answer + "}"


def uninformative_history(problems: Sequence[Problem], rng: random.Random) -> list[Attempt]:
    """Answers to random questions of the split under random reward tags: a history's layout, no information."""
    others = rng.sample(problems, rng.randint(1, min(MAX_HISTORY, len(problems))))
    return [Attempt(response_text(other.answer), other.answer, rng.randint(0, 1)) for other in others]


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the integer ``answer``: never negative, never the answer itself."""
    return str(rng.choice([int(answer) + d for d in NEAR_MISSES if int(answer) + d >= 0]))


def attempts_at(problem: Problem, copy_probability: float, rng: random.Random) -> tuple[list[Attempt], str]:
    """Earlier attempts at ``problem`` (each the gold answer or a near miss, under a random reward tag)
    and the response of a copying text: with ``copy_probability`` the answer of one of them, picked
    whatever its tag, otherwise the gold answer."""
    answers = [
        problem.answer if rng.random() < 0.5 else near_miss(problem.answer, rng)
        for _ in range(rng.randint(1, MAX_HISTORY))
    ]
    attempts = [Attempt(response_text(a), a, rng.randint(0, 1)) for a in answers]
    # Draw the copy's coin only when it can matter, so probability 1 keeps the earlier random stream.
    copies = copy_probability == 1 or rng.random() < copy_probability
    return attempts, rng.choice(answers) if copies else problem.answer


def training_example(
    problem: Problem, problems: Sequence[Problem], config: PretrainConfig, rng: random.Random
) -> tuple[list[Attempt], str]:
    """The history one pretraining text shows for ``problem`` and the answer its response gives."""
    draw = rng.random()
    if draw < config.pretrain_history_fraction:
        return uninformative_history(problems, rng), problem.answer
    if draw < config.pretrain_history_fraction + config.pretrain_copy_fraction:
        return attempts_at(problem, config.pretrain_copy_probability, rng)
    return [], problem.answer


def pretrain(
    problems: Sequence[Problem],
    config: PretrainConfig,
    output_dir: str | Path,
    templates: PromptTemplates | None = None,
) -> Path:
    """Train a tokenizer and a tiny Llama on ``problems`` and save both to ``output_dir`` (safetensors).

    ``templates`` is the prompt wording that inference and ICPO training will use with this model.
    """
    check(len(problems) > 0, "pretrain: the training split is empty; use a train_size > 0.")
    rng = random.Random(config.seed)

    def prompt(tokenizer, problem: Problem, history: list[Attempt]) -> str:
        return render_prompt(tokenizer, problem.problem, history, answer_type_of(problem.answer), templates)

    examples = [(p, *training_example(p, problems, config, rng)) for p in problems]
    # The tokenizer must exist to render prompts (BOS, chat template) and the prompts to train it:
    # render with a bootstrap tokenizer that has the same special tokens, then train the real one.
    # Its corpus always holds the history wording, so that a history costs a few tokens per line.
    bootstrap = train_tokenizer([p.problem for p in problems], vocab_size=config.vocab_size)
    texts = [prompt(bootstrap, p, h) + response_text(a) for p, h, a in examples]
    texts += [prompt(bootstrap, p, uninformative_history(problems, rng)) for p in problems]
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)

    def encode(problem: Problem, history: list[Attempt], answer: str) -> dict[str, list[int]]:
        prompt_ids = encode_prompt(tokenizer, prompt(tokenizer, problem, history))
        response_ids = encode_completion(tokenizer, response_text(answer))
        return {
            "input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        }

    dataset = Dataset.from_list([encode(*example) for example in examples])
    longest = max(len(ids) for ids in dataset["input_ids"])
    check(
        longest <= config.context_length,
        f"context_length={config.context_length} is shorter than the longest training text ({longest} tokens).",
    )
    model = init_tiny_llama(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        context_length=config.context_length,
        seed=config.seed,
    )
    with tempfile.TemporaryDirectory() as scratch:  # no mid-run checkpoints: the stage reruns whole
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.pretrain_steps,
            per_device_train_batch_size=config.pretrain_batch_size,
            learning_rate=config.pretrain_learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=config.pretrain_warmup,
            weight_decay=0.01,
            logging_steps=max(1, config.pretrain_steps // 10),
            save_strategy="no",
            report_to="none",
            seed=config.seed,
            dataloader_pin_memory=torch.accelerator.is_available(),  # torch warns when there is none
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)
