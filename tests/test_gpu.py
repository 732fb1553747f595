"""The CUDA paths on one GPU: bf16 inference and training, and DeepSpeed ZeRO-2/3 under accelerate.

CI has no GPU and skips this module; where there is one: `.venv/bin/python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_recipe import launch, losses, recipe_args
from trajectory_fixtures import SOLUTIONS, integer_problems, write_trajectories

from icpo_infer.backends.base import BackendOptions, SamplingParams
from icpo_infer.backends.hf import HFBackend
from icpo_infer.config import parse_config
from icpo_infer.prompts import render_prompt
from icpo_train.icpo_config import ICPOConfig
from icpo_train.trainer import ICPOTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Plain loss (one backward per step, what DeepSpeed runs), bf16, the tiny recipe's 8 steps.
BF16 = ("--bf16", "true", "--memory_lean", "false")


@pytest.fixture(scope="module")
def trajectories_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return write_trajectories(tiny_model_dir, tmp_path_factory.mktemp("trajectories"))


@pytest.fixture(scope="module")
def cpu_backend(tiny_model_dir) -> HFBackend:
    return HFBackend(BackendOptions(model=str(tiny_model_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def prompts_and_responses(cpu_backend) -> tuple[list[str], list[str]]:
    problems = integer_problems(4)
    prompts = [render_prompt(cpu_backend.tokenizer, p["problem"], [], "integer") for p in problems]
    return prompts, [SOLUTIONS[0] % p["answer"] for p in problems]


def test_auto_device_and_dtype_are_cuda_and_bf16(tiny_model_dir):
    backend = HFBackend(BackendOptions(model=str(tiny_model_dir)))
    assert backend.model.device.type == "cuda"
    assert backend.model.dtype == torch.bfloat16


def test_bf16_scores_on_cuda_match_fp32_on_cpu(tiny_model_dir, cpu_backend, prompts_and_responses):
    """The trajectory builder's reference log-probabilities do not depend on where they were computed."""
    prompts, responses = prompts_and_responses
    cuda = HFBackend(BackendOptions(model=str(tiny_model_dir))).score(prompts, responses)
    cpu = cpu_backend.score(prompts, responses)
    assert [s.num_tokens for s in cuda] == [s.num_tokens for s in cpu]
    assert [s.logprob for s in cuda] == pytest.approx([s.logprob for s in cpu], rel=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_seeded_samples_on_cuda_repeat(tiny_model_dir, prompts_and_responses, dtype):
    """Repeatable in both dtypes; independent of the batch in fp32 only (see SamplingParams)."""
    prompts, _ = prompts_and_responses
    backend = HFBackend(BackendOptions(model=str(tiny_model_dir), dtype=dtype))
    params = SamplingParams(n=3, max_new_tokens=12, seed=0)

    def texts(generations):
        return [[c.text for c in g.completions] for g in generations]

    together = texts(backend.generate(prompts, params))
    assert texts(backend.generate(prompts, params)) == together
    alone = [texts(backend.generate([p], params))[0] for p in prompts]
    if dtype == "float32":
        assert alone == together


def trained(model_dir: Path, trajectories_dir: Path, output_dir: Path, *overrides: str) -> ICPOTrainer:
    trainer = ICPOTrainer(
        parse_config(ICPOConfig, recipe_args(model_dir, trajectories_dir, output_dir, *overrides))
    )
    trainer.train()
    return trainer


def test_lora_in_bf16_on_cuda_learns_and_its_adapter_serves(
    tiny_model_dir, trajectories_dir, prompts_and_responses, tmp_path
):
    trainer = trained(tiny_model_dir, trajectories_dir, tmp_path, *BF16, "--per_device_train_batch_size", "9")
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    lora = [p for p in trainer.model.parameters() if p.requires_grad]
    # The frozen base in bf16 halves its memory; the adapter keeps fp32 weights for the optimizer.
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in lora} == {torch.float32}
    assert {p.device.type for p in trainer.model.parameters()} == {"cuda"}
    history = losses(trainer.state.log_history)
    assert history[-1] < 0.5 * history[0]
    trainer.save_model()
    prompts, responses = prompts_and_responses
    backends = {
        dtype: HFBackend(BackendOptions(model=str(tiny_model_dir), dtype=dtype))
        for dtype in ("bfloat16", "float32")
    }
    scores = {
        dtype: [s.logprob for s in backend.score(prompts, responses, adapter=str(tmp_path))]
        for dtype, backend in backends.items()
    }
    base = [s.logprob for s in backends["float32"].score(prompts, responses)]
    assert max(abs(t - b) for t, b in zip(scores["float32"], base, strict=True)) > 0.1
    # The adapter serves on the bf16 base as on the fp32 one.
    assert scores["bfloat16"] == pytest.approx(scores["float32"], abs=2e-2)


