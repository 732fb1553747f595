"""scripts/eval_checkpoints.py, the Trainer callback behind it, and scripts/publish_adapter.py (dry run)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from script_modules import load_script
from trajectory_fixtures import build_trajectories, integer_problems
from transformers import AutoModelForCausalLM

from icpo_infer.backends import make_backend
from icpo_infer.backends import merged as merged_backend
from icpo_infer.cli import run as icpo_infer_run
from icpo_infer.config import parse_config
from icpo_infer.infer_config import InferConfig
from icpo_train import callbacks
from icpo_train import icpo_config as icpo_config_module
from icpo_train.callbacks import (
    RESULTS_FILE,
    ROUND_PLOT,
    STEP_PLOT,
    CheckpointEvalCallback,
    CheckpointEvaluator,
)
from icpo_train.cli import main as icpo_train_main
from icpo_train.icpo_config import ICPOConfig
from icpo_train.trainer import ICPOTrainer

ROOT = Path(__file__).resolve().parents[1]
INFER_RECIPE = ROOT / "recipes" / "infer" / "tiny.yaml"
TRAIN_RECIPE = ROOT / "recipes" / "icpo" / "tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# random-icpo over 2 rounds of 2 samples on 2 short questions: the self-improvement curve in seconds.
EVAL_ARGS = ["--method", "random-icpo", "--limit", "2"]


eval_checkpoints = load_script("eval_checkpoints")
publish_adapter = load_script("publish_adapter")


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    """Two short MATH-500 questions (short prompts keep the tiny model fast), the trainer tests' own."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in integer_problems(2)))
    return path


