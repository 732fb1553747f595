"""The ICPO trainer on the tiny model: learning, memory-lean equivalence, prompts, resume, adapters, bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_recipe import losses, recipe_args
from trajectory_fixtures import build_trajectories
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from icpo_infer.backends.base import BackendOptions, encode_completion, encode_prompt
from icpo_infer.backends.hf import HFBackend
from icpo_infer.config import ConfigError, parse_config
from icpo_infer.prompts import Attempt, render_prompt
from icpo_train import cli, train
from icpo_train import icpo_config as icpo_config_module
from icpo_train.e2e.tiny_lm import init_tiny_llama
from icpo_train.icpo_config import ICPOConfig
from icpo_train.objective import group_rewards, response_losses, tail_rewards
from icpo_train.scoring import add_teacher_topk
from icpo_train.trainer import ICPOTrainer, NonFiniteLossError
from icpo_train.trajectory_data import (
    GROUP_COLUMNS,
    load_trajectories,
    tokenizer_fingerprint,
    trajectory_prompt,
)


@pytest.fixture(scope="module")
def trajectories(tiny_model_dir):
    return build_trajectories(tiny_model_dir)


@pytest.fixture(scope="module")
def trajectories_dir(trajectories, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trajectories")
    trajectories.save_to_disk(str(path))
    return path


def make_config(*args, **kwargs) -> ICPOConfig:
    return parse_config(ICPOConfig, recipe_args(*args, **kwargs))


def test_response_losses_on_known_groups():
    torch.manual_seed(0)
    ref, rewards = torch.randn(3, 5, dtype=torch.float64) * 50, torch.randint(-2, 3, (3, 5)).double()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    eta = 0.7
    small = torch.randn(3, 5, dtype=torch.float64) * 1e-2
    policy = ref + eta * rewards + small
    fw = response_losses("fw", policy, ref, rewards, eta, mask)
    # KL between the group softmaxes agrees with FW to second order and is shift invariant, as FW is.
    kl = response_losses("kl", policy, ref, rewards, eta, mask)
    torch.testing.assert_close(kl, fw, rtol=2e-2, atol=0)
    for loss_type in ("fw", "kl", "mse"):
        shifted = response_losses(loss_type, policy + 3.0, ref, rewards, eta, mask)
        torch.testing.assert_close(shifted, response_losses(loss_type, policy, ref, rewards, eta, mask))
    # mse: the same variance with uniform weights over the valid members.
    d = (policy - ref - eta * rewards)[1]
    assert response_losses("mse", policy, ref, rewards, eta, mask)[1] == pytest.approx(
        0.5 * ((d - d.mean()) ** 2).mean().item(), rel=1e-5
    )
    # fw with the Fisher at the policy: the variance under the policy's own weights, held fixed.
    leaf = policy.clone().requires_grad_()
    at_policy = response_losses("fw", leaf, ref, rewards, eta, mask, fisher_at="policy")
    w, d = torch.softmax((policy - ref)[1], -1), (policy - ref - eta * rewards)[1]
    assert at_policy[1].item() == pytest.approx(
        0.5 * ((w * d**2).sum() - (w * d).sum() ** 2).item(), rel=1e-6
    )
    at_policy[1].backward()
    torch.testing.assert_close(leaf.grad[1], w * (d - (w * d).sum()))
    # sft: mean negative log-likelihood of the positively rewarded valid members, 0 without any.
    chosen = mask[1] & (rewards[1] > 0)
    sft = response_losses("sft", policy, ref, rewards, eta, mask)
    assert sft[1].item() == pytest.approx(-policy[1][chosen].mean().item(), rel=1e-6)
    assert response_losses("sft", policy, ref, torch.zeros_like(rewards), eta, mask).eq(0).all()


def test_tail_bucket_losses_match_exact_distributions():
    # Distinct responses with their pi_ref probabilities; row 1 has two members, row 2 one.
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.9], [0.7, 0.9, 0.9]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    ref, rewards, eta = probs.log(), torch.tensor([[1.0, 0, -1], [0, 1, 0], [1, 0, 0]]).double(), 2.0

    def buckets(member_probs):  # the members then the tail, members outside the mask left out
        member_probs = member_probs * mask
        return torch.cat([member_probs, 1 - member_probs.sum(-1, keepdim=True)], -1)

    exact = buckets(probs) * torch.exp(eta * torch.nn.functional.pad(rewards, (0, 1)))
    target = exact / exact.sum(-1, keepdim=True)  # p* = pi_ref exp(eta R) / Z over the buckets, tail R = 0

    def bucket_losses(loss_type, policy_probs):
        return response_losses(loss_type, policy_probs.log(), ref, rewards, eta, mask, tail_bucket=True)

    for loss_type in ("fw", "kl", "mse"):  # zero exactly at the target distribution
        torch.testing.assert_close(
            bucket_losses(loss_type, target[:, :3]), torch.zeros(3, dtype=torch.float64)
        )
    # fw is 1/2 Var_{p*}[log q - log p*] over the buckets, kl its exact counterpart.
    student = torch.tensor([[0.3, 0.3, 0.1], [0.5, 0.4, 0.9], [0.2, 0.9, 0.9]], dtype=torch.float64)
    q = buckets(student)
    d = torch.where(q > 0, q.log() - target.log(), 0.0)
    variance = (target * d**2).sum(-1) - (target * d).sum(-1) ** 2
    torch.testing.assert_close(bucket_losses("fw", student), 0.5 * variance)
    at_policy = response_losses("fw", student.log(), ref, rewards, eta, mask, True, fisher_at="policy")
    torch.testing.assert_close(at_policy, 0.5 * ((q * d**2).sum(-1) - (q * d).sum(-1) ** 2))
    kl = (target * torch.where(target > 0, target.log() - q.log(), 0.0)).sum(-1)
    torch.testing.assert_close(bucket_losses("kl", student), kl)
    near = target[:, :3] * (1 + 1e-3 * torch.tensor([1.0, -1.0, 0.5]))
    torch.testing.assert_close(bucket_losses("kl", near), bucket_losses("fw", near), rtol=2e-2, atol=0)
    # Moving half the group's mass out of the group: invisible to the group-restricted loss, not here.
    half = target[:, :3] / 2
    group_fw = response_losses("fw", half.log(), ref, rewards, eta, mask)
    torch.testing.assert_close(group_fw, torch.zeros(3, dtype=torch.float64))
    assert (bucket_losses("fw", half) > 1e-2).all()


def target_batch() -> dict:
    """Two groups of distinct responses: history rewards, gold rewards, answers and sample counts."""
    return {
        "icl_rewards": torch.tensor([[2.0, -1.0, 0.0, 0.0], [1.0, 0.0, -3.0, 0.0]], dtype=torch.float64),
        "gold_rewards": torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
        "has_answer": torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
        "member_counts": torch.tensor([[3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64),
        "group_mask": torch.tensor([[True, True, True, True], [True, True, True, False]]),
        "ref_logps": torch.tensor([[0.2, 0.1, 0.1, 0.05], [0.3, 0.1, 0.05, 1.0]], dtype=torch.float64).log(),
    }


def test_the_target_options_set_the_rewards_and_the_tail(tiny_model_dir, trajectories_dir, tmp_path):
    batch, eta = target_batch(), 2.0

    def config(*overrides):
        return make_config(tiny_model_dir, trajectories_dir, tmp_path, "--eta", str(eta), *overrides)

    torch.testing.assert_close(group_rewards(batch, config()), batch["icl_rewards"])
    signed = group_rewards(batch, config("--reward_scale", "signed"))
    torch.testing.assert_close(signed, batch["icl_rewards"].sign())
    # gt_coef / eta per gold reward, so that z* gains gt_coef; the penalty where there is no answer.
    full = group_rewards(batch, config("--gt_coef", "1.0", "--no_answer_penalty", "0.5"))
    expected = batch["icl_rewards"] + 0.5 * batch["gold_rewards"] - 0.5 * (1 - batch["has_answer"])
    torch.testing.assert_close(full, expected)
    assert full[0, 2] == -0.5  # no answer: worse than an answer nobody tagged
    tail_config = config("--tail_bucket", "true", "--tail_reward", "answers")
    assert tail_rewards(full, batch, config("--tail_bucket", "true")) is None  # zero: the tail's R is 0
    tail = tail_rewards(full, batch, tail_config)
    # Row 0: 8 samples, 3 with R=2.5, 1 with R=-1, 2 without an answer, 2 with R=0: log E[exp(eta R)] / eta.
    mean_exp = (3 * math.exp(2.5 * eta) + math.exp(-eta) + 2 * math.exp(-0.5 * eta) + 2) / 8
    assert tail[0].item() == pytest.approx(math.log(mean_exp) / eta)
    row1 = full[1, :3]  # the masked member does not count
    assert tail[1].item() == pytest.approx(math.log(torch.exp(eta * row1).mean().item()) / eta)
    # The tail's reward moves the target's mass between the group and the tail, not inside the group.
    buckets = response_losses(
        "fw", batch["ref_logps"], batch["ref_logps"], full, eta, batch["group_mask"], True
    )
    with_tail = response_losses(
        "fw", batch["ref_logps"], batch["ref_logps"], full, eta, batch["group_mask"], True, tail_rewards=tail
    )
    assert (with_tail != buckets).all()
    with pytest.raises(ConfigError, match="tail_reward='answers' applies with tail_bucket: true"):
        config("--tail_reward", "answers")
    with pytest.raises(ConfigError, match=r"no_answer_penalty=-1\.0 is invalid"):
        config("--no_answer_penalty", "-1")
    with pytest.raises(ConfigError, match="reward_scale='binary' is unknown"):
        config("--reward_scale", "binary")


@pytest.mark.parametrize("fisher_at", ["target", "policy"])
@pytest.mark.parametrize("tail_reward", ["zero", "answers"])
@pytest.mark.parametrize("reward_scale", ["counted", "signed"])
def test_every_target_variant_keeps_the_fw_invariants(
    fisher_at, tail_reward, reward_scale, tiny_model_dir, trajectories_dir, tmp_path
):
    batch, eta = target_batch(), 2.0
    overrides = ("--tail_bucket", "true", "--tail_reward", tail_reward, "--reward_scale", reward_scale)
    config = make_config(
        tiny_model_dir, trajectories_dir, tmp_path, "--eta", str(eta), "--fisher_at", fisher_at,
        "--gt_coef", "0.5", "--no_answer_penalty", "1.0", *overrides,
    )  # fmt: skip
    rewards, mask = group_rewards(batch, config), batch["group_mask"]
    tail = tail_rewards(rewards, batch, config)
    tail = torch.zeros(2, dtype=torch.float64) if tail is None else tail
    # The exact target over the members and the tail bucket, in float64.
    member_probs = batch["ref_logps"].exp() * mask
    exact = torch.cat([member_probs, 1 - member_probs.sum(-1, keepdim=True)], -1)
    exact = exact * torch.exp(eta * torch.cat([rewards, tail.unsqueeze(-1)], -1))
    target = exact / exact.sum(-1, keepdim=True)

    def loss(policy_logps):
        return response_losses(
            "fw", policy_logps, batch["ref_logps"], rewards, eta, mask, True, fisher_at, tail_rewards=tail
        )

    at_target = target[:, :-1].log().masked_fill(~mask, 0.0).requires_grad_()
    value = loss(at_target)
    value.sum().backward()
    torch.testing.assert_close(value, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(at_target.grad, torch.zeros_like(at_target))
    # Elsewhere: 1/2 the variance of d = log q - log p* over the buckets, under p* (or q, held fixed).
    student = torch.tensor([[0.3, 0.2, 0.2, 0.1], [0.1, 0.4, 0.1, 0.7]], dtype=torch.float64) * mask
    q = torch.cat([student, 1 - student.sum(-1, keepdim=True)], -1)
    d = torch.where(q > 0, q.log() - target.log(), 0.0)
    weights = target if fisher_at == "target" else q
    leaf = student.log().masked_fill(~mask, 0.0).requires_grad_()
    value = loss(leaf)
    torch.testing.assert_close(value, 0.5 * ((weights * d**2).sum(-1) - (weights * d).sum(-1) ** 2))
    assert (value > 0).all() and torch.isfinite(value).all()
    # A policy far from its groups (every member at -1e4 nats) still has a finite loss and gradient.
    far = torch.full_like(leaf, -1e4).requires_grad_()
    loss(far).sum().backward()
    assert torch.isfinite(far.grad).all()


def test_the_anchor_adds_a_round_1_loss_against_pi_ref(tiny_model_dir, trajectories, tmp_path):
    overrides = ("--tail_bucket", "true", "--max_steps", "1", "--per_device_train_batch_size", "9")
    plain = ICPOTrainer(
        make_config(tiny_model_dir, "unused", tmp_path, *overrides), train_dataset=trajectories
    )
    anchored = ICPOTrainer(
        make_config(tiny_model_dir, "unused", tmp_path, *overrides, "--anchor_coef", "3.0"),
        train_dataset=trajectories,
    )
    inputs = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    rounds = torch.tensor(inputs["round"])
    assert set(rounds.tolist()) > {1}  # round-1 rows and rows with a history
    shift = torch.linspace(-1.0, 1.0, int(inputs["group_mask"].sum()), dtype=torch.float64)
    flat = torch.cat([row[mask] for row, mask in zip(inputs["ref_logps"], inputs["group_mask"], strict=True)])
    flat = flat.double() + shift  # a policy that moved off pi_ref
    zero = torch.zeros_like(inputs["icl_rewards"])
    policy = torch.zeros_like(inputs["ref_logps"], dtype=torch.float64).masked_scatter(
        inputs["group_mask"], flat
    )
    per_row = response_losses("fw", policy, inputs["ref_logps"], zero, 1.0, inputs["group_mask"], True)
    extra = anchored._group_loss(flat, inputs) - plain._group_loss(flat, inputs)
    # The mean over the batch's rows of 3 x the round-1 rows' distance to pi_ref (eta does not enter).
    expected = 3.0 * (per_row * (rounds == 1)).sum() / len(rounds)
    assert extra.item() == pytest.approx(expected.item(), rel=1e-5)
    assert extra.item() > 0 and "anchor_loss" in anchored._metrics


def test_fingerprint_is_stable_and_tells_tokenizers_apart(tiny_model_dir, tiny_chat_model_dir):
    base = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert base == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    # Same vocabulary, different chat template: different prompts, so a different fingerprint.
    assert base != tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_chat_model_dir))


def test_trajectories_load_from_disk_and_parquet(trajectories, trajectories_dir, tmp_path):
    trajectories.to_parquet(str(tmp_path / "trajectories.parquet"))
    for source in (trajectories_dir, tmp_path / "trajectories.parquet", tmp_path):
        assert load_trajectories(source).to_list() == trajectories.to_list()
    with pytest.raises(ConfigError, match="neither a dataset saved with save_to_disk nor Parquet"):
        load_trajectories(tmp_path / "missing")


def test_training_prompt_is_the_inference_prompt(tiny_model_dir, trajectories, trajectories_dir, tmp_path):
    trainer = ICPOTrainer(make_config(tiny_model_dir, trajectories_dir, tmp_path, "--memory_lean", "false"))
    tokenizer = trainer.processing_class
    row = trajectories[2]  # round 3: both history buckets
    history = [Attempt(h["text"], h["answer"], h["reward"]) for h in row["history"]]
    assert {a.reward for a in history} == {0, 1}
    inference_prompt = render_prompt(tokenizer, row["question"], history, row["answer_type"])
    assert trajectory_prompt(row, tokenizer) == inference_prompt
    batch = trainer.data_collator([trainer.train_dataset[2]])
    for n, response in enumerate(row["responses"]):
        sequence = batch["input_ids"][n][batch["attention_mask"][n].bool()].tolist()
        assert sequence == encode_prompt(tokenizer, inference_prompt) + encode_completion(tokenizer, response)
    # Round 1 (empty history) is the prompt pi_ref was scored on: the untrained adapter reproduces the
    # backend's ref_logps, so tokens, padding and positions match inference exactly.
    first_rounds = [i for i, r in enumerate(trainer.train_dataset["round"]) if r == 1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in first_rounds])
    with torch.no_grad():
        policy = trainer._policy_logps(trainer.model, batch)
    torch.testing.assert_close(policy, batch["ref_logps"][batch["group_mask"]], rtol=0, atol=1e-3)


def test_loss_decreases_and_logs_the_fw_terms(tiny_model_dir, trajectories_dir, tmp_path):
    config = make_config(
        tiny_model_dir,
        trajectories_dir,
        tmp_path,
        "--per_device_train_batch_size",
        "9",
        "--memory_lean",
        "false",
    )
    trainer = ICPOTrainer(config)
    trainer.train()
    history = trainer.state.log_history
    history_losses = losses(history)
    assert len(history_losses) == config.max_steps
    assert history_losses[-1] < 0.5 * history_losses[0]
    for entry in history[:-1]:  # FW loss = 1/2 Var_w[d]; ESS between 1 and the group size
        assert entry["d_weighted_var"] == pytest.approx(2 * entry["loss"], rel=1e-4)
        assert 1 <= entry["ess"] <= entry["group_size"] <= 4


def test_memory_lean_gives_the_plain_gradient(tiny_model_dir, trajectories_dir, tmp_path):
    """One SGD step (lr 1, two accumulated batches of mixed group sizes): weights move by -gradient."""
    updated = {}
    for lean in ("false", "true"):
        config = make_config(
            tiny_model_dir,
            trajectories_dir,
            tmp_path / lean,
            *("--memory_lean", lean, "--optim", "sgd", "--learning_rate", "1", "--max_grad_norm", "0"),
            *("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "1"),
            *("--save_strategy", "no"),
        )
        trainer = ICPOTrainer(config)
        initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        trainer.train()
        updated[lean] = {
            k: v.detach() - initial[k] for k, v in trainer.model.named_parameters() if k in initial
        }
    assert any(delta.abs().max() > 1e-3 for delta in updated["false"].values())
    for name, delta in updated["false"].items():
        torch.testing.assert_close(updated["true"][name], delta, rtol=1e-4, atol=1e-6)


class StopAt(TrainerCallback):
    """Interrupts a run after ``step`` optimizer steps, as a crash right after a checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.fixture(scope="module")
