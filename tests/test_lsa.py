"""The toy theory: teachers, rollouts, the LSA model, the pretraining run and its outputs, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from icpo_infer.config import ConfigError, parse_config
from icpo_train import cli
from icpo_train.lsa.bandit import BanditTasks, Teacher, linucb_policy, rollout, sample_tasks
from icpo_train.lsa.experiment import (
    LOSSES,
    HeldOut,
    LSAConfig,
    assess,
    main,
    pretraining_loss,
)
from icpo_train.lsa.model import LinearSelfAttention

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "lsa"
SMALL_RUN = ["--horizon", "20", "--train_steps", "80", "--batch_size", "32", "--eval_tasks", "200"]


def _history(num_tasks: int, length: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random history tokens ``[x; r]`` (N, length, d+1) in float64 and their Gram matrices."""
    tokens = torch.randn(num_tasks, length, dim + 1, generator=torch.Generator().manual_seed(seed)).double()
    return tokens, tokens.transpose(1, 2) @ tokens


def _float64_tasks(num_tasks: int = 64, num_arms: int = 6, dim: int = 3, horizon: int = 12) -> BanditTasks:
    tasks = sample_tasks(num_tasks, num_arms, dim, horizon, 0.1, torch.Generator().manual_seed(1))
    return BanditTasks(*(t.double() for t in (tasks.arms, tasks.theta, tasks.reward_noise, tasks.uniforms)))


def _held_out(teacher: Teacher, tasks: BanditTasks) -> HeldOut:
    teacher_rollout = rollout(teacher.policy, tasks)
    return HeldOut(tasks, teacher_rollout, teacher.logits(tasks.arms, teacher_rollout.grams))


def _realizing_lsa(teacher: Teacher, dim: int) -> LinearSelfAttention:
    """The LSA that represents the linear teacher: reward row of W_PV = e_r, W_KQ[:d, :d] = eta Gamma*^T."""
    model = LinearSelfAttention(dim).double()
    with torch.no_grad():
        model.key_query.zero_()
        model.projection_value.zero_()
        model.projection_value[-1, -1] = 1.0
        model.key_query[:dim, :dim] = teacher.effective_gamma(dim).T
    return model


def test_linear_teacher_is_eta_x_dot_sum_of_x_r():
    dim, eta = 3, 0.7
    tokens, gram = _history(4, 9, dim)
    arms = torch.randn(4, 5, dim, generator=torch.Generator().manual_seed(2)).double()
    logits = Teacher("linear", eta).logits(arms, gram)
    for n in range(4):
        sum_xr = sum(tokens[n, s, :dim] * tokens[n, s, dim] for s in range(9))
        torch.testing.assert_close(logits[n], eta * arms[n] @ sum_xr)


def test_ridge_teacher_is_regularised_least_squares():
    dim, eta, lam = 3, 2.0, 0.5
    tokens, gram = _history(4, 9, dim)
    arms = torch.randn(4, 5, dim, generator=torch.Generator().manual_seed(2)).double()
    logits = Teacher("ridge", eta, lam).logits(arms, gram)
    for n in range(4):
        # minimise ||X theta - r||^2 + lam ||theta||^2 as an augmented least-squares problem
        design = torch.cat([tokens[n, :, :dim], lam**0.5 * torch.eye(dim, dtype=torch.float64)])
        target = torch.cat([tokens[n, :, dim], torch.zeros(dim, dtype=torch.float64)])
        theta = torch.linalg.lstsq(design, target.unsqueeze(-1)).solution.squeeze(-1)
        torch.testing.assert_close(logits[n], eta * arms[n] @ theta)
    assert Teacher("ridge", eta, lam).effective_gamma(dim) is None


def test_rollout_records_the_history_it_generated_and_the_expected_regret():
    tasks = _float64_tasks()
    teacher = Teacher("linear", 1.0)
    result = rollout(teacher.policy, tasks)
    num_tasks, horizon = result.actions.shape
    rows = torch.arange(num_tasks)
    gram = torch.zeros(num_tasks, 4, 4, dtype=torch.float64)
    gaps = tasks.means.max(-1, keepdim=True).values - tasks.means
    for t in range(horizon):
        torch.testing.assert_close(result.grams[:, t], gram)
        probs = teacher.policy(tasks.arms, gram)
        torch.testing.assert_close(result.regret[:, t], (probs * gaps).sum(-1))
        action = result.actions[:, t]
        assert bool((probs[rows, action] > 0).all())
        reward = tasks.means[rows, action] + tasks.reward_noise[rows, t, action]
        token = torch.cat([tasks.arms[rows, action], reward.unsqueeze(-1)], -1)
        gram = gram + token.unsqueeze(-1) * token.unsqueeze(-2)


