"""`accelerate launch -m icpo_train train` with two CPU processes: DDP over gloo and DeepSpeed ZeRO-2/3,
per member and with shared prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_recipe import launch, losses
from trajectory_fixtures import write_trajectories


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


def test_shared_prefix_under_ddp_follows_the_per_member_run(
    tiny_model_dir, trajectories, ddp_history, tmp_path
):
    """The memory-lean shared-prefix step runs one backward per member plus the prompt's; DDP must
    all-reduce once, after all of them, or the replicas and the losses drift apart."""
    history = launch("multi_cpu.yaml", tiny_model_dir, trajectories, tmp_path, "--shared_prefix", "true")
    assert losses(history) == pytest.approx(losses(ddp_history), rel=1e-4)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_shared_prefix_under_deepspeed_follows_the_per_member_run(
    tiny_model_dir, trajectories, ddp_history, tmp_path, zero
):
    overrides = ("--memory_lean", "false", "--shared_prefix", "true")
    history = launch(f"{zero}.yaml", tiny_model_dir, trajectories, tmp_path, *overrides)
    assert losses(history) == pytest.approx(losses(ddp_history), rel=1e-3)
