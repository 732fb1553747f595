"""The openai backend against real vLLM OpenAI servers (the CPU build), beside the offline vLLM engine.

One server serves the module, on 127.0.0.1, with LoRA and an API key (a proxy in front of it stands for
a second server, or for one that fails); one offline engine of the same tiny model is the reference: the
server must sample and score exactly as it does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from script_modules import load_script
from test_backends import conformance_prompts
from test_scripts import save_adapter, save_checkpoint
from test_vllm_workflows import LOOP, all_texts, final_texts
from trajectory_fixtures import integer_problems
from transformers import AutoConfig
from vllm_server import VLLMServer

from icpo_infer import cli
from icpo_infer.backends import context_limit, make_backend
from icpo_infer.backends.base import Backend, BackendOptions, SamplingParams, ServerError
from icpo_infer.cli import run
from icpo_infer.config import ConfigError, parse_config
from icpo_infer.infer_config import METHODS, InferConfig
from icpo_infer.prompts import answer_type_of, render_prompt
from icpo_infer.results import read_results
from icpo_train.callbacks import RESULTS_FILE
from icpo_train.trajectories import TrajectoryConfig, build_trajectories
from icpo_train.trajectory_data import load_trajectories

pytestmark = pytest.mark.vllm

API_KEY_ENV = "ICPO_TEST_SERVER_KEY"
API_KEY = "sk-icpo-test-4c1d9e"  # what the servers require; it must appear in no output file
# The CPU servers run with --enable-lora: one scoring request at a time each (see OpenAIBackend.score).
SERVED = {"api_key_env": API_KEY_ENV, "score_concurrency": 1}
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "infer" / "tiny.yaml"


@pytest.fixture(scope="module")
def adapter_dir(ending_model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(ending_model_dir, directory, seed=0)
    return directory


@pytest.fixture(scope="module")
def api_key():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(API_KEY_ENV, API_KEY)
        yield API_KEY_ENV


@pytest.fixture(scope="module")
def server(ending_model_dir, tmp_path_factory, api_key) -> VLLMServer:
    """The module's one server; where a test needs a second URL, a proxy in front of it gives one (the
    client treats every URL as a server of its own)."""
    started = VLLMServer(ending_model_dir, tmp_path_factory.mktemp("server-logs") / "server.log", API_KEY)
    try:
        yield started.launch().wait()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def offline(ending_vllm_engine) -> Backend:
    """The offline engine of the servers' model, which the servers must match."""
    return ending_vllm_engine


def served(model: Path | str, *servers: VLLMServer | FlakyProxy, **changes) -> Backend:
    options = {"base_url": [s.url for s in servers], **SERVED, **changes}
    return make_backend("openai", BackendOptions(str(model), **options))


@pytest.fixture(scope="module")
def backend(ending_model_dir, server) -> Backend:
    backend = served(ending_model_dir, server)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(backend) -> list[str]:
    return conformance_prompts(backend.tokenizer)


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in integer_problems(3)))
    return path


def infer_config(
    model: Path, dataset: Path, output_dir: Path, *servers: VLLMServer, **changes
) -> InferConfig:
    options = {**LOOP, "backend": "openai", "base_url": [s.url for s in servers], **SERVED}
    return InferConfig(
        model=str(model), dataset=str(dataset), output_dir=str(output_dir), **options | changes
    )


def offline_config(config: InferConfig, output_dir: Path) -> InferConfig:
    return dataclasses.replace(
        config,
        backend="vllm",
        base_url=[],
        api_key_env=None,
        score_concurrency=None,
        output_dir=str(output_dir),
        kv_cache_gb=1,
    )


