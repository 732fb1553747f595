"""A LoRA adapter merged into its base model's weights, served as a plain model.

On the CPU vLLM engine a LoRA request costs several times the base model's time; merged, an adapter
runs at the base model's speed. :func:`merge_adapter` writes the merged model; :class:`MergedAdapter`
serves it to a run that asks for the adapter by its path, as it would from a LoRA engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from icpo_infer.backends.base import Backend, Generation, SamplingParams, Score, Usage


def merge_adapter(
    base: str | Path, adapter: str | Path, output: str | Path, trust_remote_code: bool = False
) -> None:
    """Save ``base`` with the LoRA ``adapter`` merged into its weights (fp32) as a model directory."""
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(output)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code).save_pretrained(output)


class MergedAdapter:
    """``backend`` runs a model with ``adapter`` merged in (from ``merged_dir``, removed on close): calls
    that name ``adapter``, or none, run it; calls naming another adapter are refused."""

    def __init__(self, backend: Backend, adapter: str, merged_dir: Path) -> None:
        self.backend = backend
        self.adapter = adapter
        self.merged_dir = merged_dir

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backend.tokenizer

    @property
    def usage(self) -> Usage:
        return self.backend.usage

    def _merged(self, adapter: str | None) -> None:
        if adapter not in (None, self.adapter):
            raise ValueError(f"adapter '{adapter}': this engine serves '{self.adapter}' merged, and no other")

    def generate(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams], adapter: str | None = None
    ) -> list[Generation]:
        self._merged(adapter)
        return self.backend.generate(prompts, params)

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        self._merged(adapter)
        return self.backend.score(prompts, completions)

    def release(self, adapter: str) -> None:
        """The merged adapter stays: it is the engine's weights."""

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.merged_dir, ignore_errors=True)