def test_memory_lean_in_bf16_on_cuda_follows_the_plain_loss(tiny_model_dir, trajectories_dir, tmp_path):
    runs = {
        lean: losses(
            trained(
                tiny_model_dir, trajectories_dir, tmp_path / lean, "--bf16", "true", "--memory_lean", lean
            ).state.log_history
        )
        for lean in ("false", "true")
    }
    # bf16 rounds the two paths' sums differently: equal first steps, then a drift of a few percent.
    assert runs["true"][0] == pytest.approx(runs["false"][0], rel=1e-2)
    assert runs["true"] == pytest.approx(runs["false"], rel=0.1)


def test_full_fine_tuning_keeps_fp32_weights_and_learns_under_autocast(
    tiny_model_dir, trajectories_dir, tmp_path
):
    overrides = ("--use_peft", "false", "--learning_rate", "3e-4", "--per_device_train_batch_size", "9")
    trainer = trained(tiny_model_dir, trajectories_dir, tmp_path, *BF16, *overrides)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    history = losses(trainer.state.log_history)
    assert history[-1] < 0.5 * history[0]


@pytest.fixture(scope="module")
def single_gpu_histories(tiny_model_dir, trajectories_dir, tmp_path_factory) -> dict[str, list]:
    """`accelerate launch` on one GPU without DeepSpeed, in fp32 and bf16: what the ZeRO runs follow."""
    return {
        bf16: launch(
            "ddp.yaml",
            tiny_model_dir,
            trajectories_dir,
            tmp_path_factory.mktemp(f"single-gpu-bf16-{bf16}"),
            *("--bf16", bf16, "--memory_lean", "false"),
            num_processes=1,
        )
        for bf16 in ("false", "true")
    }


@pytest.mark.parametrize("accelerate_config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_in_fp32_on_one_gpu_matches_the_plain_run_and_saves_the_adapter(
    accelerate_config, tiny_model_dir, trajectories_dir, single_gpu_histories, tmp_path
):
    overrides = ("--bf16", "false", "--memory_lean", "false")
    history = launch(
        accelerate_config, tiny_model_dir, trajectories_dir, tmp_path, *overrides, num_processes=1
    )
    assert losses(history) == pytest.approx(losses(single_gpu_histories["false"]), rel=1e-3)
    # ZeRO-3 partitions the weights: the saved adapter must hold the gathered ones, not empty shards.
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as weights:
        lora_b = [weights.get_tensor(key) for key in weights.keys() if "lora_B" in key]  # noqa: SIM118
    assert lora_b and all(t.numel() > 0 for t in lora_b)
    assert any(t.abs().max() > 0 for t in lora_b)


@pytest.mark.parametrize("accelerate_config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_in_bf16_keeps_the_losses_inputs_in_fp32(
    accelerate_config, tiny_model_dir, trajectories_dir, single_gpu_histories, tmp_path
):
    """Same weights at the first step, so the same loss up to rounding. Cast to bf16 (as transformers
    casts a DeepSpeed batch's float inputs), ref_logps lost up to half a nat each: 0.069 against 0.088."""
    history = launch(accelerate_config, tiny_model_dir, trajectories_dir, tmp_path, *BF16, num_processes=1)
    assert losses(history)[0] == pytest.approx(losses(single_gpu_histories["true"])[0], rel=1e-2)
