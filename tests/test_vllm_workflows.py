"""Every workflow that takes ``--backend vllm``, through the real vLLM engine (its CPU build here).

One engine serves the module, as one serves a user's runs, the checkpoint evaluation's too (the test
checks the options it would start its own engine with); the command line starts its own, as a user's
would. Where the two backends must agree (greedy decoding, scores, adapters), the hf backend runs the
same thing beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from boxed_model import teach_boxed_answers
from script_modules import load_script
from test_scripts import save_adapter, save_checkpoint
from tiny_recipe import recipe_args
from trajectory_fixtures import integer_problems

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import Backend, BackendOptions
from icpo_infer.backends.vllm import VLLMBackend
from icpo_infer.cli import main as cli_main
from icpo_infer.cli import run
from icpo_infer.config import parse_config
from icpo_infer.infer_config import ICPO_METHODS, METHODS, InferConfig
from icpo_infer.prompts import answer_type_of, render_prompt
from icpo_infer.results import read_results
from icpo_train import callbacks
from icpo_train.callbacks import RESULTS_FILE
from icpo_train.train import main as train_main
from icpo_train.trajectories import TrajectoryConfig, build_trajectories
from icpo_train.trajectory_data import load_trajectories

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
# Engine options that suit a tiny model on a shared CPU: no compilation, a small KV cache.
ENGINE = {"kv_cache_gb": 1, "enforce_eager": True}
ENGINE_FLAGS = ["--kv-cache-gb", "1", "--enforce-eager", "true"]
# A few seconds of every phase on CPU: short answers, two samples, one kept entry per bucket.
LOOP = {
    "rounds": 2,
    "k": 2,
    "entropy_k": 2,
    "final_k": 2,
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 8,
    "summary_max_tokens": 8,
    "context_length": 2048,
    "max_keep": 1,
    "dtype": "float32",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in integer_problems(3)))
    return path


@pytest.fixture(scope="module")
def boxed_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    questions = [row["problem"] for row in integer_problems(3)]
    return teach_boxed_answers(tiny_model_dir, tmp_path_factory.mktemp("boxed"), questions)


@pytest.fixture(scope="module")
def adapter_dir(boxed_model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(boxed_model_dir, directory, seed=0)
    return directory


@pytest.fixture(scope="module")
def engine(boxed_model_dir) -> Backend:
    options = BackendOptions(
        str(boxed_model_dir), dtype="float32", max_model_len=2048, enable_lora=True, **ENGINE
    )
    backend = make_backend("vllm", options)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(boxed_model_dir) -> Backend:
    return make_backend("hf", BackendOptions(str(boxed_model_dir), dtype="float32", device="cpu"))


def infer_config(model: Path, dataset: Path, output_dir: Path, **changes) -> InferConfig:
    options = {**LOOP, "backend": "vllm", **ENGINE, **changes}
    return InferConfig(model=str(model), dataset=str(dataset), output_dir=str(output_dir), **options)


def final_texts(output_dir: Path | str) -> list[list[str]]:
    return [row["final"]["texts"] for row in read_results(Path(output_dir) / "results.jsonl")]


def all_texts(output_dir: Path | str) -> list:
    """Every sampled text of a run: each round's samples and chosen summary, and the final samples."""
    rows = read_results(Path(output_dir) / "results.jsonl")
    return [
        (
            [(r["samples"]["texts"], r.get("chosen_summary")) for r in row.get("rounds", [])],
            row["final"]["texts"],
        )
        for row in rows
    ]


@pytest.mark.parametrize(
    ("method", "summary"),
    [(method, True) for method in METHODS] + [("me-icpo", False), ("random-icpo", False)],
)
def test_every_method_runs_through_vllm(engine, boxed_model_dir, dataset_file, tmp_path, method, summary):
    config = infer_config(boxed_model_dir, dataset_file, tmp_path, method=method, summary=summary)
    calls = engine.usage.engine_calls
    metrics = run(config, engine)

    results = read_results(tmp_path / "results.jsonl")
    assert len(results) == metrics["num_questions"] == 3
    assert all(len(row["final"]["texts"]) == 2 for row in results)
    assert metrics["engine_calls"] == engine.usage.engine_calls - calls >= 1
    assert metrics["generated_tokens"] > 0 and metrics["prompt_tokens"] > 0
    if method in ICPO_METHODS:
        records = [record for row in results for record in row["rounds"]]
        assert all(len(record["samples"]["texts"]) == 2 for record in records)
        if method == "me-icpo":  # the taught model answers, so every phase ran through the engine
            assert any(e is not None for record in records for e in record["entropies"])
        if summary:
            assert any(record["chosen_summary"] for record in records)


