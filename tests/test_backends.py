"""Backend conformance: every importable backend against the same tiny saved models.

References are computed with a plain transformers model: a token-by-token greedy decode without
cache or padding, and one unpadded forward pass per scored pair. Both backends pass the same tests
in fp32: ``hf``, and ``vllm`` through the real engine (vLLM's CPU build here), so where both equal
the reference, they equal each other (greedy tokens, scores, LoRA).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENGINE
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import (
    Backend,
    BackendOptions,
    SamplingParams,
    encode_completion,
    encode_prompt,
)
from icpo_infer.backends.hf import _RowSampler
from icpo_infer.cli import run
from icpo_infer.config import ConfigError
from icpo_infer.infer_config import InferConfig
from icpo_infer.results import read_results

QUESTIONS = [
    "Find the remainder when 2^10 is divided by 7.",
    "What is 2+3?",
    "Let x be 4. Compute x^2 - 1 and give the answer in a box.",
]


BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


def _options(name: str, model: Path, **changes) -> BackendOptions:
    options = {"dtype": "float32"}
    if name == "vllm":
        options |= CPU_ENGINE
    return BackendOptions(str(model), **(options | changes))


def save_random_lora(model_dir: Path, directory: Path, targets: list[str], rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter of ``model_dir`` whose B weights are random, so it changes the model."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=rank, lora_alpha=8, target_modules=targets),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    model.save_pretrained(directory)
    assert (directory / "adapter_model.safetensors").is_file()
    return directory


@pytest.fixture(scope="module")
def lora_dir(ending_model_dir, tmp_path_factory) -> Path:
    return save_random_lora(
        ending_model_dir, tmp_path_factory.mktemp("tiny-lora"), ["q_proj", "v_proj", "o_proj"], 4, 0
    )


@pytest.fixture(scope="module")
def reference(ending_model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(ending_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_lora(ending_model_dir, lora_dir) -> torch.nn.Module:
    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(ending_model_dir, dtype=torch.float32), lora_dir
    ).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, ending_model_dir) -> Backend:
    if request.param == "vllm":
        yield request.getfixturevalue("ending_vllm_engine")
        return
    backend = make_backend("hf", _options("hf", ending_model_dir))
    yield backend
    backend.close()


def conformance_prompts(tokenizer) -> list[str]:
    """Chat-rendered prompts (special tokens in the text) and plain base-model prompts, of different lengths."""
    chat = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    return chat + [tokenizer.bos_token + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def prompts(backend) -> list[str]:
    return conformance_prompts(backend.tokenizer)


@torch.inference_mode()
def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Token-by-token greedy decode over the whole sequence each step (no cache, no padding)."""
    ids, new = list(prompt_ids), []
    while len(new) < max_new_tokens and (not new or new[-1] != eos_id):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
    return new


@torch.inference_mode()
def logprob_reference(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    logprobs = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(completion_ids))


def texts(generations) -> list[list[str]]:
    return [[c.text for c in g.completions] for g in generations]


@pytest.mark.parametrize("params", [SamplingParams(n=4, max_new_tokens=12, seed=0)])
def test_n_samples_for_many_prompts_in_one_engine_call(backend, prompts, params):
    calls, prompt_tokens, generated = (
        backend.usage.engine_calls,
        backend.usage.prompt_tokens,
        backend.usage.generated_tokens,
    )
    generations = backend.generate(prompts, params)

    assert [len(g.completions) for g in generations] == [4] * len(prompts)
    assert [g.prompt_tokens for g in generations] == [
        len(encode_prompt(backend.tokenizer, p)) for p in prompts
    ]
    completions = [c for g in generations for c in g.completions]
    assert all(1 <= c.num_tokens <= 12 for c in completions)
    assert all(c.num_tokens == 12 for c in completions if not c.finished)
    # The model ends some samples early and runs others to the limit: both paths are exercised.
    assert {c.finished for c in completions} == {True, False}
    assert all(len(set(t)) > 1 for t in texts(generations)), "samples of a prompt should differ"
    assert backend.usage.engine_calls == calls + 1
    assert backend.usage.prompt_tokens == prompt_tokens + sum(g.prompt_tokens for g in generations)
    assert backend.usage.generated_tokens == generated + sum(c.num_tokens for c in completions)


