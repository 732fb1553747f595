"""The openai backend: OpenAI-compatible inference servers (``vllm serve``, one or several) do the work.

Prompts go to the completions endpoint as token ids from :func:`encode_prompt` (vLLM accepts them), so
the tokens match training exactly; the tokenizer is loaded here to render prompts and count tokens.
Each prompt is one request, sampled as the vllm backend asks its engine (:func:`to_vllm_sampling_kwargs`,
vLLM's own fields in the request body), so a seeded prompt samples the same through a vLLM server as
on the offline engine. Up to ``max_concurrency`` requests are in flight, each sent to the server with
the fewest outstanding, so one phase keeps every server busy.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from icpo_infer.backends import encode_prompts, params_per_prompt
from icpo_infer.backends.base import (
    BackendOptions,
    Completion,
    Generation,
    SamplingParams,
    Score,
    ServerError,
    Usage,
    derive_seed,
    encode_completion,
)
from icpo_infer.backends.vllm import repeat_greedy, to_vllm_sampling_kwargs
from icpo_infer.config import ConfigError, check

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRIES = 6
BACKOFF_S = 0.5  # the first retry waits up to this long, each later one up to twice as long as the last
MAX_BACKOFF_S = 8.0
# A long generation on a loaded server takes minutes; a server that does not even accept the
# connection is down.
TIMEOUT = httpx.Timeout(1800.0, connect=10.0)
RUNTIME_LORA = (
    "start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or serve the adapter "
    "with --lora-modules NAME=PATH and pass --adapter NAME"
)


class _Server:
    def __init__(self, url: str, headers: dict[str, str], score_concurrency: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)
        # Model and adapter names, each with its max_model_len (None where the server does not say).
        self.served: dict[str, int | None] = {}
        # Scoring requests in flight here: see OpenAIBackend.score.
        self.scoring = (
            threading.Semaphore(score_concurrency) if score_concurrency else contextlib.nullcontext()
        )
        self.outstanding = 0
        self.requests = 0


class OpenAIBackend:
    """The servers at ``options.base_url``, all serving ``options.model``.

    Adapters: a name every server already serves (``--lora-modules NAME=PATH``) is used as is; a path is
    loaded into every server on its first call (vLLM's runtime LoRA loading) and unloaded by
    :meth:`release`, so the servers must see the path (same machine or a shared file system).
    ``adapter=None`` runs ``options.adapter`` when one was given, else the base model.

    A request that fails with 429, 5xx, a timeout or a dropped connection is retried with exponential
    backoff and full jitter, ``TRIES`` times in all; then :class:`ServerError` names the server.
    """

    def __init__(self, options: BackendOptions) -> None:
        check(options.max_concurrency >= 1, f"--max-concurrency={options.max_concurrency}: use 1 or more.")
        self.options = options
        self.servers = connect(options)
        self.tokenizer = AutoTokenizer.from_pretrained(
            options.tokenizer or options.model, trust_remote_code=options.trust_remote_code
        )
        self.usage = Usage()
        self._pool = ThreadPoolExecutor(options.max_concurrency, thread_name_prefix="openai-backend")
        self._lock = threading.Lock()
        self._jitter = random.Random()  # not the global generator, which seeded code may rely on
        self._loaded: dict[str, str] = {}  # adapter path -> the name it was loaded under

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        adapter: str | None = None,
    ) -> list[Generation]:
        """``n`` completions per prompt, one request per prompt, all in flight together.

        vLLM refuses ``n > 1`` at temperature 0; greedy decoding has one answer, so it is decoded once and
        repeated ``n`` times (counted once in ``usage``, as it was generated once).
        """
        per_prompt = params_per_prompt(prompts, params)
        model = self._model_for(adapter)
        bodies = [
            {"model": model, "prompt": ids, **to_vllm_sampling_kwargs(p, prompt), "return_token_ids": True}
            for prompt, ids, p in zip(
                prompts, encode_prompts(self.tokenizer, prompts), per_prompt, strict=True
            )
        ]
        generations = [self._generation(response) for response in self._complete_all(bodies)]
        self.usage.record(generations)
        return repeat_greedy(generations, per_prompt)

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        """Sum of the completion tokens' log-probs (EOS included), read from the server's prompt log-probs."""
        if len(prompts) != len(completions):
            raise ValueError(f"score() got {len(prompts)} prompts and {len(completions)} completions")
        model = self._model_for(adapter)
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        sequences = [
            ids + encode_completion(self.tokenizer, c) for ids, c in zip(prompt_ids, completions, strict=True)
        ]
        # prompt_logprobs=1 returns the actual token's log-prob at every position (plus the top-1).
        bodies = [{"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 1} for ids in sequences]
        # vLLM's CPU build, started with --enable-lora, fails on the prompt log-probs of an engine step
        # that holds two requests (its LoRA logits kernel maps adapters per request, not per prompt
        # token), adapter or not, and the failure kills the server. The API does not tell whether a
        # server has LoRA enabled: options.score_concurrency = 1 makes each server score one request at
        # a time there.
        responses = self._complete_all(bodies, scoring=True)
        self.usage.record_scoring(sum(response["usage"]["prompt_tokens"] for response in responses))
        return [
            score_from_prompt_logprobs(response["choices"][0].get("prompt_logprobs"), ids, len(prompt))
            for response, ids, prompt in zip(responses, sequences, prompt_ids, strict=True)
        ]

    def release(self, adapter: str) -> None:
        """Unload a per-call adapter from every server; ``options.adapter`` stays. A later call loads it again."""
        if adapter != self.options.adapter and adapter in self._loaded:
            self._unload(adapter)

    def close(self) -> None:
        """Unload the adapters this backend loaded and close its connections; the servers keep running."""
        for adapter in list(self._loaded):
            self._unload(adapter)
        self._pool.shutdown(cancel_futures=True)
        for server in self.servers:
            server.client.close()

    def _model_for(self, adapter: str | None) -> str:
        """The ``model`` field of a request that runs ``adapter`` (loaded into every server if it is a path)."""
        path = adapter if adapter is not None else self.options.adapter
        if path is None:
            return self.options.model
        if all(path in server.served for server in self.servers):
            return path
        if path not in self._loaded:
            location = str(Path(path).resolve()) if Path(path).is_dir() else path
            name = f"icpo-{Path(path).name}-{derive_seed(location):08x}"
            for server in self.servers:
                response = self._post(
                    server,
                    "/load_lora_adapter",
                    # in place: a path that was loaded before (by an earlier run) may hold new weights now
                    {"lora_name": name, "lora_path": location, "load_inplace": True},
                )
                check(
                    response.status_code != 404,
                    f"adapter '{path}': {server.url} cannot load LoRA adapters at run time; {RUNTIME_LORA}.",
                )
                check(
                    response.is_success,
                    f"adapter '{path}': {server.url} could not load it ({error_message(response)}); "
                    f"the server must see the path and serve LoRA: {RUNTIME_LORA}.",
                )
            self._loaded[path] = name
        return self._loaded[path]

    def _unload(self, adapter: str) -> None:
        name = self._loaded.pop(adapter)
        for server in self.servers:
            response = self._post(server, "/unload_lora_adapter", {"lora_name": name})
            if not response.is_success:
                raise ServerError(
                    f"{server.url} could not unload adapter '{adapter}' ({error_message(response)})"
                )

    def _complete_all(self, bodies: list[dict[str, Any]], scoring: bool = False) -> list[dict[str, Any]]:
        """The completions responses of all ``bodies``, requested concurrently (``scoring`` requests at
        most ``options.score_concurrency`` per server); the first failure stops the call (requests not yet
        sent are dropped)."""
        futures = [self._pool.submit(self._complete, body, scoring) for body in bodies]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def _complete(self, body: dict[str, Any], scoring: bool) -> dict[str, Any]:
        with self._lock:  # least outstanding requests
            server = min(self.servers, key=lambda s: s.outstanding)
            server.outstanding += 1
            server.requests += 1
        try:
            with server.scoring if scoring else contextlib.nullcontext():
                response = self._post(server, "/completions", body)
        finally:
            with self._lock:
                server.outstanding -= 1
        if not response.is_success:
            raise ServerError(
                f"{server.url} refused a completions request ({response.status_code}: {error_message(response)})"
            )
        return response.json()

    def _post(self, server: _Server, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST, retrying what may pass: 429, 5xx, timeouts and dropped connections."""
        problem = ""
        for attempt in range(TRIES):
            if attempt:
                time.sleep(self._jitter.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1))))
            try:
                response = server.client.post(path, json=body)
            except httpx.TransportError as err:
                problem = one_line(f"{type(err).__name__}: {err}")
                continue
            if response.status_code not in RETRIED_STATUS:
                return response
            problem = f"HTTP {response.status_code}: {error_message(response)}"
        raise ServerError(
            f"{server.url} failed a request {TRIES} times, the last with {problem}; once the server is up "
            "again, rerun the same command to resume."
        )

    def _generation(self, response: dict[str, Any]) -> Generation:
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        return Generation(
            prompt_tokens=response["usage"]["prompt_tokens"],
            completions=[
                Completion(
                    text=choice["text"],
                    num_tokens=self._num_tokens(choice),
                    finished=choice["finish_reason"] == "stop",
                )
                for choice in choices
            ],
        )

    def _num_tokens(self, choice: dict[str, Any]) -> int:
        """vLLM returns the generated ids (EOS included); other servers' texts are counted as they re-encode."""
        if choice.get("token_ids") is not None:
            return len(choice["token_ids"])
        ids = encode_completion(self.tokenizer, choice["text"])
        return len(ids) if choice["finish_reason"] == "stop" else len(ids) - 1