def test_sampled_actions_follow_the_policy_distribution():
    tasks = sample_tasks(4000, 3, 2, 1, 0.1, torch.Generator().manual_seed(3))
    probs = torch.tensor([0.2, 0.0, 0.8])
    actions = rollout(lambda arms, gram: probs.expand(len(arms), -1), tasks).actions[:, 0]
    frequencies = torch.bincount(actions, minlength=3) / len(actions)
    assert frequencies[1] == 0
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


def test_linucb_picks_the_best_arm_once_it_knows_the_rewards():
    tasks = _float64_tasks(num_arms=4, dim=3)
    # every arm pulled 100 times without noise: the ridge estimate is essentially theta
    tokens = torch.cat([tasks.arms, tasks.means.unsqueeze(-1)], -1)
    gram = 100 * tokens.transpose(1, 2) @ tokens
    chosen = linucb_policy(alpha=0.0, ridge_lambda=1.0)(tasks.arms, gram)
    torch.testing.assert_close(chosen.argmax(-1), tasks.means.argmax(-1))
    assert bool((chosen.sum(-1) == 1).all())


def test_lsa_over_the_gram_matrix_equals_attention_over_history_tokens():
    dim = 3
    model = LinearSelfAttention(dim, init_std=1.0, generator=torch.Generator().manual_seed(0)).double()
    tokens, gram = _history(2, 7, dim)
    arms = torch.randn(2, 4, dim, generator=torch.Generator().manual_seed(5)).double()
    logits = model(arms, gram)
    with torch.no_grad():
        for n in range(2):
            for a in range(4):
                query = torch.cat([arms[n, a], torch.zeros(1, dtype=torch.float64)])
                attended = sum(
                    (model.projection_value @ e) * (e @ model.key_query @ query) for e in tokens[n]
                )
                torch.testing.assert_close(logits[n, a], (query + attended)[-1])


def test_effective_gamma_is_the_coefficient_of_the_teacher_term():
    dim = 4
    model = LinearSelfAttention(dim, init_std=1.0, generator=torch.Generator().manual_seed(0)).double()
    sum_xr = torch.randn(3, dim, dtype=torch.float64)
    gram = torch.zeros(3, dim + 1, dim + 1, dtype=torch.float64)
    gram[:, :dim, dim] = gram[:, dim, :dim] = sum_xr  # only the sum of x_s r_s is non-zero
    arms = torch.randn(3, 5, dim, dtype=torch.float64)
    expected = torch.einsum("nkd,de,ne->nk", arms, model.effective_gamma(), sum_xr)
    torch.testing.assert_close(model(arms, gram).detach(), expected)


def test_lsa_represents_the_linear_teacher_exactly():
    config = LSAConfig(teacher="linear", eta=0.8, dim=3)
    teacher = config.make_teacher()
    tasks = _float64_tasks(dim=3)
    held_out = _held_out(teacher, tasks)
    model = _realizing_lsa(teacher, config.dim)
    torch.testing.assert_close(
        model(tasks.arms, held_out.teacher_rollout.grams).detach(), held_out.teacher_logits
    )
    result = assess(config, model, held_out)
    assert result.gamma_error == 0.0
    assert float(result.imitation_kl_per_step.abs().max()) < 1e-12
    # same random numbers, same policy: the LSA takes the teacher's actions
    torch.testing.assert_close(result.cumulative_regret, held_out.teacher_rollout.regret.cumsum(1))


@pytest.mark.parametrize("name", LOSSES)
def test_each_pretraining_loss_is_minimal_at_the_target(name):
    target = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(0))
    actions = target.argmax(-1)
    exact = target.clone().requires_grad_()
    off = (target + torch.randn(8, 5, 6)).requires_grad_()
    exact_loss = pretraining_loss(name, exact, target, actions)
    assert pretraining_loss(name, off, target, actions).item() > exact_loss.item()
    if name != "ce":  # sampled-action cross-entropy is minimal at the one-hot action, not at the target
        (grad,) = torch.autograd.grad(exact_loss, exact)
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def _read_metrics(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text())


