"""`icpo-train pipeline` end to end on a micro configuration: every stage, the report, resuming."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from icpo_infer.config import ConfigError, parse_config
from icpo_train import cli as train_cli
from icpo_train.e2e import history_probe, pipeline, trajectory_fit
from icpo_train.e2e.pipeline import MODELS, PipelineConfig, format_report, main, run_pipeline
from icpo_train.trajectory_data import load_trajectories

E2E_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "e2e"
# Tiny everything: two seeds finish in well under a minute on one CPU thread.
MICRO = {
    "templates": str(E2E_RECIPES / "templates.yaml"),
    "train_size": 60,
    "validation_size": 4,
    "test_size": 3,
    "vocab_size": 300,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "context_length": 256,
    "pretrain_steps": 3,
    "pretrain_batch_size": 8,
    "trajectory_rounds": 2,
    "group_size": 2,
    "rounds": 2,
    "k": 2,
    "entropy_k": 2,
    "final_k": 2,
    "train_steps": 2,
    "train_batch_size": 2,
    "lora_r": 2,
    "lora_alpha": 4,
}


def micro_config(output_dir: Path, **changes) -> PipelineConfig:
    return PipelineConfig(output_dir=str(output_dir), **{**MICRO, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[PipelineConfig, dict]:
    config = micro_config(tmp_path_factory.mktemp("pipeline"), num_seeds=2)
    return config, run_pipeline(config)


def test_the_pipeline_runs_every_stage_and_reports_every_model(finished):
    config, report = finished
    root = Path(config.output_dir)
    assert json.loads((root / "report.json").read_text()) == report
    assert (root / "accuracy_vs_round.png").stat().st_size > 0
    assert set(report["models"]) == set(MODELS)
    for seed in (0, 1):
        run = root / f"seed-{seed}"
        assert (run / "base" / "model.safetensors").is_file()
        assert (run / "trajectories" / "trajectories.parquet").is_file()
        for model in ("icpo", "sft", "mse"):
            assert (run / "adapters" / model / "adapter_model.safetensors").is_file()
    for model, values in report["models"].items():
        assert set(values) == {"mean_per_round", "maj_per_round", "self_improvement", "single", "majority"}
        assert len(values["mean_per_round"]) == config.rounds + 1  # rounds, then the final samples
        per_seed = [report["seeds"]["per_seed"][str(seed)][model] for seed in (0, 1)]
        # The top level is the mean over seeds, "seeds" holds each seed's values and their spread.
        assert values["self_improvement"] == pytest.approx(sum(m["self_improvement"] for m in per_seed) / 2)
        for m in per_seed:
            assert m["self_improvement"] == pytest.approx(m["mean_per_round"][-1] - m["mean_per_round"][0])
        assert report["seeds"]["std"][model]["single"] >= 0
    assert report["seeds"]["values"] == [0, 1]
    assert report["num_questions"] == {"0": 3, "1": 3}
    assert set(report["comparisons"]) == {"icpo-base", "icpo-sft", "icpo-mse"}
    table = format_report(report)
    assert all(model in table for model in MODELS) and "self-impr." in table


def test_a_rerun_skips_finished_stages_and_a_missing_output_is_rebuilt_alone(finished, capsys):
    config, report = finished
    root = Path(config.output_dir)
    base_weights = root / "seed-0" / "base" / "model.safetensors"
    before = base_weights.stat().st_mtime_ns
    capsys.readouterr()
    assert run_pipeline(config) == report
    # No stage had anything to do, and each says so once per seed.
    assert capsys.readouterr().out.splitlines() == [
        f"[seed {seed}] {stage}: nothing to do, reusing what an earlier run left in {root / f'seed-{seed}'}"
        for seed in (0, 1)
        for stage in ("data", "pretrain", "trajectories", "train", "evaluate")
    ]
    assert base_weights.stat().st_mtime_ns == before

    timings = root / "seed-1" / "timings.json"
    evaluate_before = json.loads(timings.read_text())["evaluate"]
    (root / "seed-1" / "eval" / "sft" / "me-icpo" / "metrics.json").unlink()
    run_pipeline(config)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[seed")]
    work = [line for line in said if "reusing" not in line]
    assert work == ["[seed 1] evaluate: sft with me-icpo"]  # only that evaluation ran again
    assert json.loads(timings.read_text())["evaluate"] > evaluate_before  # its time adds to the stage's
    assert base_weights.stat().st_mtime_ns == before


def test_stages_run_alone_and_name_the_missing_stage(tmp_path, capsys):
    config = micro_config(tmp_path, stages=["data", "pretrain"], models=["base"])
    assert run_pipeline(config) == {}  # no report stage: nothing to report
    assert (tmp_path / "seed-0" / "base" / "model.safetensors").is_file()
    assert not (tmp_path / "seed-0" / "trajectories").exists()
    with pytest.raises(ConfigError, match="'trajectories' stage"):
        run_pipeline(micro_config(tmp_path, stages=["train"]))


def test_a_second_iteration_trains_on_the_histories_of_the_first_and_is_reported(tmp_path):
    config = micro_config(tmp_path, models=["base", "icpo", "sft"], iterations=2)
    report = run_pipeline(config)
    run = tmp_path / "seed-0"
    assert list(report["models"]) == ["base", "icpo", "sft", "icpo2", "sft2"]
    first = load_trajectories(run / "trajectories")
    for model in ("icpo", "sft"):
        assert (run / "adapters" / f"{model}2" / "adapter_model.safetensors").is_file()
        card = (run / f"trajectories-{model}2" / "README.md").read_text()
        assert f"run by the adapter `{run / 'adapters' / model}`" in card
        second = load_trajectories(run / f"trajectories-{model}2")
        assert second["responses"] == first["responses"] and second["ref_logps"] == first["ref_logps"]
    per_seed = report["seeds"]["per_seed"]["0"]
    gap = per_seed["icpo2"]["self_improvement"] - per_seed["sft2"]["self_improvement"]
    assert report["comparisons"]["icpo-sft"]["models"] == ["icpo2", "sft2"]
    assert report["comparisons"]["icpo-sft"]["self_improvement_gap"] == pytest.approx(gap)
    assert "ICPO (icpo2) minus sft2, points [paired bootstrap 95% interval]" in format_report(report)
    # The report's paired numbers are `icpo-infer compare`'s on the same run directories.
    paired = report["comparisons"]["icpo-sft"]["paired"]
    assert paired["self_improvement_diff"] == pytest.approx(100 * gap, abs=1e-4)
    assert paired["b"] == [str(run / "eval" / "icpo2" / "me-icpo")]
    low, high = paired["final_accuracy_diff_ci95"]
    assert low <= paired["final_accuracy_diff"] <= high
    assert len(paired["transitions"]) == config.rounds  # rounds 2..R and the final samples
    with pytest.raises(ConfigError, match="iterations"):
        micro_config(tmp_path, iterations=0)


def test_merged_adapters_evaluate_as_their_lora_requests_do(tmp_path):
    # Two steps that change the samples, so that evaluating the base weights instead would show.
    config = micro_config(
        tmp_path / "lora", models=["base", "icpo"], learning_rate=0.05, eval_methods=["me-icpo"]
    )
    run_pipeline(config)
    for part in ("data", "base", "trajectories", "adapters"):
        shutil.copytree(tmp_path / "lora" / "seed-0" / part, tmp_path / "merged" / "seed-0" / part)
    merged = dataclasses.replace(
        config, output_dir=str(tmp_path / "merged"), stages=["evaluate"], merge_adapters=True
    )
    run_pipeline(merged)

    def finals(root: str, model: str) -> list:
        path = Path(root) / "seed-0" / "eval" / model / "me-icpo" / "results.jsonl"
        return [json.loads(line)["final"] for line in path.open()]

    assert finals(config.output_dir, "icpo") != finals(config.output_dir, "base")
    for model in ("base", "icpo"):
        assert finals(merged.output_dir, model) == finals(config.output_dir, model), model
    weights = tmp_path / "merged" / "seed-0" / "merged" / "icpo"
    assert (weights / "model.safetensors").is_file() and not (weights / "adapter_config.json").exists()


@pytest.mark.vllm
def test_a_given_base_model_skips_pretraining_and_the_vllm_engine_runs_every_model(tiny_model_dir, tmp_path):
    config = micro_config(
        tmp_path,
        base_model=str(tiny_model_dir),
        backend="vllm",
        kv_cache_gb=1,
        models=["base", "icpo"],
        learning_rate=0.05,  # two steps that change the samples
        task="arithmetic",
        train_facts=0,
        validation_facts=1,
        test_facts=1,
    )
    report = run_pipeline(config)
    run = tmp_path / "seed-0"
    assert not (run / "base").exists() and "pretrain" not in json.loads((run / "timings.json").read_text())
    assert load_trajectories(run / "trajectories")["ref_logps"]  # scored by the engine
    # Without seed-N/base, the probes score with the model that scored the trajectories.
    losses, _ = trajectory_fit.fit(run, ["base"], "fw", 2.0, rows=1, templates=None)
    assert losses["base"][1] == pytest.approx(0, abs=1e-3)
    adapter_config = json.loads((run / "adapters" / "icpo" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert list(report["models"]) == ["base", "icpo"]
    # The adapter ran as a LoRA request of the one engine: its samples are its own, not the base model's.
    samples = {
        model: (run / "eval" / model / "me-icpo" / "results.jsonl").read_text() for model in ("base", "icpo")
    }
    assert samples["base"] != samples["icpo"]
    test = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert test and all(row["id"].split("-")[0] in ("multiplication", "addition") for row in test)
    with pytest.raises(ConfigError, match="backend 'sglang'"):
        micro_config(tmp_path, backend="sglang")
    with pytest.raises(ConfigError, match="task 'algebra'"):
        micro_config(tmp_path, task="algebra")
    with pytest.raises(ConfigError, match="the validation split is empty"):
        micro_config(tmp_path, task="arithmetic", validation_facts=0)


def test_the_cli_reads_a_recipe_and_rejects_bad_values_before_any_work(tmp_path):
    recipe = tmp_path / "micro.yaml"
    recipe.write_text("\n".join(f"{key}: {value}" for key, value in MICRO.items()))
    config = parse_config(PipelineConfig, ["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    assert config.hidden_size == 16 and config.stages[0] == "data"
    with pytest.raises(ConfigError, match="stages"):
        micro_config(tmp_path, stages=["pretrain", "deploy"])
    with pytest.raises(ConfigError, match="eval_dtype 'float8' is unknown; use auto, bfloat16"):
        micro_config(tmp_path, eval_dtype="float8")  # found before the trajectories, not hours later
    with pytest.raises(ConfigError, match="output_dir"):
        main(["--config", str(recipe)])
    assert not (tmp_path / "out").exists()


def test_sigterm_closes_the_engine_and_stops_like_ctrl_c(tmp_path, monkeypatch, capsys):
    closed = []

    class Engine:
        def close(self) -> None:
            closed.append(True)

    def trajectories(self) -> bool:
        self._backend = Engine()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal interrupts it
        return True

    def unhandled(signum, frame):
        raise AssertionError(
            "SIGTERM reached the default handler, which kills the process and orphans the engine"
        )

    monkeypatch.setattr(pipeline._SeedRun, "trajectories", trajectories)
    recipe = tmp_path / "micro.yaml"
    recipe.write_text("\n".join(f"{key}: {value}" for key, value in MICRO.items()))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        status = train_cli.main(["pipeline", "--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 143 and closed == [True]
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last_line.startswith("icpo-train pipeline: terminated;"), last_line


def test_the_target_options_reach_the_adapters_they_apply_to(tmp_path):
    target = {
        "gt_coef": 0.5,
        "reward_scale": "signed",
        "no_answer_penalty": 1.0,
        "logprob_reduction": "sum",
    }
    schedule = {"lr_scheduler_type": "cosine", "lora_target_modules": ["q_proj", "v_proj"]}
    config = micro_config(
        tmp_path,
        tail_bucket=True,
        fisher_at="policy",
        tail_reward="answers",
        anchor_coef=2.0,
        **target,
        **schedule,
    )
    trained = {model: config.train_config(tmp_path, model) for model in ("icpo", "sft", "mse")}
    assert {model: c.tail_bucket for model, c in trained.items()} == {"icpo": True, "sft": False, "mse": True}
    assert {model: c.fisher_at for model, c in trained.items()} == {
        "icpo": "policy",
        "sft": "target",
        "mse": "target",
    }
    # sft has neither a tail nor a target to anchor; every adapter gets the same rewards and schedule.
    assert {model: c.tail_reward for model, c in trained.items()} == {
        "icpo": "answers",
        "sft": "zero",
        "mse": "answers",
    }
    assert {model: c.anchor_coef for model, c in trained.items()} == {"icpo": 2.0, "sft": 0.0, "mse": 2.0}
    for c in trained.values():
        assert {key: getattr(c, key) for key in target} == target
        assert (c.lr_scheduler_type, c.lora_target_modules) == ("cosine", ["q_proj", "v_proj"])
    assert micro_config(tmp_path, history_members=True).trajectory_config(tmp_path).history_members
    assert not config.trajectory_config(tmp_path).history_members
    with pytest.raises(ConfigError, match="fisher_at='nowhere' is unknown"):
        micro_config(tmp_path, fisher_at="nowhere")
    with pytest.raises(ConfigError, match="tail_reward='answers' applies with tail_bucket: true"):
        micro_config(tmp_path, tail_reward="answers")
    with pytest.raises(ConfigError, match="reward 'oracle' is unknown"):
        micro_config(tmp_path, eval_reward="oracle")


def test_the_gold_setting_builds_trains_and_evaluates_with_gold_rewards(tmp_path):
    config = micro_config(
        tmp_path,
        models=["base", "icpo"],
        eval_methods=["me-icpo"],
        history_reward="gt",
        eval_reward="gt",
        tail_bucket=True,
        tail_reward="answers",
        no_answer_penalty=1.0,
        anchor_coef=1.0,
    )
    report = run_pipeline(config)
    run = tmp_path / "seed-0"
    gold = {
        json.loads(line)["id"]: json.loads(line)["answer"] for line in (run / "data" / "test.jsonl").open()
    }
    for model in ("base", "icpo"):
        rows = [json.loads(line) for line in (run / "eval" / model / "me-icpo" / "results.jsonl").open()]
        # Every round's rewards compare to the gold answer, not to the majority of the samples.
        assert {r["rounds"][0]["pseudo_label"] == gold[r["id"]] for r in rows} == {True}
        assert all(record["pseudo_label"] == gold[r["id"]] for r in rows for record in r["rounds"])
    card = (run / "trajectories" / "README.md").read_text()
    assert "with gt rewards" in card
    assert report["eval_reward"] == "gt" and report["config"]["eval_reward"] == "gt"
    assert "by the gold answer (external rewards)" in format_report(report)
    assert "by the gold answer" in pipeline.format_legend(report)


@pytest.mark.parametrize(
    ("recipe", "models", "iterations"),
    [
        ("demo.yaml", {"base", "icpo", "sft"}, 1),
        ("tiny.yaml", set(MODELS), 1),
        ("full.yaml", {"base", "icpo", "sft"}, 2),
        ("smollm2.yaml", set(MODELS), 1),
        ("smollm2_gold.yaml", {"base", "icpo", "sft"}, 1),
    ],
)
def test_the_shipped_recipes_are_valid(recipe, models, iterations, tmp_path):
    config = parse_config(
        PipelineConfig, ["--config", str(E2E_RECIPES / recipe), "--output_dir", str(tmp_path)]
    )
    assert config.templates is not None
    assert (set(config.models), config.iterations) == (models, iterations)


def test_the_demo_runs_the_toy_theory_then_the_pipeline_and_ends_with_the_table(tmp_path, capsys):
    from icpo_train.e2e import demo

    recipe = tmp_path / "micro.yaml"
    recipe.write_text("\n".join(f"{key}: {value}" for key, value in MICRO.items()))
    args = ["--output_dir", str(tmp_path / "demo"), "--pipeline_recipe", str(recipe)]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo" / "lsa" / "metrics.json").is_file()
    assert (tmp_path / "demo" / "e2e" / "report.json").is_file()
    assert "reusing" not in out
    results = out[out.index("== Results ==") :]
    assert "LSA imitating" in results and "self-impr." in results
    # Under the table: what each row and column means, and that one seed is no measurement.
    legend = results[results.index("ICPO minus base") :]
    assert all(f"  {name} " in legend for name in ("base", "icpo", "sft", "mse", "round 1", "self-impr."))
    assert "1 seed of a tiny model on 3 questions: a smoke test" in legend
    assert "recipes/e2e/full.yaml" in legend
    assert results.rstrip().endswith(str(tmp_path / "demo" / "e2e" / "accuracy_vs_round.png"))

    # A second run trains nothing again and says what it reuses.
    assert demo.main(args) == 0
    again = capsys.readouterr().out
    for loss in ("fw", "mse", "kl", "ce"):
        assert f"lsa {loss}: reusing" in again
    seed_dir = tmp_path / "demo" / "e2e" / "seed-0"
    assert [line for line in again.splitlines() if line.startswith("[seed")] == [
        f"[seed 0] {stage}: nothing to do, reusing what an earlier run left in {seed_dir}"
        for stage in ("data", "pretrain", "trajectories", "train", "evaluate")
    ]
    assert again[again.index("== Results ==") :] == results


def test_the_history_probe_screens_a_seed_dirs_base_and_adapters(finished, tmp_path, capsys):
    config, _ = finished
    seed_dir = Path(config.output_dir) / "seed-0"
    # The icpo adapter with its B weights zeroed: the base model itself, so its figures are the base's.
    zero = tmp_path / "zero"
    shutil.copytree(seed_dir / "adapters" / "icpo", zero)
    weights = load_file(zero / "adapter_model.safetensors")
    save_file(
        {name: w * 0 if "lora_B" in name else w for name, w in weights.items()},
        zero / "adapter_model.safetensors",
    )
    out = tmp_path / "probe.json"
    argv = ["--model", str(seed_dir / "base"), "--questions", str(seed_dir / "data" / "test.jsonl")]
    argv += ["--templates", config.templates, "--limit", "2", "--k", "2", "--max-new-tokens", "8"]
    argv += ["--gold-completion", "\\boxed{{gold}}", "--json", str(out)]
    assert history_probe.main([*argv, "--adapter", str(seed_dir / "adapters" / "icpo"), str(zero)]) == 0
    assert "tag disc." in capsys.readouterr().out
    table = json.loads(out.read_text())
    assert list(table) == ["base", "icpo", "zero"]
    for row in table.values():
        assert set(row) >= {key for key, _, _ in history_probe.METRICS}
        assert row["questions"] == 2
        # The micro base model may give no answer at all: then there is no discrimination to average.
        assert all(value is None or math.isfinite(value) for value in row.values())
        assert 0 <= row["accuracy"] <= row["answer_rate"] <= 1
    for key, value in table["base"].items():
        if key != "seconds":
            assert table["zero"][key] == (
                value if value is None else pytest.approx(value, rel=1e-6, abs=1e-6)
            )


def rewarded_copy(seed_dir: Path, copy: Path) -> Path:
    """``seed_dir`` with its trajectories' later rounds rewarding their first member: the micro base
    model's answers are mostly invalid, so its own histories may hold nothing to reward."""
    copy.mkdir()
    for name in ("base", "adapters"):
        (copy / name).symlink_to(seed_dir / name)

    def reward_first(row: dict) -> dict:
        rewards = [0.0] * len(row["icl_rewards"])
        rewards[0] = float(row["round"] > 1)
        return {"icl_rewards": rewards}

    load_trajectories(seed_dir / "trajectories").map(reward_first).save_to_disk(str(copy / "trajectories"))
    return copy


