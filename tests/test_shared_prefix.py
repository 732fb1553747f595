"""Shared-prefix group scoring: the prompt runs once per group, and the loss and every gradient equal
scoring prompt + response per member (plain and memory-lean steps, LoRA, gradient checkpointing)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from tiny_recipe import recipe_args
from trajectory_fixtures import build_trajectories
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from icpo_infer.backends.base import encode_completion
from icpo_infer.config import ConfigError, parse_config
from icpo_train.collation import group_sequences
from icpo_train.icpo_config import ICPOConfig
from icpo_train.scoring import check_full_attention, prompt_states, response_logps, responses_on_prompt_logits
from icpo_train.trainer import ICPOTrainer

# Rows of three rounds (prompts of three lengths) and two group sizes (3 and 4 members).
BATCH_ROWS = (0, 2, 4, 8)


@pytest.fixture(scope="module")
def trajectories(tiny_model_dir):
    """The fixture rows with member 1 of row 4 invalid (non-finite ref_logp): a masked member."""

    def invalidate(row, index):
        return {"ref_logps": [row["ref_logps"][0], math.nan, *row["ref_logps"][2:]]} if index == 4 else {}

    return build_trajectories(tiny_model_dir).map(invalidate, with_indices=True)


@pytest.fixture(scope="module")
def short_answers(tiny_model_dir, trajectories):
    """The same rows with short answers as responses and probable ref_logps: under the tail bucket the
    long responses' mass is ~0 and their loss vanishes; these groups hold a real share of pi_ref's mass."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def shorten(row):
        responses = [f"{7 + j}" + " 0" * j for j in range(len(row["responses"]))]
        return {
            "responses": responses,
            "ref_num_tokens": [len(encode_completion(tokenizer, r)) for r in responses],
            "ref_logps": [v if math.isnan(v) else -1.0 - j / 2 for j, v in enumerate(row["ref_logps"])],
        }

    return trajectories.map(shorten)


def make_trainer(model_dir, trajectories, output_dir, model, *overrides) -> ICPOTrainer:
    config = parse_config(
        ICPOConfig, recipe_args(model_dir, "unused", output_dir, "--save_strategy", "no", *overrides)
    )
    trainer = ICPOTrainer(config, model=model, train_dataset=trajectories)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    return trainer