def test_greedy_equals_a_manual_greedy_decode(backend, prompts, reference):
    tokenizer, eos = backend.tokenizer, backend.tokenizer.eos_token_id
    generations = backend.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=10))

    finished = set()
    for prompt, generation in zip(prompts, generations, strict=True):
        expected = greedy_reference(reference, encode_prompt(tokenizer, prompt), 10, eos)
        ended = expected[-1] == eos
        expected_text = tokenizer.decode(expected[:-1] if ended else expected, skip_special_tokens=True)
        for completion in generation.completions:
            assert (completion.text, completion.num_tokens, completion.finished) == (
                expected_text,
                len(expected),
                ended,
            )
        finished.add(ended)
    assert finished == {True, False}, "the prompts should cover both an EOS stop and the token limit"


def test_token_counts_match_retokenisation_where_the_text_is_canonical(backend, prompts):
    """Where the decoded text re-encodes to the generated tokens, the counts agree with encode_completion."""
    generations = backend.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    checked = 0
    for generation in generations:
        completion = generation.completions[0]
        ids = encode_completion(backend.tokenizer, completion.text)
        if "\ufffd" not in completion.text:  # byte tokens that decode to no character do not round-trip
            assert completion.num_tokens == (len(ids) if completion.finished else len(ids) - 1)
            checked += 1
    assert checked >= 2


def test_max_new_tokens_is_respected(backend, prompts):
    generations = backend.generate(prompts, SamplingParams(n=3, max_new_tokens=1, seed=1))
    assert all(c.num_tokens == 1 for g in generations for c in g.completions)


def test_per_prompt_params_in_one_call(backend, prompts):
    params = [
        SamplingParams(n=2, temperature=0, max_new_tokens=6),
        SamplingParams(n=3, max_new_tokens=4, seed=0),
    ]
    calls = backend.usage.engine_calls
    greedy, sampled = backend.generate(prompts[:2], params)

    assert backend.usage.engine_calls == calls + 1
    assert len(greedy.completions) == 2 and len(sampled.completions) == 3
    assert greedy.completions[0] == greedy.completions[1]
    assert all(c.num_tokens <= 4 for c in sampled.completions)


def test_seeded_sampling_is_reproducible(backend, prompts):
    params = SamplingParams(
        n=3, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=8
    )
    first = texts(backend.generate(prompts, params.replace(seed=7)))
    again = texts(backend.generate(prompts, params.replace(seed=7)))
    other = texts(backend.generate(prompts, params.replace(seed=8)))
    assert first == again
    assert first != other


def test_a_seeded_prompt_samples_the_same_whatever_it_is_sent_with(backend, prompts):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=7)
    together = texts(backend.generate(prompts, params))
    alone = [texts(backend.generate([prompt], params))[0] for prompt in reversed(prompts)][::-1]
    assert together == alone
    # The stream is the prompt's, not the call's: the same prompt twice samples the same, and the
    # samples of one prompt are not copies of each other.
    twice = texts(backend.generate([prompts[0], prompts[0]], params))
    assert twice[0] == twice[1] == together[0]
    assert len(set(together[0])) > 1


def test_a_seeded_call_longer_than_one_engine_step_samples_as_its_prompts_alone(backend):
    """Thirty long prompts do not fit one scheduling step of vLLM (4k tokens on a CPU): their prefill is
    spread over steps, and each seeded prompt still samples as it does alone."""
    tokenizer = backend.tokenizer
    prompts = [tokenizer.bos_token + tokenizer.decode(list(range(10 + i, 250 + i))) for i in range(30)]
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    assert sum(lengths) > 8192 and max(lengths) < 500
    params = SamplingParams(n=2, max_new_tokens=3, seed=11)
    together = texts(backend.generate(prompts, params))
    for i in range(0, 30, 7):
        assert together[i] == texts(backend.generate([prompts[i]], params))[0]


def test_stop_strings_cut_each_sample_before_the_first_one(backend, prompts):
    params = SamplingParams(n=1, max_new_tokens=16, seed=3)
    full = [g.completions[0].text for g in backend.generate(prompts, params)]
    # Stop strings taken from inside two samples: the same seeded call must end each sample where one first appears.
    stops = tuple(text[4:6] for text in full if len(text) > 6 and text[4:6].isprintable())[:2]
    assert len(stops) == 2
    stopped = [g.completions[0] for g in backend.generate(prompts, params.replace(stop=stops))]

    cut = 0
    for text, completion in zip(full, stopped, strict=True):
        ends = [text.index(s) for s in stops if s in text]
        assert completion.text == (text[: min(ends)] if ends else text)
        if ends:
            assert completion.finished
            cut += 1
    assert cut >= 2


