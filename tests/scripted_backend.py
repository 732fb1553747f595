"""A generation backend whose completions follow a script, for testing the ME-ICPO logic.

``respond(prompt, params)`` returns the ``params.n`` completion texts of one prompt; tests design
it so that votes, rewards, entropies and evictions have known right results. Every call is
recorded, so tests can count engine calls and inspect the sampling parameters sent.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from icpo_infer.backends import params_per_prompt
from icpo_infer.backends.base import Completion, Generation, SamplingParams, Usage, encode_prompt

Respond = Callable[[str, SamplingParams], list[str]]


class ScriptedBackend:
    """Generation only (the algorithms never score)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, respond: Respond) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.usage = Usage()
        self.calls: list[list[tuple[str, SamplingParams]]] = []

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
