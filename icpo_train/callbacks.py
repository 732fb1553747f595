"""Evaluation of a training run's saved models with icpo-infer, as they appear.

:class:`CheckpointEvaluator` runs `icpo-infer run` (the same code path) once per saved model of a run
directory: the base model as step 0, every ``checkpoint-N`` once it is complete, and the final model
when the run saved it without a checkpoint of the same step. Each evaluation gets its own
`icpo-infer` output directory under the evaluation directory (``InferConfig.output_dir``), so an
interrupted evaluation resumes; a row is appended to ``results.jsonl`` there and two plots are redrawn:
accuracy against round for every evaluated model (the self-improvement curves) and accuracy and
self-improvement against training step. One evaluator loads the base model once: the base and every
LoRA checkpoint run on that engine, a fully fine-tuned checkpoint loads its own.

Two ways to drive it: ``scripts/eval_checkpoints.py`` (after or beside training, ``--watch`` to follow
a live run) and :class:`CheckpointEvalCallback` (inside the Trainer, at each save).

When is a save complete? The Trainer writes a checkpoint's ``trainer_state.json`` after its weights,
and ``icpo-train train`` writes the run directory's ``trainer_state.json`` after the final model: a
``checkpoint-N`` folder counts once it holds ``trainer_state.json``, and the run is finished once its
root does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import ADAPTER_CONFIG, Backend, BackendOptions
from icpo_infer.cli import run as icpo_infer_run
from icpo_infer.infer_config import InferConfig
from icpo_infer.report import accuracy_limits, load_metrics, plot_comparison
from icpo_infer.results import append_line, read_results
from icpo_train.icpo_config import check_trackers

RESULTS_FILE = "results.jsonl"
ROUND_PLOT = "accuracy_vs_round.png"
STEP_PLOT = "accuracy_vs_step.png"
STATE_FILE = "trainer_state.json"  # written last: see the module docstring
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
SUMMARY_KEYS = (
    "k",
    "num_questions",
    "mean@k",
    "maj@k",
    "pass@k",
    "self_improvement",
    "mean_per_round",
    "maj_per_round",
    "generated_tokens",
)


def tracker_logs(row: dict[str, Any]) -> dict[str, float]:
    """One evaluation's figures as tracker scalars. The ``eval_`` prefix is what transformers' trackers
    file under ``eval/``: ``eval/mean@K`` (final round), ``eval/mean@K_round{r}``, ``eval/maj@K``,
    ``eval/pass@K``, ``eval/self_improvement`` and ``eval/generated_tokens``."""
    k = row["k"]
    logs = {f"eval_mean@{k}_round{r}": accuracy for r, accuracy in enumerate(row["mean_per_round"], 1)}
    logs |= {f"eval_{name}@{k}": row[f"{name}@k"] for name in ("mean", "maj", "pass")}
    logs |= {"eval_self_improvement": row["self_improvement"]}
    if row.get("generated_tokens") is not None:
        logs["eval_generated_tokens"] = row["generated_tokens"]
    return logs


class Trackers:
    """The trackers of ``report_to`` (transformers' own integrations: tensorboard, wandb, trackio, ...)
    outside a Trainer: :meth:`log` files an evaluation row at its training step, as the Trainer files its
    losses, under the run directory (TensorBoard: ``RUN_DIR/runs/``)."""

    def __init__(self, run_dir: Path, report_to: list[str]) -> None:
        check_trackers(report_to, "--report-to")
        self.args = TrainingArguments(output_dir=str(run_dir), report_to=report_to, run_name=run_dir.name)
        self.callbacks = [tracker() for tracker in get_reporting_integration_callbacks(report_to)]
        for callback in self.callbacks:
            callback.on_train_begin(self.args, TrainerState(), TrainerControl())

    def log(self, row: dict[str, Any]) -> None:
        state = TrainerState(global_step=row["step"])
        for callback in self.callbacks:
            callback.on_log(self.args, state, TrainerControl(), logs=tracker_logs(row))

    def close(self) -> None:
        for callback in self.callbacks:
            callback.on_train_end(self.args, TrainerState(), TrainerControl())
        if "wandb" in self.args.report_to:  # transformers leaves the run open until the process ends
            import wandb

            wandb.finish()


@dataclass(frozen=True)
class SavedModel:
    """One model of a run: the base (``path`` None), a checkpoint, or the final save (the run dir)."""

    step: int
    name: str
    path: Path | None = None


def completed_checkpoints(run_dir: str | Path) -> list[SavedModel]:
    """The run's complete ``checkpoint-N`` folders, by step."""
    found = []
    for path in Path(run_dir).iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append(SavedModel(int(match.group(1)), path.name, path))
    return sorted(found, key=lambda saved: saved.step)


def final_step(run_dir: str | Path) -> int | None:
    """The last step of a finished run; None while it is still running."""
    state = Path(run_dir) / STATE_FILE
    return json.loads(state.read_text())["global_step"] if state.is_file() else None


def base_model_of(run_dir: str | Path) -> str | None:
    """The model a run trained: from icpo-train's resolved config, else from a checkpoint's adapter config."""
    run_dir = Path(run_dir)
    config = run_dir / "icpo_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_name_or_path")
    for saved in completed_checkpoints(run_dir):
        if (saved.path / ADAPTER_CONFIG).is_file():
            return json.loads((saved.path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return None


class CheckpointEvaluator:
    """Evaluates the saved models of ``run_dir`` with ``config`` (its ``model`` is the base model, its
    ``output_dir`` the evaluation directory), each once."""

    def __init__(self, run_dir: str | Path, config: InferConfig) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.eval_dir = Path(config.output_dir)
        self.rows = read_results(self.eval_dir / RESULTS_FILE)
        self._base_backend: Backend | None = None  # loaded once; the base and every adapter run on it

    @property
    def evaluated_steps(self) -> set[int]:
        return {row["step"] for row in self.rows}

    def pending(self, include_base: bool = True) -> list[SavedModel]:
        """What has not been evaluated yet: the base, complete checkpoints, the final save of a finished run."""
        candidates = [SavedModel(0, "base")] if include_base else []
        candidates += completed_checkpoints(self.run_dir)
        last = final_step(self.run_dir)
        if last is not None:
            candidates.append(SavedModel(last, "final", self.run_dir))
        done = set(self.evaluated_steps)
        pending = []
        for saved in candidates:
            if saved.step not in done:
                pending.append(saved)
                done.add(saved.step)  # the final save of a step that has a checkpoint is that checkpoint
        return pending

    def evaluate(self, saved: SavedModel) -> dict[str, Any]:
        """Run icpo-infer on one saved model, append its row to the results table and redraw the plots."""
        if saved.path is None:
            model, adapter = self.config.model, None
        elif (saved.path / ADAPTER_CONFIG).is_file():
            model, adapter = self.config.model, str(saved.path)
        else:  # full fine-tuning saves whole models
            model, adapter = str(saved.path), None
        output_dir = self.eval_dir / saved.name
        backend = self._backend_of(model, adapter)
        metrics = icpo_infer_run(
            dataclasses.replace(self.config, model=model, adapter=adapter, output_dir=str(output_dir)),
            backend,
        )
        if backend is not None and adapter is not None:  # each checkpoint is evaluated once: a long --watch
            backend.release(adapter)  # must not pile them up
        row = {
            "step": saved.step,
            "name": saved.name,
            "model": model,
            "adapter": adapter,
            "output_dir": str(output_dir),
            **{key: metrics[key] for key in SUMMARY_KEYS},
        }
        append_line(self.eval_dir / RESULTS_FILE, row)
        self.rows.append(row)
        self.plot()
        return row

    def _backend_of(self, model: str, adapter: str | None) -> Backend | None:
        """The base model's backend, shared by its evaluations; None (icpo-infer loads its own) for a
        fully fine-tuned checkpoint, or an adapter to merge, which is evaluated once."""
        if model != self.config.model or (adapter is not None and self.config.merge_adapter):
            return None
        if self._base_backend is None:
            options = BackendOptions.from_config(self.config)
            options = dataclasses.replace(options, adapter=None, enable_lora=not self.config.merge_adapter)
            self._base_backend = make_backend(self.config.backend, options)
        return self._base_backend

    def close(self) -> None:
        """Free the base model's backend (a later evaluation loads it again)."""
        if self._base_backend is not None:
            self._base_backend.close()
            self._base_backend = None

    def evaluate_pending(self, include_base: bool = True) -> list[dict[str, Any]]:
        return [self.evaluate(saved) for saved in self.pending(include_base)]

    def plot(self) -> Figure:
        """accuracy_vs_round.png (one curve per evaluated model) and accuracy_vs_step.png (returned)."""
        rows = sorted(self.rows, key=lambda row: row["step"])
        runs = load_metrics([row["output_dir"] for row in rows])
        plot_comparison([f"step {row['step']}" for row in rows], runs, self.eval_dir / ROUND_PLOT)

        steps = [row["step"] for row in rows]
        k = rows[0]["k"]
        figure = Figure(figsize=(10, 3.8), layout="constrained")
        accuracy, improvement = figure.subplots(1, 2)
        mean, maj = [row["mean@k"] for row in rows], [row["maj@k"] for row in rows]
        accuracy.plot(steps, mean, marker="o", label=f"mean@{k}")
        accuracy.plot(steps, maj, marker="s", linestyle="--", label=f"maj@{k}")
        accuracy.set(ylabel="accuracy", title="final round", ylim=accuracy_limits([*mean, *maj, 0.0]))
        accuracy.legend()
        gains = [100 * row["self_improvement"] for row in rows]
        improvement.plot(steps, gains, marker="o", color="C2")
        improvement.axhline(0.0, color="grey", linewidth=0.8)
        improvement.set(ylabel="points", title=f"self-improvement (mean@{k}, final - round 1)")
        for ax in (accuracy, improvement):
            ax.set(xlabel="training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.suptitle(f"{self.config.method} on {Path(self.config.dataset).name}: {self.run_dir.name}")
        figure.savefig(self.eval_dir / STEP_PLOT, dpi=120)
        return figure


class CheckpointEvalCallback(TrainerCallback):
    """Evaluates each checkpoint when the Trainer saves it (and the base model when training begins).

    ``config`` is a small `icpo-infer run` config: ``model`` the base model, ``output_dir`` the
    evaluation directory. Runs on the main process only, with the RNG state of training restored
    afterwards, so the evaluation does not change the run. The other processes wait at their next
    collective: keep the evaluation small (or use scripts/eval_checkpoints.py on another device).
    With ``trainer`` (``trainer.add_callback(CheckpointEvalCallback(config, trainer=trainer))``), each
    evaluation's figures (:func:`tracker_logs`) go through ``trainer.log`` at the checkpoint's step: into
    every tracker of ``report_to``, beside the loss, and into the log history.
    """

    def __init__(
        self, config: InferConfig, evaluate_base: bool = True, trainer: Trainer | None = None
    ) -> None:
        self.config = config
        self.evaluate_base = evaluate_base
        self.trainer = trainer

    def _evaluate(self, args, saved: SavedModel) -> None:
        # A fresh evaluator per save, closed when its evaluation ends: a kept one would hold a second
        # copy of the base model (or a vLLM engine's memory pool) beside training between saves.
        evaluator = CheckpointEvaluator(args.output_dir, self.config)
        if saved.step in evaluator.evaluated_steps:
            return
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            try:
                row = evaluator.evaluate(saved)
            finally:
                evaluator.close()
        if self.trainer is not None:
            self.trainer.log(tracker_logs(row))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluate_base and state.is_world_process_zero:
            self._evaluate(args, SavedModel(0, "base"))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._evaluate(args, SavedModel(state.global_step, name, Path(args.output_dir) / name))
