"""`icpo-train train`: fine-tune a model (LoRA) on reflection trajectories with the ICPO loss.

One process::

    icpo-train train --config recipes/icpo/NAME.yaml [--field value ...]

Several processes (DDP on GPUs or CPUs, DeepSpeed ZeRO)::

    accelerate launch --config_file recipes/accelerate/NAME.yaml -m icpo_train train --config ...

Rerunning the same command resumes from the newest checkpoint in the output directory (other
result-changing settings are refused, naming them). The output directory receives ``checkpoint-N`` folders (safetensors LoRA adapters that icpo-infer
loads with ``--adapter``), the final adapter, ``icpo_config.json`` (the resolved config), the
Trainer's ``trainer_state.json`` / ``train_results.json`` and ``log.txt`` (what the run printed).
``--resume_from_checkpoint last`` (or a checkpoint path) continues a run whatever its settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from icpo_infer.config import check, parse_config, to_dict
from icpo_infer.results import TRAINING_CONFIG_FILE, refuse_foreign_output, write_json_atomic
from icpo_infer.run_log import run_log
from icpo_train.icpo_config import ICPOConfig
from icpo_train.trainer import ICPOTrainer

CONFIG_FILE = TRAINING_CONFIG_FILE
# The TrainingArguments most runs set, listed by `--help` after the ICPO fields.
TRAINING_FIELDS = (
    "output_dir",
    "resume_from_checkpoint",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "bf16",
    "gradient_checkpointing",
    "logging_steps",
    "save_steps",
    "seed",
)


# Training settings that change what a run computes, besides the ICPO fields: a rerun that resumes must
# keep them.
RESULT_FIELDS = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "bf16",
    "seed",
)


def main_fields() -> list[str]:
    """What `--help` lists: the fields ICPOConfig adds to TrainingArguments, then :data:`TRAINING_FIELDS`."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(ICPOConfig) if f.name not in inherited] + list(TRAINING_FIELDS)


# ICPO fields that change how a step is computed but not what it computes.
SAME_RESULT_FIELDS = ("memory_lean", "shared_prefix", "fused_token_loss")


def result_settings(config: ICPOConfig) -> dict:
    """What a resumed run must share with the run it continues, as JSON data."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)} | set(SAME_RESULT_FIELDS)
    names = [f.name for f in dataclasses.fields(ICPOConfig) if f.name not in inherited] + list(RESULT_FIELDS)
    settings = json.loads(json.dumps(to_dict(config)))
    return {name: settings.get(name) for name in names}


def resolve_checkpoint(config: ICPOConfig) -> str | None:
    """The checkpoint to resume from: ``resume_from_checkpoint`` (a path, or ``last``: the newest in
    output_dir), or when unset the newest in output_dir of a run with the same settings."""
    if config.resume_from_checkpoint not in (None, "last"):
        return config.resume_from_checkpoint
    output = Path(config.output_dir)
    last = get_last_checkpoint(output) if output.is_dir() else None
    if config.resume_from_checkpoint == "last":
        check(last is not None, f"resume_from_checkpoint: no checkpoint-N folder in output_dir '{output}'.")
        return last
    if last is None:
        return None
    stored = output / CONFIG_FILE
    check(
        stored.is_file(),
        f"output_dir '{output}' holds checkpoints without {CONFIG_FILE}, so nothing says how they were made: "
        "pass --resume_from_checkpoint last to continue them anyway, or another --output_dir.",
    )
    previous = json.loads(stored.read_text())
    changed = [
        f"{key} ({previous.get(key)!r} there, {value!r} now)"
        for key, value in result_settings(config).items()
        if previous.get(key) != value
    ]
    check(
        not changed,
        f"output_dir '{output}' holds a training run with other settings: {'; '.join(changed)}. Use the same "
        "values to resume it, or another --output_dir.",
    )
    print(f"icpo-train train: resuming from {last}", flush=True)
    return last


def trainable_checksum(model: torch.nn.Module) -> float:
    """Sum of all trainable weights: equal on every process when the replicas stayed in sync."""
    return sum(p.detach().double().sum().item() for p in model.parameters() if p.requires_grad)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(
        ICPOConfig,
        argv,
        prog="icpo-train train",
        main_fields=main_fields(),
        others="transformers' TrainingArguments",
    )
    refuse_foreign_output(Path(config.output_dir), CONFIG_FILE, "--output_dir")
    checkpoint = resolve_checkpoint(config)
    trainer = ICPOTrainer(config)
    with contextlib.ExitStack() as log:
        if trainer.is_world_process_zero():
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(config.output_dir) / CONFIG_FILE, to_dict(config))
            log.enter_context(run_log(config.output_dir))
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = {**result.metrics, **dataclasses.asdict(trainer.trajectory_stats)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        print(
            f"icpo-train train: process {config.process_index} of {config.world_size} finished at step "
            f"{trainer.state.global_step}; trainable-weight checksum {trainable_checksum(trainer.model)!r}",
            flush=True,
        )
    # Free the wrapped model and the gloo process group while the interpreter is alive: left to its
    # shutdown, a gloo thread can abort a rank ("terminate called without an active exception")
    # after training succeeded.
    accelerator = trainer.accelerator
    del trainer
    accelerator.free_memory()  # drops the DDP / DeepSpeed wrappers, then collects garbage
    accelerator.end_training()
    return 0
