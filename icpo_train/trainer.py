"""The ICPO trainer: fine-tune an LLM (LoRA) so that its answer distribution given a round's history
moves where one Fisher-weighted policy-optimization step from pi_ref would move it.

Response level (default). One example is one trajectory row: the prompt of round t
(:func:`icpo_train.trajectory_data.trajectory_prompt`, the exact inference prompt) and a group of
responses y_j sampled from pi_ref given the bare question. Student logits are
``z_j = log pi_theta(y_j | prompt_t)`` (sum over the response tokens, or their mean); targets are
``z*_j = ref_logps_j + eta * R_j`` with ``R_j = icl_rewards_j + gt_coef / eta * gold_rewards_j``;
the loss is :func:`icpo_train.losses.group_fisher_weighted_loss`.

Token level. Every completion token is one FW-LM problem over the vocabulary: the student's
next-token logits given prompt_t against a teacher's, computed by ``teacher_model`` on the same
sequence or stored sparsely (top-k) in the dataset by :func:`add_teacher_topk`.

Memory-lean mode (response level). The loss depends on theta only through the G scalars z_j, so
``dL/dtheta = sum_j (dL/dz_j) dz_j/dtheta``: the group's z values are computed first without a
graph, the loss and its G coefficients ``dL/dz_j`` (``w_j (d_j - dbar)`` for FW) follow from them,
and each member is then re-run and back-propagated alone with its coefficient. Peak memory is that
of one response, whatever G.

Shared prefix (response level). A group's members share their prompt, by far the longer part once the
history grows. The prompt runs once, its keys and values are cached, and every response runs on that
cache; the prompt's backward runs once too, with the sum of its members' gradients. Memory-lean, the
members' gradients into the prompt's keys and values accumulate in detached copies, and the prompt's
backward joins the group's last member's.

Fused token level. The loss takes the student's last hidden states and applies the output layer a chunk
of positions at a time (:func:`icpo_train.losses.fused_fisher_weighted_logit_matching`): the logits of
the whole batch, V = 152k wide for Qwen2.5, never exist, in forward or backward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D
from trl.trainer.utils import selective_log_softmax

from icpo_infer.backends import model_loading
from icpo_infer.backends.base import encode_completion, encode_prompt
from icpo_infer.config import ConfigError, check, option
from icpo_infer.prompts import PromptTemplates
from icpo_train.losses import (
    FISHER_AT,
    fisher_weighted_logit_matching,
    fused_fisher_weighted_logit_matching,
    fused_sparse_fisher_weighted_logit_matching,
    group_fisher_weighted_loss,
    group_weights,
    sparse_fisher_weighted_logit_matching,
    with_tail_bucket,
)
from icpo_train.trajectory_data import (
    GROUP_COLUMNS,
    TEACHER_COLUMNS,
    load_trajectories,
    training_templates,
    trajectory_prompt,
    validate_trajectories,
)

logger = logging.getLogger(__name__)

LOSS_LEVELS = ("response", "token")
LOSS_TYPES = ("fw", "kl", "mse", "sft")
REWARD_SCALES = ("counted", "signed")
TAIL_REWARDS = ("zero", "answers")
QWEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# log(pi(group) / pi_ref(group)) below which a policy-Fisher tail-bucket loss has (almost) no gradient
# left to bring the policy back: it weighs each response by the policy's own probability.
COLLAPSED_LOG_GROUP_MASS_RATIO = -10.0
# Module types LoRA can wrap (PEFT's own list is longer; these are the ones causal LMs use).
LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Embedding, Conv1D)


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


class NonFiniteLossError(ConfigError):
    """Training produced a NaN or infinite loss; the message names the step, the example and the settings
    to change, and the CLI prints it as a one-line error like any bad input."""


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must name at least one module LoRA can adapt (PEFT only fails when none matches)."""
    adaptable = [name for name, module in model.named_modules() if isinstance(module, LORA_MODULE_TYPES)]
    if targets == ["all-linear"]:
        return
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in adaptable):
            choices = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
            raise ConfigError(
                f"lora_target_modules: '{target}' is not a linear or embedding module of "
                f"{type(model).__name__}; choose among {', '.join(choices)} (or all-linear)."
            )


def check_full_attention(model: PreTrainedModel) -> None:
    """shared_prefix hands every layer the prompt's whole key/value cache: only full attention reads it as
    scoring prompt + response in one sequence does."""
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    other = sorted(set(layer_types) - {"full_attention"})
    check(
        not other,
        f"shared_prefix: {type(model).__name__} has {', '.join(other)} layers, which the shared prompt cache "
        "does not reproduce; set shared_prefix: false.",
    )


