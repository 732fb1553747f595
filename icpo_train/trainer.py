"""The ICPO trainer: fine-tune an LLM (LoRA) so that its answer distribution given a round's history
moves where one Fisher-weighted policy-optimization step from pi_ref would move it.

Response level (default). One example is one trajectory row: the prompt of round t
(:func:`icpo_train.trajectory_data.trajectory_prompt`, the exact inference prompt) and a group of
responses y_j sampled from pi_ref given the bare question. Student logits are
``z_j = log pi_theta(y_j | prompt_t)`` (sum over the response tokens, or their mean); targets are
``z*_j = ref_logps_j + eta * R_j``, the rewards R_j and the loss as :mod:`icpo_train.objective` composes
them (:func:`icpo_train.losses.group_fisher_weighted_loss` by default).

Token level. Every completion token is one FW-LM problem over the vocabulary: the student's
next-token logits given prompt_t against a teacher's, computed by ``teacher_model`` on the same
sequence or stored sparsely (top-k) in the dataset by :func:`icpo_train.scoring.add_teacher_topk`.

Memory-lean mode (response level). The loss depends on theta only through the G scalars z_j, so
``dL/dtheta = sum_j (dL/dz_j) dz_j/dtheta``: the group's z values are computed first without a
graph, the loss and its G coefficients ``dL/dz_j`` (``w_j (d_j - dbar)`` for FW) follow from them,
and each member is then re-run and back-propagated alone with its coefficient. Peak memory is that
of one response, whatever G.

Shared prefix (response level). A group's members share their prompt: it runs once, its keys and
values cached, and every response runs on that cache (:mod:`icpo_train.scoring`). Memory-lean, the
members' gradients into the prompt's keys and values accumulate in detached copies, and the prompt's
backward joins the group's last member's.

Fused token level. The loss takes the student's last hidden states and applies the output layer a chunk
of positions at a time (:func:`icpo_train.losses.fused_fisher_weighted_logit_matching`): the logits of
the whole batch, V = 152k wide for Qwen2.5, never exist, in forward or backward.

The parts: :mod:`icpo_train.icpo_config` (the options), :mod:`icpo_train.collation` (trajectory rows as
token ids and batches), :mod:`icpo_train.scoring` (the policy's logits and log-probabilities of responses, shared prefix, a
teacher's top-k),
:mod:`icpo_train.objective` (rewards, targets and the per-group loss) and :mod:`icpo_train.losses` (the
FW losses themselves).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from icpo_infer.backends import model_loading
from icpo_infer.config import ConfigError, check
from icpo_infer.prompts import PromptTemplates
from icpo_train.collation import TrajectoryCollator, group_sequences, tokenize_trajectories
from icpo_train.icpo_config import ICPOConfig
from icpo_train.losses import (
    fisher_weighted_logit_matching,
    fused_fisher_weighted_logit_matching,
    fused_sparse_fisher_weighted_logit_matching,
    sparse_fisher_weighted_logit_matching,
)
from icpo_train.objective import group_losses
from icpo_train.scoring import (
    check_full_attention,
    check_plain_output_layer,
    completion_logits,
    prompt_states,
    response_logps,
    responses_on_prompt_logits,
)
from icpo_train.trajectory_data import load_trajectories, training_templates, validate_trajectories

logger = logging.getLogger(__name__)

# log(pi(group) / pi_ref(group)) below which a policy-Fisher tail-bucket loss has (almost) no gradient
# left to bring the policy back: it weighs each response by the policy's own probability.
COLLAPSED_LOG_GROUP_MASS_RATIO = -10.0
# Module types LoRA can wrap (PEFT's own list is longer; these are the ones causal LMs use).
LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Embedding, Conv1D)


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
            "trajectories with icpo_train.scoring.add_teacher_topk.",
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

    # -- the loss -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_level == "token":
            return self._token_loss(model, inputs)
        if self.args.shared_prefix:
            return self._group_loss(self._shared_prefix_logps(model, inputs), inputs)
        return self._group_loss(self._policy_logps(model, inputs), inputs)

    def _response_logps(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return response_logps(logits, targets, mask, self.args.logprob_reduction)

    def _policy_logps(self, model: torch.nn.Module, inputs: dict, rows: slice = slice(None)) -> torch.Tensor:
        """z = log pi_theta(response | prompt_t) of the selected members, flat ``(n,)``."""
        return self._response_logps(*completion_logits(model, inputs, rows))

    def _shared_prefix_logps(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """z of every member, flat ``(n,)``: each group's prompt runs once, its responses together on it."""
        return torch.cat(
            [
                self._response_logps(
                    *responses_on_prompt_logits(model, prompt_states(model, prompt), prompt, responses)
                )
                for prompt, responses in group_sequences(inputs)
            ]
        )

    def _group_loss(self, flat_logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The batch's response-level loss from its members' z values (flat, in collator order)."""
        group_mask = inputs["group_mask"]
        policy_logps = torch.zeros(group_mask.shape, dtype=flat_logps.dtype, device=flat_logps.device)
        losses, metrics = group_losses(policy_logps.masked_scatter(group_mask, flat_logps), inputs, self.args)
        self._raise_if_not_finite(losses, inputs)
        for key, value in metrics.items():
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

    # -- memory-lean step -----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.memory_lean:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.args.shared_prefix:
            return self._memory_lean_shared_prefix_step(model, inputs)
        return self._memory_lean_step(model, inputs)

    def _memory_lean_step(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """Pass 1: every member's z without a graph; the loss and its coefficients dL/dz_j follow. Pass 2:
        one member at a time, forward and backward of ``dL/dz_j * z_j``."""
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
                        self._response_logps(*responses_on_prompt_logits(model, detached, prompt, [response]))
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
                    objective = (coefficients[n] * self._response_logps(*logits)).sum()
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