def test_score_equals_a_manual_forward_pass(backend, prompts, reference):
    tokenizer = backend.tokenizer
    completions = [" The answer is \\boxed{5}.", "", "x^2 = 16", "\n\n", "7", " so 15"]
    scores = backend.score(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        completion_ids = encode_completion(tokenizer, completion)
        assert score.num_tokens == len(completion_ids)
        expected = logprob_reference(reference, encode_prompt(tokenizer, prompt), completion_ids)
        assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_scoring_counts_one_engine_call_that_reads_prompts_and_completions(backend, prompts):
    completions = ["so \\boxed{5}", ""]
    before = (backend.usage.engine_calls, backend.usage.prompt_tokens, backend.usage.generated_tokens)
    backend.score(prompts[:2], completions)
    read = sum(
        len(encode_prompt(backend.tokenizer, p)) + len(encode_completion(backend.tokenizer, c))
        for p, c in zip(prompts[:2], completions, strict=True)
    )
    after = (backend.usage.engine_calls, backend.usage.prompt_tokens, backend.usage.generated_tokens)
    assert after == (before[0] + 1, before[1] + read, before[2])


def test_score_of_a_greedy_completion_is_the_sum_of_its_chosen_log_probs(backend, prompts, reference):
    tokenizer, eos = backend.tokenizer, backend.tokenizer.eos_token_id
    generations = backend.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    ended = [
        (p, g.completions[0]) for p, g in zip(prompts, generations, strict=True) if g.completions[0].finished
    ]
    assert ended
    for prompt, completion in ended:
        prompt_ids = encode_prompt(tokenizer, prompt)
        chosen = greedy_reference(reference, prompt_ids, 10, eos)
        assert encode_completion(tokenizer, completion.text) == chosen
        [score] = backend.score([prompt], [completion.text])
        assert score.logprob == pytest.approx(
            logprob_reference(reference, prompt_ids, chosen), rel=1e-4, abs=1e-4
        )
        assert score.num_tokens == completion.num_tokens


def test_lora_adapter_changes_outputs_and_scores_and_leaves_the_base_alone(
    backend, prompts, reference, reference_lora, lora_dir
):
    tokenizer, eos = backend.tokenizer, backend.tokenizer.eos_token_id
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    completions = [" The answer is \\boxed{5}."] * len(prompts)
    base_scores = backend.score(prompts, completions)
    base_texts = texts(backend.generate(prompts, greedy))

    adapted_scores = backend.score(prompts, completions, adapter=str(lora_dir))
    adapted = backend.generate(prompts, greedy, adapter=str(lora_dir))

    for prompt, completion, score in zip(prompts, completions, adapted_scores, strict=True):
        expected = logprob_reference(
            reference_lora, encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
        )
        assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert all(abs(a.logprob - b.logprob) > 0.1 for a, b in zip(adapted_scores, base_scores, strict=True))
    for prompt, generation in zip(prompts, adapted, strict=True):
        expected = greedy_reference(reference_lora, encode_prompt(tokenizer, prompt), 8, eos)
        assert generation.completions[0].num_tokens == len(expected)
    assert texts(adapted) != base_texts
    # Without the adapter the backend is the base model again.
    assert backend.score(prompts, completions) == base_scores
    assert texts(backend.generate(prompts, greedy)) == base_texts


@pytest.fixture(scope="module")
def mlp_lora_dir(ending_model_dir, tmp_path_factory) -> Path:
    """A second adapter of ``ending_model_dir``, on the MLP instead of attention."""
    directory = tmp_path_factory.mktemp("tiny-mlp-lora")
    return save_random_lora(ending_model_dir, directory, ["gate_proj", "up_proj", "down_proj"], 8, 1)


def test_adapters_per_call_through_one_backend_with_the_base_between_them(
    backend, prompts, reference, reference_lora, lora_dir, mlp_lora_dir
):
    tokenizer = backend.tokenizer
    completions = [" The answer is \\boxed{5}."] * len(prompts)
    mlp_reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(backend.options.model, dtype=torch.float32), mlp_lora_dir
    ).eval()
    expected = {None: reference, str(lora_dir): reference_lora, str(mlp_lora_dir): mlp_reference}
    seen = {}
    for adapter in [str(lora_dir), None, str(mlp_lora_dir), str(lora_dir), None, str(mlp_lora_dir)]:
        scores = backend.score(prompts, completions, adapter=adapter)
        for prompt, completion, score in zip(prompts, completions, scores, strict=True):
            want = logprob_reference(
                expected[adapter], encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
            )
            assert score.logprob == pytest.approx(want, rel=1e-4, abs=1e-4), adapter
        seen[adapter] = tuple(s.logprob for s in scores)
    assert len(set(seen.values())) == 3  # three different models


