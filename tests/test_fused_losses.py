"""The fused token-level FW losses (last hidden states + LM head, in chunks of positions) equal the
unfused losses on the full logits: value, gradients into the hidden states and the head, masking; and
the token-level trainer step with the fused loss equals the step without."""

from __future__ import annotations

import pytest
import torch
from tiny_recipe import recipe_args
from trajectory_fixtures import build_trajectories
from transformers import AutoTokenizer

from icpo_infer.config import parse_config
from icpo_train.e2e.tiny_lm import init_tiny_llama
from icpo_train.icpo_config import ICPOConfig
from icpo_train.losses import (
    fisher_weighted_logit_matching,
    fused_fisher_weighted_logit_matching,
    fused_sparse_fisher_weighted_logit_matching,
    sparse_fisher_weighted_logit_matching,
)
from icpo_train.scoring import add_teacher_topk
from icpo_train.trainer import ICPOTrainer

HIDDEN, VOCAB = 6, 23


def linear(in_features: int, out_features: int, dtype: torch.dtype, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=True, dtype=dtype)


@pytest.fixture
def problem() -> dict:
    """Student and teacher hidden states of 3 sequences x 7 positions, padding masked out; the teacher's
    vocabulary has 2 more (unused) rows than the student's."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, HIDDEN, dtype=torch.float64, generator=generator)
    teacher_hidden = torch.randn(3, 7, 5, dtype=torch.float64, generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.3
    mask[0] = False  # a sequence with nothing to learn
    head, teacher_head = linear(HIDDEN, VOCAB, torch.float64, 1), linear(5, VOCAB + 2, torch.float64, 2)
    with torch.no_grad():
        teacher_logits = 3 * teacher_head(teacher_hidden)
        teacher_head.weight.mul_(3), teacher_head.bias.mul_(3)
    top = teacher_logits[..., :VOCAB].topk(4, dim=-1)
    return {
        "hidden": hidden,
        "teacher_hidden": teacher_hidden,
        "mask": mask,
        "head": head,
        "teacher_head": teacher_head,
        "teacher_logits": teacher_logits[..., :VOCAB],
        "top_indices": top.indices,
        "top_logits": top.values,
        "log_normalizer": teacher_logits[..., :VOCAB].logsumexp(-1),
    }


def gradients(loss_fn, problem, trainable_head: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the gradients of a weighted sum of it (random weights per position, so that per-position
    losses are scaled unevenly) in the hidden states and, when trainable, in the head's parameters."""
    hidden = problem["hidden"].clone().requires_grad_()
    head = problem["head"].requires_grad_(trainable_head)
    head.zero_grad()
    loss = loss_fn(hidden)
    weights = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(9)) + 0.5
    (weights * loss).sum().backward()
    return loss.detach(), [hidden.grad] + (
        [head.weight.grad.clone(), head.bias.grad.clone()] if trainable_head else []
    )


def assert_same(fused, unfused) -> None:
    assert unfused[0].abs().max() > 0
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-12, atol=1e-12)
    for fused_grad, unfused_grad in zip(fused[1], unfused[1], strict=True):
        assert unfused_grad.abs().max() > 0
        torch.testing.assert_close(fused_grad, unfused_grad, rtol=1e-10, atol=1e-12)


# A frozen head (LoRA) takes the single-pass route, a trainable one the checkpointed chunks.
@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_dense_equals_the_unfused_loss(problem, reduction, chunk_size, trainable_head):
    p = problem
    unfused = gradients(
        lambda h: fisher_weighted_logit_matching(p["head"](h), p["teacher_logits"], p["mask"], reduction),
        p,
        trainable_head,
    )
    fused = gradients(
        lambda h: fused_fisher_weighted_logit_matching(
            h, p["head"], p["teacher_hidden"], p["teacher_head"], p["mask"], reduction, chunk_size
        ),
        p,
        trainable_head,
    )
    assert_same(fused, unfused)


@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_sparse_equals_the_unfused_loss(problem, normalised, chunk_size, trainable_head):
    p = problem
    normalizer = p["log_normalizer"] if normalised else None
    unfused = gradients(
        lambda h: sparse_fisher_weighted_logit_matching(
            p["head"](h), p["top_indices"], p["top_logits"], p["mask"], "none", normalizer
        ),
        p,
        trainable_head,
    )
    fused = gradients(
        lambda h: fused_sparse_fisher_weighted_logit_matching(
            h, p["head"], p["top_indices"], p["top_logits"], p["mask"], "none", normalizer, chunk_size
        ),
        p,
        trainable_head,
    )
    assert_same(fused, unfused)
    assert (fused[0][~p["mask"]] == 0).all()


