"""Linear bandit tasks, the teacher algorithms the LSA imitates, and in-context rollouts.

A history of (arm features x_s, reward r_s) is read as tokens ``e_s = [x_s; r_s]``. Every policy here
(the teachers, LinUCB and the LSA) depends on the history only through its Gram matrix
``G = sum_s e_s e_s^T`` of shape ``(d + 1, d + 1)``: ``G[:d, :d] = sum x x^T``, ``G[:d, d] = sum x r``.
So a policy is a function ``(arms, gram) -> action probabilities`` and a rollout only updates ``G``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

TEACHERS = ("linear", "ridge")

Policy = Callable[[Tensor, Tensor], Tensor]
"""``(arms (N, K, d), gram (N, d+1, d+1)) -> action probabilities (N, K)``."""


@dataclass
class BanditTasks:
    """``N`` linear bandit tasks with all the randomness of a rollout of ``horizon`` steps drawn up front.

    Drawing the reward noise and the action-sampling uniforms in advance makes every policy evaluated on
    these tasks see the same random numbers (common random numbers: policies that agree act alike), and
    lets a data-parallel process take its shard of a batch that all processes drew identically.
    """

    arms: Tensor  # (N, K, d) arm features
    theta: Tensor  # (N, d) reward parameter
    reward_noise: Tensor  # (N, T, K) noise added to the pulled arm's mean at step t
    uniforms: Tensor  # (N, T) inverse-CDF draws that pick the action at step t

    @property
    def means(self) -> Tensor:
        """Expected reward of every arm, ``(N, K)``."""
        return torch.einsum("nkd,nd->nk", self.arms, self.theta)

    def __len__(self) -> int:
        return self.arms.shape[0]

    def __getitem__(self, index: slice | Tensor) -> BanditTasks:
        return BanditTasks(
            self.arms[index], self.theta[index], self.reward_noise[index], self.uniforms[index]
        )

    def to(self, device: torch.device | str) -> BanditTasks:
        return BanditTasks(*(t.to(device) for t in (self.arms, self.theta, self.reward_noise, self.uniforms)))


def sample_tasks(
    num_tasks: int, num_arms: int, dim: int, horizon: int, noise_std: float, generator: torch.Generator
) -> BanditTasks:
    """Tasks with features ``x_a ~ N(0, I/d)``, parameter ``theta ~ N(0, I)`` and reward noise ``N(0, noise_std^2)``."""
    arms = torch.randn(num_tasks, num_arms, dim, generator=generator) / dim**0.5
    theta = torch.randn(num_tasks, dim, generator=generator)
    reward_noise = noise_std * torch.randn(num_tasks, horizon, num_arms, generator=generator)
    uniforms = torch.rand(num_tasks, horizon, generator=generator)
    return BanditTasks(arms, theta, reward_noise, uniforms)


@dataclass(frozen=True)
class Teacher:
    """The in-context policy-optimisation algorithm: ``z*(a) = eta * x_a . theta_hat``, ``pi = softmax(z*)``.

    ``linear``: ``theta_hat = Gamma* sum_s x_s r_s`` with ``Gamma* = I``; no ``1/t`` factor, so one LSA
    layer (which has none either) represents it exactly. ``ridge``: ``theta_hat = (lambda I + sum_s x x^T)^-1
    sum_s x r``, which needs a matrix inverse and is therefore not exactly representable.
    """

    kind: str
    eta: float
    ridge_lambda: float = 1.0

    def logits(self, arms: Tensor, gram: Tensor) -> Tensor:
        """``arms (N, K, d)``, ``gram (N, ..., d+1, d+1)`` -> logits ``(N, ..., K)``."""
        dim = arms.shape[-1]
        sum_xr = gram[..., :dim, dim]
        if self.kind == "linear":
            theta_hat = sum_xr
        elif self.kind == "ridge":
            regularizer = self.ridge_lambda * torch.eye(dim, dtype=gram.dtype, device=gram.device)
            theta_hat = torch.linalg.solve(regularizer + gram[..., :dim, :dim], sum_xr)
        else:
            raise ValueError(f"unknown teacher '{self.kind}'; valid: {', '.join(TEACHERS)}")
        return self.eta * torch.einsum("n...d,nkd->n...k", theta_hat, arms)

    def policy(self, arms: Tensor, gram: Tensor) -> Tensor:
        return torch.softmax(self.logits(arms, gram), dim=-1)

    def effective_gamma(self, dim: int) -> Tensor | None:
        """``eta * Gamma*``, the matrix an LSA must learn to represent the teacher; None if not realizable."""
        return self.eta * torch.eye(dim) if self.kind == "linear" else None


def uniform_policy(arms: Tensor, gram: Tensor) -> Tensor:
    return torch.full(arms.shape[:2], 1.0 / arms.shape[1], dtype=arms.dtype, device=arms.device)


def linucb_policy(alpha: float, ridge_lambda: float) -> Policy:
    """LinUCB: pull ``argmax_a x_a . theta_ridge + alpha * ||x_a||_{A^-1}`` with ``A = lambda I + sum x x^T``."""

    def policy(arms: Tensor, gram: Tensor) -> Tensor:
        dim = arms.shape[-1]
        design = ridge_lambda * torch.eye(dim, dtype=gram.dtype, device=gram.device) + gram[:, :dim, :dim]
        design_inv = torch.linalg.inv(design)
        estimate = torch.einsum("nkd,nde,ne->nk", arms, design_inv, gram[:, :dim, dim])
        width = torch.einsum("nkd,nde,nke->nk", arms, design_inv, arms).clamp(min=0).sqrt()
        best = (estimate + alpha * width).argmax(-1)
        return torch.nn.functional.one_hot(best, arms.shape[1]).to(arms.dtype)

    return policy


@dataclass
class Rollout:
    """What a policy did on a batch of tasks over ``T`` steps."""

    grams: Tensor  # (N, T, d+1, d+1) Gram matrix of the history before step t
    actions: Tensor  # (N, T) arm pulled at step t
    regret: Tensor  # (N, T) expected regret of step t's action distribution, mu* - E_{a~pi_t}[mu_a]


@torch.no_grad()
def rollout(policy: Policy, tasks: BanditTasks) -> Rollout:
    """Let ``policy`` act in context on ``tasks`` for their horizon, sampling from its own distribution.

    The regret of step ``t`` is the expectation over the policy's action distribution given the history
    (an unbiased, lower-variance estimate of the regret of the sampled action).
    """
    arms, means = tasks.arms, tasks.means
    num_tasks, _, dim = arms.shape
    horizon = tasks.uniforms.shape[1]
    gaps = means.max(-1, keepdim=True).values - means
    gram = torch.zeros(num_tasks, dim + 1, dim + 1, dtype=arms.dtype, device=arms.device)
    grams, actions, regret = [], [], []
    for t in range(horizon):
        probs = policy(arms, gram)
        cdf = probs.cumsum(-1)
        # right=True never picks a zero-probability arm; the clamp guards against float round-off.
        draw = cdf[:, -1:] * tasks.uniforms[:, t : t + 1]
        action = torch.searchsorted(cdf, draw, right=True).clamp(max=arms.shape[1] - 1)
        x = arms.gather(1, action.unsqueeze(-1).expand(-1, 1, dim)).squeeze(1)
        reward = (means + tasks.reward_noise[:, t]).gather(1, action)
        token = torch.cat([x, reward], dim=-1)
        grams.append(gram)
        actions.append(action.squeeze(1))
        regret.append((probs * gaps).sum(-1))
        gram = gram + token.unsqueeze(-1) * token.unsqueeze(-2)
    return Rollout(torch.stack(grams, 1), torch.stack(actions, 1), torch.stack(regret, 1))
