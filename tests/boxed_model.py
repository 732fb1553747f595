"""A tiny model that answers in \\boxed{}: the random tiny model taught for a few seconds.

A randomly initialised model never writes a \\boxed{} answer, so every response would be invalid
and ME-ICPO would skip its summary, probe and eviction phases. Teaching the model to end any
prompt with ``\\boxed{d}`` (d mostly 5, else another digit) gives valid, varied answers, so the
real backend goes through every phase. Shared by the CLI tests and benchmarks/me_icpo_calls.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from icpo_infer.backends.base import encode_completion, encode_prompt
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt, render_summary_prompt


def teaching_prompts(
    tokenizer, questions: Sequence[str], templates: PromptTemplates | None = None
) -> list[str]:
    """The prompt shapes ME-ICPO sends: bare questions, questions with history, summary requests."""
    history = [Attempt("an idea", "5", 1), Attempt("another idea", "3", 0)]
    prompts = []
    for question in questions:
        prompts.append(render_prompt(tokenizer, question, templates=templates))
        prompts.append(render_prompt(tokenizer, question, history, templates=templates))
        prompts.append(render_summary_prompt(tokenizer, question, "some work \\boxed{5}", templates))
    return prompts


def teach_boxed_answers(
    model_dir: str | Path,
    output_dir: str | Path,
    questions: Sequence[str],
    steps: int = 150,
    seed: int = 0,
    templates: PromptTemplates | None = None,
) -> Path:
    """Fine-tune the model at ``model_dir`` to answer every prompt (rendered with ``templates``) with
    ``\\boxed{d}``; save it to ``output_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    prompts = [encode_prompt(tokenizer, p) for p in teaching_prompts(tokenizer, questions, templates)]
    model.train()
    for _ in range(steps):
        prompt = rng.choice(prompts)
        digit = 5 if rng.random() < 0.6 else rng.randrange(10)
        answer = encode_completion(tokenizer, f"\\boxed{{{digit}}}")
        input_ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)