def test_a_seeded_prompt_samples_through_the_server_as_on_the_offline_engine(backend, offline, prompts):
    for params in [
        SamplingParams(n=3, max_new_tokens=12, seed=7),
        SamplingParams(
            n=3, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=8, seed=3
        ),
        SamplingParams(n=2, temperature=0, max_new_tokens=10),
        [SamplingParams(n=2, max_new_tokens=6, seed=1), SamplingParams(n=1, temperature=0, max_new_tokens=6)]
        * 3,
    ]:
        before = [dataclasses.replace(b.usage) for b in (backend, offline)]
        assert backend.generate(prompts, params) == offline.generate(prompts, params)
        spent = [
            [getattr(b.usage, k) - getattr(usage, k) for k in vars(usage)]
            for b, usage in zip((backend, offline), before, strict=True)
        ]
        assert spent[0] == spent[1]  # the token counts of the server's usage, as the engine counts them
    completions = [
        c
        for g in backend.generate(prompts, SamplingParams(n=4, max_new_tokens=12, seed=0))
        for c in g.completions
    ]
    assert {c.finished for c in completions} == {True, False}  # EOS and the token limit both seen
    # Stop strings taken from inside the samples cut them as the engine does.
    params = SamplingParams(n=1, max_new_tokens=16, seed=3)
    texts = [g.completions[0].text for g in backend.generate(prompts, params)]
    stops = tuple(text[4:6] for text in texts if len(text) > 6 and text[4:6].isprintable())[:2]
    assert len(stops) == 2
    stopped = backend.generate(prompts, params.replace(stop=stops))
    assert stopped == offline.generate(prompts, params.replace(stop=stops))
    assert [g.completions[0].text for g in stopped] != texts


def test_scores_and_an_adapter_loaded_at_run_time_equal_the_offline_engines(
    backend, offline, prompts, adapter_dir, server
):
    completions = [" The answer is \\boxed{5}.", "", "x^2 = 15", "\n\n", "7", " so 15"]
    before = dataclasses.replace(backend.usage)
    base = backend.score(prompts, completions)
    assert backend.usage.engine_calls == before.engine_calls + 1
    assert backend.usage.generated_tokens == before.generated_tokens
    assert backend.usage.prompt_tokens - before.prompt_tokens == sum(
        len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) + s.num_tokens
        for p, s in zip(prompts, base, strict=True)
    )
    for ours, theirs in zip(base, offline.score(prompts, completions), strict=True):
        assert ours.num_tokens == theirs.num_tokens
        assert ours.logprob == pytest.approx(theirs.logprob, rel=1e-5, abs=1e-5)

    adapter = str(adapter_dir)
    adapted = backend.score(prompts, completions, adapter=adapter)
    for ours, theirs in zip(adapted, offline.score(prompts, completions, adapter=adapter), strict=True):
        assert ours.logprob == pytest.approx(theirs.logprob, rel=1e-5, abs=1e-5)
    assert all(abs(a.logprob - b.logprob) > 0.1 for a, b in zip(adapted, base, strict=True))
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    assert backend.generate(prompts, greedy, adapter=adapter) == offline.generate(
        prompts, greedy, adapter=adapter
    )
    assert len(server.served()) == 2  # the model and the adapter

    backend.release(adapter)
    assert server.served() == [backend.options.model]
    assert backend.score(prompts, completions) == base


def test_methods_run_through_the_server_as_on_the_offline_engine(
    ending_model_dir, dataset_file, server, offline, tmp_path
):
    for method in METHODS:
        config = infer_config(ending_model_dir, dataset_file, tmp_path / method, server, method=method)
        metrics = run(config)
        assert metrics["num_questions"] == 3 and metrics["engine_calls"] >= 1
        if method == "me-icpo":
            run(offline_config(config, tmp_path / "offline"), offline)
            assert all_texts(tmp_path / method) == all_texts(tmp_path / "offline")
            written = json.loads((tmp_path / method / "metrics.json").read_text())
            assert written["config"]["api_key_env"] == API_KEY_ENV
    for path in tmp_path.rglob("*"):  # the key is read from the environment only, never written
        assert not path.is_file() or API_KEY.encode() not in path.read_bytes(), path


