"""A generation backend whose completions follow a script, for testing the ME-ICPO logic.

``respond(prompt, params)`` returns the ``params.n`` completion texts of one prompt; tests design
it so that votes, rewards, entropies and evictions have known right results. ``confidence(prompt,
completion)``, when given, is the mean token log-probability that ``score`` reports. Every call is
recorded, so tests can count engine calls and inspect the sampling parameters sent.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from icpo_infer.backends import params_per_prompt
from icpo_infer.backends.base import (
    Completion,
    Generation,
    SamplingParams,
    Score,
    Usage,
    encode_completion,
    encode_prompt,
)

Respond = Callable[[str, SamplingParams], list[str]]
Confidence = Callable[[str, str], float]


class ScriptedBackend:
    """Scripted generation, and scoring by a scripted confidence (best-of-n)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, respond: Respond, confidence: Confidence | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.confidence = confidence
        self.usage = Usage()
        self.calls: list[list[tuple[str, SamplingParams]]] = []
        self.scored: list[list[tuple[str, str]]] = []

    def generate(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams], adapter: str | None = None
    ) -> list[Generation]:
        requests = list(zip(prompts, params_per_prompt(prompts, params), strict=True))
        generations = []
        for prompt, p in requests:
            texts = self.respond(prompt, p)
            assert len(texts) == p.n, f"script gave {len(texts)} completions for n={p.n}"
            completions = [Completion(t, len(encode_prompt(self.tokenizer, t))) for t in texts]
            generations.append(Generation(len(encode_prompt(self.tokenizer, prompt)), completions))
        self.calls.append(requests)
        self.usage.record(generations)
        return generations

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        scores, tokens_read = [], 0
        for prompt, completion in zip(prompts, completions, strict=True):
            num_tokens = len(encode_completion(self.tokenizer, completion))
            scores.append(Score(self.confidence(prompt, completion) * num_tokens, num_tokens))
            tokens_read += len(encode_prompt(self.tokenizer, prompt)) + num_tokens
        self.scored.append(list(zip(prompts, completions, strict=True)))
        self.usage.record_scoring(tokens_read)
        return scores