def test_short_run_learns_and_writes_metrics_plots_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(RECIPES / "linear_bandit.yaml"), "--output_dir", str(out), *SMALL_RUN]) == 0
    assert "imitation KL" in capsys.readouterr().out

    metrics = _read_metrics(out)
    assert len(metrics["imitation_kl_per_step"]) == 20
    curve = metrics["training_curve"]["imitation_kl"]
    assert curve[-1] < curve[0] / 10
    assert metrics["imitation_kl"] == pytest.approx(curve[-1])
    assert set(metrics["regret"]) == {"lsa", "teacher", "linucb", "uniform"}
    assert metrics["regret"]["lsa"] < metrics["regret"]["uniform"]
    assert 0 <= metrics["gamma_error"] < 1
    assert set(metrics["ablation"]) == set(LOSSES)
    assert metrics["config"]["horizon"] == 20 and metrics["config"]["output_dir"] == str(out)
    assert metrics["num_processes"] == 1
    for name in ("regret.png", "imitation_kl.png", "ablation.png"):
        assert imread(out / name).ndim == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"lsa-{n}.safetensors" for n in sorted(LOSSES)
    ]
    assert not list(out.rglob("*.tmp"))


def test_ridge_teacher_has_no_gamma_error(tmp_path):
    out = tmp_path / "ridge"
    main(
        [
            "--config",
            str(RECIPES / "ridge_bandit.yaml"),
            "--output_dir",
            str(out),
            *SMALL_RUN,
            "--ablation",
            "false",
        ]
    )
    metrics = _read_metrics(out)
    assert metrics["gamma_error"] is None
    assert "ablation" not in metrics
    assert not (out / "ablation.png").exists()


def _without_timings(metrics: dict) -> dict:
    metrics = json.loads(json.dumps(metrics))
    del metrics["training_curve"]["train_seconds"], metrics["config"]["output_dir"]
    return metrics


def test_same_seed_gives_the_same_metrics_and_a_rerun_reuses_the_checkpoint(tmp_path):
    args = [*SMALL_RUN, "--train_steps", "30", "--ablation", "false"]
    main([*args, "--output_dir", str(tmp_path / "a")])
    main([*args, "--output_dir", str(tmp_path / "b")])
    first = _read_metrics(tmp_path / "a")
    assert _without_timings(first) == _without_timings(_read_metrics(tmp_path / "b"))

    checkpoint = tmp_path / "a" / "checkpoints" / "lsa-fw.safetensors"
    written = checkpoint.stat().st_mtime_ns
    main([*args, "--output_dir", str(tmp_path / "a")])
    assert checkpoint.stat().st_mtime_ns == written
    assert _read_metrics(tmp_path / "a") == first

    main([*args, "--output_dir", str(tmp_path / "a"), "--seed", "1"])  # other settings: retrain
    assert checkpoint.stat().st_mtime_ns != written
    assert _without_timings(_read_metrics(tmp_path / "a")) != _without_timings(first)


def test_recipes_parse_and_the_linear_recipe_is_the_default():
    linear = parse_config(LSAConfig, ["--config", str(RECIPES / "linear_bandit.yaml")])
    assert linear == LSAConfig()
    ridge = parse_config(LSAConfig, ["--config", str(RECIPES / "ridge_bandit.yaml")])
    assert ridge == replace(LSAConfig(), teacher="ridge", eta=5.0)


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--num_arms", "1", "num_arms"),
        ("--dim", "0", "dim"),
        ("--eta", "0", "eta"),
        ("--eta", "-1", "eta"),
        ("--horizon", "0", "horizon"),
        ("--teacher", "exp3", "teacher"),
        ("--loss", "l1", "loss"),
    ],
)
def test_invalid_values_are_rejected_before_any_work(tmp_path, flag, value, field):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=f"{field}=") as error:
        main(["--output_dir", str(out), flag, value])
    assert "use" in str(error.value)  # the message says what to do
    assert not out.exists()


def test_unknown_recipe_key_names_the_key_and_the_valid_ones(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("horizn: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'horizn'.*'horizon'.*Valid keys: ablation"):
        main(["--config", str(recipe), "--output_dir", str(tmp_path / "never")])


def test_missing_recipe_is_a_clean_cli_error(tmp_path, capsys):
    assert cli.main(["lsa", "--config", str(tmp_path / "missing.yaml")]) == 2
    message = capsys.readouterr().err
    assert "--config" in message and "does not exist" in message
