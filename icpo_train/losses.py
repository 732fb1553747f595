"""Fisher-weighted logit matching (FW-LM).

For a softmax policy with logits ``z`` and a fixed target ``z*`` (``p* = softmax(z*)``), with
``d = z - z*``::

    L_FW = 1/2 d^T F(p*) d,  F(p*) = diag(p*) - p* p*^T,  i.e.  L_FW = 1/2 Var_{a~p*}[d_a]

It is the second-order expansion of KL(p* || softmax(z)) around z = z*, invariant to adding a constant
to z or z*, and its gradient in z is ``p* (d - E_{p*}[d])``. No gradient flows into the target.

All three public losses reduce to one weighted variance, ``1/2 sum_a w_a (d_a - sum_b w_b d_b)^2``,
with weights ``w = softmax(log_weights)``: the target policy itself for logit matching, the
self-normalised importance weights ``softmax(eta * R)`` for response groups sampled from pi_ref.
The fused token-level forms compute the logit-matching losses from a model's last hidden states and
its output layer, a chunk of positions at a time, so that the logits of all positions never exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch.utils.checkpoint import checkpoint

Reduction = Literal["mean", "sum", "none"]
FisherAt = Literal["target", "policy"]  # where FW evaluates its Fisher weights
FISHER_AT: tuple[str, ...] = get_args(FisherAt)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the last axis, with no temporary the size of the inputs."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class _WeightedVariance(torch.autograd.Function):
    """Row-wise ``1/2 Var_w[z - z*]`` over the last axis, ``w = softmax(log_weights)`` held fixed.

    Forward allocates two tensors the size of the logits and keeps one, ``w * (d - E_w[d])``, for
    backward (as cross-entropy keeps its log-softmax); backward is one multiply. Rows outside ``mask``
    get zero loss and zero gradient whatever they hold (padding may be non-finite).
    """

    @staticmethod
    def forward(ctx, logits, target, log_weights, mask):
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(log_weights, dim=-1, dtype=compute_dtype)
        d = logits.to(compute_dtype, copy=True).sub_(target)
        # A zero-weight action (target logit -inf) has d = +inf or nan: it must contribute exactly nothing.
        d.nan_to_num_(nan=0.0, posinf=0.0, neginf=float("-inf"))
        d -= _rowdot(weights, d).unsqueeze(-1)
        weighted = weights.mul_(d)
        loss = 0.5 * _rowdot(weighted, d)
        if mask is not None:
            weighted.masked_fill_(~mask.unsqueeze(-1), 0.0)
            loss = loss.masked_fill(~mask, 0.0)
        ctx.save_for_backward(weighted)
        ctx.logits_dtype = logits.dtype
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (weighted,) = ctx.saved_tensors
        grad_logits = weighted * grad_loss.to(weighted.dtype).unsqueeze(-1)
        return grad_logits.to(ctx.logits_dtype), None, None, None


class _StudentBuckets(torch.autograd.Function):
    """The student's logits at the teacher's top-k and the logsumexp of all its other logits.

    The tail is computed in row chunks and backward builds a single gradient the size of the logits,
    so the sparse loss needs less memory than cross-entropy on the full vocabulary.
    """

    ROW_CHUNK = 256

    @staticmethod
    def forward(ctx, logits, indices):
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_indices = indices.reshape(-1, indices.shape[-1])
        tail = torch.empty(flat_logits.shape[0], dtype=logits.dtype, device=logits.device)
        for start in range(0, len(flat_logits), _StudentBuckets.ROW_CHUNK):
            rows = slice(start, start + _StudentBuckets.ROW_CHUNK)
            tail[rows] = flat_logits[rows].scatter(-1, flat_indices[rows], float("-inf")).logsumexp(-1)
        tail = tail.reshape(logits.shape[:-1])
        ctx.save_for_backward(logits, indices, tail)
        return logits.gather(-1, indices), tail

    @staticmethod
    def backward(ctx, grad_topk, grad_tail):
        logits, indices, tail = ctx.saved_tensors
        grad = torch.exp(logits - tail.unsqueeze(-1))  # softmax over the tail ...
        grad.scatter_(-1, indices, 0.0)  # ... which excludes the top-k
        grad.mul_(grad_tail.unsqueeze(-1))
        grad.scatter_add_(-1, indices, grad_topk)
        return grad, None


def _reduce(row_losses: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    count = mask.sum() if mask is not None else torch.tensor(row_losses.numel(), device=row_losses.device)
    return row_losses.sum() / count.clamp(min=1).to(row_losses.dtype)


def _weighted_variance(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_weights: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: Reduction,
) -> torch.Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"mask must have the leading shape {tuple(logits.shape[:-1])} of the logits, got {tuple(mask.shape)}"
            )
    row_losses = _WeightedVariance.apply(logits, target.detach(), log_weights.detach(), mask)
    return _reduce(row_losses, mask, reduction)


def fisher_weighted_logit_matching(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """FW-LM between ``logits`` and ``target_logits`` over the last (action or vocabulary) axis.

    ``mask`` has the leading shape (True = counts). ``mean`` averages over unmasked positions.
    """
    if logits.shape != target_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_logits {tuple(target_logits.shape)} differ in shape"
        )
    return _weighted_variance(logits, target_logits, target_logits, mask, reduction)


def sparse_fisher_weighted_logit_matching(
    logits: torch.Tensor,
    target_indices: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    target_log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """FW-LM against a teacher stored sparsely as its top-k logits.

    ``logits``: student logits ``(..., V)``; ``target_indices`` and ``target_logits``: ``(..., k)``.

    Convention:
    - With ``target_log_normalizer`` (``(...,)``, the teacher's full-vocabulary logsumexp), the k stored
      actions keep their exact teacher probabilities and the remaining mass ``1 - sum_k p*`` becomes one
      tail bucket. The student's tail bucket is the logsumexp of its logits outside the top-k. The loss
      is FW-LM over these k + 1 buckets, i.e. the exact FW-LM of the bucketed distributions.
    - Without it, the teacher is renormalised over its top-k and the student is compared on those k
      logits only (no tail bucket).
    """
    if target_indices.shape != target_logits.shape:
        raise ValueError("target_indices and target_logits must have the same shape (..., k)")
    target_logits = target_logits.detach()
    if target_log_normalizer is None:
        return fisher_weighted_logit_matching(
            logits.gather(-1, target_indices), target_logits, mask, reduction
        )

    target_logp = target_logits - target_log_normalizer.detach().unsqueeze(-1)
    topk_mass = target_logp.exp().sum(-1).clamp(max=1.0)
    target_tail = torch.log1p(-topk_mass).clamp(min=torch.finfo(target_logp.dtype).min)
    student_topk, student_tail = _StudentBuckets.apply(logits, target_indices)
    student = torch.cat([student_topk, student_tail.unsqueeze(-1)], dim=-1)
    target = torch.cat([target_logp, target_tail.unsqueeze(-1)], dim=-1)
    return fisher_weighted_logit_matching(student, target, mask, reduction)


def _group_log_weights(rewards: torch.Tensor, eta: float, group_mask: torch.Tensor | None) -> torch.Tensor:
    log_weights = eta * rewards.detach()
    if group_mask is not None:
        log_weights = log_weights.masked_fill(~group_mask.to(torch.bool), float("-inf"))
    return log_weights


def group_weights(rewards: torch.Tensor, eta: float, group_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-normalised importance weights ``softmax_j(eta * R_j)`` of a group sampled from pi_ref."""
    return torch.softmax(_group_log_weights(rewards, eta, group_mask), dim=-1).nan_to_num(0.0)


def with_tail_bucket(logps: torch.Tensor, group_mask: torch.Tensor, min_tail: float = 1e-6) -> torch.Tensor:
    """A group's response log-probabilities plus one last column, the log-probability of every other
    response: ``log(1 - sum_j p_j)`` ``(..., G + 1)``, in float64; members outside ``group_mask`` are -inf.

    ``logps`` must be the log-probabilities of distinct responses (each counted once). The tail mass is
    floored at ``min_tail``: below it, float32 sums of token log-probs cannot resolve it.
    """
    logps = logps.double().masked_fill(~group_mask.to(torch.bool), float("-inf"))
    group_mass = logps.logsumexp(-1, keepdim=True).clamp(max=math.log1p(-min_tail))
    return torch.cat([logps, torch.log(-torch.expm1(group_mass))], dim=-1)


def group_fisher_weighted_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
    group_mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    fisher_at: FisherAt = "target",
) -> torch.Tensor:
    """Response-level FW-LM over groups of responses (group = last axis).

    ``z_j = policy_logps``, ``z*_j = ref_logps + eta * rewards``. With the group sampled from pi_ref,
    expectations under p* become the self-normalised weights ``w = softmax(eta * R)``, so
    ``L = 1/2 sum_j w_j (d_j - sum_i w_i d_i)^2``. Members outside ``group_mask`` get weight 0; a group
    with fewer than 2 valid members has zero loss. ``mean`` averages over groups.

    ``fisher_at="policy"`` evaluates the Fisher at the current policy instead of the target (held fixed,
    no gradient through it): weights ``softmax(policy_logps - ref_logps)``, the policy's own
    self-normalised weights. Both are second-order expansions of the KL; this one weighs an error by the
    policy's probability, so it keeps pulling where the policy puts much more mass than the target.
    """
    if not (policy_logps.shape == ref_logps.shape == rewards.shape):
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and rewards "
            f"{tuple(rewards.shape)} must have the same shape (..., G)"
        )
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if fisher_at not in FISHER_AT:
        raise ValueError(f"fisher_at must be one of {FISHER_AT}, got {fisher_at!r}")
    target = (ref_logps + eta * rewards).detach()
    log_weights = _group_log_weights(rewards, eta, group_mask)
    if fisher_at == "policy":
        log_weights = (
            (policy_logps - ref_logps).detach().masked_fill(log_weights == float("-inf"), float("-inf"))
        )
    if group_mask is None:
        return _weighted_variance(policy_logps, target, log_weights, None, reduction)
    group_mask = group_mask.to(torch.bool)
    policy_logps = torch.where(group_mask, policy_logps, target)  # invalid members: d = 0, whatever they hold
    return _weighted_variance(policy_logps, target, log_weights, group_mask.sum(-1) >= 2, reduction)


