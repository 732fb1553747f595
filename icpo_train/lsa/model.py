"""One layer of linear self-attention (LSA) that reads a bandit history and outputs a logit per arm.

Tokens: ``e_s = [x_{a_s}; r_s]`` for the history and a query ``q_a = [x_a; 0]`` per arm. The layer
(no softmax, no MLP, no ``1/n`` factor) maps each query to

    q_a + W_PV sum_s e_s (e_s^T W_KQ q_a)  =  q_a + W_PV G W_KQ q_a,   G = sum_s e_s e_s^T,

and the logit of arm ``a`` is the reward coordinate of that output (the query's own is 0). Because the
attention is linear, the sum over history tokens factors through the Gram matrix ``G``; the model takes
``G`` directly, which gives the same outputs as attending over the tokens at O(1) cost per step.

Full parametrization: ``W_KQ`` and ``W_PV`` are both unconstrained ``(d+1) x (d+1)`` matrices. Only the
last row of ``W_PV`` reaches the read-out and the query's zero reward coordinate hides the last column
of ``W_KQ``; those entries get zero gradient, as in the paper's full model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearSelfAttention(nn.Module):
    def __init__(self, dim: int, init_std: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dim = dim
        size = (dim + 1, dim + 1)
        self.key_query = nn.Parameter(init_std * torch.randn(size, generator=generator))
        self.projection_value = nn.Parameter(init_std * torch.randn(size, generator=generator))

    def forward(self, arms: Tensor, gram: Tensor) -> Tensor:
        """``arms (N, K, d)``, history Gram matrices ``gram (N, ..., d+1, d+1)`` -> logits ``(N, ..., K)``."""
        keyed_queries = arms @ self.key_query[:, : self.dim].T  # W_KQ q_a, (N, K, d+1)
        readout = self.projection_value[-1]  # reward row of W_PV
        weighted_gram = torch.einsum("e,n...ef->n...f", readout, gram)
        return torch.einsum("n...f,nkf->n...k", weighted_gram, keyed_queries)

    def policy(self, arms: Tensor, gram: Tensor) -> Tensor:
        return torch.softmax(self(arms, gram), dim=-1)

    @torch.no_grad()
    def effective_gamma(self) -> Tensor:
        """The ``Gamma`` with which the LSA's logits contain ``x_a^T Gamma sum_s x_s r_s`` (the teacher's term).

        With ``W_KQ = [[A, .], [b^T, .]]`` and the reward row of ``W_PV`` equal to ``[v; c]``, that term is
        ``sum_s (c r_s + v . x_s)(x_s^T A + r_s b^T) x_a``, whose part bilinear in ``(x_s r_s, x_a)`` has
        ``Gamma = (c A + v b^T)^T``. The other parts (``sum r_s^2``, ``sum x_s x_s^T``) must vanish for an
        exact imitation of the linear teacher, whose logits are ``eta x_a^T Gamma* sum_s x_s r_s``.
        """
        d = self.dim
        a, b = self.key_query[:d, :d], self.key_query[d, :d]
        v, c = self.projection_value[-1, :d], self.projection_value[-1, d]
        return (c * a + torch.outer(v, b)).T
