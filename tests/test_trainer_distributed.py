"""`accelerate launch -m icpo_train train` with two CPU processes: DDP over gloo and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trajectory_fixtures import write_trajectories

ROOT = Path(__file__).resolve().parents[1]
# Two accumulated micro-batches per step: gradients sync once per step, in the last micro-batch.
ACCUMULATE = ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
# The ranks share one stdout pipe, so another rank's output can follow a checksum before its newline.
CHECKSUM = re.compile(
    r"process (\d) of 2 finished at step (\d+); trainable-weight checksum ([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    accelerate_config: str, model_dir: Path, trajectories: Path, output_dir: Path, *overrides: str
) -> list:
    """Run the tiny recipe under ``accelerate launch``; returns the trainer's log history."""
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(ROOT / "recipes" / "accelerate" / accelerate_config)),
        *("--num_processes", "2", "--main_process_port", str(free_port())),
        *("-m", "icpo_train", "train", "--config", str(ROOT / "recipes" / "icpo" / "tiny.yaml")),
        *("--model_name_or_path", str(model_dir), "--trajectories", str(trajectories)),
        *("--output_dir", str(output_dir), *ACCUMULATE, *overrides),
    ]
    # A rank that aborts prints every thread's Python stack (faulthandler).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    # Each process reports its own weights: data parallelism must leave the replicas identical.
    finished = {rank: (int(step), checksum) for rank, step, checksum in CHECKSUM.findall(run.stdout)}
    assert sorted(finished) == ["0", "1"]
    assert finished["0"] == finished["1"]
    assert finished["0"][0] == 8
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def losses(history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def trajectories(tiny_model_dir, tmp_path_factory) -> Path:
    return write_trajectories(tiny_model_dir, tmp_path_factory.mktemp("trajectories"))


@pytest.fixture(scope="module")
def ddp_history(tiny_model_dir, trajectories, tmp_path_factory) -> list:
    """DDP over gloo with the memory-lean step (one backward per group member, one all-reduce)."""
    return launch("multi_cpu.yaml", tiny_model_dir, trajectories, tmp_path_factory.mktemp("ddp"))


def test_ddp_on_two_cpu_processes_learns(ddp_history):
    assert len(losses(ddp_history)) == 8
    assert losses(ddp_history)[-1] < 0.5 * losses(ddp_history)[0]


def test_deepspeed_zero2_on_two_cpu_processes_matches_ddp(
    tiny_model_dir, trajectories, ddp_history, tmp_path
):
    history = launch("zero2.yaml", tiny_model_dir, trajectories, tmp_path, "--memory_lean", "false")
    # Same data order, same initialisation: ZeRO-2 with the plain loss follows the memory-lean DDP run.
    assert losses(history) == pytest.approx(losses(ddp_history), rel=1e-3)
    assert (tmp_path / "checkpoint-8" / "adapter_model.safetensors").is_file()