def resumed_run(tiny_model_dir, trajectories_dir, tmp_path_factory):
    """An uninterrupted 6-step run, and the same run interrupted at step 3 then resumed by the CLI."""
    overrides = ("--max_steps", "6", "--save_steps", "3", "--per_device_train_batch_size", "2")
    reference = tmp_path_factory.mktemp("uninterrupted")
    trainer = ICPOTrainer(make_config(tiny_model_dir, trajectories_dir, reference, *overrides))
    trainer.train()
    interrupted = tmp_path_factory.mktemp("interrupted")
    config = make_config(tiny_model_dir, trajectories_dir, interrupted, *overrides)
    ICPOTrainer(config, callbacks=[StopAt(3)]).train()
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-3"]
    args = recipe_args(tiny_model_dir, trajectories_dir, interrupted, *overrides)
    assert train.main([*args, "--resume_from_checkpoint", "last"]) == 0
    resumed = json.loads((interrupted / "trainer_state.json").read_text())["log_history"]
    return trainer.state.log_history, resumed, interrupted


def test_resume_reproduces_the_uninterrupted_run(resumed_run):
    reference, resumed, interrupted = resumed_run
    assert len(losses(resumed)) == 6
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-5)
    log = (interrupted / "log.txt").read_text()  # what the CLI printed: the losses of steps 4 to 6
    assert log.count("INFO stdout: {'loss'") == 3 and "finished at step 6" in log


