"""`accelerate launch` with 2 CPU processes (DDP over gloo) trains the model one process trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icpo_train.lsa.experiment import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--config", str(ROOT / "recipes" / "lsa" / "linear_bandit.yaml"),
    "--horizon", "20", "--train_steps", "40", "--batch_size", "32", "--eval_tasks", "200", "--ablation", "false",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_the_same_model_as_one(tmp_path):
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "multi_cpu.yaml"),
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    # A rank that aborts prints every thread's Python stack (faulthandler).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    distributed = tmp_path / "two"
    run = subprocess.run(
        [*launch, "-m", "icpo_train", "lsa", *ARGS, "--output_dir", str(distributed)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-5000:]
    assert run.stdout.count("imitation KL(teacher || LSA)") == 1  # only the main process reports

    single = tmp_path / "one"
    main([*ARGS, "--output_dir", str(single)])

    two, one = (json.loads((d / "metrics.json").read_text()) for d in (distributed, single))
    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    # Each process rolled out its half of every batch and DDP averaged the gradients: the result is the
    # one-process model up to the summation order of the all-reduce.
    two_weights, one_weights = (
        load_file(d / "checkpoints" / "lsa-fw.safetensors") for d in (distributed, single)
    )
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-5, atol=1e-6)
    assert two["imitation_kl"] == pytest.approx(one["imitation_kl"], rel=1e-4)
    assert two["regret"] == pytest.approx(one["regret"], rel=1e-3)