def save_adapter(model_dir: Path, directory: Path, seed: int) -> None:
    """A real PEFT LoRA adapter of the tiny model, with random B weights so that it changes outputs."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=2.0)
    model.save_pretrained(directory)


def save_checkpoint(model_dir: Path, run_dir: Path, step: int, complete: bool = True) -> Path:
    """checkpoint-N as the Trainer leaves it: adapter, optimizer state, and trainer_state.json once complete."""
    checkpoint = run_dir / f"checkpoint-{step}"
    save_adapter(model_dir, checkpoint, seed=step)
    (checkpoint / "optimizer.pt").write_bytes(b"not to be uploaded")
    if complete:
        mark_saved(checkpoint, step)
    return checkpoint


def mark_saved(directory: Path, step: int) -> None:
    """What the Trainer writes last when it saves (see icpo_train/callbacks.py)."""
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def results(eval_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (eval_dir / RESULTS_FILE).read_text().splitlines()]


def sample_texts(output_dir: str) -> list[str]:
    rows = [json.loads(line) for line in (Path(output_dir) / "results.jsonl").read_text().splitlines()]
    return [text for row in rows for text in row["final"]["texts"]]


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, dataset_file, tmp_path_factory) -> Path:
    """A fake run directory with two real LoRA checkpoints, evaluated by the script."""
    run_dir = tmp_path_factory.mktemp("run")
    for step in (1, 2):
        save_checkpoint(tiny_model_dir, run_dir, step)
    argv = ["--run-dir", str(run_dir), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    assert eval_checkpoints.main([*argv, *EVAL_ARGS]) == 0
    return run_dir


def test_eval_checkpoints_evaluates_base_and_each_checkpoint(evaluated_run, tiny_model_dir):
    eval_dir = evaluated_run / "eval"
    rows = results(eval_dir)
    assert [(row["step"], row["name"]) for row in rows] == [
        (0, "base"),
        (1, "checkpoint-1"),
        (2, "checkpoint-2"),
    ]
    assert [row["adapter"] for row in rows] == [
        None,
        str(evaluated_run / "checkpoint-1"),
        str(evaluated_run / "checkpoint-2"),
    ]
    assert all(
        row["model"] == str(tiny_model_dir) for row in rows
    )  # the base model, from adapter_config.json
    for row in rows:
        metrics = json.loads((Path(row["output_dir"]) / "metrics.json").read_text())
        assert metrics["config"]["adapter"] == row["adapter"] and metrics["config"]["method"] == "random-icpo"
        assert row["mean@k"] == metrics["mean@k"] and row["num_questions"] == 2
        assert len(row["mean_per_round"]) == 2
    base, first, second = (sample_texts(row["output_dir"]) for row in rows)
    assert base != first and first != second  # the adapters were applied
    for plot in (ROUND_PLOT, STEP_PLOT):
        assert (eval_dir / plot).read_bytes().startswith(PNG_MAGIC)


def test_the_base_model_is_loaded_once_and_adapters_sample_as_on_a_fresh_load(
    tiny_model_dir, dataset_file, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(tiny_model_dir, run_dir, step)
    loads, backends = [], []

    def counted_make_backend(name, options):
        loads.append(options)
        backends.append(make_backend(name, options))
        return backends[-1]

    monkeypatch.setattr(callbacks, "make_backend", counted_make_backend)
    argv = ["--config", str(INFER_RECIPE), "--model", str(tiny_model_dir), "--dataset", str(dataset_file)]
    config = parse_config(InferConfig, [*argv, "--output-dir", str(tmp_path / "eval"), *EVAL_ARGS])
    rows = CheckpointEvaluator(run_dir, config).evaluate_pending()
    assert [row["name"] for row in rows] == ["base", "checkpoint-1", "checkpoint-2"]
    assert len(loads) == 1 and loads[0].model == str(tiny_model_dir) and loads[0].adapter is None
    assert not isinstance(backends[0].model, PeftModel)  # every checkpoint's adapter was released

    for row in rows:  # each model alone, as `icpo-infer run` loads it
        fresh = tmp_path / f"fresh-{row['name']}"
        icpo_infer_run(dataclasses.replace(config, adapter=row["adapter"], output_dir=str(fresh)))
        assert sample_texts(str(fresh)) == sample_texts(row["output_dir"])


def test_merged_checkpoints_sample_as_their_lora_evaluation_and_leave_no_weights(
    evaluated_run, tiny_model_dir, dataset_file, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(tiny_model_dir, run_dir, step)  # the evaluated run's adapters
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # read TMPDIR again
    merges = []
    merge = merged_backend.merge_adapter
    monkeypatch.setattr(merged_backend, "merge_adapter", lambda *args: merges.append(args[1]) or merge(*args))
    argv = ["--run-dir", str(run_dir), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    try:
        assert eval_checkpoints.main([*argv, *EVAL_ARGS, "--no-base", "--merge-adapter"]) == 0
    finally:
        tempfile.tempdir = None
    merged, lora = results(run_dir / "eval"), results(evaluated_run / "eval")[1:]
    assert [row["name"] for row in merged] == ["checkpoint-1", "checkpoint-2"]
    assert merges == [str(run_dir / "checkpoint-1"), str(run_dir / "checkpoint-2")]
    for merged_row, lora_row in zip(merged, lora, strict=True):
        assert sample_texts(merged_row["output_dir"]) == sample_texts(lora_row["output_dir"])
    assert list((tmp_path / "tmp").iterdir()) == []  # each merged model was deleted after its evaluation


def test_rerun_evaluates_only_new_complete_saves(evaluated_run, tiny_model_dir, dataset_file, monkeypatch):
    argv = ["--run-dir", str(evaluated_run), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    save_checkpoint(tiny_model_dir, evaluated_run, 3, complete=False)  # being written
    assert eval_checkpoints.main([*argv, *EVAL_ARGS]) == 0
    assert [row["step"] for row in results(evaluated_run / "eval")] == [0, 1, 2]

    mark_saved(evaluated_run / "checkpoint-3", 3)
    mark_saved(evaluated_run, 3)  # the run finished at step 3: its final save is checkpoint-3
    assert eval_checkpoints.main([*argv, *EVAL_ARGS]) == 0
    assert [row["name"] for row in results(evaluated_run / "eval")] == [
        "base",
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]


def test_watch_polls_until_the_run_finishes(tiny_model_dir, dataset_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # training has begun (icpo-train train wrote its config) but saved nothing yet
    (run_dir / "icpo_config.json").write_text(json.dumps({"model_name_or_path": str(tiny_model_dir)}))
    polls = []

    def training_goes_on(seconds):  # stands in for the wait: the trainer saves, then finishes
        polls.append(seconds)
        if len(polls) == 1:
            save_checkpoint(tiny_model_dir, run_dir, 10)
        else:  # the final adapter, at a step without a checkpoint
            save_adapter(tiny_model_dir, run_dir, seed=12)
            mark_saved(run_dir, 12)

    monkeypatch.setattr(eval_checkpoints.time, "sleep", training_goes_on)
    argv = ["--run-dir", str(run_dir), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    watch = ["--watch", "--poll-seconds", "7", "--no-base", "--method", "single", "--limit", "1"]
    assert eval_checkpoints.main([*argv, *watch]) == 0
    rows = results(run_dir / "eval")
    assert [(row["step"], row["name"]) for row in rows] == [(10, "checkpoint-10"), (12, "final")]
    assert rows[-1]["adapter"] == str(run_dir) and polls == [7, 7]


def test_eval_checkpoints_bad_input(tmp_path, dataset_file, capsys):
    assert (
        eval_checkpoints.main(["--run-dir", str(tmp_path / "missing"), "--dataset", str(dataset_file)]) == 2
    )
    assert "--run-dir" in capsys.readouterr().err
    argv = ["--run-dir", str(tmp_path), "--model", "m", "--dataset", str(dataset_file), "--adapter", "a"]
    assert eval_checkpoints.main(argv) == 2
    assert "--adapter" in capsys.readouterr().err


def test_callback_evaluates_each_save_without_changing_training(tiny_model_dir, dataset_file, tmp_path):
    trajectories = tmp_path / "trajectories"
    build_trajectories(tiny_model_dir, num_questions=2, rounds=1).save_to_disk(str(trajectories))
    argv = ["--config", str(INFER_RECIPE), "--model", str(tiny_model_dir), "--dataset", str(dataset_file)]
    argv += ["--output-dir", str(tmp_path / "eval"), "--method", "single"]
    evaluation = parse_config(InferConfig, argv)

    def train(output_dir: Path, evaluate: bool) -> list[float]:
        args = ["--config", str(TRAIN_RECIPE), "--model_name_or_path", str(tiny_model_dir)]
        args += ["--trajectories", str(trajectories), "--output_dir", str(output_dir)]
        args += ["--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "1"]
        args += ["--logging_steps", "1", "--report_to", "tensorboard"]
        trainer = ICPOTrainer(parse_config(ICPOConfig, args))
        if evaluate:
            trainer.add_callback(CheckpointEvalCallback(evaluation, trainer=trainer))
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain = train(tmp_path / "plain", evaluate=False)
    evaluated = train(tmp_path / "evaluated", evaluate=True)
    assert evaluated == plain  # the evaluations left the training RNG alone
    rows = results(tmp_path / "eval")
    assert [(row["step"], row["name"]) for row in rows] == [
        (0, "base"),
        (1, "checkpoint-1"),
        (2, "checkpoint-2"),
    ]
    assert rows[1]["adapter"] == str(tmp_path / "evaluated" / "checkpoint-1")
    # Each evaluation is in TensorBoard beside the loss, at its checkpoint's step.
    scalars = tensorboard_scalars(tmp_path / "evaluated" / "runs")
    k = rows[0]["k"]
    assert scalars[f"eval/mean@{k}"] == [(row["step"], pytest.approx(row["mean@k"])) for row in rows]
    assert scalars["eval/generated_tokens"] == [(row["step"], row["generated_tokens"]) for row in rows]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``log_dir``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def test_eval_checkpoints_files_each_evaluation_in_tensorboard_and_wandb(
    evaluated_run, tiny_model_dir, dataset_file, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(tiny_model_dir, run_dir, step)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["--run-dir", str(run_dir), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    assert eval_checkpoints.main([*argv, *EVAL_ARGS, "--report-to", "tensorboard", "wandb"]) == 0
    rows = results(run_dir / "eval")
    k = rows[0]["k"]
    scalars = tensorboard_scalars(run_dir / "runs")
    assert scalars[f"eval/mean@{k}"] == [(row["step"], pytest.approx(row["mean@k"])) for row in rows]
    for r in (1, 2):
        assert scalars[f"eval/mean@{k}_round{r}"] == [
            (row["step"], pytest.approx(row["mean_per_round"][r - 1])) for row in rows
        ]
    assert scalars["eval/self_improvement"] == [
        (row["step"], pytest.approx(row["self_improvement"])) for row in rows
    ]
    # W&B, offline: one history row per evaluation, at its step.
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = [row for row in wandb_history(run_file) if f"eval/mean@{k}" in row]
    assert [row["train/global_step"] for row in history] == [row["step"] for row in rows]
    assert [row[f"eval/mean@{k}"] for row in history] == pytest.approx([row["mean@k"] for row in rows])
    assert [row["eval/generated_tokens"] for row in history] == [row["generated_tokens"] for row in rows]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: wandb's record protobufs in its LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of chunks: checksum, length, kind 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, position, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
    return rows


def test_a_tracker_that_is_not_installed_is_a_one_line_error(
    evaluated_run, dataset_file, capsys, monkeypatch
):
    monkeypatch.setattr(icpo_config_module, "get_available_reporting_integrations", list)
    argv = ["--run-dir", str(evaluated_run), "--config", str(INFER_RECIPE), "--dataset", str(dataset_file)]
    assert eval_checkpoints.main([*argv, *EVAL_ARGS, "--report-to", "wandb"]) == 2
    assert "--report-to: wandb is not installed" in capsys.readouterr().err


# -- publish_adapter.py ------------------------------------------------------------------------------


@pytest.fixture
def publish(evaluated_run, capsys, monkeypatch):
    """Runs the script with no network: HfApi must not even be built."""

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run must not touch the Hub")

    monkeypatch.setattr(publish_adapter, "HfApi", no_network)

    def run(*args: str) -> tuple[int, str, str]:
        code = publish_adapter.main(["--checkpoint", str(evaluated_run / "checkpoint-2"), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def card_of(dry_run_output: str) -> ModelCard:
    return ModelCard(dry_run_output.split("README.md:\n", 1)[1])


def test_publish_dry_run_lists_the_adapter_files_and_the_card(publish, evaluated_run):
    eval_dir = evaluated_run / "eval"
    peft_card = (evaluated_run / "checkpoint-2" / "README.md").read_text()
    code, out, _ = publish(
        "--repo-id", "icpo-org/tiny-icpo", "--base-model", "icpo-org/tiny-base", "--dry-run",
        "--recipe", str(TRAIN_RECIPE), "--training-data", "icpo-org/tiny-trajectories",
        "--base-eval", str(eval_dir / "base"), "--adapter-eval", str(eval_dir / "checkpoint-2"),
    )  # fmt: skip
    assert code == 0
    assert "public model repository icpo-org/tiny-icpo" in out
    assert "commit message: Upload ICPO LoRA adapter (checkpoint-2)" in out
    listed = [line.split()[0] for line in out.split("files:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no optimizer or state
    assert (evaluated_run / "checkpoint-2" / "README.md").read_text() == peft_card  # nothing written

    card = card_of(out)
    assert card.data.base_model == "icpo-org/tiny-base" and card.data.library_name == "peft"
    assert card.data.datasets == ["icpo-org/tiny-trajectories"]
    base = json.loads((eval_dir / "base" / "metrics.json").read_text())
    adapter = json.loads((eval_dir / "checkpoint-2" / "metrics.json").read_text())
    by_type = {result.metric_type: result for result in card.data.eval_results}
    assert by_type["accuracy"].metric_value == adapter["mean@k"]
    assert by_type["self_improvement"].metric_value == adapter["self_improvement"]
    assert by_type["accuracy"].dataset_name == "questions" and card.data.model_name == "tiny-icpo"
    row = next(line for line in card.text.splitlines() if line.startswith("| mean@2 (final)"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    delta = 100 * (adapter["mean@k"] - base["mean@k"])
    assert cells[1:] == [f"{100 * base['mean@k']:.1f}", f"{100 * adapter['mean@k']:.1f}", f"{delta:+.1f}"]
    assert "learning_rate: 1.0e-2" in card.text and "Steps: 2" in card.text


def test_the_card_holds_what_ran_overrides_included_and_how_the_trajectories_were_built(
    tiny_model_dir, dataset_file, tmp_path, capsys
):
    trajectories, run = tmp_path / "trajectories", tmp_path / "run"
    build = ["build-trajectories", "--model", str(tiny_model_dir), "--dataset", str(dataset_file)]
    build += ["--output", str(trajectories), "--rounds", "1", "--group-size", "3", "--max-new-tokens", "8"]
    assert icpo_train_main([*build, "--device", "cpu", "--history-reward", "gt"]) == 0
    args = ["--config", str(TRAIN_RECIPE), "--model_name_or_path", str(tiny_model_dir)]
    args += ["--trajectories", str(trajectories), "--output_dir", str(run)]
    assert (
        icpo_train_main(["train", *args, "--max_steps", "2", "--save_steps", "2", "--learning_rate", "0.005"])
        == 0
    )
    capsys.readouterr()
    argv = ["--checkpoint", str(run / "checkpoint-2"), "--repo-id", "o/x", "--base-model", "o/b", "--dry-run"]
    assert publish_adapter.main(argv) == 0
    card = card_of(capsys.readouterr().out).text
    assert "learning_rate: 0.005" in card and "max_steps: 2" in card  # the override, not the recipe's 1e-2
    assert "learning_rate: 1.0e-2" not in card
    assert f"- Training data: {trajectories} (`icpo-train build-trajectories` with `{tiny_model_dir}`" in card
    assert "1 rounds, groups of 3 at temperature 1.0, histories from me-icpo with gt rewards" in card


def test_publish_without_evaluation_says_so(publish):
    code, out, _ = publish(
        "--repo-id", "icpo-org/x", "--base-model", "icpo-org/tiny-base", "--private", "--dry-run"
    )
    assert code == 0 and "private model repository" in out
    card = card_of(out)
    assert card.data.eval_results is None and "Not evaluated." in card.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo-id", "icpo-org/x"], "--base-model"),  # adapter_config.json names a local path
        (["--repo-id", "not a repo", "--base-model", "o/b"], "--repo-id"),
        (["--repo-id", "o/x", "--base-model", "o/b", "--base-eval", "somewhere"], "--adapter-eval"),
    ],
)
def test_publish_bad_input(publish, args, message):
    code, _, err = publish(*args, "--dry-run")
    assert code == 2 and message in err


def test_publish_refuses_evaluations_that_measure_different_things(publish, evaluated_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    metrics = json.loads((evaluated_run / "eval" / "checkpoint-2" / "metrics.json").read_text())
    metrics["config"]["rounds"] = 5
    (other / "metrics.json").write_text(json.dumps(metrics))
    code, _, err = publish(
        "--repo-id", "o/x", "--base-model", "o/b", "--dry-run",
        "--base-eval", str(evaluated_run / "eval" / "base"), "--adapter-eval", str(other),
    )  # fmt: skip
    assert code == 2 and "rounds" in err
