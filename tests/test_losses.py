"""The facts DESIGN section 2 requires of Fisher-weighted logit matching, checked in float64."""

from __future__ import annotations

import pytest
import torch

from icpo_train.losses import (
    fisher_weighted_logit_matching,
    group_fisher_weighted_loss,
    group_weights,
    sparse_fisher_weighted_logit_matching,
)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 7, dtype=torch.float64, generator=generator)
    z_star = torch.randn(4, 3, 7, dtype=torch.float64, generator=generator)
    return z, z_star


def brute_force(z: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
    p = z_star.softmax(-1)
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    d = z - z_star
    return 0.5 * torch.einsum("...i,...ij,...j->...", d, fisher, d)


def test_equals_half_d_fisher_d(logits):
    z, z_star = logits
    loss = fisher_weighted_logit_matching(z, z_star, reduction="none")
    torch.testing.assert_close(loss, brute_force(z, z_star), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fisher_weighted_logit_matching(z, z_star), brute_force(z, z_star).mean())
    torch.testing.assert_close(
        fisher_weighted_logit_matching(z, z_star, reduction="sum"), brute_force(z, z_star).sum()
    )


def test_is_second_order_expansion_of_kl(logits):
    _, z_star = logits
    direction = torch.randn(z_star.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p_star = z_star.softmax(-1)
    for eps in (1e-2, 1e-3):
        z = z_star + eps * direction
        kl = (p_star * (p_star.log() - z.log_softmax(-1))).sum(-1)
        fw = fisher_weighted_logit_matching(z, z_star, reduction="none")
        # KL = FW + O(eps^3): the relative gap shrinks linearly with eps.
        assert ((kl - fw).abs() / fw).max() < 20 * eps


def test_shift_invariance(logits):
    z, z_star = logits
    base = fisher_weighted_logit_matching(z, z_star, reduction="none")
    shift = torch.randn(z.shape[:-1], dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(fisher_weighted_logit_matching(z + shift, z_star, reduction="none"), base)
    torch.testing.assert_close(fisher_weighted_logit_matching(z, z_star - 3 * shift, reduction="none"), base)


def test_zero_exactly_when_softmaxes_agree(logits):
    z, z_star = logits
    same_policy = z_star + 5.0  # same softmax, different logits
    assert torch.all(fisher_weighted_logit_matching(same_policy, z_star, reduction="none").abs() < 1e-12)
    assert torch.all(fisher_weighted_logit_matching(z, z_star, reduction="none") > 1e-6)


def test_gradient_formula(logits):
    z, z_star = logits
    z = z.clone().requires_grad_(True)
    fisher_weighted_logit_matching(z, z_star, reduction="sum").backward()
    p = z_star.softmax(-1)
    d = z.detach() - z_star
    expected = p * (d - (p * d).sum(-1, keepdim=True))
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-12)


def test_no_gradient_into_target(logits):
    z, z_star = logits
    z_star = z_star.clone().requires_grad_(True)
    loss = fisher_weighted_logit_matching(z.requires_grad_(True), z_star)
    loss.backward()
    assert z_star.grad is None


def test_gradcheck(logits):
    z, z_star = logits
    mask = torch.tensor([[True, False, True]] * 4)
    assert torch.autograd.gradcheck(
        lambda x: fisher_weighted_logit_matching(x, z_star, mask=mask), (z.clone().requires_grad_(True),)
    )


def test_masked_positions_contribute_nothing(logits):
    z, z_star = logits
    mask = torch.zeros(z.shape[:-1], dtype=torch.bool)
    mask[:, 0] = True
    garbage = z.clone()
    garbage[:, 1:] = float("nan")  # padding may hold anything
    garbage.requires_grad_(True)
    loss = fisher_weighted_logit_matching(garbage, z_star, mask=mask)
    torch.testing.assert_close(loss, brute_force(z, z_star)[:, 0].mean())
    loss.backward()
    assert torch.all(garbage.grad[:, 1:] == 0) and torch.isfinite(garbage.grad).all()
    per_position = fisher_weighted_logit_matching(garbage, z_star, mask=mask, reduction="none")
    assert torch.all(per_position[:, 1:] == 0)


def test_zero_probability_action_has_zero_weight(logits):
    z, z_star = logits
    z_star = z_star.clone()
    z_star[..., 0] = float("-inf")
    wild = z.clone()
    wild[..., 0] = 1e6
    torch.testing.assert_close(
        fisher_weighted_logit_matching(wild, z_star, reduction="none"),
        brute_force(z[..., 1:], z_star[..., 1:]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_huge_logits(dtype):
    generator = torch.Generator().manual_seed(2)
    z = (1e4 * torch.randn(8, 50, generator=generator)).to(dtype).requires_grad_(True)
    z_star = (1e4 * torch.randn(8, 50, generator=generator)).to(dtype)
    loss = fisher_weighted_logit_matching(z, z_star)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad.dtype == dtype


def test_sparse_with_normaliser_equals_dense_fw_on_buckets():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(5, 20, dtype=torch.float64, generator=generator)
    teacher = torch.randn(5, 20, dtype=torch.float64, generator=generator)
    top_logits, top_indices = teacher.topk(4, dim=-1)
    log_norm = teacher.logsumexp(-1)
    loss = sparse_fisher_weighted_logit_matching(
        z, top_indices, top_logits, reduction="none", target_log_normalizer=log_norm
    )

    tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, top_indices, False)
    z_buckets = torch.cat(
        [z.gather(-1, top_indices), z.masked_fill(~tail, -torch.inf).logsumexp(-1, True)], -1
    )
    t_buckets = torch.cat(
        [top_logits, teacher.masked_fill(~tail, -torch.inf).logsumexp(-1, True)], -1
    )  # exact bucketed teacher
    torch.testing.assert_close(loss, brute_force(z_buckets, t_buckets))


def test_sparse_with_full_topk_equals_dense():
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    teacher = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    indices = torch.arange(6).expand(3, 6)
    sparse = sparse_fisher_weighted_logit_matching(z, indices, teacher)  # renormalised over all = exact
    torch.testing.assert_close(sparse, fisher_weighted_logit_matching(z, teacher))


def test_sparse_gradcheck():
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 9, dtype=torch.float64, generator=generator)
    top_logits, top_indices = teacher.topk(3, dim=-1)
    log_norm = teacher.logsumexp(-1)
    assert torch.autograd.gradcheck(
        lambda x: sparse_fisher_weighted_logit_matching(
            x, top_indices, top_logits, target_log_normalizer=log_norm
        ),
        (z,),
    )


def test_group_loss_is_weighted_variance_with_softmax_reward_weights():
    generator = torch.Generator().manual_seed(6)
    policy = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    ref = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    rewards = torch.randint(0, 3, (3, 5), generator=generator).to(torch.float64)
    eta = 0.7
    loss = group_fisher_weighted_loss(policy, ref, rewards, eta, reduction="none")
    w = torch.softmax(eta * rewards, -1)
    d = policy.detach() - ref - eta * rewards
    dbar = (w * d).sum(-1, keepdim=True)
    torch.testing.assert_close(loss, 0.5 * (w * (d - dbar) ** 2).sum(-1))
    loss.sum().backward()
    torch.testing.assert_close(policy.grad, w * (d - dbar))  # dL/dd_j = w_j (d_j - dbar)
    torch.testing.assert_close(group_weights(rewards, eta), w)


def test_group_mask_drops_members_and_small_groups():
    policy = torch.tensor(
        [[0.3, -1.0, 2.0, 9.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64, requires_grad=True
    )
    ref = torch.zeros(2, 4, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss = group_fisher_weighted_loss(policy, ref, rewards, 1.0, group_mask=mask, reduction="none")
    expected = group_fisher_weighted_loss(policy[:1, :3], ref[:1, :3], rewards[:1, :3], 1.0, reduction="none")
    torch.testing.assert_close(loss[0], expected[0])
    assert loss[1] == 0  # one valid member: nothing to match
    loss.sum().backward()
    assert policy.grad[0, 3] == 0 and torch.all(policy.grad[1] == 0)
    mean = group_fisher_weighted_loss(policy, ref, rewards, 1.0, group_mask=mask)
    torch.testing.assert_close(mean, expected[0])  # mean over groups that count


def test_bad_shapes_and_eta_are_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        fisher_weighted_logit_matching(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eta must be > 0"):
        group_fisher_weighted_loss(x, x, x, eta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fisher_weighted_logit_matching(x, x, reduction="avg")
