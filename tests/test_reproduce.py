"""The reproduction recipes run as written on tiny models of the same architecture and tokenizer setup.

Each recipe of recipes/reproduce/ runs through scripts/reproduce.py with only the model path and the
sizes overridden (and the hf backend on CPU); its benchmark is resolved by name to a local stand-in
of the Hub dataset with the same columns. So a GPU user's first run does not fail on configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from boxed_model import teach_boxed_answers
from conftest import fixture_problems, tokenizer_texts
from script_modules import load_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from icpo_infer.backends.base import encode_prompt
from icpo_infer.config import ConfigError, load_recipe
from icpo_infer.prompts import PromptTemplates, render_prompt

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "reproduce"
reproduce = load_script("reproduce")

# Chat templates of the same shape as the real ones (special tokens, generation prompt, BOS handling).
QWEN_MATH_TEMPLATE = (  # Qwen2.5-Math ships one with a default system message, base models included
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nPlease reason step by step, and put your "
    "final answer within \\boxed{}.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
# Per family: architecture, special tokens (BOS, EOS, PAD, others), the generation config's EOS tokens,
# the chat template, and the real model's positions (max_position_embeddings).
FAMILIES = {
    "qwen2.5-math": {
        "architecture": "qwen2",
        "bos": None,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "stop": ["<|endoftext|>"],
        "template": QWEN_MATH_TEMPLATE,
        "positions": 4096,
    },
    "llama-3.1-instruct": {
        "architecture": "llama",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "stop": ["<|end_of_text|>", "<|eot_id|>"],
        "template": LLAMA3_TEMPLATE,
        "positions": 131072,
    },
    "r1-distill-llama": {
        "architecture": "llama",
        "bos": "<｜begin▁of▁sentence｜>",
        "eos": "<｜end▁of▁sentence｜>",
        "pad": "<｜end▁of▁sentence｜>",
        "special": [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ],
        "stop": ["<｜end▁of▁sentence｜>"],
        "template": R1_TEMPLATE,
        "positions": 131072,
    },
}
RECIPE_FAMILY = {
    "qwen2.5-math-7b": ("Qwen/Qwen2.5-Math-7B", "qwen2.5-math"),
    "qwen2.5-math-1.5b": ("Qwen/Qwen2.5-Math-1.5B", "qwen2.5-math"),
    "deepseek-r1-distill-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "r1-distill-llama"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-instruct"),
}
# The sizes a CPU run can afford; everything else comes from the recipe.
SIZES = (
    *("--limit", "2", "--rounds", "2", "--k", "2", "--entropy-k", "2", "--final-k", "2"),
    *("--max-new-tokens", "12", "--summary-max-tokens", "4", "--backend", "hf", "--device", "cpu"),
)


def build_tiny_model(directory: Path, family: dict) -> Path:
    """A random model of the family's architecture (head_dim 32) with a tokenizer set up like the real one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=family["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_texts(), trainer)
    if family["bos"]:  # Llama tokenizers add BOS when asked for special tokens (the chat template has it too)
        bos_id = tokenizer.token_to_id(family["bos"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family['bos']} $A",
            pair=f"{family['bos']} $A $B",
            special_tokens=[(family["bos"], bos_id)],
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=family["bos"], eos_token=family["eos"], pad_token=family["pad"]
    )
    wrapped.chat_template = family["template"]
    config_class = Qwen2Config if family["architecture"] == "qwen2" else LlamaConfig
    config = config_class(
        vocab_size=len(wrapped),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=family["positions"],
        bos_token_id=wrapped.bos_token_id,
        eos_token_id=[wrapped.convert_tokens_to_ids(token) for token in family["stop"]],
        pad_token_id=wrapped.pad_token_id,
    )
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM if family["architecture"] == "qwen2" else LlamaForCausalLM)(config)
    model.save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Per family, the tiny model taught to answer in \\boxed{} in the prompt format its recipes use, so
    that ME-ICPO goes through its summary and probe phases."""
    root = tmp_path_factory.mktemp("families")
    questions = [row["problem"] for row in fixture_problems()[:4]]
    taught = {}
    for name, family in FAMILIES.items():
        templates = PromptTemplates(prompt_format="plain") if name == "qwen2.5-math" else None
        base = build_tiny_model(root / name, family)
        taught[name] = teach_boxed_answers(base, root / f"{name}-boxed", questions, templates=templates)
    return taught


@pytest.fixture
def aime_stand_in(tmp_path, monkeypatch) -> Path:
    """Two integer-answer problems at the path of the AIME 2024 Hub id, with its columns; the recipes' relative paths
    (templates) resolve from the working directory, as from the repository root."""
    rows = [
        {
            "id": 60 + i,
            "problem": row["problem"],
            "solution": "",
            "answer": row["answer"],
            "url": "",
            "year": "2024",
        }
        for i, row in enumerate(fixture_problems()[:2])
    ]
    folder = tmp_path / "HuggingFaceH4" / "aime_2024"
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(folder / "train.parquet")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_recipe_is_tested():
    assert {path.stem for path in RECIPES.glob("*.yaml")} == {*RECIPE_FAMILY, "plain_prompt"}


@pytest.mark.parametrize("name", sorted(RECIPE_FAMILY))
def test_recipe_runs_as_written_on_a_tiny_model_of_its_family(name, tiny_models, aime_stand_in, tmp_path):
    model_id, family = RECIPE_FAMILY[name]
    recipe_path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(recipe_path)
    assert recipe["model"] == model_id and recipe["dataset"] == "aime24"
    # The paper's settings (DESIGN.md section 4).
    paper = {"k": 16, "entropy_k": 16, "final_k": 16, "temperature": 0.6, "top_p": 0.95}
    paper |= {"repetition_penalty": 1.1, "max_new_tokens": 5000, "summary_max_tokens": 500}
    assert {key: recipe[key] for key in paper} == paper and recipe["rounds"] in (3, 4, 5)
    assert recipe["context_length"] <= FAMILIES[family]["positions"]  # vLLM refuses longer prompts

    output = tmp_path / "out"
    assert (
        reproduce.main(
            [
                "--config",
                str(recipe_path),
                "--output-dir",
                str(output),
                "--model",
                str(tiny_models[family]),
                *SIZES,
            ]
        )
        == 0
    )

    table = (output / reproduce.TABLE_FILE).read_text()
    for method in recipe["methods"]:
        metrics = json.loads((output / method / "metrics.json").read_text())
        config = metrics["config"]
        assert metrics["num_questions"] == 2 and config["method"] == method
        assert config["dataset"] == "aime24" and config["model"] == str(tiny_models[family])
        ran_as_written = {
            key: value for key, value in recipe.items() if key not in ("methods", "paper_mean_at_k")
        }
        overridden = {
            "model",
            "rounds",
            "k",
            "entropy_k",
            "final_k",
            "max_new_tokens",
            "summary_max_tokens",
            "backend",
        }
        assert {key: config[key] for key in ran_as_written if key not in overridden} == {
            key: value for key, value in ran_as_written.items() if key not in overridden
        }
        if method == "me-icpo":  # valid answers, so every phase ran: summaries, probes, a pick
            rows = [json.loads(line) for line in (output / method / "results.jsonl").read_text().splitlines()]
            rounds = [r for row in rows for r in row["rounds"]]
            assert any(r["chosen"] is not None and any(e is not None for e in r["entropies"]) for r in rounds)
        reported = recipe.get("paper_mean_at_k", {}).get("aime24", {}).get(method)
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert row.split("|")[3].strip() == ("-" if reported is None else f"{reported:.1f}")

    # Base math models are prompted with plain text although their tokenizer ships a chat template;
    # instruct and distilled models get their chat template.
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
    templates = PromptTemplates.from_yaml(recipe["templates"]) if "templates" in recipe else None
    prompt = render_prompt(tokenizer, "What is 1+1?", templates=templates)
    if family == "qwen2.5-math":
        assert "<|im_start|>" not in prompt and prompt.endswith("Solution:\n")
    else:
        chat_marker = FAMILIES[family]["special"][2]  # <|start_header_id|> or <｜User｜>
        assert prompt.startswith(tokenizer.bos_token + chat_marker) and "What is 1+1?" in prompt
        assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # as the real tokenizer
        assert encode_prompt(tokenizer, prompt).count(tokenizer.bos_token_id) == 1  # not doubled


def test_a_local_file_runs_without_the_paper_figures_of_another_benchmark(
    tiny_models, aime_stand_in, tmp_path, problems_file
):
    recipe = str(RECIPES / "qwen2.5-math-7b.yaml")
    model = str(tiny_models["qwen2.5-math"])
    args = ["--model", model, "--dataset", str(problems_file), "--methods", "single", *SIZES]
    assert reproduce.main(["--config", recipe, "--output-dir", str(tmp_path / "out"), *args]) == 0
    row = next(
        line
        for line in (tmp_path / "out" / "table.md").read_text().splitlines()
        if line.startswith("| single")
    )
    assert row.split("|")[3].strip() == "-"  # the recipe's figures are AIME 2024's


def test_methods_can_be_chosen_and_per_method_flags_are_refused(tiny_models, aime_stand_in, tmp_path, capsys):
    recipe = str(RECIPES / "qwen2.5-math-1.5b.yaml")
    model = str(tiny_models["qwen2.5-math"])
    output = tmp_path / "out"
    assert (
        reproduce.main(
            ["--config", recipe, "--output-dir", str(output), "--model", model, "--methods", "single", *SIZES]
        )
        == 0
    )
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["single"]
    assert reproduce.main(["--config", recipe, "--output-dir", str(output), "--method", "single"]) == 2
    assert "--method: set by reproduce.py for each method" in capsys.readouterr().err
    assert reproduce.main(["--config", recipe, "--output-dir", str(output), "--methods", "sampling"]) == 2
    assert "method 'sampling' is unknown" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: aime24\n")
    with pytest.raises(ConfigError, match="'methods' must list the methods"):
        reproduce.plan(["--config", str(bad), "--output-dir", str(output)])
    bad.write_text("methods: [single]\nmodel: m\ndataset: aime24\npaper_mean_at_k: {single: 11.0}\n")
    with pytest.raises(ConfigError, match="'paper_mean_at_k' must map benchmarks"):
        reproduce.plan(["--config", str(bad), "--output-dir", str(output)])
