"""The policy's logits of trajectory responses and their log-probabilities, as the trainer computes them.

:func:`completion_logits` runs a collated batch, every member one left-padded sequence (or returns the last
hidden states, for the fused token-level loss, whose output layer :func:`check_plain_output_layer`
checks); :func:`response_logps` turns logits into each response's log-probability.

Shared prefix. A group's members share their prompt, by far the longer part once the history grows.
:func:`prompt_states` runs the prompt once and records its keys and values, and
:func:`responses_on_prompt_logits` runs every response on that cache; the prompt's backward runs once
too, with the sum of its members' gradients. Only full attention reads a prompt cache as it reads prompt
+ response in one sequence (:func:`check_full_attention`).

:func:`add_teacher_topk` stores a teacher's sparse token-level targets in the trajectories, for the
token-level loss without a teacher model in memory.
"""

from __future__ import annotations

import contextlib

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.modeling_layers import GradientCheckpointingLayer
from trl.trainer.utils import selective_log_softmax

from icpo_infer.backends.base import encode_completion, encode_prompt
from icpo_infer.config import check
from icpo_infer.prompts import PromptTemplates
from icpo_train.collation import TrajectoryCollator
from icpo_train.trajectory_data import TEACHER_COLUMNS, trajectory_prompt


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


def response_logps(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """``log pi(response)`` of each response ``(n,)`` from the logits predicting its tokens ``(n, C, V)``:
    the sum over its tokens (``mask``), or their mean with ``reduction="mean"``; in at least fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_logps = selective_log_softmax(logits, targets).masked_fill(~mask, 0.0)
    if reduction == "mean":
        return token_logps.sum(-1) / mask.sum(-1)
    return token_logps.sum(-1)