def test_a_rerun_resumes_from_the_newest_checkpoint_and_refuses_other_settings(
    tiny_model_dir, trajectories_dir, tmp_path, capsys
):
    overrides = ("--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2")
    args = recipe_args(tiny_model_dir, trajectories_dir, tmp_path, *overrides)
    assert train.main(args) == 0
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed after the checkpoint of step 2
    capsys.readouterr()
    assert train.main([*args, "--memory_lean", "true"]) == 0  # the same loss, computed otherwise
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in out and "finished at step 4" in out
    assert (tmp_path / "checkpoint-4").is_dir()
    with pytest.raises(ConfigError, match=r"other settings: learning_rate \(0\.01 there, 0\.02 now\)"):
        train.main([*args, "--learning_rate", "0.02"])
    (tmp_path / train.CONFIG_FILE).unlink()
    with pytest.raises(ConfigError, match=r"without icpo_config\.json.*--resume_from_checkpoint last"):
        train.main(args)
    without_output = [a for a in args if a != str(tmp_path)]
    without_output.remove("--output_dir")
    with pytest.raises(ConfigError, match="output_dir is required"):
        parse_config(ICPOConfig, without_output)


def test_tokenising_writes_no_cache_files_into_the_trajectories(tiny_model_dir, trajectories_dir, tmp_path):
    ICPOTrainer(make_config(tiny_model_dir, trajectories_dir, tmp_path))
    assert not list(trajectories_dir.glob("cache-*"))