def connect(options: BackendOptions) -> list[_Server]:
    """The servers of ``options.base_url``, each checked to serve ``options.model``."""
    check(
        bool(options.base_url),
        "--backend openai needs a server: pass --base-url http://HOST:PORT/v1 (repeat it for several).",
    )
    headers = {}
    if options.api_key_env is not None:
        key = os.environ.get(options.api_key_env)
        check(
            bool(key),
            f"--api-key-env: the environment variable {options.api_key_env} is not set; export the "
            "servers' API key in it.",
        )
        headers["Authorization"] = f"Bearer {key}"
    servers = [_Server(url, headers, options.score_concurrency) for url in dict.fromkeys(options.base_url)]
    for server in servers:
        server.served = served_models(server)
        check(
            options.model in server.served,
            f"--model '{options.model}' is not served at {server.url}, which serves "
            f"{', '.join(sorted(server.served))}; pass the served name as --model (and the model's "
            "local tokenizer as --tokenizer).",
        )
    return servers


def served_context_limit(options: BackendOptions) -> int | None:
    """The longest prompt + completion every server takes for ``options.model`` (vLLM's max_model_len)."""
    servers = connect(options)
    limits = [server.served[options.model] for server in servers]
    for server in servers:
        server.client.close()
    return None if None in limits else min(limits)