def test_a_greedy_me_icpo_run_gives_the_same_texts_on_hf_and_vllm(
    engine, hf, boxed_model_dir, dataset_file, tmp_path
):
    greedy = {"method": "me-icpo", "temperature": 0.0, "summary_temperature": 0.0}
    run(infer_config(boxed_model_dir, dataset_file, tmp_path / "vllm", **greedy), engine)
    run(infer_config(boxed_model_dir, dataset_file, tmp_path / "hf", backend="hf", **greedy), hf)
    assert all_texts(tmp_path / "vllm") == all_texts(tmp_path / "hf")


def test_an_adapter_runs_through_vllm_as_through_hf(
    engine, hf, boxed_model_dir, adapter_dir, dataset_file, tmp_path
):
    greedy = {"method": "single", "temperature": 0.0, "adapter": str(adapter_dir)}
    run(infer_config(boxed_model_dir, dataset_file, tmp_path / "vllm", **greedy), engine)
    run(infer_config(boxed_model_dir, dataset_file, tmp_path / "hf", backend="hf", **greedy), hf)
    run(
        infer_config(boxed_model_dir, dataset_file, tmp_path / "base", method="single", temperature=0.0),
        engine,
    )
    assert final_texts(tmp_path / "vllm") == final_texts(tmp_path / "hf")
    assert final_texts(tmp_path / "vllm") != final_texts(tmp_path / "base")


class Interrupted(Exception):
    pass


class InterruptAfter:
    """The engine, stopped (as by Ctrl-C) before its ``calls + 1``-th generation call."""

    def __init__(self, backend: Backend, calls: int) -> None:
        self.backend, self.tokenizer, self.usage, self.calls_left = (
            backend,
            backend.tokenizer,
            backend.usage,
            calls,
        )

    def generate(self, *args, **kwargs):
        if self.calls_left == 0:
            raise Interrupted
        self.calls_left -= 1
        return self.backend.generate(*args, **kwargs)

    def score(self, *args, **kwargs):
        return self.backend.score(*args, **kwargs)

    def release(self, adapter: str) -> None:
        self.backend.release(adapter)


def test_an_interrupted_vllm_run_resumes_to_the_results_of_an_uninterrupted_one(
    engine, boxed_model_dir, dataset_file, tmp_path
):
    config = infer_config(boxed_model_dir, dataset_file, tmp_path / "resumed", batch_questions=1)
    with pytest.raises(Interrupted):
        run(config, InterruptAfter(engine, calls=9))  # inside the second question's chunk
    assert len(read_results(tmp_path / "resumed" / "results.jsonl")) == 1
    run(config, engine)
    run(dataclasses.replace(config, output_dir=str(tmp_path / "whole")), engine)
    assert all_texts(tmp_path / "resumed") == all_texts(tmp_path / "whole")


def test_trajectories_built_on_vllm_carry_hf_scores_and_train_an_adapter_vllm_serves(
    engine, hf, boxed_model_dir, dataset_file, tmp_path
):
    config = TrajectoryConfig(
        model=str(boxed_model_dir), dataset=str(dataset_file), output=str(tmp_path / "traj"),
        backend="vllm", rounds=2, group_size=4, **{k: v for k, v in LOOP.items() if k not in ("rounds", "final_k")},
    )  # fmt: skip
    dataset = load_trajectories(build_trajectories(config, backend=engine))
    assert len(dataset) == 3 * 2
    for row in dataset.filter(lambda row: row["round"] == 1):  # log pi_ref(y | question), as hf scores it
        prompt = render_prompt(hf.tokenizer, row["question"], [], answer_type_of(row["answer"]))
        expected = hf.score([prompt] * len(row["responses"]), row["responses"])
        assert row["ref_logps"] == pytest.approx([s.logprob for s in expected], rel=1e-4, abs=1e-4)
        assert row["ref_num_tokens"] == [s.num_tokens for s in expected]

    output = tmp_path / "train"
    assert train_main(recipe_args(boxed_model_dir, tmp_path / "traj", output, "--max_steps", "2")) == 0
    assert (output / "adapter_model.safetensors").is_file()
    prompts = [engine.tokenizer.bos_token + "What is 2+3?"]
    completions = [" The answer is \\boxed{5}."]
    [served] = engine.score(prompts, completions, adapter=str(output))
    [expected] = hf.score(prompts, completions, adapter=str(output))
    assert served.logprob == pytest.approx(expected.logprob, rel=1e-4, abs=1e-4)
    assert served.logprob != engine.score(prompts, completions)[0].logprob