def load_policy(config: ICPOConfig) -> PreTrainedModel:
    """The model to train, wrapped in a fresh LoRA adapter when ``use_peft``.

    A LoRA base is loaded in bf16 when training in bf16 (it stays frozen); a fully fine-tuned model
    keeps fp32 master weights and runs in bf16 through autocast.
    """
    dtype = torch.bfloat16 if config.bf16 and config.use_peft else torch.float32
    with model_loading(config.model_name_or_path, "--model_name_or_path"):
        model = AutoModelForCausalLM.from_pretrained(
            config.model_name_or_path, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    if not config.use_peft:
        return model
    check_lora_targets(model, list(config.lora_target_modules))
    return get_peft_model(model, config.lora_config())


def _tokenize_row(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    templates: PromptTemplates | None,
    max_length: int | None,
    teacher_columns: list[str],
    distinct: bool,
) -> dict:
    """Prompt and response token ids of one row, keeping the valid members of its group.

    A member is valid when its ref_logp and rewards are finite and prompt + response fits
    ``max_length``; with ``distinct`` a repeat of an earlier member's tokens is not a member. A response
    that does not encode to ``ref_num_tokens`` tokens means the ref_logps score other tokens than the
    ones trained on: an error, never a silent bias.
    """
    where = f"question_id={row['question_id']} round={row['round']}"
    size = len(row["responses"])
    for column in GROUP_COLUMNS:
        check(
            len(row[column]) == size,
            f"--trajectories: row {where}: '{column}' has {len(row[column])} entries for {size} responses; "
            "rebuild the trajectories.",
        )
    prompt_ids = encode_prompt(tokenizer, trajectory_prompt(row, tokenizer, templates))
    encoded = [encode_completion(tokenizer, response) for response in row["responses"]]
    repeats = Counter(map(tuple, encoded)) if distinct else None
    members, completions, seen = [], [], set()
    for j, ids in enumerate(encoded):
        if distinct:
            if tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
        check(
            len(ids) == row["ref_num_tokens"][j],
            f"--trajectories: row {where}, response {j} encodes to {len(ids)} tokens but ref_num_tokens "
            f"says {row['ref_num_tokens'][j]}: its ref_logp scores other tokens. Rebuild the trajectories.",
        )
        finite = all(math.isfinite(row[c][j]) for c in ("ref_logps", "icl_rewards", "gold_rewards"))
        if finite and (max_length is None or len(prompt_ids) + len(ids) <= max_length):
            members.append(j)
            completions.append(ids)
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completions,
        "num_responses": len(seen) if distinct else size,  # the candidate members
        "num_members": len(members),
        **{
            c: [row[c][j] for j in members]
            for c in ("ref_logps", "icl_rewards", "gold_rewards", *teacher_columns)
        },
        "has_answer": [float(bool(row["response_answers"][j])) for j in members],
        # How many of the group's samples each member stands for (distinct members: its repeats).
        "member_counts": [float(repeats[tuple(encoded[j])]) if repeats else 1.0 for j in members],
    }


@dataclass
class TrajectoryStats:
    rows: int  # rows in the dataset
    skipped_groups: int  # rows left out: fewer than min_members valid members
    skipped_members: int  # members left out of their group (non-finite or too long)
    min_members: int  # 2, or 1 for tail-bucket losses (a member and the tail bucket)


def tokenize_trajectories(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    templates: PromptTemplates | None = None,
    max_length: int | None = None,
    tail_bucket: bool = False,
) -> tuple[Dataset, TrajectoryStats]:
    """Token ids of every row and the valid members of its group; groups under 2 members are dropped.

    ``tail_bucket``: members are the distinct responses, and one member (plus the tail) is a group.
    """
    teacher_columns = [c for c in TEACHER_COLUMNS if c in dataset.column_names]
    tokenized = dataset.map(
        _tokenize_row,
        fn_kwargs={
            "tokenizer": tokenizer,
            "templates": templates,
            "max_length": max_length,
            "teacher_columns": teacher_columns,
            "distinct": tail_bucket,
        },
        remove_columns=[c for c in dataset.column_names if c not in ("question_id", "round")],
        keep_in_memory=True,  # no cache files in the trajectories' folder, which is an input
        desc="tokenising trajectories",
    )
    sizes = tokenized["num_members"]
    min_members = 1 if tail_bucket else 2
    stats = TrajectoryStats(
        rows=len(sizes),
        skipped_groups=sum(size < min_members for size in sizes),
        skipped_members=sum(tokenized["num_responses"]) - sum(sizes),
        min_members=min_members,
    )
    kept = tokenized.select([i for i, size in enumerate(sizes) if size >= min_members])
    return kept.remove_columns(["num_responses", "num_members"]), stats