def test_masked_positions_are_never_computed(problem):
    p = problem
    hidden = p["hidden"].clone()
    hidden[~p["mask"]] = float("nan")  # padding may hold anything
    hidden.requires_grad_()
    loss = fused_sparse_fisher_weighted_logit_matching(
        hidden,
        p["head"],
        p["top_indices"],
        p["top_logits"],
        p["mask"],
        target_log_normalizer=p["log_normalizer"],
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert (hidden.grad[~p["mask"]] == 0).all()


def test_gradcheck(problem):
    p = problem
    hidden = p["hidden"][1:, :3].clone().requires_grad_()
    mask = p["mask"][1:, :3]

    def dense(h, head):
        teacher = p["teacher_hidden"][1:, :3]
        return fused_fisher_weighted_logit_matching(h, head, teacher, p["teacher_head"], mask, chunk_size=2)

    def sparse(h, head):
        return fused_sparse_fisher_weighted_logit_matching(
            h,
            head,
            p["top_indices"][1:, :3],
            p["top_logits"][1:, :3],
            mask,
            target_log_normalizer=p["log_normalizer"][1:, :3],
            chunk_size=2,
        )

    weight = p["head"].weight.detach().clone().requires_grad_()
    frozen = p["head"].requires_grad_(False)
    for loss in (dense, sparse):
        # A trainable head (checkpointed chunks), then a frozen module (the single-pass route).
        assert torch.autograd.gradcheck(
            lambda h, w, loss=loss: loss(h, lambda x: torch.nn.functional.linear(x, w)), (hidden, weight)
        )
        assert torch.autograd.gradcheck(lambda h, loss=loss: loss(h, frozen), (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_the_unfused_loss(problem, dtype):
    """The same computation in the same precision: fp32 to rounding, bf16 within bf16's resolution."""
    p = problem
    head, teacher_head = p["head"].to(dtype), p["teacher_head"].to(dtype)
    hidden, teacher_hidden = p["hidden"].to(dtype), p["teacher_hidden"].to(dtype)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        if fused:
            loss = fused_fisher_weighted_logit_matching(
                h, head, teacher_hidden, teacher_head, p["mask"], chunk_size=4
            )
        else:
            target = teacher_head(teacher_hidden).detach()[..., :VOCAB]
            loss = fisher_weighted_logit_matching(head(h), target, p["mask"])
        loss.backward()
        assert loss.dtype == dtype and h.grad.dtype == dtype
        results.append([loss.float(), h.grad.float(), head.weight.grad.float()])
    for fused, unfused in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(
            fused, unfused, rtol=tolerance, atol=tolerance * unfused.abs().max().item()
        )


def test_bad_inputs_are_errors(problem):
    p = problem
    with pytest.raises(ValueError, match="differ in leading shape"):
        fused_fisher_weighted_logit_matching(
            p["hidden"], p["head"], p["teacher_hidden"][:2], p["teacher_head"]
        )
    with pytest.raises(ValueError, match="chunk_size"):
        fused_fisher_weighted_logit_matching(
            p["hidden"], p["head"], p["teacher_hidden"], p["teacher_head"], chunk_size=0
        )
    with pytest.raises(ValueError, match=r"shape \(..., k\)"):
        fused_sparse_fisher_weighted_logit_matching(
            p["hidden"], p["head"], p["top_indices"][:2], p["top_logits"][:2]
        )


@pytest.fixture(scope="module")
def token_level_rows(tiny_model_dir, tmp_path_factory):
    """One question's three rounds, a teacher model (another initialisation) and its top-8 columns."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher_dir = tmp_path_factory.mktemp("teacher")
    teacher = init_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rows = build_trajectories(tiny_model_dir).select(range(3))
    return rows, teacher_dir, add_teacher_topk(rows, teacher, tokenizer, top_k=8)


@pytest.mark.parametrize("use_peft", ["true", "false"])
@pytest.mark.parametrize("teacher", ["live", "top-k"])
def test_trainer_token_level_fused_equals_unfused(
    tiny_model_dir, token_level_rows, tmp_path, teacher, use_peft
):
    """One training step of the token-level trainer: same loss and gradients with and without the fused
    loss; full fine-tuning trains the output layer (tied to the embeddings) through the chunks too."""
    rows, teacher_dir, with_topk = token_level_rows
    options = (
        "--loss_level",
        "token",
        "--memory_lean",
        "false",
        "--use_peft",
        use_peft,
        "--save_strategy",
        "no",
    )
    if teacher == "live":
        options += ("--teacher_model", str(teacher_dir))
    steps = []
    for fused in ("false", "true"):
        config = parse_config(
            ICPOConfig, recipe_args(tiny_model_dir, "unused", tmp_path, *options, "--fused_token_loss", fused)
        )
        trainer = ICPOTrainer(config, train_dataset=rows if teacher == "live" else with_topk)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        loss = trainer.training_step(trainer.model, batch)
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
        steps.append((loss, grads))
    (loss, grads), (fused_loss, fused_grads) = steps
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        assert scale > 0 or "lora_A" in name, name  # LoRA starts at B = 0, where A has no gradient
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=1e-5 * scale)
