"""The one interface every generation engine implements, and the types it speaks.

Prompts are fully rendered strings (chat template already applied by :mod:`icpo_infer.prompts`).
Every backend and the trainer turn text into token ids with :func:`encode_prompt` and
:func:`encode_completion`, so inference and training see the same tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"  # what a saved PEFT adapter holds and a full model does not


def adapter_problem(path: str | None) -> str | None:
    """Why ``path`` cannot be a LoRA adapter, or None when it can.

    Backends load an adapter on its first call, after work has been done, so configs check it first:
    a local directory must hold an adapter config, and anything else must be a valid Hub repo id.
    """
    if path is None:
        return None
    if Path(path).is_dir():
        if (Path(path) / ADAPTER_CONFIG).is_file():
            return None
        return f"holds no {ADAPTER_CONFIG}, so it is a full model, not a LoRA adapter"
    problem = location_problem(path)
    return problem and f"{problem}: train the adapter first or fix the path"


def location_problem(path: str) -> str | None:
    """Why ``path`` is neither a local directory nor a Hub repo id, or None when it is one of them."""
    if Path(path).is_dir():
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return "is no directory, nor a Hub repo id"
    return None


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; ``n`` completions per prompt. ``top_k=0`` and ``top_p=1`` switch those filters off.

    ``seed`` makes a prompt's samples a function of the prompt, these parameters and the seed alone:
    every backend draws them from a stream derived from (seed, prompt), so they do not depend on the
    other prompts of the call, their order or how the backend batches them. That holds exactly in
    fp32; in bf16 a batch of another shape rounds the logits differently, and a sample can change by a
    token (seen with the hf backend on an H100). A repeated call is still identical.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, ok, fix in [
            ("n", self.n >= 1, "use n >= 1"),
            ("temperature", self.temperature >= 0, "use temperature >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "use 0 < top_p <= 1"),
            ("top_k", self.top_k >= 0, "use top_k >= 0 (0 = off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "use max_new_tokens >= 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "use repetition_penalty > 0 (1 = off)"),
        ]:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {fix}")

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    text: str
    num_tokens: int
    finished: bool = True  # False when cut by max_new_tokens


@dataclass
class Generation:
    """The ``n`` completions of one prompt."""

    prompt_tokens: int
    completions: list[Completion]


@dataclass
class Usage:
    """What a backend spent since it was created; ME-ICPO reports it."""

    engine_calls: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def record(self, generations: list[Generation]) -> None:
        self.engine_calls += 1
        for generation in generations:
            self.prompt_tokens += generation.prompt_tokens
            self.generated_tokens += sum(c.num_tokens for c in generation.completions)

    def record_scoring(self, num_tokens: int) -> None:
        """One scoring call: it reads ``num_tokens`` (prompts and completions) and generates nothing."""
        self.engine_calls += 1
        self.prompt_tokens += num_tokens


class ServerError(RuntimeError):
    """A server failed a request for good (after retries); the one-line message names its URL."""


@dataclass
class Score:
    """log pi(completion | prompt), summed over the completion's tokens."""

    logprob: float
    num_tokens: int


@runtime_checkable
class Backend(Protocol):
    tokenizer: PreTrainedTokenizerBase
    usage: Usage

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        adapter: str | None = None,
    ) -> list[Generation]:
        """One engine call: sample ``params.n`` completions for each prompt (one params per prompt, or shared)."""
        ...

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        """log-probability of each completion (with its end-of-sequence token) given its prompt.

        One engine call in ``usage``, whose prompt and completion tokens count as prompt tokens."""
        ...

    def release(self, adapter: str) -> None:
        """Free the weights of an adapter passed per call; a later call with it loads it again."""
        ...

    def close(self) -> None:
        """Free the model's memory (and stop the engine's processes) now; the backend is done."""
        ...


@dataclass
class BackendOptions:
    """Engine options shared by all backends; each backend uses those that apply to it."""

    model: str
    adapter: str | None = None
    dtype: str = "auto"  # auto: bf16 where the device supports it, else fp32
    device: str = "auto"
    trust_remote_code: bool = False
    max_batch_tokens: int = 16384  # hf: generation batches are split to stay under this many tokens
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_gb: float | None = (
        None  # vllm: KV cache size; None: gpu_memory_utilization on a GPU, 4 GiB on a CPU
    )
    max_model_len: int | None = None  # vllm: longest prompt + completion the engine plans for
    enforce_eager: bool = False  # vllm: no torch.compile or CUDA graphs
    max_lora_rank: int = 64
    enable_lora: bool = False  # serve adapters passed per call although no default adapter is set
    merge_adapter: bool = False  # hf, vllm: run ``adapter`` merged into the weights, not as LoRA
    base_url: list[str] = field(default_factory=list)  # openai: the servers
    api_key_env: str | None = None  # openai: the environment variable holding the API key
    tokenizer: str | None = None  # openai: the served model's tokenizer, loaded here (default: model)
    max_concurrency: int = 64  # openai: most requests in flight over all servers
    score_concurrency: int | None = None  # openai: most scoring requests in flight per server; None: no cap
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> BackendOptions:
        """The options a run's config carries, read from its fields of the same names; the engine plans
        for the run's ``context_length``, which bounds every prompt + completion."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(config, f.name)]
        options = cls(**{name: getattr(config, name) for name in names})
        if hasattr(config, "context_length"):
            options.max_model_len = config.context_length
        return options


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. Special tokens are already in the text, so none are added."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of a completion as the model emits it: the text, then end-of-sequence."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from a run seed and names (phase, prompt, sample index), stable across runs."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")