@dataclass
class TrajectoryCollator:
    """Batches trajectory rows: every group member becomes one sequence ``prompt + response``.

    Sequences are left-padded, as the inference backend scores them, so every response ends at the
    last column and ``completion_mask`` (right-aligned) marks its tokens. Per-member values come as
    ``(rows, G)`` tensors with ``group_mask`` marking the real members of each row.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        sequences = [row["prompt_ids"] + ids for row in rows for ids in row["completion_ids"]]
        completions = [ids for row in rows for ids in row["completion_ids"]]
        width, span = max(map(len, sequences)), max(map(len, completions))
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), span), dtype=torch.bool)
        for n, (sequence, completion) in enumerate(zip(sequences, completions, strict=True)):
            input_ids[n, width - len(sequence) :] = torch.tensor(sequence)
            attention_mask[n, width - len(sequence) :] = 1
            completion_mask[n, span - len(completion) :] = True
        sizes = torch.tensor([len(row["completion_ids"]) for row in rows])
        group_mask = torch.arange(int(sizes.max())) < sizes.unsqueeze(-1)

        def per_member(column: str) -> torch.Tensor:
            values = torch.tensor([v for row in rows for v in row[column]], dtype=torch.float32)
            return torch.zeros(group_mask.shape).masked_scatter(group_mask, values)

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "group_mask": group_mask,
            "ref_logps": per_member("ref_logps"),
            "icl_rewards": per_member("icl_rewards"),
            "gold_rewards": per_member("gold_rewards"),
            "question_id": [row["question_id"] for row in rows],
            "round": [row["round"] for row in rows],
        }
        # Written by tokenize_trajectories; the teacher's top-k annotation needs no rewards.
        batch.update({c: per_member(c) for c in ("has_answer", "member_counts") if c in rows[0]})
        if "teacher_topk_ids" in rows[0]:
            batch.update(self._teacher_topk(rows, completions, span))
        return batch

    @staticmethod
    def _teacher_topk(rows: list[dict], completions: list[list[int]], span: int) -> dict:
        """The stored teacher columns, right-aligned like ``completion_mask``."""
        top_k = len(rows[0]["teacher_topk_ids"][0][0])
        ids = torch.zeros((len(completions), span, top_k), dtype=torch.long)
        logits = torch.zeros((len(completions), span, top_k))
        has_normalizer = "teacher_logsumexp" in rows[0]
        normalizer = torch.zeros((len(completions), span))
        members = [(row, j) for row in rows for j in range(len(row["completion_ids"]))]
        for n, ((row, j), completion) in enumerate(zip(members, completions, strict=True)):
            ids[n, span - len(completion) :] = torch.tensor(row["teacher_topk_ids"][j])
            logits[n, span - len(completion) :] = torch.tensor(row["teacher_topk_logits"][j])
            if has_normalizer:
                normalizer[n, span - len(completion) :] = torch.tensor(row["teacher_logsumexp"][j])
        columns = {"teacher_topk_ids": ids, "teacher_topk_logits": logits}
        return {**columns, "teacher_logsumexp": normalizer} if has_normalizer else columns


def completion_logits(
    model: torch.nn.Module, batch: dict, rows: slice = slice(None), last_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each response token ``(n, C, V)``, the tokens ``(n, C)`` and their mask.

    ``rows`` selects members of the batch; padding columns that no selected member uses are cut off,
    and only the last C + 1 positions go through the output layer (``logits_to_keep``). With
    ``last_hidden`` the model's last hidden states ``(n, C, H)`` at those positions instead of the logits
    (the output layer runs on one position only).
    """
    attention_mask, completion_mask = batch["attention_mask"][rows], batch["completion_mask"][rows]
    width, span = int(attention_mask.sum(-1).max()), int(completion_mask.sum(-1).max())
    input_ids, attention_mask = batch["input_ids"][rows, -width:], attention_mask[:, -width:]
    # Left padding: positions come from the mask, as in generate() and Backend.score.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=1 if last_hidden else span + 1,
        output_hidden_states=last_hidden,
        use_cache=False,
    )
    states = outputs.hidden_states[-1][:, -span - 1 : -1] if last_hidden else outputs.logits[:, :-1]
    return states, input_ids[:, -span:], completion_mask[:, -span:]


def check_plain_output_layer(model: PreTrainedModel) -> None:
    """The fused token-level loss applies the output layer itself: logits must be nothing more."""
    config = model.config.get_text_config(decoder=True)
    check(
        getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None,
        f"fused_token_loss: {type(model).__name__} transforms its output layer's logits (softcapping or "
        "scaling), which the fused loss does not reproduce; set fused_token_loss: false.",
    )