def test_trajectory_fit_measures_each_model_against_the_target_per_round(finished, capsys, tmp_path):
    config, _ = finished
    seed_dir = rewarded_copy(Path(config.output_dir) / "seed-0", tmp_path / "seed-0")
    table, ratios = trajectory_fit.fit(
        seed_dir, ["base", "icpo"], "fw", 2.0, rows=8, templates=config.templates
    )
    assert list(table) == ["base", "icpo", trajectory_fit.IGNORE] and ratios == {}
    assert all(set(row) == {1, 2} for row in table.values())
    # The trajectories were scored with the base model: with an empty history it is its own target.
    assert table["base"][1] == pytest.approx(0, abs=1e-4)
    assert table[trajectory_fit.IGNORE][1] == 0
    assert all(loss >= 0 for row in table.values() for loss in row.values())
    tail, ratios = trajectory_fit.fit(
        seed_dir, ["base", "icpo"], "fw", 2.0, rows=8, templates=config.templates, tail_bucket=True
    )
    assert tail["base"][1] == pytest.approx(0, abs=1e-4)
    assert tail["base"][2] != pytest.approx(table["base"][2])  # another loss on the same rows
    # The group's mass relative to the reference's: the base model is the reference in round 1.
    assert list(ratios) == ["base", "icpo"] and ratios["base"][1] == pytest.approx(0, abs=1e-4)
    assert all(math.isfinite(ratio) for row in ratios.values() for ratio in row.values())
    assert trajectory_fit.main(["--seed-dir", str(seed_dir), "--models", "base", "--rows", "2"]) == 0
    assert "ignore" in capsys.readouterr().out
    assert (
        trajectory_fit.main(["--seed-dir", str(seed_dir), "--models", "base", "--rows", "2", "--tail-bucket"])
        == 0
    )
    assert "log_group_mass_ratio" in capsys.readouterr().out
    # The recipe's target options give another target: the history-ignoring row moves with it.
    target = {"reward_scale": "signed", "no_answer_penalty": 1.0, "tail_reward": "answers", "gt_coef": 0.5}
    other, _ = trajectory_fit.fit(
        seed_dir, ["base"], "fw", 2.0, rows=8, templates=config.templates, tail_bucket=True, target=target
    )
    assert other[trajectory_fit.IGNORE] != tail[trajectory_fit.IGNORE]
    options = ["--tail-bucket", "--tail-reward", "answers", "--no-answer-penalty", "1"]
    assert (
        trajectory_fit.main(["--seed-dir", str(seed_dir), "--models", "base", "--rows", "2", *options]) == 0
    )
    capsys.readouterr()
    with pytest.raises(SystemExit):
        trajectory_fit.main(["--seed-dir", str(seed_dir), "--models", "base", "nope"])
    assert "no adapter ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trajectory_fit.main(["--seed-dir", str(tmp_path / "missing"), "--models", "base"])
    assert "--trajectories:" in capsys.readouterr().err
    (seed_dir / "base").unlink()  # and no build_config.json in the copied trajectories
    with pytest.raises(SystemExit):
        trajectory_fit.main(["--seed-dir", str(seed_dir), "--models", "base"])
    assert "neither" in capsys.readouterr().err