def test_release_drops_an_adapter_and_a_later_call_loads_it_again(backend, prompts, lora_dir):
    completions = ["4", " The answer is 25", "", "x", "7", " so 15"]
    base = backend.score(prompts, completions)
    adapted = backend.score(prompts, completions, adapter=str(lora_dir))
    backend.release(str(lora_dir))
    backend.release(str(lora_dir))  # already gone: nothing to do
    assert backend.score(prompts, completions) == base
    again = backend.score(prompts, completions, adapter=str(lora_dir))
    assert [s.logprob for s in again] == pytest.approx([s.logprob for s in adapted], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_merged_adapter_runs_as_the_lora_model_and_its_weights_go_on_close(
    name, ending_model_dir, reference_lora, lora_dir, mlp_lora_dir
):
    backend = make_backend(name, _options(name, ending_model_dir, adapter=str(lora_dir), merge_adapter=True))
    merged_dir = backend.merged_dir
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    tokenizer, eos = backend.tokenizer, backend.tokenizer.eos_token_id
    prompts = conformance_prompts(tokenizer)
    completions = [" The answer is \\boxed{5}."] * len(prompts)
    for adapter in (str(lora_dir), None):  # the run names its adapter on every call
        scores = backend.score(prompts, completions, adapter=adapter)
        for prompt, completion, score in zip(prompts, completions, scores, strict=True):
            expected = logprob_reference(
                reference_lora, encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
            )
            assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    greedy = backend.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8), adapter=str(lora_dir))
    for prompt, generation in zip(prompts, greedy, strict=True):
        expected = greedy_reference(reference_lora, encode_prompt(tokenizer, prompt), 8, eos)
        assert generation.completions[0].num_tokens == len(expected)
    assert backend.usage.engine_calls == 3
    with pytest.raises(ValueError, match=r"serves .* merged, and no other"):
        backend.score(prompts, completions, adapter=str(mlp_lora_dir))
    backend.release(str(lora_dir))  # its weights are the engine's: nothing to release
    backend.close()
    assert not merged_dir.exists()


@pytest.mark.parametrize("name", BACKENDS)
def test_bf16_on_the_cpu_scores_and_decodes_close_to_fp32(name, ending_model_dir, reference):
    backend = make_backend(name, _options(name, ending_model_dir, dtype="bfloat16"))
    tokenizer = backend.tokenizer
    prompts = [tokenizer.bos_token + q for q in QUESTIONS]
    completions = [" The answer is \\boxed{5}.", "7", " so 15"]
    for prompt, completion, score in zip(
        prompts, completions, backend.score(prompts, completions), strict=True
    ):
        want = logprob_reference(
            reference, encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)
        )
        assert score.logprob == pytest.approx(want, rel=0.05, abs=0.2)
    generations = backend.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4))
    assert all(g.completions[0].num_tokens >= 1 for g in generations)
    backend.close()


# The options below are the transformers backend's own.


def test_hf_batches_under_a_token_budget_give_the_same_results(tiny_model_dir):
    big = make_backend("hf", BackendOptions(str(tiny_model_dir), dtype="float32"))
    small = make_backend("hf", BackendOptions(str(tiny_model_dir), dtype="float32", max_batch_tokens=1))
    prompts = [big.tokenizer.bos_token + q for q in QUESTIONS]
    for params in [
        SamplingParams(n=2, temperature=0, max_new_tokens=6),
        SamplingParams(n=3, max_new_tokens=6, seed=5),
    ]:
        assert texts(small.generate(prompts, params)) == texts(big.generate(prompts, params))
    completions = ["4", " The answer is 25", ""]
    for a, b in zip(small.score(prompts, completions), big.score(prompts, completions), strict=True):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=0.7), range(6)),
        (SamplingParams(top_k=3), range(3)),
        (SamplingParams(temperature=2.0, top_p=0.5), range(2)),
    ],
)
def test_hf_row_sampler_draws_from_the_filtered_distribution(params, allowed):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    rows = 20000
    sampler = _RowSampler(params, seeds=list(range(rows)))
    picked = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
    assert (picked.isfinite().sum(-1) == 1).all()  # one token per row, which greedy decoding then takes
    counts = torch.bincount(picked.argmax(-1), minlength=6).double() / rows
    expected = (logits / params.temperature).softmax(-1)
    expected[[a for a in range(6) if a not in allowed]] = 0  # top-p 0.5 at temperature 2: the top two
    expected /= expected.sum()
    assert counts.tolist() == pytest.approx(expected.tolist(), abs=0.01)
    again = _RowSampler(params, seeds=list(range(rows)))
    assert torch.equal(again(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1)), picked)