# Positions per chunk of the fused token-level losses: the peak holds one chunk's logits (and their
# gradient), 256 x 152k fp32 logits being 150 MiB.
FUSED_CHUNK_SIZE = 256


class _FrozenHeadRowLosses(torch.autograd.Function):
    """Per-row losses through a frozen output layer, one chunk of rows at a time, each chunk's gradient in
    the hidden states computed right after its loss: only one chunk's logits ever exist and backward only
    scales the stored gradients (a row's loss depends on its own hidden state alone)."""

    @staticmethod
    def forward(ctx, row_loss, chunk_size, hidden, *row_inputs):
        losses, grads = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            part = [t[start : start + chunk_size] for t in row_inputs]
            with torch.enable_grad():
                rows = hidden[start : start + chunk_size].detach().requires_grad_()
                loss = row_loss(rows, *part)
                (grad,) = torch.autograd.grad(loss.sum(), rows)
            losses.append(loss.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads))
        ctx.num_inputs = len(row_inputs)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_losses.to(grad_hidden.dtype).unsqueeze(-1)
        return None, None, grad_hidden, *([None] * ctx.num_inputs)


def _chunked_row_losses(
    row_loss: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor | None,
    row_inputs: tuple[torch.Tensor, ...],
    chunk_size: int,
    reduction: Reduction,
) -> torch.Tensor:
    """``row_loss(hidden_rows, *row_inputs_rows)`` over the unmasked positions, ``chunk_size`` at a time.

    A frozen ``head`` (a module without trainable parameters, as under LoRA) takes the single-pass route of
    :class:`_FrozenHeadRowLosses`. A trainable one runs each chunk under activation checkpointing: backward
    recomputes a chunk's logits when it reaches it, so the head's gradient accumulates chunk by chunk. Either
    way neither forward nor backward holds more than one chunk's logits. Masked positions are never
    computed: zero loss, zero gradient.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = hidden.shape[:-1]
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the leading shape {tuple(lead)} of hidden, got {tuple(mask.shape)}"
            )
    rows = hidden.reshape(-1, hidden.shape[-1])
    inputs = [t.reshape(rows.shape[0], *t.shape[len(lead) :]) for t in row_inputs]
    kept = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    if kept is not None:
        rows, inputs = rows[kept], [t[kept] for t in inputs]
    frozen = isinstance(head, torch.nn.Module) and not any(p.requires_grad for p in head.parameters())
    starts = range(0, rows.shape[0], chunk_size)
    if rows.shape[0] == 0:
        losses = rows.sum(-1)  # nothing to compute, still part of the graph
    elif not torch.is_grad_enabled() or (frozen and not rows.requires_grad):
        with torch.no_grad():
            losses = torch.cat([row_loss(*(t[s : s + chunk_size] for t in (rows, *inputs))) for s in starts])
    elif frozen:
        losses = _FrozenHeadRowLosses.apply(row_loss, chunk_size, rows, *inputs)
    else:
        chunks = [
            checkpoint(row_loss, *(t[s : s + chunk_size] for t in (rows, *inputs)), use_reentrant=False)
            for s in starts
        ]
        losses = torch.cat(chunks)
    if kept is not None:
        losses = losses.new_zeros(mask.numel()).index_put((kept,), losses)
    return _reduce(losses.reshape(lead), mask, reduction)


def fused_fisher_weighted_logit_matching(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    target_hidden: torch.Tensor,
    target_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    chunk_size: int = FUSED_CHUNK_SIZE,
) -> torch.Tensor:
    """:func:`fisher_weighted_logit_matching` of ``head(hidden)`` against ``target_head(target_hidden)``
    without ever holding either's logits for all positions: ``chunk_size`` positions at a time, forward and
    backward (see :func:`_chunked_row_losses`).

    ``hidden`` ``(..., H)``: the student's last hidden states; ``head``: its output layer (the LM head
    module); ``target_hidden`` ``(..., H')`` and ``target_head``: the teacher's, held fixed. Where the two
    heads' vocabularies differ in size, the shared leading part is compared (embedding rows past the
    tokenizer's).
    """
    if target_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and target_hidden {tuple(target_hidden.shape)} differ in leading shape"
        )

    def row_loss(rows: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
        logits = head(rows)
        with torch.no_grad():
            target = target_head(target_rows)
        vocab = min(logits.shape[-1], target.shape[-1])
        return fisher_weighted_logit_matching(logits[..., :vocab], target[..., :vocab], reduction="none")

    return _chunked_row_losses(row_loss, hidden, head, mask, (target_hidden.detach(),), chunk_size, reduction)


def fused_sparse_fisher_weighted_logit_matching(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    target_indices: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    target_log_normalizer: torch.Tensor | None = None,
    chunk_size: int = FUSED_CHUNK_SIZE,
) -> torch.Tensor:
    """:func:`sparse_fisher_weighted_logit_matching` of ``head(hidden)`` (``hidden`` ``(..., H)``, the
    student's last hidden states; ``head`` its output layer) against the teacher's stored top-k, without
    ever holding the logits of all positions: ``chunk_size`` positions at a time, forward and backward."""
    if target_indices.shape != target_logits.shape or target_indices.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"target_indices {tuple(target_indices.shape)} and target_logits {tuple(target_logits.shape)} must "
            f"both have the shape (..., k) with the leading shape of hidden {tuple(hidden.shape)}"
        )
    normalizer = () if target_log_normalizer is None else (target_log_normalizer.detach(),)

    def row_loss(
        rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, *log_normalizer
    ) -> torch.Tensor:
        return sparse_fisher_weighted_logit_matching(
            head(rows), indices, values, reduction="none", target_log_normalizer=(log_normalizer or [None])[0]
        )

    inputs = (target_indices, target_logits.detach(), *normalizer)
    return _chunked_row_losses(row_loss, hidden, head, mask, inputs, chunk_size, reduction)
