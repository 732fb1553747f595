"""What the response-level loss is made of: each member's reward R_j, the tail bucket's reward, the
per-group loss of the group logits against ``z* = ref + eta R``, and the FW terms logged beside it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from icpo_train.icpo_config import ICPOConfig
from icpo_train.losses import group_fisher_weighted_loss, group_weights, with_tail_bucket


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


def group_losses(
    policy_logps: torch.Tensor, inputs: dict, config: ICPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The response-level loss of every row of a collated batch ``(B,)``, from its members' z values
    ``(B, G)``, and the batch's metrics (detached means).

    The loss is ``response_losses`` against ``z* = ref + eta R``; with ``anchor_coef`` each round-1 row
    adds ``anchor_coef`` times its loss against pi_ref itself (R = 0: the first attempt, with no history,
    stays the base model's).
    """
    group_mask, ref_logps = inputs["group_mask"], inputs["ref_logps"]
    rewards = group_rewards(inputs, config)
    options = {"tail_bucket": config.tail_bucket, "fisher_at": config.fisher_at}
    losses = response_losses(
        config.loss_type,
        policy_logps,
        ref_logps,
        rewards,
        config.eta,
        group_mask,
        tail_rewards=tail_rewards(rewards, inputs, config),
        **options,
    )
    metrics = {}
    if config.anchor_coef > 0:
        first = torch.tensor(inputs["round"], device=losses.device) == 1
        zero = torch.zeros_like(rewards)
        anchor = response_losses(
            config.loss_type, policy_logps, ref_logps, zero, config.eta, group_mask, **options
        )
        losses = losses + config.anchor_coef * anchor * first
        # Every step records it (0 without round-1 rows), so that processes reduce the same metrics.
        metrics["anchor_loss"] = (anchor * first).detach().mean().float()
    if config.tail_bucket:
        tail = with_tail_bucket(policy_logps.detach(), group_mask)[:, -1]
        metrics["tail_mass"] = tail.exp().mean().float()
        mass = [
            logps.detach().masked_fill(~group_mask, -math.inf).logsumexp(-1)
            for logps in (policy_logps, ref_logps)
        ]
        metrics["log_group_mass_ratio"] = (mass[0] - mass[1]).mean().float()
    metrics.update(group_statistics(policy_logps, ref_logps, rewards, config.eta, group_mask))
    return losses, metrics