class Unclosed:
    """The module's engine for code that closes what it loaded: the next test still needs it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def close(self) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def test_eval_checkpoints_serves_every_checkpoint_as_a_lora_request_of_one_engine(
    engine, boxed_model_dir, dataset_file, tmp_path, monkeypatch
):
    loaded = []

    def module_engine(backend: str, options: BackendOptions) -> Unclosed:
        """The engine the script would start, as its flags ask: the module's has those options."""
        loaded.append((backend, options.model, options.dtype, options.enable_lora, options.adapter))
        return Unclosed(engine)

    monkeypatch.setattr(callbacks, "make_backend", module_engine)
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(boxed_model_dir, run_dir, step)
    flags = [
        *("--config", str(ROOT / "recipes" / "infer" / "tiny.yaml"), "--method", "random-icpo"),
        *("--model", str(boxed_model_dir), "--dataset", str(dataset_file)),
        *("--backend", "vllm", "--dtype", "float32", *ENGINE_FLAGS),
    ]
    assert load_script("eval_checkpoints").main(["--run-dir", str(run_dir), *flags]) == 0
    assert loaded == [("vllm", str(boxed_model_dir), "float32", True, None)]  # one engine, LoRA on
    rows = [json.loads(line) for line in (run_dir / "eval" / RESULTS_FILE).read_text().splitlines()]
    assert [row["name"] for row in rows] == ["base", "checkpoint-1", "checkpoint-2"]
    config = parse_config(InferConfig, [*flags, "--output-dir", str(tmp_path / "alone")])
    for row in rows:  # each checkpoint samples as it does on another engine
        alone = dataclasses.replace(config, adapter=row["adapter"], output_dir=str(tmp_path / row["name"]))
        run(alone, engine)
        assert final_texts(alone.output_dir) == final_texts(row["output_dir"])
    assert len({json.dumps(final_texts(row["output_dir"])) for row in rows}) == 3


def test_the_command_line_runs_me_icpo_with_an_adapter_on_vllm(
    boxed_model_dir, adapter_dir, dataset_file, tmp_path
):
    command = [
        *(str(Path(sys.executable).parent / "icpo-infer"), "run"),
        *("--config", str(ROOT / "recipes" / "infer" / "tiny.yaml")),
        *("--model", str(boxed_model_dir), "--adapter", str(adapter_dir), "--dataset", str(dataset_file)),
        *("--output-dir", str(tmp_path), "--backend", "vllm", "--dtype", "float32", *ENGINE_FLAGS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "3 questions: mean@2" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["backend"] == "vllm" and metrics["config"]["adapter"] == str(adapter_dir)
    assert metrics["engine_calls"] >= 1


def test_ctrl_c_in_a_vllm_run_stops_every_engine_process(
    boxed_model_dir, dataset_file, tmp_path, monkeypatch, capsys
):
    """Interrupted (Ctrl-C) inside an engine call, a run stops with one line and leaves no process of the
    engine it started behind."""
    started = []

    def interrupted(self, *args, **kwargs):
        # The engine's processes name themselves VLLM::EngineCore and VLLM::Worker.
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.name().startswith("VLLM"):
                    started.append(process)
        raise KeyboardInterrupt

    monkeypatch.setattr(VLLMBackend, "generate", interrupted)
    before = {process.pid for process in psutil.Process().children(recursive=True)}  # engines started earlier
    args = [
        *("run", "--config", str(ROOT / "recipes" / "infer" / "tiny.yaml"), "--model", str(boxed_model_dir)),
        *("--dataset", str(dataset_file), "--output-dir", str(tmp_path / "run")),
        *("--backend", "vllm", "--dtype", "float32", *ENGINE_FLAGS),
    ]
    assert cli_main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("icpo-infer run: interrupted")
    engine = [process for process in started if process.pid not in before]
    assert engine, "the run started no engine process"
    _, alive = psutil.wait_procs(engine, timeout=10)
    assert not alive, [process.name() for process in alive]
