"""`icpo-infer run` and `icpo-infer compare` end to end: real hf backend, tiny model, arithmetic questions."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from boxed_model import teach_boxed_answers
from conftest import fixture_problems
from interruptions import interrupt_at_save, signalled_run
from transformers import AutoConfig

from icpo_infer import cli
from icpo_infer.backends.hf import HFBackend
from icpo_infer.cli import main
from icpo_infer.config import parse_config
from icpo_infer.icpo import run_method
from icpo_infer.infer_config import ROUND_METHODS, InferConfig
from icpo_infer.results import RESULTS_FILE, STATE_FILE, ChunkState
from icpo_infer.run_log import run_log
from icpo_train.cli import main as icpo_train_main

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "infer" / "tiny.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def boxed_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    questions = [row["problem"] for row in fixture_problems()[:3]]
    return teach_boxed_answers(tiny_model_dir, tmp_path_factory.mktemp("boxed"), questions)


@pytest.fixture(scope="module")
def infer(boxed_model_dir, problems_file):
    def run(output_dir, *args: str) -> int:
        dataset = str(problems_file)
        argv = ["run", "--config", RECIPE, "--model", str(boxed_model_dir), "--dataset", dataset]
        return main([*argv, "--output-dir", str(output_dir), *args])

    return run


@pytest.fixture(scope="module")
def whole(infer, tmp_path_factory) -> Path:
    """An uninterrupted ME-ICPO run of two questions, for interrupted ones to match."""
    out = tmp_path_factory.mktemp("whole")
    assert infer(out, "--limit", "2") == 0
    return out


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_me_icpo_run_writes_results_metrics_and_plot(infer, tmp_path):
    out = tmp_path / "me-icpo"
    assert infer(out, "--limit", "3") == 0
    results = rows(out)
    assert [r["id"] for r in results] == [row["id"] for row in fixture_problems()[:3]]
    for result in results:
        assert len(result["rounds"]) == 2 and len(result["final"]["texts"]) == 2
        assert result["rounds"][0]["history"] == []
        for record in result["rounds"]:
            assert len(record["samples"]["texts"]) == len(record["rewards"]) == 2
            assert all(
                (reward is None) == (answer is None)
                for reward, answer in zip(record["rewards"], record["samples"]["answers"], strict=True)
            )
    records = [record for result in results for record in result["rounds"]]
    # The taught model answers, so every phase ran through the real backend.
    assert any(r["chosen_summary"] for r in records)
    assert any(e is not None for r in records for e in r["entropies"])
    assert any(r["eviction_entropies"] for r in records)
    m = metrics(out)
    assert m["num_questions"] == 3 and m["skipped"] == 0 and m["k"] == 2
    assert len(m["mean_per_round"]) == len(m["maj_per_round"]) == 2
    assert m["self_improvement"] == pytest.approx(m["mean@k"] - m["mean_per_round"][0])
    assert 1 <= m["engine_calls"] <= 9 and m["prompt_tokens"] > 0 and m["generated_tokens"] > 0
    assert m["wall_time_s"] > 0 and m["config"]["method"] == "me-icpo"
    assert (out / "accuracy_vs_round.png").read_bytes().startswith(PNG_MAGIC)


def test_rerun_resumes_refuses_other_settings_and_overwrite_starts_over(infer, tmp_path, capsys):
    out = tmp_path / "run"
    assert infer(out, "--limit", "2") == 0
    first = rows(out)
    calls = metrics(out)["engine_calls"]

    assert infer(out, "--limit", "3") == 0  # resumes: only the third question is new
    resumed = rows(out)
    assert resumed[:2] == first and len(resumed) == 3
    assert metrics(out)["num_questions"] == 3
    calls = metrics(out)["engine_calls"]
    assert infer(out, "--limit", "3") == 0  # all done: no engine call
    assert rows(out) == resumed and metrics(out)["engine_calls"] == calls

    capsys.readouterr()
    assert infer(out, "--limit", "3", "--k", "3") == 2
    assert "k (2 there, 3 now)" in capsys.readouterr().err
    assert rows(out) == resumed

    assert infer(out, "--limit", "2", "--overwrite") == 0
    assert rows(out) == first  # seeded end to end: the same questions give the same results


def test_a_run_written_before_a_setting_existed_resumes_at_its_default(infer, tmp_path, capsys):
    out = tmp_path / "run"
    assert infer(out, "--limit", "1", "--method", "single") == 0
    stored = json.loads((out / "config.json").read_text())
    del stored["feedback_max_tokens"], stored["reward_model"]
    (out / "config.json").write_text(json.dumps(stored))
    assert infer(out, "--limit", "2", "--method", "single") == 0
    assert len(rows(out)) == 2
    (out / "config.json").write_text(json.dumps(stored))
    assert infer(out, "--limit", "2", "--method", "single", "--feedback-max-tokens", "9") == 2
    assert "feedback_max_tokens (1024 there, 9 now)" in capsys.readouterr().err


def test_results_do_not_depend_on_which_questions_run_together(infer, tmp_path):
    assert infer(tmp_path / "together", "--limit", "3", "--batch-questions", "3") == 0
    assert infer(tmp_path / "apart", "--limit", "3", "--batch-questions", "1") == 0
    together = rows(tmp_path / "together")
    assert rows(tmp_path / "apart") == together
    # A resumed run whose first chunk is cut elsewhere samples the third question as the others did.
    assert infer(tmp_path / "resumed", "--limit", "1", "--batch-questions", "2") == 0
    assert infer(tmp_path / "resumed", "--limit", "3", "--batch-questions", "2") == 0
    assert rows(tmp_path / "resumed") == together


@pytest.mark.parametrize("method", ["single", "best-of-n", "self-refine"])
def test_an_interrupted_write_is_dropped_and_redone(infer, tmp_path, method):
    out = tmp_path / "run"
    assert infer(out, "--limit", "2", "--method", method) == 0
    complete = (out / "results.jsonl").read_text()
    lines = complete.splitlines(keepends=True)
    (out / "results.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    assert infer(out, "--limit", "2", "--method", method) == 0
    redone = rows(out)
    assert [r["id"] for r in redone] == [json.loads(line)["id"] for line in lines]
    assert redone[0] == json.loads(lines[0]) and metrics(out)["num_questions"] == 2


@pytest.mark.parametrize(("method", "calls_per_chunk"), [("best-of-n", 2), ("self-refine", 5)])
def test_other_methods_resume_and_report_their_cost(infer, tmp_path, method, calls_per_chunk):
    # self-refine with the recipe's 2 rounds: sample, then feedback and refine per round.
    args = ["--method", method, "--feedback-max-tokens", "8"]
    assert infer(tmp_path / "whole", "--limit", "3", *args) == 0
    assert infer(tmp_path / "resumed", "--limit", "2", *args) == 0
    assert metrics(tmp_path / "resumed")["engine_calls"] == calls_per_chunk
    assert infer(tmp_path / "resumed", "--limit", "3", *args) == 0
    resumed, whole = rows(tmp_path / "resumed"), rows(tmp_path / "whole")
    for result in whole:
        if method == "best-of-n":
            assert result["pick"]["scorer"] == "mean_logprob" and len(result["pick"]["scores"]) == 2
            assert result["metrics"]["best"] == float(result["final"]["correct"][result["pick"]["chosen"]])
        else:
            assert [len(r["feedback"]) for r in result["rounds"]] == [2, 2]
    if method == "best-of-n":  # scores computed in batches of another shape differ in the last digits
        for a, b in zip(resumed, whole, strict=True):
            assert a["pick"]["scores"] == pytest.approx(b["pick"]["scores"], abs=1e-5)
            a["pick"]["scores"] = b["pick"]["scores"]
    assert resumed == whole
    m = metrics(tmp_path / "resumed")
    assert m["engine_calls"] == 2 * calls_per_chunk  # two runs, one chunk each
    assert m["prompt_tokens"] > 0 and m["generated_tokens"] > 0 and m["wall_time_s"] > 0
    if method == "best-of-n":
        assert metrics(tmp_path / "whole")["best@k"] == pytest.approx(
            sum(r["metrics"]["best"] for r in whole) / 3
        )
    else:
        assert len(metrics(tmp_path / "whole")["mean_per_round"]) == 2


def test_best_of_n_with_a_reward_model_counts_its_cost(infer, tiny_reward_model_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        infer(out, "--limit", "2", "--method", "best-of-n", "--reward-model", str(tiny_reward_model_dir)) == 0
    )
    for result in rows(out):
        assert result["pick"]["scorer"] == str(tiny_reward_model_dir) and len(result["pick"]["scores"]) == 2
    m = metrics(out)
    assert m["engine_calls"] == 2  # the generator's sampling call and the reward model's scoring call
    sampled = sum(len(r["final"]["texts"]) for r in rows(out))
    assert m["prompt_tokens"] > sampled and "best@k" in m


def test_compare_prints_differences_and_saves_a_plot(infer, tmp_path, capsys):
    assert infer(tmp_path / "single", "--limit", "3", "--method", "single") == 0
    assert infer(tmp_path / "me-icpo", "--limit", "3") == 0
    assert infer(tmp_path / "best-of-n", "--limit", "3", "--method", "best-of-n") == 0
    plot, cost_plot = tmp_path / "compare.png", tmp_path / "cost.png"
    capsys.readouterr()
    dirs = [str(tmp_path / name) for name in ("single", "me-icpo", "best-of-n")]
    assert main(["compare", *dirs, "--output", str(plot), "--cost-output", str(cost_plot)]) == 0
    table = capsys.readouterr().out
    base, icpo = metrics(tmp_path / "single"), metrics(tmp_path / "me-icpo")
    single_line, icpo_line = table.splitlines()[2:4]
    assert single_line.split()[:3] == ["single", "single", f"{100 * base['mean@k']:.1f}"]
    assert icpo_line.split()[:4] == [
        "me-icpo",
        "me-icpo",
        f"{100 * icpo['mean@k']:.1f}",
        f"{100 * (icpo['mean@k'] - base['mean@k']):+.1f}",
    ]
    best = metrics(tmp_path / "best-of-n")
    best_line = table.splitlines()[4].split()
    # accuracy as each method answers (best-of-n: its pick), then generated tokens per question and calls
    assert best_line[-4:] == [
        f"{100 * best['best@k']:.1f}",
        f"{100 * (best['best@k'] - base['mean@k']):+.1f}",
        f"{best['generated_tokens'] / 3:.0f}",
        str(best["engine_calls"]),
    ]
    # the self-reward diagnostics of the ICPO run, per round
    diagnostics = [line.split() for line in table.splitlines() if line.startswith("me-icpo ")][1:]
    pooled = icpo["self_reward"]
    assert [row[:3] for row in diagnostics] == [
        ["me-icpo", str(r + 1), f"{100 * pooled['pseudo_label_accuracy'][r]:.1f}"] for r in range(2)
    ]
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert cost_plot.read_bytes().startswith(PNG_MAGIC)
    # Settings that move the figures without changing what they measure are named.
    assert infer(tmp_path / "gold", "--limit", "3", "--reward", "gt", "--dtype", "bfloat16") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "me-icpo"), str(tmp_path / "gold"), "--output", str(plot)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: gold ran")]
    assert notes == [
        "note: gold ran with dtype 'bfloat16', the first run with 'auto'",
        "note: gold ran with reward 'gt', the first run with 'self'",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "beam"], "use one of single, majority, best-of-n, self-refine, random-icpo, me-icpo"),
        (["--backend", "tgi"], "use one of hf, vllm, openai"),
        (["--backend", "openai"], "--backend openai needs a server: pass --base-url"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url is for --backend openai"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"], "127.0.0.1:9/v1: no server answers"),
        (["--problem-field", "question"], "--problem-field"),
        (
            ["--adapter", "runs/x/adapters/icpo"],
            "is no directory, nor a Hub repo id: train the adapter first",
        ),
    ],
)
def test_bad_input_is_a_clean_error(infer, tmp_path, capsys, args, message):
    assert infer(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def dataset_lines(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ("flag", "unknown option '--num-rounds'. Did you mean '--rounds'?"),
        ("model", "--model: '/no/such/model' is no local directory, nor a Hub repo id"),
        ("line", "could not read '{dataset}' (line 2 is not valid JSON"),
        ("empty", "--dataset: '{dataset}' is empty"),
        (
            "recipe",
            "--config: '{recipe}' is not valid YAML (expected ',' or ']', but got ':' at line 2, column 7)",
        ),
        ("templates", "--templates: '{templates}' is not valid YAML"),
    ],
)
def test_common_mistakes_are_one_line_errors_that_write_nothing(
    boxed_model_dir, tmp_path, capsys, mistake, message
):
    dataset = dataset_lines(tmp_path / "ok.jsonl", '{"id": 1, "problem": "What is 2+3?", "answer": "5"}')
    argv = ["run", "--config", RECIPE, "--model", str(boxed_model_dir), "--output-dir", str(tmp_path / "run")]
    if mistake == "flag":
        argv += ["--num-rounds", "3"]
    elif mistake == "model":
        argv[argv.index("--model") + 1] = "/no/such/model"
    elif mistake == "line":
        dataset = dataset_lines(
            tmp_path / "bad.jsonl", '{"id": 1, "problem": "x", "answer": "1"}', '{"id": 2,'
        )
    elif mistake == "empty":
        dataset = dataset_lines(tmp_path / "empty.jsonl")
    else:  # a YAML file cut short
        (tmp_path / f"{mistake}.yaml").write_text("k: [1, 2\nrounds: 3\n")
        argv += ["--templates" if mistake == "templates" else "--config", str(tmp_path / f"{mistake}.yaml")]
    assert main([*argv, "--dataset", dataset]) == 2
    err = capsys.readouterr().err  # datasets' progress lines may come first
    files = {name: tmp_path / f"{name}.yaml" for name in ("recipe", "templates")}
    assert message.format(dataset=dataset, **files) in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a failed start leaves no directory to refuse the next one


def test_no_command_writes_into_another_commands_output(
    infer, whole, boxed_model_dir, problems_file, tmp_path, capsys
):
    trajectories = tmp_path / "trajectories"
    trajectories.mkdir()
    (trajectories / "build_config.json").write_text("{}")
    assert infer(trajectories) == 2
    assert (
        "holds the output of `icpo-train build-trajectories` (build_config.json); choose another "
        "--output-dir" in capsys.readouterr().err
    )
    assert sorted(p.name for p in trajectories.iterdir()) == ["build_config.json"]
    model = ["--model", str(boxed_model_dir)]
    for argv, flag in [
        (["build-trajectories", *model, "--dataset", str(problems_file), "--output", str(whole)], "--output"),
        (
            [
                "train",
                "--model_name_or_path",
                str(boxed_model_dir),
                "--trajectories",
                "t",
                "--output_dir",
                str(whole),
            ],
            "--output_dir",
        ),
    ]:
        assert icpo_train_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"holds the output of `icpo-infer run` (config.json); choose another {flag}" in err


def test_the_context_length_defaults_to_the_models_limit_and_may_not_pass_it(
    boxed_model_dir, problems_file, tmp_path, capsys
):
    limit = AutoConfig.from_pretrained(boxed_model_dir).max_position_embeddings
    recipe = tmp_path / "recipe.yaml"  # the tiny recipe without its context_length
    lines = Path(RECIPE).read_text().splitlines(keepends=True)
    recipe.write_text("".join(line for line in lines if not line.startswith("context_length")))
    argv = ["run", "--config", str(recipe), "--model", str(boxed_model_dir), "--dataset", str(problems_file)]
    assert main([*argv, "--limit", "1", "--output-dir", str(tmp_path / "run")]) == 0
    assert f"context length: {limit} tokens, the model's limit" in capsys.readouterr().out
    assert metrics(tmp_path / "run")["config"]["context_length"] == limit
    assert main([*argv, "--limit", "1", "--output-dir", str(tmp_path / "run")]) == 0  # resumes: the same
    assert main([*argv, "--context-length", str(limit + 1), "--output-dir", str(tmp_path / "long")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"context_length={limit + 1} is more than the {limit} tokens '{boxed_model_dir}' takes" in err
    assert not (tmp_path / "long").exists()
    trajectories = ["build-trajectories", "--model", str(boxed_model_dir), "--dataset", str(problems_file)]
    assert icpo_train_main([*trajectories, "--output", str(tmp_path / "t"), "--context-length", "99999"]) == 2
    assert "context_length=99999 is more than" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(infer, tmp_path, capsys, monkeypatch):
    finished = []

    def interrupt_after_one(backend, problems, config, done, on_chunk, *args):
        def keep(results):
            on_chunk(results)
            finished.extend(results)
            raise KeyboardInterrupt

        return run_method(backend, problems, config, done, keep, *args)

    monkeypatch.setattr(cli, "run_method", interrupt_after_one)
    assert infer(tmp_path / "run", "--limit", "2", "--batch-questions", "1") == 130
    err = capsys.readouterr().err
    assert "interrupted; finished questions and finished rounds are kept" in err
    assert "Traceback" not in err
    assert len(rows(tmp_path / "run")) == 1
    # show and compare say the run is unfinished, and how far it got.
    assert main(["show", str(tmp_path / "run")]) == 0
    assert "INCOMPLETE: 1 of 2 questions done; rerun" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--allow-mismatch"]) == 0
    assert "* INCOMPLETE, figures over the finished questions only: " in capsys.readouterr().out
    monkeypatch.undo()
    assert infer(tmp_path / "run", "--limit", "2", "--batch-questions", "1") == 0
    assert main(["show", str(tmp_path / "run")]) == 0
    assert "INCOMPLETE" not in capsys.readouterr().out
    assert infer(tmp_path / "whole", "--limit", "2") == 0
    assert rows(tmp_path / "run") == rows(tmp_path / "whole")


def test_base_url_may_be_repeated_and_the_flags_replace_the_recipes_list(tmp_path):
    recipe = tmp_path / "servers.yaml"
    recipe.write_text("backend: openai\nbase_url: [http://a:8000/v1]\n")
    required = ["--config", str(recipe), "--model", "m", "--dataset", "d", "--output-dir", str(tmp_path)]
    assert parse_config(InferConfig, required).base_url == ["http://a:8000/v1"]
    flags = ["--base-url", "http://b:8000/v1", "--base-url", "http://c:8000/v1"]
    assert parse_config(InferConfig, [*required, *flags]).base_url == ["http://b:8000/v1", "http://c:8000/v1"]


def test_a_full_model_passed_as_adapter_is_a_clean_error(infer, boxed_model_dir, tmp_path, capsys):
    assert infer(tmp_path / "run", "--adapter", str(boxed_model_dir)) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "goes in --model" in err and "Traceback" not in err


def test_compare_needs_finished_runs(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err


def test_output_files_share_one_mode_and_the_clis_say_their_version(infer, tmp_path, capsys):
    assert infer(tmp_path / "run", "--limit", "1", "--method", "single") == 0
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.json", "results.jsonl", "log.txt"} <= set(modes)
    assert len(set(modes.values())) == 1
    capsys.readouterr()
    assert main(["--version"]) == 0 and icpo_train_main(["--version"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"icpo {version('icpo')}"] * 2


def test_compare_refuses_runs_that_measure_different_things_and_writes_beside_the_first(
    infer, tmp_path, capsys
):
    assert infer(tmp_path / "r2", "--limit", "2") == 0
    assert infer(tmp_path / "r3", "--limit", "2", "--rounds", "3") == 0
    assert infer(tmp_path / "other-questions", "--limit", "1") == 0
    assert infer(tmp_path / "k3", "--limit", "2", "--method", "single", "--k", "3") == 0
    capsys.readouterr()
    for other, problem in [
        ("r3", "r3 has rounds 3, the first run 2"),
        ("other-questions", "other-questions ran other questions (1, 0 not in the first run's 2)"),
        ("k3", "k3 has k 3, the first run 2"),
    ]:
        assert main(["compare", str(tmp_path / "r2"), str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert problem in err and "--allow-mismatch" in err and "Traceback" not in err
    assert not (tmp_path / "r2" / "compare.png").exists()

    assert main(["compare", str(tmp_path / "r2"), str(tmp_path / "r3"), "--allow-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "warning: r3 has rounds 3" in captured.err and "% of questions" in captured.out
    for plot in ("compare.png", "cost_accuracy.png"):  # beside the first run, not in the working directory
        assert (tmp_path / "r2" / plot).read_bytes().startswith(PNG_MAGIC)


def test_rounds_of_runs_of_other_lengths_line_up_before_one_final(infer, tmp_path, monkeypatch):
    assert infer(tmp_path / "r2", "--limit", "1") == 0
    assert infer(tmp_path / "r3", "--limit", "1", "--rounds", "3") == 0
    drawn = {}

    def keep(self, *args, **kwargs):
        drawn.setdefault("lines", []).append(list(args[0]))
        return original(self, *args, **kwargs)

    from matplotlib.axes import Axes

    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", keep)
    monkeypatch.setattr(
        Axes, "set_xticks", lambda self, ticks, labels: drawn.update(ticks=(list(ticks), labels))
    )
    assert main(["compare", str(tmp_path / "r2"), str(tmp_path / "r3"), "--allow-mismatch"]) == 0
    assert drawn["lines"] == [[1, 2, 4], [1, 2, 3, 4]]
    assert drawn["ticks"] == ([1, 2, 3, 4], ["1", "2", "3", "final"])


def test_show_prints_one_runs_summary(infer, tmp_path, capsys):
    assert infer(tmp_path / "run", "--limit", "2") == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    m = metrics(tmp_path / "run")
    assert out.startswith("me-icpo of ") and "2 questions, k = 2" in out
    assert f"mean@k per round: 1 {100 * m['mean_per_round'][0]:.1f}" in out
    assert f"{100 * m['mean@k']:.1f}" in out and "self-reward per round" in out


@pytest.mark.parametrize("method", ROUND_METHODS)
def test_a_run_interrupted_between_rounds_resumes_from_the_next_round(
    infer, tmp_path, capsys, monkeypatch, method
):
    args = ["--limit", "2", "--batch-questions", "1", "--method", method, "--feedback-max-tokens", "8"]
    assert infer(tmp_path / "whole", *args) == 0
    interrupt_at_save(monkeypatch, 3)  # 2 rounds per chunk: the second chunk's first round
    out = tmp_path / "run"
    assert infer(out, *args) == 130
    assert len(rows(out)) == 1 and json.loads((out / STATE_FILE).read_text())["round"] == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert infer(out, *args) == 0
    assert "resuming: 1/2 questions done, 1 of 2 rounds done for the next 1" in capsys.readouterr().err
    assert rows(out) == rows(tmp_path / "whole") and not (out / STATE_FILE).exists()
    # What the kept round cost is counted once: the two runs spent what the uninterrupted one did.
    assert metrics(out)["engine_calls"] == metrics(tmp_path / "whole")["engine_calls"]


def test_a_run_interrupted_inside_a_round_loses_only_that_round(infer, whole, tmp_path, monkeypatch):
    out = tmp_path / "run"
    generate = HFBackend.generate
    calls_after_round_1 = []

    def interrupt_inside_round_2(self, *args, **kwargs):
        if (out / STATE_FILE).exists():
            calls_after_round_1.append(1)
            if len(calls_after_round_1) == 2:  # round 2's second engine call: it has sampled
                raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(HFBackend, "generate", interrupt_inside_round_2)
    assert infer(out, "--limit", "2") == 130
    assert not (out / RESULTS_FILE).exists() and json.loads((out / STATE_FILE).read_text())["round"] == 1
    monkeypatch.undo()
    assert infer(out, "--limit", "2") == 0
    assert rows(out) == rows(whole)


def test_sigterm_stops_like_ctrl_c_after_a_round_and_the_same_command_resumes(
    infer, whole, boxed_model_dir, problems_file, tmp_path
):
    out = tmp_path / "run"
    argv = [
        "run",
        "--config",
        RECIPE,
        "--model",
        str(boxed_model_dir),
        "--dataset",
        str(problems_file),
    ]
    argv += ["--output-dir", str(out), "--limit", "2"]
    ended = signalled_run(out / STATE_FILE, "icpo-infer", argv, signal.SIGTERM)
    assert ended.returncode == 143, ended.stderr[-3000:]
    last = ended.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("icpo-infer run: terminated; finished questions and finished rounds are kept")
        and "Traceback" not in ended.stderr
    )
    assert json.loads((out / STATE_FILE).read_text())["round"] == 1
    assert infer(out, "--limit", "2") == 0
    assert rows(out) == rows(whole)


def test_a_state_write_cut_short_leaves_the_last_state_and_no_partial_file(tmp_path, monkeypatch):
    state = ChunkState(tmp_path / STATE_FILE)
    state.save({"round": 1, "questions": []})

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        state.save({"round": 2, "questions": []})
    assert state.load() == {"round": 1, "questions": []}
    assert [path.name for path in tmp_path.iterdir()] == [STATE_FILE]


def test_the_log_holds_what_the_run_printed_and_a_resume_appends_to_it(infer, tmp_path, capsys):
    out = tmp_path / "run"
    assert infer(out, "--limit", "1", "--method", "single") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("1 questions: mean@2")
    first = (out / "log.txt").read_text()
    assert first.rstrip().endswith(f"INFO stdout: {summary}")
    assert infer(out, "--limit", "2", "--method", "single") == 0
    resumed = (out / "log.txt").read_text()
    assert resumed.startswith(first) and "INFO stdout: 2 questions: mean@2" in resumed[len(first) :]


def test_run_log_records_stdout_stderr_and_logging_then_lets_go(tmp_path, capsys, monkeypatch):
    # Without pytest's handlers, as in a CLI process: logged warnings still reach the console.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    stdout, stderr = sys.stdout, sys.stderr
    with run_log(tmp_path):
        print("step 1\rstep 2 of 2")  # a progress bar's redraws: its last state is kept
        print("UserWarning: watch out", file=sys.stderr)
        logging.getLogger("icpo_infer.test").warning("a logged warning")
    assert sys.stdout is stdout and sys.stderr is stderr and logging.getLogger().handlers == []
    print("after")
    log = (tmp_path / "log.txt").read_text()
    assert "INFO stdout: step 2 of 2\n" in log and "step 1" not in log
    assert "INFO stderr: UserWarning: watch out" in log
    assert "WARNING icpo_infer.test: a logged warning" in log and "after" not in log
    captured = capsys.readouterr()
    assert "step 1\rstep 2 of 2" in captured.out and "a logged warning" in captured.err