def policy(model_dir, dtype: torch.dtype, lora: ICPOConfig | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if lora is None:
        return model
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same A in every policy compared
    model = get_peft_model(model, lora.lora_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA starts with B = 0, where A gets no gradient: start elsewhere
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return model


def step(trainer: ICPOTrainer, rows=BATCH_ROWS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and every trainable parameter's gradient of one training step on ``rows``."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.training_step(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads


def assert_same_step(reference, other, tolerance: float) -> None:
    """Same loss, and every gradient the same within ``tolerance`` of its largest entry."""
    (loss, grads), (other_loss, other_grads) = reference, other
    assert loss.item() > 0
    torch.testing.assert_close(other_loss, loss, rtol=tolerance, atol=0)
    assert sorted(other_grads) == sorted(grads)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, f"{name} has no gradient: it tests nothing"
        torch.testing.assert_close(
            other_grads[name], grad, rtol=0, atol=tolerance * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_group_sequences_reads_back_each_rows_prompt_and_responses(tiny_model_dir, trajectories, tmp_path):
    trainer = make_trainer(tiny_model_dir, trajectories, tmp_path, None, "--shared_prefix", "true")
    features = [trainer.train_dataset[i] for i in BATCH_ROWS]
    groups = group_sequences(trainer.data_collator(features))
    assert [len(responses) for _, responses in groups] == [3, 3, 3, 4]  # row 4 lost its member 1
    for (prompt, responses), feature in zip(groups, features, strict=True):
        assert prompt.tolist() == feature["prompt_ids"]
        assert [r.tolist() for r in responses] == feature["completion_ids"]


@pytest.mark.parametrize("tail_bucket", ["false", "true"])
@pytest.mark.parametrize("lean", ["false", "true"])
def test_full_fine_tuning_in_float64_equals_the_per_member_path(
    tiny_model_dir, trajectories, short_answers, tmp_path, lean, tail_bucket
):
    rows = short_answers if tail_bucket == "true" else trajectories
    options = ("--use_peft", "false", "--memory_lean", lean, "--tail_bucket", tail_bucket)
    steps = {}
    for shared in ("false", "true"):
        model = policy(tiny_model_dir, torch.float64)
        trainer = make_trainer(tiny_model_dir, rows, tmp_path, model, *options, "--shared_prefix", shared)
        steps[shared] = step(trainer)
    # Llama's RMSNorm computes in float32 whatever the model's dtype: the gradient at a prompt position,
    # summed over the members before that norm, is rounded there once instead of once per member. So
    # float64 agrees to float32's rounding (1e-7) of each gradient's scale, not to float64's.
    assert_same_step(steps["false"], steps["true"], tolerance=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lean", ["false", "true"])
def test_lora_in_float32_equals_the_per_member_path(
    tiny_model_dir, trajectories, tmp_path, lean, checkpointing
):
    """LoRA with gradient checkpointing: the checkpointed layers keep the prompt's cache and their
    replay in backward reads it again. fp32 agrees within 1e-4 of each gradient's largest entry."""
    steps = {}
    for shared in ("false", "true"):
        config = parse_config(ICPOConfig, recipe_args(tiny_model_dir, "unused", tmp_path))
        model = policy(tiny_model_dir, torch.float32, lora=config)
        if checkpointing:  # as Trainer.train does, with transformers' default (non-reentrant) checkpoints
            model.gradient_checkpointing_enable()
            assert model.base_model.model.model.layers[0].gradient_checkpointing
        trainer = make_trainer(
            tiny_model_dir, trajectories, tmp_path, model, "--memory_lean", lean, "--shared_prefix", shared
        )
        steps[shared] = step(trainer)
    assert_same_step(steps["false"], steps["true"], tolerance=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("--loss_level", "token", "--memory_lean", "false"),
            "shared_prefix applies to loss_level: response",
        ),
        (
            (
                "--gradient_checkpointing",
                "true",
                "--gradient_checkpointing_kwargs",
                '{"use_reentrant": true}',
            ),
            "reentrant",
        ),
    ],
)
def test_bad_shared_prefix_settings(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(
            ICPOConfig, recipe_args(tiny_model_dir, "unused", tmp_path, "--shared_prefix", "true", *overrides)
        )


def test_sliding_window_models_are_refused():
    """A sliding-window layer would attend over the whole cached prompt: refused, full attention passes."""
    for sliding, refused in ((False, False), (True, True)):
        config = Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            use_sliding_window=sliding,
            sliding_window=16,
            max_window_layers=0,
        )
        if refused:
            with pytest.raises(ConfigError, match="sliding_attention layers"):
                check_full_attention(Qwen2ForCausalLM(config))
        else:
            check_full_attention(Qwen2ForCausalLM(config))


def test_memory_lean_replays_each_members_dropout(tiny_model_dir, trajectories, tmp_path):
    """With dropout, the lean step's gradient is the gradient of the loss it returns: pass 2 replays the
    masks each member drew in pass 1. Reference: the same draws, in order, in one graph."""
    options = ("--lora_dropout", "0.5", "--shared_prefix", "true", "--memory_lean", "true")
    config = parse_config(ICPOConfig, recipe_args(tiny_model_dir, "unused", tmp_path, *options))
    model = policy(tiny_model_dir, torch.float64, lora=config)
    trainer = make_trainer(tiny_model_dir, trajectories, tmp_path, model, *options)
    torch.manual_seed(0)
    lean = step(trainer)

    model.zero_grad(set_to_none=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in BATCH_ROWS])
    torch.manual_seed(0)
    logps = []
    for prompt, responses in group_sequences(batch):
        states = prompt_states(model, prompt)
        for response in responses:
            logps.append(response_logps(*responses_on_prompt_logits(model, states, prompt, [response])))
    loss = trainer._group_loss(torch.cat(logps), batch)
    loss.backward()
    reference = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert_same_step(reference, lean, tolerance=1e-6)