class _PromptStates(DynamicLayer):
    """One layer's keys and values of a prompt, recorded by the prompt's forward.

    Recording overwrites instead of appending: under gradient checkpointing the layer runs again in
    backward and stores the same states a second time.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class _OnPrompt(DynamicLayer):
    """A recorded prompt read by the responses' forward: every response attends over the prompt's keys and
    values followed by its own, and nothing is stored, so a checkpointed layer's recomputation reads the
    same prompt."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, dtype = key_states.shape[0], key_states.dtype  # the prompt's states may be kept in fp32
        keys = torch.cat([self.keys.to(dtype).expand(batch, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.to(dtype).expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values


PromptStates = list[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def _cache_under_checkpointing(model: torch.nn.Module):
    """Checkpointed decoder layers drop their cache unless they declare that they only read it; the
    shared-prefix caches above only read (or overwrite with the same states), so they may be kept."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's default


def prompt_states(model: torch.nn.Module, prompt_ids: torch.Tensor) -> PromptStates:
    """Every layer's keys and values of ``prompt_ids`` ``(P,)`` but its last token, which each response's
    forward runs itself (its logits predict the response's first token)."""
    prefix = prompt_ids[:-1].unsqueeze(0)
    if prefix.shape[1] == 0:
        return []
    cache = Cache(layer_class_to_replicate=_PromptStates)
    with _cache_under_checkpointing(model):
        model(
            input_ids=prefix,
            position_ids=torch.arange(prefix.shape[1], device=prefix.device).unsqueeze(0),
            past_key_values=cache,
            use_cache=False,
            logits_to_keep=1,
        )
    return [(layer.keys, layer.values) for layer in cache.layers]


def responses_on_prompt_logits(
    model: torch.nn.Module, states: PromptStates, prompt_ids: torch.Tensor, responses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(n, C, V)`` predicting each response token given the prompt whose ``states`` are
    recorded, the tokens ``(n, C)`` and their mask, for the ``responses`` (right-padded together: the
    causal mask keeps the padding out of every real token's view)."""
    span = max(len(response) for response in responses)
    suffix = prompt_ids.new_zeros((len(responses), span + 1))
    mask = torch.zeros((len(responses), span), dtype=torch.bool, device=prompt_ids.device)
    suffix[:, 0] = prompt_ids[-1]
    for n, response in enumerate(responses):
        suffix[n, 1 : len(response) + 1] = response
        mask[n, : len(response)] = True
    start = len(prompt_ids) - 1
    positions = torch.arange(start, start + span + 1, device=suffix.device).expand(len(responses), -1)
    cache = Cache(layers=[_OnPrompt(keys, values) for keys, values in states]) if states else None
    with _cache_under_checkpointing(model):
        logits = model(
            input_ids=suffix, position_ids=positions, past_key_values=cache, use_cache=False
        ).logits
    return logits[:, :-1], suffix[:, 1:], mask


def group_sequences(batch: dict) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each row's prompt ``(P,)`` and its members' responses, read back from a collated batch."""
    input_ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(-1).tolist()
    completion_lengths = batch["completion_mask"].sum(-1).tolist()
    rows, first = [], 0
    for size in batch["group_mask"].sum(-1).tolist():
        members = range(first, first + size)
        prompt = input_ids[first, width - lengths[first] : width - completion_lengths[first]]
        rows.append((prompt, [input_ids[n, width - completion_lengths[n] :] for n in members]))
        first += size
    return rows


def response_losses(
    loss_type: str,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
    group_mask: torch.Tensor,
    tail_bucket: bool = False,
    fisher_at: str = "target",
    tail_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group loss ``(B,)`` of the group logits ``z = policy_logps`` against ``z* = ref + eta R``.

    - fw: ``1/2 sum_j w_j (d_j - dbar)^2`` with ``w = softmax(eta R)`` (importance weights p*/pi_ref);
    - kl: ``KL(softmax(z* - ref) || softmax(z - ref))`` over the group: the group-restricted softmaxes
      with pi_ref divided out, as the group was sampled from it; fw is its second-order expansion;
    - mse: fw with uniform weights, ``1/2 mean_j (d_j - mean d)^2`` (shift-invariant like fw);
    - sft: ``-mean log pi_theta(y_j)`` over the members with positive reward R_j > 0 (0 if none).

    With ``tail_bucket`` (fw, kl, mse; the members must be distinct responses) the actions are the
    members plus one bucket holding every other response, and the distributions are exact rather than
    group-restricted: the student's ``pi_theta`` and the target ``pi_ref exp(eta R)`` over those buckets,
    the tail's reward ``tail_rewards`` ``(B,)`` (default 0). The group's total mass is then matched too;
    fw weighs by the target itself. ``fisher_at="policy"`` (fw): the Fisher at the current policy instead
    (see group_fisher_weighted_loss).
    """
    if loss_type == "sft":
        chosen = group_mask & (rewards > 0)
        return -(policy_logps * chosen).sum(-1) / chosen.sum(-1).clamp(min=1)
    if tail_bucket:
        # The buckets are enumerated, not sampled: the group form with a uniform proposal (ref = 0)
        # and eta R = the exact target log-probabilities.
        if tail_rewards is None:
            tail_rewards = rewards.new_zeros(rewards.shape[:-1])
        bucket_rewards = torch.cat([rewards, tail_rewards.unsqueeze(-1)], dim=-1).double()
        target = with_tail_bucket(ref_logps, group_mask) + eta * bucket_rewards
        policy = with_tail_bucket(policy_logps, group_mask)
        buckets = F.pad(group_mask, (0, 1), value=True)
        proposal = torch.zeros_like(target)
        losses = response_losses(loss_type, policy, proposal, target / eta, eta, buckets, fisher_at=fisher_at)
        return losses.to(policy_logps.dtype)
    if loss_type == "fw":
        return group_fisher_weighted_loss(
            policy_logps, ref_logps, rewards, eta, group_mask, reduction="none", fisher_at=fisher_at
        )
    if loss_type == "mse":
        target = ref_logps + eta * rewards
        uniform = torch.zeros_like(rewards)
        return group_fisher_weighted_loss(policy_logps, target, uniform, eta, group_mask, reduction="none")
    if loss_type == "kl":
        log_w = (eta * rewards).masked_fill(~group_mask, float("-inf")).log_softmax(-1)
        log_q = (policy_logps - ref_logps).masked_fill(~group_mask, float("-inf")).log_softmax(-1)
        return (log_w.exp() * torch.where(group_mask, log_w - log_q, 0.0)).sum(-1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def group_rewards(inputs: dict, config: ICPOConfig) -> torch.Tensor:
    """R_j of every member of a collated batch ``(B, G)``: the in-context reward (counted or signed), plus
    the weighted gold reward, minus the penalty of a response without an answer."""
    icl = inputs["icl_rewards"] if config.reward_scale == "counted" else inputs["icl_rewards"].sign()
    no_answer = 1.0 - inputs["has_answer"]
    return icl + config.gt_coef / config.eta * inputs["gold_rewards"] - config.no_answer_penalty * no_answer


def tail_rewards(rewards: torch.Tensor, inputs: dict, config: ICPOConfig) -> torch.Tensor | None:
    """The tail bucket's reward ``(B,)``: None (0), or with ``tail_reward: answers`` the group's sample
    estimate of ``1/eta log E_{pi_ref}[exp(eta R)]``, each distinct member counted as often as it was
    sampled: the tail holds the other strings of the same answers, in about the same proportions. Members
    left out (non-finite, or past max_length) are in the tail but not in the estimate."""
    if config.tail_reward == "zero":
        return None
    log_counts = inputs["member_counts"].log().masked_fill(~inputs["group_mask"], -math.inf)
    return ((config.eta * rewards + log_counts).logsumexp(-1) - log_counts.logsumexp(-1)) / config.eta


@torch.no_grad()
def group_statistics(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
    group_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch means of the FW terms: E_w[d], Var_w[d] (= 2 L_FW), the weights' effective sample size."""
    weights = group_weights(rewards, eta, group_mask)
    d = torch.where(group_mask, policy_logps - ref_logps - eta * rewards, 0.0)
    mean = (weights * d).sum(-1, keepdim=True)
    return {
        "d_weighted_mean": mean.mean(),
        "d_weighted_var": (weights * (d - mean) ** 2).sum(-1).mean(),
        "ess": (1 / (weights**2).sum(-1)).mean(),
        "group_size": group_mask.sum(-1).float().mean(),
    }


class ICPOTrainer(Trainer):
    """transformers' Trainer with the ICPO losses; see the module docstring.

    ``model``, ``processing_class`` and ``train_dataset`` default to ``args.model_name_or_path``
    (with a LoRA adapter when ``args.use_peft``), its tokenizer and ``args.trajectories``. Bad input
    (missing columns, another tokenizer, LoRA targets the model lacks, no usable group) raises
    :class:`~icpo_infer.config.ConfigError` before training starts.
    """

    loss_is_scaled_for_ga = False  # losses are batch means: the Trainer divides by the accumulation steps

    def __init__(
        self,
        args: ICPOConfig,
        model: PreTrainedModel | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        train_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        with model_loading(args.model_name_or_path, "--model_name_or_path"):
            tokenizer = processing_class or AutoTokenizer.from_pretrained(
                args.model_name_or_path, trust_remote_code=args.trust_remote_code
            )
        trajectories = train_dataset if train_dataset is not None else load_trajectories(args.trajectories)
        validate_trajectories(trajectories, tokenizer)
        check(
            args.loss_level != "token"
            or args.teacher_model is not None
            or "teacher_topk_ids" in trajectories.column_names,
            "loss_level: token needs a teacher: set teacher_model, or add top-k teacher columns to the "
            "trajectories with icpo_train.trainer.add_teacher_topk.",
        )
        if train_dataset is None:
            templates = training_templates(args.trajectories, args.templates)
        else:
            templates = PromptTemplates.from_yaml(args.templates) if args.templates else None
        set_seed(args.seed)  # the LoRA initialisation is part of the run
        model = model if model is not None else load_policy(args)
        if args.shared_prefix:
            check_full_attention(model)
        if args.loss_level == "token" and args.fused_token_loss:
            check_plain_output_layer(model)
        with args.main_process_first(desc="tokenising trajectories"):
            dataset, self.trajectory_stats = tokenize_trajectories(
                trajectories, tokenizer, templates, args.max_length, args.tail_bucket
            )
        stats = self.trajectory_stats
        if stats.skipped_groups or stats.skipped_members:
            logger.warning(
                "trajectories: skipped %d of %d groups with fewer than %d valid members; left out %d members "
                "(non-finite ref_logp or reward, or longer than max_length=%s)",
                stats.skipped_groups,
                stats.rows,
                stats.min_members,
                stats.skipped_members,
                args.max_length,
            )
        check(
            len(dataset) > 0,
            f"--trajectories: none of the {stats.rows} groups has {stats.min_members} valid members (finite "
            f"ref_logps and rewards, prompt + response within max_length={args.max_length}); raise max_length "
            "or rebuild.",
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        super().__init__(
            model=model,
            args=args,
            data_collator=TrajectoryCollator(pad),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        self.teacher = None
        if args.loss_level == "token" and args.teacher_model is not None:
            self.teacher = AutoModelForCausalLM.from_pretrained(
                args.teacher_model,
                dtype=torch.bfloat16 if args.bf16 else torch.float32,
                trust_remote_code=args.trust_remote_code,
            )
            self.teacher.requires_grad_(False).eval().to(self.accelerator.device)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _prepare_input(self, data):
        """Moves tensors to the device, keeping their dtype. Under DeepSpeed the parent casts float
        inputs to the engine's dtype, for models whose inputs are features; in bf16 that rounded
        ``ref_logps`` (sums of many token log-probabilities, a few hundred nats) to whole nats."""
        if isinstance(data, torch.Tensor):
            return data.to(self.args.device)
        return super()._prepare_input(data)

    # -- losses ---------------------------------------------------------------------------------

    def _logps(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z_j from the logits predicting each member's response tokens ``(n, C, V)``: ``(n,)``."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps = selective_log_softmax(logits, targets).masked_fill(~mask, 0.0)
        if self.args.logprob_reduction == "mean":
            return token_logps.sum(-1) / mask.sum(-1)
        return token_logps.sum(-1)

    def _policy_logps(self, model: torch.nn.Module, inputs: dict, rows: slice = slice(None)) -> torch.Tensor:
        """z = log pi_theta(response | prompt_t) of the selected members, flat ``(n,)``."""
        return self._logps(*completion_logits(model, inputs, rows))

    def _shared_prefix_logps(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """z of every member, flat ``(n,)``: each group's prompt runs once, its responses together on it."""
        return torch.cat(
            [
                self._logps(
                    *responses_on_prompt_logits(model, prompt_states(model, prompt), prompt, responses)
                )
                for prompt, responses in group_sequences(inputs)
            ]
        )

    def _group_loss(self, flat_logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The batch's response-level loss from its members' z values (flat, in collator order)."""
        group_mask = inputs["group_mask"]
        policy_logps = torch.zeros(group_mask.shape, dtype=flat_logps.dtype, device=flat_logps.device)
        policy_logps = policy_logps.masked_scatter(group_mask, flat_logps)
        args = self.args
        rewards = group_rewards(inputs, args)
        options = {"tail_bucket": args.tail_bucket, "fisher_at": args.fisher_at}
        losses = response_losses(
            args.loss_type,
            policy_logps,
            inputs["ref_logps"],
            rewards,
            args.eta,
            group_mask,
            tail_rewards=tail_rewards(rewards, inputs, args),
            **options,
        )
        if args.anchor_coef > 0:
            # The first attempt, with no history, against pi_ref itself: R = 0 for every response.
            first = torch.tensor(inputs["round"], device=losses.device) == 1
            zero = torch.zeros_like(rewards)
            anchor = response_losses(
                args.loss_type, policy_logps, inputs["ref_logps"], zero, args.eta, group_mask, **options
            )
            losses = losses + args.anchor_coef * anchor * first
            # Every step records it (0 without round-1 rows), so that processes reduce the same metrics.
            self._metrics["anchor_loss"].append((anchor * first).detach().mean().float())
        self._raise_if_not_finite(losses, inputs)
        if args.tail_bucket:
            tail = with_tail_bucket(policy_logps.detach(), group_mask)[:, -1]
            self._metrics["tail_mass"].append(tail.exp().mean().float())
            mass = [
                logps.detach().masked_fill(~group_mask, -math.inf).logsumexp(-1)
                for logps in (policy_logps, inputs["ref_logps"])
            ]
            self._metrics["log_group_mass_ratio"].append((mass[0] - mass[1]).mean().float())
        for key, value in group_statistics(
            policy_logps, inputs["ref_logps"], rewards, args.eta, group_mask
        ).items():
            self._metrics[key].append(value)
        return losses.mean()

    def _token_loss(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """Mean per-token FW-LM over all response tokens of the batch."""
        fused = self.args.fused_token_loss
        # Fused: the last hidden states, the loss applying the output layer chunk by chunk.
        student, _, mask = completion_logits(model, inputs, last_hidden=fused)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        span = mask.shape[1]
        if self.teacher is not None:
            with torch.no_grad():
                teacher, _, _ = completion_logits(self.teacher, inputs, last_hidden=fused)
            if fused:
                per_token = fused_fisher_weighted_logit_matching(
                    student, head, teacher, self.teacher.get_output_embeddings(), mask, reduction="none"
                )
            else:
                vocab = min(student.shape[-1], teacher.shape[-1])  # embedding rows past the tokenizer differ
                per_token = fisher_weighted_logit_matching(
                    student[..., :vocab], teacher[..., :vocab], mask, reduction="none"
                )
        else:
            normalizer = inputs.get("teacher_logsumexp")
            targets = (inputs["teacher_topk_ids"][:, -span:], inputs["teacher_topk_logits"][:, -span:], mask)
            options = {
                "reduction": "none",
                "target_log_normalizer": None if normalizer is None else normalizer[:, -span:],
            }
            if fused:
                per_token = fused_sparse_fisher_weighted_logit_matching(student, head, *targets, **options)
            else:
                per_token = sparse_fisher_weighted_logit_matching(student, *targets, **options)
        group_mask = inputs["group_mask"]
        member_rows = group_mask.nonzero()[:, 0]
        per_row = torch.zeros(group_mask.shape[0], device=per_token.device, dtype=per_token.dtype)
        self._raise_if_not_finite(per_row.index_add(0, member_rows, per_token.sum(-1)), inputs)
        self._metrics["tokens"].append(mask.sum().float())
        return per_token.sum() / mask.sum()

    def _raise_if_not_finite(self, per_row_losses: torch.Tensor, inputs: dict) -> None:
        bad = (~torch.isfinite(per_row_losses)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise NonFiniteLossError(
                f"non-finite loss ({per_row_losses[row].item()}) at step {self.state.global_step + 1} on "
                f"question_id={inputs['question_id'][row]} round={inputs['round'][row]}: training stopped. "
                "Check that example's ref_logps and rewards, or lower learning_rate / eta."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_level == "token":
            return self._token_loss(model, inputs)
        if self.args.shared_prefix:
            return self._group_loss(self._shared_prefix_logps(model, inputs), inputs)
        return self._group_loss(self._policy_logps(model, inputs), inputs)

    # -- memory-lean step -----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.memory_lean:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.args.shared_prefix:
            return self._memory_lean_shared_prefix_step(model, inputs)
        members = [slice(n, n + 1) for n in range(inputs["input_ids"].shape[0])]
        device = self.accelerator.device
        # Pass 1 runs in a forked RNG, so pass 2 replays the same dropout masks member by member.
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.no_grad(),
            self.compute_loss_context_manager(),
        ):
            flat_logps = torch.cat([self._policy_logps(model, inputs, member) for member in members])
        loss, coefficients = self._loss_and_coefficients(flat_logps, inputs)
        for n, member in enumerate(members):
            # DDP all-reduces the accumulated gradients once, in the last member's backward.
            last = n == len(members) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync, self.compute_loss_context_manager():
                logp = self._policy_logps(model, inputs, member)
                self.accelerator.backward((coefficients[n] * logp).sum())
        return loss.detach()

    def _loss_and_coefficients(
        self, flat_logps: torch.Tensor, inputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss from its members' z values and its coefficients dL/dz_j (w_j (d_j - dbar) for fw)."""
        flat_logps.requires_grad_()
        loss = self._group_loss(flat_logps, inputs) / self.current_gradient_accumulation_steps
        (coefficients,) = torch.autograd.grad(loss, flat_logps)
        return loss, coefficients

    def _memory_lean_shared_prefix_step(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """The memory-lean step with shared prefixes.

        Pass 1: per group, the prompt's forward with its graph (kept until pass 2), then each member's z
        without one. Pass 2: one member at a time, with the RNG state it had in pass 1 (the same dropout
        masks), on detached copies of the prompt's states, which accumulate the members' gradients into the
        prompt. A group's last member runs on the prompt's states themselves and its backward carries the
        accumulated gradients too, so the prompt's backward runs once. DDP all-reduces once, in the last
        group's last backward: every other forward runs under no_sync.
        """
        groups = group_sequences(inputs)
        device = self.accelerator.device
        cuda = device.type == "cuda"

        def rng_state() -> tuple:
            return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None

        def set_rng_state(state: tuple) -> None:
            torch.set_rng_state(state[0])
            if cuda:
                torch.cuda.set_rng_state(state[1], device)

        prompts, member_rng, logps = [], [], []
        for prompt, responses in groups:
            with self.accelerator.no_sync(model), self.compute_loss_context_manager():
                states = prompt_states(model, prompt)
            prompts.append(states)
            detached = [(keys.detach(), values.detach()) for keys, values in states]
            with torch.no_grad(), self.compute_loss_context_manager():
                for response in responses:
                    member_rng.append(rng_state())
                    logps.append(
                        self._logps(*responses_on_prompt_logits(model, detached, prompt, [response]))
                    )
        after_pass_1 = rng_state()
        loss, coefficients = self._loss_and_coefficients(torch.cat(logps), inputs)
        n = 0
        for g, ((prompt, responses), states) in enumerate(zip(groups, prompts, strict=True)):
            prompt_tensors = [tensor for pair in states for tensor in pair]
            # Leaves in at least fp32: a bf16 sum over G members would round away what fp32 gradients keep.
            leaves = [
                t.detach().to(torch.promote_types(t.dtype, torch.float32)).requires_grad_()
                for t in prompt_tensors
            ]
            on_leaves = list(zip(leaves[::2], leaves[1::2], strict=True))
            for j, response in enumerate(responses):
                last = j == len(responses) - 1
                sync = last and g == len(groups) - 1
                set_rng_state(member_rng[n])
                with (
                    contextlib.nullcontext() if sync else self.accelerator.no_sync(model),
                    self.compute_loss_context_manager(),
                ):
                    logits = responses_on_prompt_logits(
                        model, states if last else on_leaves, prompt, [response]
                    )
                    objective = (coefficients[n] * self._logps(*logits)).sum()
                    if last:  # d objective / d state = the accumulated gradient: the prompt's one backward
                        objective = objective + sum(
                            (tensor * leaf.grad.to(tensor.dtype)).sum()
                            for tensor, leaf in zip(prompt_tensors, leaves, strict=True)
                            if leaf.grad is not None
                        )
                    self.accelerator.backward(objective)
                n += 1
        set_rng_state(after_pass_1)
        return loss.detach()

    # -- logging --------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the ICPO metrics since the last log (averaged over processes)."""
        if "loss" in logs and self._metrics:
            keys = sorted(self._metrics)
            means = torch.stack([torch.stack(self._metrics[key]).mean() for key in keys])
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({key: value.item() for key, value in zip(keys, means, strict=True)})
            self._metrics.clear()
            self._warn_if_collapsed(logs)
        super().log(logs, start_time)

    def _warn_if_collapsed(self, logs: dict[str, float]) -> None:
        ratio = logs.get("log_group_mass_ratio", 0.0)
        if self.args.fisher_at == "policy" and ratio < COLLAPSED_LOG_GROUP_MASS_RATIO:
            logger.warning(
                "step %d: the policy has moved its probability off the trajectories' responses "
                "(log_group_mass_ratio %.1f, the mean over rows of log pi(group) / pi_ref(group)). With "
                "tail_bucket and fisher_at: policy the loss weighs each response by the policy's own "
                "probability, so little gradient is left to bring the mass back, and the adapter answers "
                "with responses its trajectories never held. Train with fisher_at: target, or a lower "
                "learning_rate.",
                self.state.global_step,
                ratio,
            )


@torch.no_grad()
def add_teacher_topk(
    dataset: Dataset,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    top_k: int,
    templates: PromptTemplates | None = None,
    batch_size: int = 4,
) -> Dataset:
    """The trajectories with the teacher's sparse token-level targets for every response.

    For each response token given the round's prompt: the teacher's ``top_k`` token ids and logits
    and its full-vocabulary logsumexp, the target of the token-level loss when no teacher model is
    loaded during training.
    """
    check(top_k >= 1, f"top_k={top_k} is invalid; use top_k >= 1.")
    collate = TrajectoryCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = next(teacher.parameters()).device

    def annotate(batch: dict) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        features = [
            {
                "prompt_ids": encode_prompt(tokenizer, trajectory_prompt(row, tokenizer, templates)),
                "completion_ids": [encode_completion(tokenizer, r) for r in row["responses"]],
                **{c: row[c] for c in ("ref_logps", "icl_rewards", "gold_rewards", "question_id", "round")},
            }
            for row in rows
        ]
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(features).items()}
        logits, _, _ = completion_logits(teacher, inputs)
        top = logits.float().topk(top_k, dim=-1)
        normalizer = logits.float().logsumexp(-1)
        columns: dict[str, list] = {c: [] for c in TEACHER_COLUMNS}
        n = 0
        for feature in features:
            for column in columns.values():
                column.append([])
            for ids in feature["completion_ids"]:
                span = slice(logits.shape[1] - len(ids), None)
                columns["teacher_topk_ids"][-1].append(top.indices[n, span].tolist())
                columns["teacher_topk_logits"][-1].append(top.values[n, span].tolist())
                columns["teacher_logsumexp"][-1].append(normalizer[n, span].tolist())
                n += 1
        return columns

    return dataset.map(annotate, batched=True, batch_size=batch_size, desc="teacher top-k")
