"""Fisher-weighted logit matching (FW-LM).

For a softmax policy with logits ``z`` and a fixed target ``z*`` (``p* = softmax(z*)``), with
``d = z - z*``::

    L_FW = 1/2 d^T F(p*) d,  F(p*) = diag(p*) - p* p*^T,  i.e.  L_FW = 1/2 Var_{a~p*}[d_a]

It is the second-order expansion of KL(p* || softmax(z)) around z = z*, invariant to adding a constant
to z or z*, and its gradient in z is ``p* (d - E_{p*}[d])``. No gradient flows into the target.

All three public losses reduce to one weighted variance, ``1/2 sum_a w_a (d_a - sum_b w_b d_b)^2``,
with weights ``w = softmax(log_weights)``: the target policy itself for logit matching, the
self-normalised importance weights ``softmax(eta * R)`` for response groups sampled from pi_ref.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]


class _WeightedVariance(torch.autograd.Function):
    """Row-wise ``1/2 Var_w[d]`` over the last axis with ``w = softmax(log_weights)`` held fixed.

    Backward reuses ``w * (d - E_w[d])`` from forward: one tensor the size of the logits is saved,
    as cross-entropy saves its log-softmax, and the gradient is a single multiply.
    """

    @staticmethod
    def forward(ctx, d: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(d.dtype, torch.float32)
        weights = torch.softmax(log_weights.to(compute_dtype), dim=-1)
        # A zero-weight action (target logit -inf) has d = +-inf; it must contribute exactly nothing.
        centered = torch.where(weights > 0, d.to(compute_dtype), 0.0)
        centered -= (weights * centered).sum(-1, keepdim=True)
        weighted = weights.mul_(centered)
        loss = 0.5 * (weighted * centered).sum(-1)
        ctx.save_for_backward(weighted)
        ctx.input_dtype = d.dtype
        return loss.to(d.dtype)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (weighted,) = ctx.saved_tensors
        grad_d = weighted * grad_loss.to(weighted.dtype).unsqueeze(-1)
        return grad_d.to(ctx.input_dtype), None


def _reduce(row_losses: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if mask is not None:
        row_losses = torch.where(
            mask, row_losses, torch.zeros((), dtype=row_losses.dtype, device=row_losses.device)
        )
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    count = mask.sum() if mask is not None else torch.tensor(row_losses.numel(), device=row_losses.device)
    return row_losses.sum() / count.clamp(min=1).to(row_losses.dtype)


def _weighted_variance(
    d: torch.Tensor, log_weights: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction
) -> torch.Tensor:
    """Apply the row loss only to unmasked rows, so padding (possibly non-finite) never enters the graph."""
    if mask is None:
        return _reduce(_WeightedVariance.apply(d, log_weights), None, reduction)
    mask = mask.to(torch.bool)
    if mask.shape != d.shape[:-1]:
        raise ValueError(
            f"mask must have the leading shape {tuple(d.shape[:-1])} of the logits, got {tuple(mask.shape)}"
        )
    rows = _WeightedVariance.apply(d[mask], log_weights[mask])
    row_losses = torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)
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
    target_logits = target_logits.detach()
    return _weighted_variance(logits - target_logits, target_logits, mask, reduction)


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
    student_topk = logits.gather(-1, target_indices)
    if target_log_normalizer is None:
        return fisher_weighted_logit_matching(student_topk, target_logits, mask, reduction)

    target_logp = target_logits - target_log_normalizer.detach().unsqueeze(-1)
    topk_mass = target_logp.exp().sum(-1).clamp(max=1.0)
    target_tail = torch.log1p(-topk_mass).clamp(min=torch.finfo(target_logp.dtype).min)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    student_tail = logits.to(compute_dtype).scatter(-1, target_indices, float("-inf")).logsumexp(-1)
    student = torch.cat([student_topk.to(compute_dtype), student_tail.unsqueeze(-1)], dim=-1)
    target = torch.cat([target_logp, target_tail.unsqueeze(-1)], dim=-1).to(compute_dtype)
    return fisher_weighted_logit_matching(student, target, mask, reduction).to(logits.dtype)


def _group_log_weights(rewards: torch.Tensor, eta: float, group_mask: torch.Tensor | None) -> torch.Tensor:
    log_weights = eta * rewards.detach()
    if group_mask is not None:
        log_weights = log_weights.masked_fill(~group_mask.to(torch.bool), float("-inf"))
    return log_weights


def group_weights(rewards: torch.Tensor, eta: float, group_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-normalised importance weights ``softmax_j(eta * R_j)`` of a group sampled from pi_ref."""
    return torch.softmax(_group_log_weights(rewards, eta, group_mask), dim=-1).nan_to_num(0.0)


def group_fisher_weighted_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
    group_mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Response-level FW-LM over groups of responses (group = last axis).

    ``z_j = policy_logps``, ``z*_j = ref_logps + eta * rewards``. With the group sampled from pi_ref,
    expectations under p* become the self-normalised weights ``w = softmax(eta * R)``, so
    ``L = 1/2 sum_j w_j (d_j - sum_i w_i d_i)^2``. Members outside ``group_mask`` get weight 0; a group
    with fewer than 2 valid members has zero loss. ``mean`` averages over groups.
    """
    if not (policy_logps.shape == ref_logps.shape == rewards.shape):
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and rewards "
            f"{tuple(rewards.shape)} must have the same shape (..., G)"
        )
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    target = (ref_logps + eta * rewards).detach()
    log_weights = _group_log_weights(rewards, eta, group_mask)
    if group_mask is None:
        return _weighted_variance(policy_logps - target, log_weights, None, reduction)
    group_mask = group_mask.to(torch.bool)
    d = torch.where(group_mask, policy_logps - target, torch.zeros_like(policy_logps))
    return _weighted_variance(d, log_weights, group_mask.sum(-1) >= 2, reduction)