def test_two_servers_give_the_results_of_one(ending_model_dir, dataset_file, server, tmp_path):
    config = infer_config(ending_model_dir, dataset_file, tmp_path / "one", server, max_concurrency=4)
    run(config)
    second = FlakyProxy(server.url)  # another URL, as a second server's
    urls = [server.url, second.url]
    both = served(ending_model_dir, server, second, max_concurrency=4)
    run(dataclasses.replace(config, base_url=urls, output_dir=str(tmp_path / "two")), both)
    second.close()
    assert all_texts(tmp_path / "two") == all_texts(tmp_path / "one")
    assert all(url.requests > 0 for url in both.servers)  # the requests were spread over both


def test_a_server_gone_mid_run_fails_it_with_its_url_and_a_rerun_resumes(
    ending_model_dir, dataset_file, server, tmp_path, capsys
):
    """The server behind ``gone`` is killed after the first question (its connections drop, in flight or
    new), then comes back at the same URL."""
    gone = FlakyProxy(server.url)

    def command(output: Path, server: VLLMServer | FlakyProxy) -> list[str]:
        return [
            *(
                "run",
                "--config",
                str(TINY_RECIPE),
                "--model",
                str(ending_model_dir),
                "--dataset",
                str(dataset_file),
            ),
            *(
                "--output-dir",
                str(output),
                "--batch-questions",
                "1",
                "--dtype",
                "float32",
                "--backend",
                "openai",
            ),
            *("--base-url", server.url, "--api-key-env", API_KEY_ENV, "--score-concurrency", "1"),
        ]

    results = tmp_path / "resumed" / "results.jsonl"

    def kill_after_the_first_question() -> None:
        deadline = time.monotonic() + 300
        while not (results.is_file() and results.read_text().count("\n") >= 1):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        gone.down = True

    killer = threading.Thread(target=kill_after_the_first_question, daemon=True)
    killer.start()
    assert cli.main(command(tmp_path / "resumed", gone)) == 1
    killer.join(timeout=60)
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith(f"icpo-infer run: error: {gone.url} failed a request"), error
    assert 1 <= len(read_results(results)) < 3

    gone.down = False  # back at the same URL: the same command
    assert cli.main(command(tmp_path / "resumed", gone)) == 0
    gone.close()
    assert cli.main(command(tmp_path / "whole", server)) == 0
    assert all_texts(tmp_path / "resumed") == all_texts(tmp_path / "whole")


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server that answers its first POSTs with the given
    error statuses (as an overloaded or restarting server does) and forwards everything else. While
    ``down`` it drops every connection without an answer, those in flight included, as a killed server
    does; set back, the same URL answers again, as a restarted server does."""

    def __init__(self, target: str, failures: list[int] = ()) -> None:
        self.failures = list(failures)
        self.down = False
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if proxy.down:
                    self.close_connection = True
                    return
                with lock:
                    status = proxy.failures.pop(0) if method == "POST" and proxy.failures else None
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: self.headers[k] for k in ("Authorization", "Content-Type") if k in self.headers}
                response = httpx.request(
                    method, target + self.path.removeprefix("/v1"), content=body, headers=headers, timeout=600
                )
                if proxy.down:  # killed while the request was in flight
                    self.close_connection = True
                    return
                self.send_response(response.status_code)
                self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def do_GET(self) -> None:
                self.forward("GET")

            def do_POST(self) -> None:
                self.forward("POST")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_429_and_5xx_are_retried_and_a_server_that_keeps_failing_is_named(
    ending_model_dir, server, backend, prompts
):
    params = SamplingParams(n=2, max_new_tokens=6, seed=4)
    proxy = FlakyProxy(server.url, failures=[503, 429, 502])
    try:
        assert served(ending_model_dir, proxy).generate(prompts[:1], params) == backend.generate(
            prompts[:1], params
        )
        assert proxy.failures == []  # three failures, then the answer
        proxy.failures = [503] * 6
        with pytest.raises(
            ServerError, match=rf"^{re.escape(proxy.url)} failed a request 6 times, the last with HTTP 503"
        ):
            served(ending_model_dir, proxy).generate(prompts[:1], params)
    finally:
        proxy.close()


def test_a_wrong_url_model_or_key_is_a_config_error_before_any_work(
    ending_model_dir, server, monkeypatch, tmp_path
):
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:9/v1: no server answers"):
        make_backend("openai", BackendOptions(str(ending_model_dir), base_url=["http://127.0.0.1:9/v1"]))
    with pytest.raises(ConfigError, match=r"--model 'tiny' is not served at .*--tokenizer"):
        served("tiny", server)
    with pytest.raises(ConfigError, match=r"unauthorised.*--api-key-env"):
        served(ending_model_dir, server, api_key_env=None)
    monkeypatch.delenv(API_KEY_ENV)
    with pytest.raises(ConfigError, match=f"{API_KEY_ENV} is not set"):
        served(ending_model_dir, server)
    with pytest.raises(ConfigError, match="needs a server: pass --base-url"):
        InferConfig(model="m", dataset="d", output_dir=str(tmp_path), backend="openai")
    with pytest.raises(ConfigError, match="--base-url is for --backend openai"):
        InferConfig(model="m", dataset="d", output_dir=str(tmp_path), base_url=["http://x/v1"])


def test_trajectories_built_through_the_server_carry_the_offline_engines_scores(
    ending_model_dir, dataset_file, server, offline, tmp_path
):
    loop = {k: v for k, v in LOOP.items() if k not in ("rounds", "final_k")}
    config = TrajectoryConfig(
        model=str(ending_model_dir), dataset=str(dataset_file), output=str(tmp_path / "traj"), backend="openai",
        base_url=[server.url], **SERVED, rounds=2, group_size=4, **loop,
    )  # fmt: skip
    dataset = load_trajectories(build_trajectories(config))
    assert len(dataset) == 3 * 2
    for row in dataset.filter(lambda row: row["round"] == 1):
        prompt = render_prompt(offline.tokenizer, row["question"], [], answer_type_of(row["answer"]))
        expected = offline.score([prompt] * len(row["responses"]), row["responses"])
        assert row["ref_logps"] == pytest.approx([s.logprob for s in expected], rel=1e-5, abs=1e-5)
        assert row["ref_num_tokens"] == [s.num_tokens for s in expected]


def test_eval_checkpoints_loads_each_checkpoint_into_the_running_server(
    ending_model_dir, dataset_file, server, offline, tmp_path
):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(ending_model_dir, run_dir, step)
    flags = [
        *("--config", str(TINY_RECIPE), "--method", "random-icpo", "--model", str(ending_model_dir)),
        *("--dataset", str(dataset_file), "--dtype", "float32"),
        *("--backend", "openai", "--base-url", server.url, "--api-key-env", API_KEY_ENV),
        *("--score-concurrency", "1"),
    ]
    assert load_script("eval_checkpoints").main(["--run-dir", str(run_dir), *flags]) == 0
    rows = [json.loads(line) for line in (run_dir / "eval" / RESULTS_FILE).read_text().splitlines()]
    assert [row["name"] for row in rows] == ["base", "checkpoint-1", "checkpoint-2"]
    assert server.served() == [str(ending_model_dir)]  # each checkpoint was unloaded after its evaluation
    config = parse_config(InferConfig, [*flags, "--output-dir", str(tmp_path)])
    for row in rows:  # each checkpoint samples as on the offline engine
        alone = dataclasses.replace(offline_config(config, tmp_path / row["name"]), adapter=row["adapter"])
        run(alone, offline)
        assert final_texts(alone.output_dir) == final_texts(row["output_dir"])
    assert len({json.dumps(final_texts(row["output_dir"])) for row in rows}) == 3


def test_the_context_limit_is_the_servers_max_model_len(ending_model_dir, server):
    options = BackendOptions(str(ending_model_dir), base_url=[server.url], api_key_env=API_KEY_ENV)
    assert context_limit("openai", options) == 2048  # its --max-model-len, below the model's positions
    assert (
        context_limit("vllm", options) == AutoConfig.from_pretrained(ending_model_dir).max_position_embeddings
    )