def test_hf_release_frees_an_adapter_and_a_later_call_loads_it_again(ending_model_dir, lora_dir, tmp_path):
    backend = make_backend("hf", BackendOptions(str(ending_model_dir), dtype="float32"))
    copy = shutil.copytree(lora_dir, tmp_path / "copy")  # another path: a second PEFT adapter
    prompts, completions = [backend.tokenizer.bos_token + QUESTIONS[0]], [" 4"]
    base = backend.score(prompts, completions)
    adapted = backend.score(prompts, completions, adapter=str(lora_dir))
    assert backend.score(prompts, completions, adapter=str(copy)) == adapted != base

    backend.release(str(lora_dir))
    assert list(backend.model.peft_config) == ["adapter_2"]  # the second load; the first is gone
    assert backend.score(prompts, completions, adapter=str(copy)) == adapted
    assert backend.score(prompts, completions) == base
    backend.release(str(copy))
    backend.release(str(copy))  # already gone: nothing to do
    assert not isinstance(backend.model, PeftModel)
    assert backend.score(prompts, completions) == base
    assert backend.score(prompts, completions, adapter=str(lora_dir)) == adapted

    with_default = make_backend(
        "hf", BackendOptions(str(ending_model_dir), dtype="float32", adapter=str(lora_dir))
    )
    with_default.release(str(lora_dir))  # the default adapter stays
    assert with_default.score(prompts, completions) == adapted


def test_hf_default_adapter_is_used_when_none_is_named(ending_model_dir, lora_dir):
    with_adapter = make_backend(
        "hf", BackendOptions(str(ending_model_dir), dtype="float32", adapter=str(lora_dir))
    )
    prompts = [with_adapter.tokenizer.bos_token + q for q in QUESTIONS]
    completions = ["4", " The answer is 25", ""]
    assert with_adapter.score(prompts, completions) == with_adapter.score(
        prompts, completions, adapter=str(lora_dir)
    )
    plain = make_backend("hf", BackendOptions(str(ending_model_dir), dtype="float32"))
    assert with_adapter.score(prompts, completions) != plain.score(prompts, completions)


def test_a_run_on_a_shared_backend_samples_with_its_own_adapter(
    ending_model_dir, lora_dir, problems_file, tmp_path
):
    """One loaded model serves runs of the base and of an adapter, as in the pipeline's evaluation."""

    def sampled(name: str, adapter: str | None, backend: Backend) -> list[list[str]]:
        config = InferConfig(
            model=str(ending_model_dir), adapter=adapter, dataset=str(problems_file), limit=2,
            method="single", k=2, max_new_tokens=6, context_length=2048, dtype="float32",
            output_dir=str(tmp_path / name),
        )  # fmt: skip
        run(config, backend)
        return [row["final"]["texts"] for row in read_results(tmp_path / name / "results.jsonl")]

    shared = make_backend("hf", BackendOptions(str(ending_model_dir), dtype="float32"))
    own = make_backend("hf", BackendOptions(str(ending_model_dir), dtype="float32", adapter=str(lora_dir)))
    with_adapter = sampled("shared-lora", str(lora_dir), shared)
    assert with_adapter == sampled("own-lora", str(lora_dir), own)
    assert sampled("shared-base", None, shared) != with_adapter


def test_hf_seeded_generation_leaves_the_global_rng_alone(tiny_model_dir):
    backend = make_backend("hf", BackendOptions(str(tiny_model_dir), dtype="float32"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    backend.generate([backend.tokenizer.bos_token + "1+1"], SamplingParams(n=2, max_new_tokens=3, seed=5))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("tgi", {}, "Valid backends: hf, vllm"),
        ("hf", {"dtype": "fp8"}, "--dtype"),
        ("hf", {"device": "tpu-ish"}, "--device"),
        ("hf", {"max_batch_tokens": 0}, "--max-batch-tokens"),
    ],
)
def test_bad_options_are_config_errors(tiny_model_dir, name, changes, message):
    with pytest.raises(ConfigError, match=message):
        make_backend(name, BackendOptions(str(tiny_model_dir), **changes))