def served_models(server: _Server) -> dict[str, int | None]:
    """The model (and adapter) names ``server`` serves, with their max_model_len where it says; a clear
    error if it is no OpenAI-compatible API."""
    try:
        response = server.client.get("/models", timeout=httpx.Timeout(60.0, connect=10.0))
    except httpx.TransportError as err:
        raise ConfigError(
            f"--base-url {server.url}: no server answers there ({one_line(str(err)) or type(err).__name__}); "
            "start it or fix the URL."
        ) from err
    check(
        response.status_code not in (401, 403),
        f"--base-url {server.url} refused the request as unauthorised ({response.status_code}); put the "
        "server's API key in an environment variable and pass its name as --api-key-env.",
    )
    try:
        response.raise_for_status()
        return {model["id"]: model.get("max_model_len") for model in response.json()["data"]}
    except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--base-url {server.url}: GET /models gave no model list ({response.status_code}); pass the "
            "URL of an OpenAI-compatible API, which ends in /v1."
        ) from err


def score_from_prompt_logprobs(
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None,
    token_ids: list[int],
    num_prompt_tokens: int,
) -> Score:
    """The score of the tokens after the first ``num_prompt_tokens``, from a vLLM response's prompt
    log-probs (at each position, a map from token id to its log-prob; None at position 0)."""
    check(
        prompt_logprobs is not None,
        "--backend openai: the server returned no prompt_logprobs, so it cannot score completions "
        "(build-trajectories and best-of-n without a reward model need that capability); serve the "
        "model with vLLM.",
    )
    positions = range(num_prompt_tokens, len(token_ids))
    logprob = sum(prompt_logprobs[t][str(token_ids[t])]["logprob"] for t in positions)
    return Score(logprob=float(logprob), num_tokens=len(positions))


def error_message(response: httpx.Response) -> str:
    """The server's error message on one line (vLLM and OpenAI put it in error.message)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return one_line(message or response.text)[:300]


def one_line(text: str) -> str:
    return " ".join(text.split())
