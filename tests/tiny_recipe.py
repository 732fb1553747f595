"""The tiny training recipe's command line, in process and under ``accelerate launch``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "icpo" / "tiny.yaml"
# Two accumulated micro-batches per step: gradients sync once per step, in the last micro-batch.
ACCUMULATE = ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
# The ranks share one stdout pipe, so another rank's output can follow a checksum before its newline.
CHECKSUM = re.compile(
    r"process (\d+) of \d+ finished at step (\d+); "
    r"trainable-weight checksum ([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
)


def recipe_args(model_dir: Path, trajectories_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    """The command line of `icpo-train train` on the tiny recipe."""
    return [
        *("--config", str(TINY_RECIPE), "--model_name_or_path", str(model_dir)),
        *("--trajectories", str(trajectories_dir), "--output_dir", str(output_dir), *overrides),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    accelerate_config: str,
    model_dir: Path,
    trajectories: Path,
    output_dir: Path,
    *overrides: str,
    num_processes: int = 2,
) -> list:
    """Run the tiny recipe under ``accelerate launch``; returns the trainer's log history."""
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(ROOT / "recipes" / "accelerate" / accelerate_config)),
        *("--num_processes", str(num_processes), "--main_process_port", str(free_port())),
        *("-m", "icpo_train", "train"),
        *recipe_args(model_dir, trajectories, output_dir, *ACCUMULATE, *overrides),
    ]
    # A rank that aborts prints every thread's Python stack (faulthandler).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    # Each process reports its own weights: data parallelism must leave the replicas identical.
    finished = {rank: (int(step), checksum) for rank, step, checksum in CHECKSUM.findall(run.stdout)}
    assert sorted(finished) == [str(rank) for rank in range(num_processes)]
    assert len(set(finished.values())) == 1
    assert finished["0"][0] == 8
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def losses(history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]