def test_saved_adapter_loads_in_the_hf_backend_and_changes_outputs(tiny_model_dir, trajectories, resumed_run):
    _, _, run_dir = resumed_run
    checkpoint = run_dir / "checkpoint-6"
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_B" in key for key in weights.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert json.loads((run_dir / train.CONFIG_FILE).read_text())["loss_type"] == "fw"
    backend = HFBackend(BackendOptions(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    row = trajectories[1]
    prompts = [trajectory_prompt(row, backend.tokenizer)] * len(row["responses"])
    base = [s.logprob for s in backend.score(prompts, row["responses"])]
    for adapter in (checkpoint, run_dir):  # a checkpoint and the final adapter
        tuned = [s.logprob for s in backend.score(prompts, row["responses"], adapter=str(adapter))]
        assert all(abs(t - b) > 1e-3 for t, b in zip(tuned, base, strict=True))


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Another tiny model with the same tokenizer (a different initialisation)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("teacher")
    init_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_token_level_learns_from_a_teacher_dense_or_top_k(
    tiny_model_dir, trajectories, teacher_dir, tmp_path
):
    rows = trajectories.select(range(3))  # one question, three rounds: one full batch
    token_level = ("--loss_level", "token", "--memory_lean", "false", "--per_device_train_batch_size", "3")
    token_level += ("--max_steps", "6", "--save_strategy", "no")
    dense_config = make_config(
        tiny_model_dir, "unused", tmp_path / "dense", *token_level, "--teacher_model", str(teacher_dir)
    )
    dense = ICPOTrainer(dense_config, train_dataset=rows)
    dense.train()
    # All of the vocabulary but one token as top-k, that one as the tail bucket: exactly the dense loss.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with_topk = add_teacher_topk(rows, teacher, tokenizer, top_k=teacher.config.vocab_size - 1)
    sparse = ICPOTrainer(
        make_config(tiny_model_dir, "unused", tmp_path / "sparse", *token_level), train_dataset=with_topk
    )
    sparse.train()
    dense_losses, sparse_losses = losses(dense.state.log_history), losses(sparse.state.log_history)
    assert dense_losses == sorted(dense_losses, reverse=True)
    assert sparse_losses == pytest.approx(dense_losses, rel=1e-3)


# -- bad input ---------------------------------------------------------------------------------


def test_missing_column_is_named(tiny_model_dir, trajectories, tmp_path):
    config = make_config(tiny_model_dir, "unused", tmp_path)
    with pytest.raises(ConfigError, match="lacks the column\\(s\\) icl_rewards, tokenizer_fingerprint"):
        ICPOTrainer(
            config, train_dataset=trajectories.remove_columns(["icl_rewards", "tokenizer_fingerprint"])
        )


def test_lora_target_the_model_lacks(tiny_model_dir, trajectories_dir, tmp_path):
    config = make_config(
        tiny_model_dir, trajectories_dir, tmp_path, "--lora_target_modules", "q_proj", "qkv_proj"
    )
    with pytest.raises(ConfigError, match=r"'qkv_proj' is not a linear or embedding module.*down_proj"):
        ICPOTrainer(config)


def test_another_tokenizer_than_the_trajectories(tiny_chat_model_dir, trajectories_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer_fingerprint .* differs"):
        ICPOTrainer(make_config(tiny_chat_model_dir, trajectories_dir, tmp_path))


def test_response_that_scores_other_tokens(tiny_model_dir, trajectories, tmp_path):
    def corrupt(row):
        return {"ref_num_tokens": [n + 1 for n in row["ref_num_tokens"]]}

    with pytest.raises(ConfigError, match=r"encodes to .* tokens but ref_num_tokens says"):
        ICPOTrainer(make_config(tiny_model_dir, "unused", tmp_path), train_dataset=trajectories.map(corrupt))


def test_groups_under_two_valid_members_are_counted_and_skipped(tiny_model_dir, trajectories, tmp_path):
    def invalidate(row, index):
        if index in (0, 4):  # one member left with a finite ref_logp
            return {"ref_logps": [row["ref_logps"][0]] + [-math.inf] * (len(row["ref_logps"]) - 1)}
        if index == 5:  # one member fewer: still a group
            return {"ref_logps": [math.nan, *row["ref_logps"][1:]]}
        return {}

    config = make_config(tiny_model_dir, "unused", tmp_path, "--max_steps", "2", "--save_strategy", "no")
    trainer = ICPOTrainer(config, train_dataset=trajectories.map(invalidate, with_indices=True))
    stats = trainer.trajectory_stats
    assert (stats.rows, stats.skipped_groups) == (9, 2)
    assert stats.skipped_members == (2 + 3 + 1)  # row 0 has 3 members, row 4 has 4
    assert len(trainer.train_dataset) == 7
    trainer.train()
    assert all(math.isfinite(loss) for loss in losses(trainer.state.log_history))
    with pytest.raises(ConfigError, match="none of the 9 groups has 2 valid members"):
        ICPOTrainer(
            make_config(tiny_model_dir, "unused", tmp_path, "--max_length", "20"), train_dataset=trajectories
        )


def test_tail_bucket_trains_on_the_distinct_responses(tiny_model_dir, trajectories, tmp_path):
    def repeat_first(row, index):  # member 1 repeats member 0; in row 8 every member does
        repeated = range(len(row["responses"])) if index == 8 else [1]
        return {c: [row[c][0] if j in repeated else v for j, v in enumerate(row[c])] for c in GROUP_COLUMNS}

    repeated = trajectories.map(repeat_first, with_indices=True)
    overrides = ("--tail_bucket", "true", "--max_steps", "3", "--per_device_train_batch_size", "3")
    trainer = ICPOTrainer(make_config(tiny_model_dir, "unused", tmp_path, *overrides), train_dataset=repeated)
    members = [len(row["completion_ids"]) for row in trainer.train_dataset]
    assert members == [2, 2, 2, 3, 3, 3, 3, 3, 1]  # a lone response and the tail still make a group
    assert (trainer.trajectory_stats.skipped_groups, trainer.trajectory_stats.skipped_members) == (0, 0)
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "tail_mass" in entry]
    assert len(entries) == 3
    # The tiny model's long responses are improbable: the tail holds nearly all the mass.
    assert all(math.isfinite(entry["loss"]) and 0.99 < entry["tail_mass"] <= 1 for entry in entries)
    # The adapter starts at the reference: the group keeps its reference mass.
    assert all(abs(entry["log_group_mass_ratio"]) < 0.1 for entry in entries)


def test_a_policy_that_left_its_groups_is_reported(tiny_model_dir, trajectories, tmp_path, caplog):
    overrides = ("--tail_bucket", "true", "--fisher_at", "policy", "--max_steps", "1")
    trainer = ICPOTrainer(
        make_config(tiny_model_dir, "unused", tmp_path, *overrides), train_dataset=trajectories
    )
    with caplog.at_level(logging.WARNING, logger="icpo_train.trainer"):
        trainer.train()
        assert "log_group_mass_ratio" in trainer.state.log_history[0] and not caplog.records
        # What a policy that moved its mass off the groups logs (a seed of the SmolLM2 study, at step 24).
        trainer._metrics["log_group_mass_ratio"].append(torch.tensor(-22.07))
        trainer.log({"loss": 6e-5})
    assert "log_group_mass_ratio -22.1" in caplog.text and "fisher_at: target" in caplog.text


def test_bf16_trains_on_a_machine_without_accelerators(tiny_model_dir, trajectories_dir, tmp_path):
    overrides = [
        "--bf16",
        "true",
        "--tail_bucket",
        "true",
        "--fisher_at",
        "policy",
        "--shared_prefix",
        "true",
    ]
    config = make_config(tiny_model_dir, trajectories_dir, tmp_path, *overrides, "--max_steps", "2")
    assert config.use_cpu  # transformers takes bf16 without an accelerator only as CPU autocast
    trainer = ICPOTrainer(config)
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    trainer.train()
    assert all(math.isfinite(loss) for loss in losses(trainer.state.log_history))


def test_non_finite_loss_stops_training_naming_the_example(tiny_model_dir, trajectories, tmp_path, capsys):
    def overflow(row, index):  # finite, but its squared deviation overflows float32
        return {"ref_logps": [-3e38, *row["ref_logps"][1:]]} if index == 7 else {}

    overflowing = trajectories.map(overflow, with_indices=True)
    config = make_config(tiny_model_dir, "unused", tmp_path, "--per_device_train_batch_size", "9")
    trainer = ICPOTrainer(config, train_dataset=overflowing)
    row = trajectories[7]
    with pytest.raises(NonFiniteLossError, match=f"at step 1 on question_id={row['question_id']} round=2"):
        trainer.train()
    # The command line prints it as a one-line error naming the fix, not a traceback.
    overflowing.save_to_disk(str(tmp_path / "overflow"))
    args = recipe_args(
        tiny_model_dir, tmp_path / "overflow", tmp_path / "cli", "--per_device_train_batch_size", "9"
    )
    assert cli.main(["train", *args]) == 2
    error = capsys.readouterr().err
    assert "icpo-train train: error: non-finite loss" in error and "lower learning_rate / eta" in error
    assert "Traceback" not in error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("--loss_type", "ppo"), "loss_type='ppo' is unknown"),
        (("--eta", "0"), "eta=0.0 is invalid"),
        (("--loss_level", "token", "--loss_type", "kl", "--memory_lean", "false"), "use loss_type: fw"),
        (("--teacher_model", "somewhere"), "teacher_model is used by loss_level: token only"),
        (("--tail_bucket", "true", "--loss_type", "sft"), "tail_bucket applies to loss_level: response"),
        (("--tail_bucket", "true", "--logprob_reduction", "mean"), "set logprob_reduction: sum"),
        (
            ("--fisher_at", "policy", "--loss_type", "kl"),
            "fisher_at='policy' applies to loss_level: response",
        ),
        (("--fisher_at", "student"), "fisher_at='student' is unknown"),
        (("--report_to", "tensorbored"), "report_to: 'tensorbored' is unknown; use none or one of"),
        (("--report_to", "wandb"), "report_to: wandb is not installed; pip install wandb"),
    ],
)
def test_bad_config_values(tiny_model_dir, trajectories_dir, tmp_path, overrides, message, monkeypatch):
    monkeypatch.setattr(icpo_config_module, "get_available_reporting_integrations", list)  # none installed
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_model_dir, trajectories_dir, tmp_path, *overrides)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/model", "'/no/such/model' is no local directory, nor a Hub repo id"),
        ("{empty}", "'{empty}' holds no config.json, so it is no model directory"),
    ],
)
def test_a_model_that_cannot_load_is_a_one_line_error(trajectories_dir, tmp_path, capsys, model, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = model.format(empty=empty)
    args = recipe_args(model, trajectories_dir, tmp_path / "out")
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("icpo-train train: error: --model_name_or_path: " + message.format(empty=empty))


def test_memory_lean_under_deepspeed_is_refused(tiny_model_dir, trajectories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with zero2.yaml sets
    with pytest.raises(ConfigError, match=r"memory_lean .* DeepSpeed"):
        make_config(tiny_model_dir, trajectories_dir, tmp_path, "--memory_lean", "true")


def test_token_level_without_a_teacher(tiny_model_dir, trajectories_dir, tmp_path):
    config = make_config(
        tiny_model_dir, trajectories_dir, tmp_path, "--loss_level", "token", "--memory_lean", "false"
    )
    with pytest.raises(ConfigError, match="loss_level: token needs a teacher"):
        ICPOTrainer(config)


def test_help_lists_the_icpo_options_and_help_all_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    brief = capsys.readouterr().out
    assert brief.index("--loss_type") < brief.index("--output_dir") < brief.index("--learning_rate")
    assert "--adam_beta1" not in brief and "--help-all lists all of them" in brief
    with pytest.raises(SystemExit):
        cli.main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and full.index("--loss_type") < full.index("--adam_beta1")
    assert len(full.splitlines()) > 3 * len(brief.splitlines())


def test_deepspeeds_cpu_notice_is_dropped_and_its_other_messages_kept():
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logging creates

    def kept(message: str) -> bool:
        record = deepspeed_logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, (), None)
        return bool(deepspeed_logger.filter(record))

    assert not kept(
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    )
    assert kept("Setting ds_accelerator to cuda (auto detect)")
