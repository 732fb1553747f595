"""Generation engines behind one interface (:class:`~icpo_infer.backends.base.Backend`).

``make_backend("hf" | "vllm" | "openai", options)`` builds one; each engine module is imported only
when asked for, so vLLM is needed only by those who use it. The helpers below are the option
handling the engines share.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, PreTrainedTokenizerBase

from icpo_infer.backends.base import Backend, BackendOptions, SamplingParams, encode_prompt
from icpo_infer.config import ConfigError, check

BACKENDS = ("hf", "vllm", "openai")
T = TypeVar("T")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_backend(name: str, options: BackendOptions) -> Backend:
    """The backend called ``name`` ("hf", "vllm" or "openai"), loaded with ``options``."""
    check(name in BACKENDS, f"--backend: unknown backend '{name}'. Valid backends: {', '.join(BACKENDS)}.")
    if name == "openai":
        try:
            from icpo_infer.backends.openai import OpenAIBackend
        except ModuleNotFoundError as err:
            check(err.name != "httpx", "--backend openai needs httpx: pip install 'icpo[openai]'.")
            raise
        return OpenAIBackend(options)
    if name == "vllm":
        from icpo_infer.backends.vllm import VLLMBackend as backend_class
    else:
        from icpo_infer.backends.hf import HFBackend as backend_class
    with model_loading(options.model):
        if options.merge_adapter and options.adapter is not None:
            return _merged_backend(backend_class, options)
        return backend_class(options)


def _merged_backend(backend_class: type, options: BackendOptions) -> Backend:
    """The model with ``options.adapter`` merged into its weights (in a temporary directory)."""
    from icpo_infer.backends.merged import MergedAdapter, merge_adapter

    merged_dir = Path(tempfile.mkdtemp(prefix="icpo-merged-"))
    try:
        merge_adapter(options.model, options.adapter, merged_dir, options.trust_remote_code)
        merged = dataclasses.replace(options, model=str(merged_dir), adapter=None, merge_adapter=False)
        return MergedAdapter(backend_class(merged), options.adapter, merged_dir)
    except BaseException:
        shutil.rmtree(merged_dir, ignore_errors=True)
        raise


@contextmanager
def model_loading(model: str, flag: str = "--model") -> Iterator[None]:
    """Refuse a ``model`` that is neither a model directory nor a Hub repo id, before any work; then
    turn transformers' OSError while loading it (its word for a model it cannot find or read) into a
    one-line error."""
    if Path(model).is_dir():
        check(
            (Path(model) / "config.json").is_file(),
            f"{flag}: '{model}' holds no config.json, so it is no model directory; check the path.",
        )
    else:
        try:
            validate_repo_id(model)
        except HFValidationError as err:
            raise ConfigError(
                f"{flag}: '{model}' is no local directory, nor a Hub repo id (ORG/NAME); check the path."
            ) from err
    try:
        yield
    except OSError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"{flag}: cannot load '{model}': {first_line}") from err


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else must be a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"--device: '{name}' is not a device ({err}); use auto, cpu, cuda or cuda:N."
        ) from err
    check(
        device.type != "cuda" or torch.cuda.is_available(),
        f"--device: '{name}' asks for CUDA but none is available; use --device cpu (or auto).",
    )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    check(name in DTYPES, f"--dtype: unknown dtype '{name}'. Valid dtypes: auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def params_per_prompt(
    prompts: list[str], params: SamplingParams | list[SamplingParams]
) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt: a shared one repeated, or the given list checked for length."""
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(
            f"got {len(params)} SamplingParams for {len(prompts)} prompts: give one per prompt or one shared"
        )
    return list(params)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """:func:`encode_prompt` for each prompt; an empty prompt gives the model nothing to condition on."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    empty = [k for k, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} are empty: a prompt needs at least one token")
    return prompt_ids


def context_limit(name: str, options: BackendOptions) -> int | None:
    """The longest prompt + completion ``options.model`` takes on the backend ``name``: its config's
    ``max_position_embeddings``, or on ``openai`` the servers' ``max_model_len``; None where neither says."""
    if name == "openai":
        from icpo_infer.backends.openai import served_context_limit

        return served_context_limit(options)
    with model_loading(options.model):
        config = AutoConfig.from_pretrained(options.model, trust_remote_code=options.trust_remote_code)
    config = getattr(config, "text_config", None) or config  # multimodal models nest the language model's
    return getattr(config, "max_position_embeddings", None)


def resolve_context_length(config: T) -> T:
    """``config`` (any run config with ``context_length`` and the backend fields) with its context length
    set against the model's limit: the limit when it is unset (said in one line); a value above the limit
    is an error naming both."""
    limit = context_limit(config.backend, BackendOptions.from_config(config))
    if config.context_length is None:
        check(
            limit is not None,
            f"context_length: '{config.model}' states no limit (max_position_embeddings); set --context-length.",
        )
        print(f"context length: {limit} tokens, the model's limit (--context-length sets a smaller one)")
        return dataclasses.replace(config, context_length=limit)
    check(
        limit is None or config.context_length <= limit,
        f"context_length={config.context_length} is more than the {limit} tokens '{config.model}' takes; "
        "lower --context-length, or leave it out to use the model's limit.",
    )
    return config
