"""ICPOConfig: every option of `icpo-train train`, transformers' TrainingArguments plus the ICPO
fields, checked when the config is built (trackers by :func:`check_trackers`, which the checkpoint
evaluation's ``--report-to`` shares)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from transformers import TrainingArguments
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from icpo_infer.config import check, option
from icpo_train.losses import FISHER_AT

LOSS_LEVELS = ("response", "token")
LOSS_TYPES = ("fw", "kl", "mse", "sft")
REWARD_SCALES = ("counted", "signed")
TAIL_REWARDS = ("zero", "answers")
QWEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _deepspeed_requested(config: TrainingArguments) -> bool:
    """DeepSpeed comes from ``--deepspeed`` or from ``accelerate launch`` with a DeepSpeed config."""
    return bool(config.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_trackers(report_to: Sequence[str], flag: str) -> None:
    """Refuse a tracker transformers does not integrate, or one whose package is not installed."""
    available = get_available_reporting_integrations()
    for tracker in report_to:
        check(
            tracker == "none" or tracker in INTEGRATION_TO_CALLBACK,
            f"{flag}: '{tracker}' is unknown; use none or one of {', '.join(INTEGRATION_TO_CALLBACK)}.",
        )
        check(
            tracker == "none" or tracker in available,
            f"{flag}: {tracker} is not installed; pip install {tracker} (or the trackers extra: pip install "
            f"-e '.[trackers]'), or drop it from --{flag.lstrip('-')}.",
        )


@dataclass
class ICPOConfig(TrainingArguments):
    """All options of `icpo-train train`: transformers' TrainingArguments plus the ICPO fields."""

    model_name_or_path: str | None = option(None, "Base model to train: a local directory or a Hub id.")
    trajectories: str | None = option(
        None, "Trajectory dataset from `icpo-train build-trajectories`: a save_to_disk directory or Parquet."
    )
    templates: str | None = option(
        None,
        "YAML file overriding the prompt wording. Default: the one the trajectories' directory records "
        "they were built with; a different one is refused.",
    )
    loss_level: str = option("response", f"One of {', '.join(LOSS_LEVELS)}.")
    loss_type: str = option(
        "fw",
        "fw: Fisher-weighted logit matching; kl: KL between the group softmaxes (pi_ref divided out); "
        "mse: unweighted, 1/2 mean_j (d_j - mean d)^2; sft: cross-entropy on members with positive reward.",
    )
    eta: float = option(1.0, "Step size of the in-context policy update: z* = log pi_ref + eta * R.")
    gt_coef: float = option(0.0, "Weight of the gold reward in the target: z* += gt_coef * gold_reward.")
    reward_scale: str = option(
        "counted",
        "In-context reward R of a response: counted (the history's tags on its answer added up, +1 per "
        "entry tagged 1, -1 per entry tagged 0) or signed (the sign of that sum: +1, 0 or -1).",
    )
    no_answer_penalty: float = option(
        0.0,
        "Subtracted from R of every response without an answer, so that saying nothing is never a safe "
        "way to avoid an answer the history tagged 0.",
    )
    tail_reward: str = option(
        "zero",
        "tail_bucket: the target reward of the tail (every response outside the group): zero, or answers "
        "(1/eta log of the group's mean exp(eta R), counting repeats: the tail holds the same answers as "
        "the samples, so the target moves answers, not the sampled strings).",
    )
    anchor_coef: float = option(
        0.0,
        "Weight of an extra loss on the round-1 rows (no history) against pi_ref itself (R = 0): keeps the "
        "model's first attempt close to the base model's.",
    )
    tail_bucket: bool = option(
        False,
        "Response level (fw, kl, mse): match exact distributions over the group's distinct responses plus "
        "one bucket for every other response, instead of the group-restricted softmax; anchors the group's "
        "mass. Needs logprob_reduction: sum.",
    )
    fisher_at: str = option(
        "target",
        "fw: where the Fisher weights are evaluated: target (F(p*), the paper's) or policy (the current "
        "policy, held fixed: keeps pulling where the policy is far from the target).",
    )
    logprob_reduction: str = option("sum", "z_j = sum (default) or mean of the response's token log-probs.")
    memory_lean: bool = option(
        False, "Back-propagate one group member at a time: peak memory independent of the group size."
    )
    shared_prefix: bool = option(
        False,
        "Response level: run each group's prompt once and score every response on the prompt's key/value "
        "cache, back-propagating through the prompt once: the same loss and gradients as scoring "
        "prompt + response per member, without recomputing the prompt G times. Combines with memory_lean "
        "(then one response at a time on the prompt, whose activations the step keeps: peak memory one "
        "response plus the batch's prompts), LoRA, gradient checkpointing, DDP and DeepSpeed; models with "
        "sliding-window attention are refused.",
    )
    teacher_model: str | None = option(
        None, "Token level: teacher model scored on the same sequences (else the dataset's top-k columns)."
    )
    fused_token_loss: bool = option(
        True,
        "Token level: compute the loss from the last hidden states and the output layer in chunks of "
        "positions, so that neither forward nor backward holds the logits of the whole batch (the same loss "
        "and gradients); false: from the full logits.",
    )
    max_length: int | None = option(
        None, "Leave out group members whose prompt + response exceed this many tokens."
    )
    use_peft: bool = option(True, "Train a LoRA adapter (false: full fine-tuning).")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(QWEN_LORA_TARGETS),
        metadata={"help": "Module names LoRA adapts (suffixes of the model's module names)."},
    )
    trust_remote_code: bool = option(False, "Run the model repository's own code (only for repos you trust).")
    # TrainingArguments defaults that do not suit this trainer.
    output_dir: str | None = option(None, "Where the checkpoints and the final adapter go (required).")
    bf16: bool | None = option(None, "bf16 mixed precision; default: where the device supports it.")
    remove_unused_columns: bool = option(
        False, "Keep the tokenised trajectory columns (the collator needs them)."
    )
    ddp_find_unused_parameters: bool | None = option(False, "Every trainable parameter gets a gradient.")
    logging_steps: float = option(10, "Log every this many optimizer steps.")

    def __post_init__(self) -> None:
        check(
            self.output_dir is not None,
            "output_dir is required: name the folder for the checkpoints and the final adapter.",
        )
        check(
            self.model_name_or_path is not None,
            "model_name_or_path is required: name the base model (a local directory or a Hub id).",
        )
        check(
            self.trajectories is not None,
            "trajectories is required: pass the output directory of `icpo-train build-trajectories`.",
        )
        for name, value, valid in [
            ("loss_level", self.loss_level, LOSS_LEVELS),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("logprob_reduction", self.logprob_reduction, ("sum", "mean")),
            ("fisher_at", self.fisher_at, FISHER_AT),
            ("reward_scale", self.reward_scale, REWARD_SCALES),
            ("tail_reward", self.tail_reward, TAIL_REWARDS),
        ]:
            check(value in valid, f"{name}='{value}' is unknown; use one of {', '.join(valid)}.")
        check(self.eta > 0, f"eta={self.eta} is invalid; use eta > 0.")
        check(
            self.gt_coef >= 0,
            f"gt_coef={self.gt_coef} is invalid; use gt_coef >= 0 (0: history rewards only).",
        )
        for name in ("no_answer_penalty", "anchor_coef"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} is invalid; use {name} >= 0.")
        check(
            self.tail_reward == "zero" or self.tail_bucket,
            f"tail_reward='{self.tail_reward}' applies with tail_bucket: true; set tail_bucket: true or remove it.",
        )
        check(
            self.max_length is None or self.max_length >= 2,
            f"max_length={self.max_length} is invalid; use max_length >= 2 or leave it out.",
        )
        check(
            self.fisher_at == "target" or (self.loss_level == "response" and self.loss_type == "fw"),
            f"fisher_at='{self.fisher_at}' applies to loss_level: response with loss_type: fw; remove it.",
        )
        if self.tail_bucket:
            check(
                self.loss_level == "response" and self.loss_type in ("fw", "kl", "mse"),
                f"tail_bucket applies to loss_level: response with loss_type fw, kl or mse (got "
                f"{self.loss_level}, {self.loss_type}); set tail_bucket: false.",
            )
            check(
                self.logprob_reduction == "sum",
                "tail_bucket needs probabilities of whole responses; set logprob_reduction: sum.",
            )
        check(self.lora_r >= 1, f"lora_r={self.lora_r} is invalid; use lora_r >= 1.")
        check(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} is invalid; use lora_alpha > 0.")
        check(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} is invalid; use 0 <= it < 1.")
        check(bool(self.lora_target_modules), "lora_target_modules is empty; name the modules LoRA adapts.")
        if self.loss_level == "token":
            check(
                self.loss_type == "fw",
                f"loss_type='{self.loss_type}' is a response-level ablation; use loss_type: fw with loss_level: token.",
            )
            check(
                not self.memory_lean, "memory_lean applies to loss_level: response; set memory_lean: false."
            )
            check(
                not self.shared_prefix,
                "shared_prefix applies to loss_level: response; set shared_prefix: false.",
            )
        else:
            check(self.teacher_model is None, "teacher_model is used by loss_level: token only; remove it.")
        check(
            not (self.memory_lean and _deepspeed_requested(self)),
            "memory_lean runs one backward per group member, which DeepSpeed's engine (one backward per "
            "step) cannot accumulate; launch with recipes/accelerate/ddp.yaml or set memory_lean: false.",
        )
        check(
            not (self.shared_prefix and self.memory_lean and self.fp16),
            "shared_prefix with memory_lean adds the members' gradients into the prompt's states outside fp16's "
            "loss scaling; train in bf16 (bf16: true, fp16: false) or set shared_prefix: false.",
        )
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not torch.accelerator.is_available() and (multi_process or self.bf16):
            # Without accelerators transformers runs DDP (MULTI_CPU) and bf16 (CPU autocast; twice fp32's
            # speed on CPUs with AVX512-BF16) only with use_cpu; DeepSpeed initialises its own process
            # group, which needs the backend.
            if multi_process:
                self.ddp_backend = self.ddp_backend or "gloo"
            self.use_cpu = self.use_cpu or not _deepspeed_requested(self)
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin memory for; torch warns at every run
        super().__post_init__()
        check_trackers(self.report_to, "report_to")  # a list once the parent parsed it
        checkpoint_kwargs = self.gradient_checkpointing_kwargs  # a dict once the parent parsed it
        check(
            not (
                self.shared_prefix
                and self.gradient_checkpointing
                and isinstance(checkpoint_kwargs, dict)
                and checkpoint_kwargs.get("use_reentrant", False)
            ),
            "shared_prefix: reentrant gradient checkpointing gives the prompt's cached keys and values no "
            "gradient; remove use_reentrant from gradient_checkpointing_kwargs (the default is non-reentrant).",
        )

    def lora_config(self) -> LoraConfig:
        targets = list(self.lora_target_modules)
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,  # PEFT's keyword is a str
            task_type="CAUSAL_LM",
        )
