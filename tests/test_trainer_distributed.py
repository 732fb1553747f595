"""`accelerate launch -m icpo_train train` with two CPU processes: DDP over gloo and DeepSpeed ZeRO-2/3,
per member and with shared prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_recipe import launch, losses
from trajectory_fixtures import build_trajectories, write_trajectories
from transformers import AutoTokenizer

from icpo_train.e2e.tiny_lm import init_tiny_llama
from icpo_train.scoring import add_teacher_topk


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


@pytest.fixture(scope="module")
def topk_trajectories(tiny_model_dir, tmp_path_factory) -> Path:
    """The trajectories with a teacher's (another initialisation) top-8 columns, for the token level."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = init_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    path = tmp_path_factory.mktemp("topk")
    add_teacher_topk(build_trajectories(tiny_model_dir), teacher, tokenizer, top_k=8).save_to_disk(str(path))
    return path


def test_fused_token_loss_under_zero3_follows_the_unfused_ddp_run(
    tiny_model_dir, topk_trajectories, tmp_path
):
    """The fused loss calls the output layer itself, chunk by chunk: under ZeRO-3 its weights are gathered
    for those calls as for the model's own."""
    token_level = ("--loss_level", "token", "--memory_lean", "false")
    unfused = launch(
        "multi_cpu.yaml",
        tiny_model_dir,
        topk_trajectories,
        tmp_path / "ddp",
        *token_level,
        "--fused_token_loss",
        "false",
    )
    fused = launch("zero3.yaml", tiny_model_dir, topk_trajectories, tmp_path / "zero3", *token_level)
    assert losses(fused) == pytest.approx(losses(unfused), rel=1e-4)
    assert losses(unfused)[-1] < losses(unfused)[0]
