"""`icpo-train lsa`: pretrain a linear self-attention model to imitate a bandit algorithm in context.

Pretraining samples fresh tasks every step, rolls out histories with the teacher (the behaviour
policy), and matches the LSA's logits to the teacher's at every step of every history. Evaluation on
held-out tasks measures the per-step imitation KL(teacher || LSA) on teacher histories, the regret of
the LSA acting in context against the teacher, uniform random and LinUCB, and the effective Gamma the
LSA learned. The loop runs through ``accelerate``: each process rolls out its shard of every batch
and DDP averages the gradients, so N processes train the model one process would.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from icpo_infer.config import check, parse_config, to_dict
from icpo_infer.run_log import run_log
from icpo_train.losses import fisher_weighted_logit_matching
from icpo_train.lsa.bandit import (
    TEACHERS,
    BanditTasks,
    Rollout,
    Teacher,
    linucb_policy,
    rollout,
    sample_tasks,
    uniform_policy,
)
from icpo_train.lsa.model import LinearSelfAttention

LOSSES = ("fw", "mse", "kl", "ce")
ROLLOUT_CHUNK_STEPS = 25  # training steps whose tasks are rolled out in one batch (see _training_batches)


@dataclass
class LSAConfig:
    """Settings of ``icpo-train lsa``; the defaults are ``recipes/lsa/linear_bandit.yaml``."""

    output_dir: str = field(
        default="runs/lsa", metadata={"help": "Where plots, metrics.json and checkpoints go."}
    )
    teacher: str = field(
        default="linear", metadata={"help": f"Algorithm to imitate: {' | '.join(TEACHERS)}."}
    )
    num_arms: int = field(default=10, metadata={"help": "Arms K per task."})
    dim: int = field(default=5, metadata={"help": "Feature dimension d."})
    noise_std: float = field(default=0.1, metadata={"help": "Standard deviation of the reward noise."})
    eta: float = field(default=1.0, metadata={"help": "Teacher step size: z*(a) = eta * x_a . theta_hat."})
    ridge_lambda: float = field(
        default=1.0, metadata={"help": "Ridge regulariser of the ridge teacher and LinUCB."}
    )
    horizon: int = field(default=50, metadata={"help": "Steps T of every history and deployment."})
    loss: str = field(default="fw", metadata={"help": f"Pretraining loss: {' | '.join(LOSSES)}."})
    train_steps: int = field(
        default=200, metadata={"help": "Optimizer steps (one fresh batch of tasks each)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Tasks per step, summed over processes."})
    learning_rate: float = field(default=0.02, metadata={"help": "Adam learning rate (cosine decay to 0)."})
    init_std: float = field(default=0.05, metadata={"help": "Standard deviation of the initial LSA weights."})
    eval_tasks: int = field(default=1000, metadata={"help": "Held-out tasks for the evaluation."})
    eval_every: int = field(default=20, metadata={"help": "Steps between held-out imitation-KL checks."})
    linucb_alpha: float = field(default=1.0, metadata={"help": "Exploration bonus of the LinUCB reference."})
    ablation: bool = field(default=True, metadata={"help": "Also pretrain with every loss and compare them."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "torch intra-op threads; the LSA's tensors are tiny, so more threads mostly add overhead."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the initialisation, training and held-out tasks."}
    )

    def __post_init__(self) -> None:
        check(
            self.teacher in TEACHERS,
            f"teacher='{self.teacher}' is unknown; use one of {', '.join(TEACHERS)}.",
        )
        check(self.loss in LOSSES, f"loss='{self.loss}' is unknown; use one of {', '.join(LOSSES)}.")
        check(
            self.num_arms >= 2,
            f"num_arms={self.num_arms}: a bandit needs at least 2 arms; use num_arms >= 2.",
        )
        check(self.dim >= 1, f"dim={self.dim}: use a feature dimension dim >= 1.")
        check(self.eta > 0, f"eta={self.eta}: the teacher's step size must be positive; use eta > 0.")
        check(self.horizon >= 1, f"horizon={self.horizon}: use horizon >= 1 steps.")
        check(self.noise_std >= 0, f"noise_std={self.noise_std}: use noise_std >= 0.")
        check(self.ridge_lambda > 0, f"ridge_lambda={self.ridge_lambda}: use ridge_lambda > 0.")
        check(self.train_steps >= 1, f"train_steps={self.train_steps}: use train_steps >= 1.")
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: use batch_size >= 1.")
        check(self.learning_rate > 0, f"learning_rate={self.learning_rate}: use learning_rate > 0.")
        check(self.init_std > 0, f"init_std={self.init_std}: use init_std > 0.")
        check(
            self.eval_tasks >= 2, f"eval_tasks={self.eval_tasks}: use eval_tasks >= 2 (for a standard error)."
        )
        check(self.eval_every >= 1, f"eval_every={self.eval_every}: use eval_every >= 1.")
        check(self.linucb_alpha >= 0, f"linucb_alpha={self.linucb_alpha}: use linucb_alpha >= 0.")
        check(self.num_threads >= 1, f"num_threads={self.num_threads}: use num_threads >= 1.")

    def make_teacher(self) -> Teacher:
        return Teacher(self.teacher, self.eta, self.ridge_lambda)

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> BanditTasks:
        return sample_tasks(num_tasks, self.num_arms, self.dim, self.horizon, self.noise_std, generator)


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent, reproducible random stream per purpose (initialisation, training, evaluation)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{stream}:{seed}".encode()))


def imitation_kl(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(logits)) per position, in nats."""
    return F.kl_div(
        logits.log_softmax(-1), target_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def pretraining_loss(name: str, logits: Tensor, target_logits: Tensor, actions: Tensor) -> Tensor:
    """``fw``: Fisher-weighted logit matching; ``mse`` on raw logits; exact ``kl``; ``ce`` on the
    teacher's sampled actions (imitation from actions only)."""
    if name == "fw":
        return fisher_weighted_logit_matching(logits, target_logits)
    if name == "mse":
        return F.mse_loss(logits, target_logits)
    if name == "kl":
        return imitation_kl(target_logits, logits).mean()
    if name == "ce":
        return F.cross_entropy(logits.flatten(0, -2), actions.flatten())
    raise ValueError(f"unknown loss '{name}'; valid: {', '.join(LOSSES)}")


@dataclass
class HeldOut:
    """Held-out tasks and the teacher's own rollout on them (the histories imitation is measured on)."""

    tasks: BanditTasks
    teacher_rollout: Rollout
    teacher_logits: Tensor  # (N, T, K)

    @torch.no_grad()
    def imitation_kl_per_step(self, model: LinearSelfAttention) -> Tensor:
        logits = model(self.tasks.arms, self.teacher_rollout.grams)
        # float64: a KL near 1e-8 is below float32's resolution of log-probabilities.
        return imitation_kl(self.teacher_logits.double(), logits.double()).mean(0)


def _held_out(config: LSAConfig, device: torch.device) -> HeldOut:
    tasks = config.sample_tasks(config.eval_tasks, _generator(config.seed, "eval")).to(device)
    teacher = config.make_teacher()
    teacher_rollout = rollout(teacher.policy, tasks)
    return HeldOut(tasks, teacher_rollout, teacher.logits(tasks.arms, teacher_rollout.grams))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written output."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _training_fingerprint(config: LSAConfig) -> str:
    """Everything that determines a trained model and its training curve, except the loss (in the file name)."""
    fields = to_dict(config)
    for name in ("output_dir", "ablation", "loss", "linucb_alpha", "num_threads"):
        fields.pop(name)
    return json.dumps(fields, sort_keys=True)


def _load_checkpoint(path: Path, config: LSAConfig, model: LinearSelfAttention) -> dict | None:
    """Restore a model trained earlier with the same settings; its training curve, or None."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as checkpoint:
        metadata = checkpoint.metadata() or {}
    if metadata.get("fingerprint") != _training_fingerprint(config):
        return None
    model.load_state_dict(load_file(path))
    return json.loads(metadata["training_curve"])


def _training_batches(config: LSAConfig, accelerator: Accelerator) -> Iterator[tuple[Tensor, ...]]:
    """This process's shard of every step's batch: ``arms, grams, teacher logits, teacher actions``.

    Fresh tasks every step, rolled out by the teacher. All processes draw the same global batches and
    keep their own shard, so the gradient DDP averages is the one-process gradient of the whole batch.
    The tasks of ``ROLLOUT_CHUNK_STEPS`` steps are rolled out together: a rollout is sequential in
    time, and one wide rollout costs little more than a narrow one.
    """
    teacher = config.make_teacher()
    data = _generator(config.seed, "train")
    shard_size = config.batch_size // accelerator.num_processes
    own_rows = accelerator.process_index * shard_size + torch.arange(shard_size)
    for first_step in range(0, config.train_steps, ROLLOUT_CHUNK_STEPS):
        num_steps = min(ROLLOUT_CHUNK_STEPS, config.train_steps - first_step)
        tasks = config.sample_tasks(num_steps * config.batch_size, data)
        tasks = tasks[(torch.arange(num_steps)[:, None] * config.batch_size + own_rows).flatten()]
        tasks = tasks.to(accelerator.device)
        behaviour = rollout(teacher.policy, tasks)
        target_logits = teacher.logits(tasks.arms, behaviour.grams)
        for i in range(num_steps):
            rows = slice(i * shard_size, (i + 1) * shard_size)
            yield tasks.arms[rows], behaviour.grams[rows], target_logits[rows], behaviour.actions[rows]


def train_lsa(
    config: LSAConfig, loss_name: str, accelerator: Accelerator, held_out: HeldOut | None
) -> tuple[LinearSelfAttention, dict]:
    """Pretrain an LSA with ``loss_name``; returns the model and its training curve (main process:
    held-out imitation KL every ``eval_every`` steps; ``held_out`` is None on the other processes).

    Reuses ``checkpoints/lsa-<loss>.safetensors`` if it was trained with the same settings.
    """
    model = LinearSelfAttention(config.dim, config.init_std, _generator(config.seed, "init"))
    checkpoint = Path(config.output_dir) / "checkpoints" / f"lsa-{loss_name}.safetensors"
    curve = _load_checkpoint(checkpoint, config, model)
    if curve is not None:
        if accelerator.is_main_process:
            print(
                f"lsa {loss_name}: reusing {checkpoint}, trained earlier with the same settings", flush=True
            )
        return model.to(accelerator.device), curve

    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train_steps)
    # The DDP wrapper (several processes) shares `model`'s parameters: evaluate and save `model` itself.
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    curve: dict[str, list] = {"step": [], "train_seconds": [], "imitation_kl": []}
    monitor_seconds = 0.0
    start = time.perf_counter()
    batches = _training_batches(config, accelerator)
    progress = tqdm(
        range(1, config.train_steps + 1), desc=f"lsa {loss_name}", disable=not accelerator.is_main_process
    )
    for step in progress:
        arms, grams, target_logits, actions = next(batches)
        loss = pretraining_loss(loss_name, ddp_model(arms, grams), target_logits, actions)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        if held_out is not None and (step % config.eval_every == 0 or step == config.train_steps):
            monitor_start = time.perf_counter()
            kl = held_out.imitation_kl_per_step(model).mean().item()
            curve["step"].append(step)
            curve["train_seconds"].append(round(monitor_start - start - monitor_seconds, 4))
            curve["imitation_kl"].append(kl)
            progress.set_postfix(loss=f"{loss.item():.2e}", held_out_kl=f"{kl:.2e}")
            monitor_seconds += time.perf_counter() - monitor_start

    if accelerator.is_main_process:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"fingerprint": _training_fingerprint(config), "training_curve": json.dumps(curve)}
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        _write_atomically(checkpoint, lambda tmp: save_file(state, tmp, metadata=metadata))
    return model, curve


@dataclass
class Assessment:
    """How well one trained LSA imitates the teacher and how it does when it acts."""

    imitation_kl_per_step: Tensor  # (T,) mean over held-out tasks of KL(teacher || LSA) on teacher histories
    cumulative_regret: Tensor  # (N, T) of the LSA acting in context
    gamma_error: float | None  # relative Frobenius error of the effective Gamma; None if not realizable


def assess(config: LSAConfig, model: LinearSelfAttention, held_out: HeldOut) -> Assessment:
    target_gamma = config.make_teacher().effective_gamma(config.dim)
    gamma_error = None
    if target_gamma is not None:
        error = torch.linalg.norm(model.effective_gamma().cpu() - target_gamma) / torch.linalg.norm(
            target_gamma
        )
        gamma_error = error.item()
    return Assessment(
        held_out.imitation_kl_per_step(model),
        rollout(model.policy, held_out.tasks).regret.cumsum(1),
        gamma_error,
    )


def reference_regret(config: LSAConfig, held_out: HeldOut) -> dict[str, Tensor]:
    """Cumulative regret ``(N, T)`` of the teacher, LinUCB and uniform random on the held-out tasks."""
    linucb = linucb_policy(config.linucb_alpha, config.ridge_lambda)
    return {
        "teacher": held_out.teacher_rollout.regret.cumsum(1),
        "linucb": rollout(linucb, held_out.tasks).regret.cumsum(1),
        "uniform": rollout(uniform_policy, held_out.tasks).regret.cumsum(1),
    }


def _save_figure(fig: Figure, path: Path) -> None:
    # A bare Figure (no pyplot) renders with Agg and holds no global state.
    _write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_regret(curves: dict[str, Tensor], teacher: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        mean = curve.mean(0).cpu()
        stderr = (curve.std(0) / len(curve) ** 0.5).cpu()
        steps = torch.arange(1, len(mean) + 1)
        label = f"{name} ({teacher})" if name == "teacher" else name
        # dashed, so an LSA that imitates well stays visible on top of its teacher
        ax.plot(steps, mean, "--" if name == "lsa" else "-", label=label)
        ax.fill_between(steps, mean - stderr, mean + stderr, alpha=0.25)
    ax.set(xlabel="step t", ylabel="mean cumulative regret", title="In-context deployment on held-out tasks")
    ax.legend()
    _save_figure(fig, path)


def plot_imitation_kl(kl_per_step: Sequence[float], teacher: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # Step 0 (empty history) is exactly 0 for every model: both policies are uniform.
    ax.semilogy(range(1, len(kl_per_step)), kl_per_step[1:], marker=".")
    ax.set(
        xlabel="history length t",
        ylabel="KL(teacher || LSA) [nats]",
        title=f"Imitation of the {teacher} teacher on held-out tasks",
    )
    ax.grid(True, which="both", alpha=0.3)
    _save_figure(fig, path)


def plot_ablation(
    ablation: dict[str, dict], curves: dict[str, dict], teacher_regret: float, path: Path
) -> None:
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for (name, curve), style in zip(curves.items(), ("-", "--", "-.", ":"), strict=False):
        left.semilogy(curve["step"], curve["imitation_kl"], style, marker=".", label=name)
    left.set(xlabel="training step", ylabel="held-out imitation KL [nats]", title="Pretraining loss ablation")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    names = list(ablation)
    right.bar(names, [ablation[name]["regret"] for name in names])
    right.axhline(teacher_regret, color="black", linestyle="--", label="teacher")
    right.set(ylabel="LSA cumulative regret at T", title="Deployment regret by pretraining loss")
    right.legend()
    _save_figure(fig, path)


@contextmanager
def _intra_op_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_lsa(config: LSAConfig) -> dict:
    """Pretrain, evaluate, plot and write ``metrics.json`` in ``config.output_dir``; returns the metrics
    (on every process; only the main process evaluates and writes)."""
    # Without an accelerator, processes started by `accelerate launch` / torchrun run DDP over gloo.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    check(
        config.batch_size % accelerator.num_processes == 0,
        f"batch_size={config.batch_size} must be divisible by the {accelerator.num_processes} processes.",
    )
    with ExitStack() as log, _intra_op_threads(config.num_threads):
        if accelerator.is_main_process:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            log.enter_context(run_log(config.output_dir))
        metrics = _pretrain_and_evaluate(config, accelerator)
    # Free the DDP replicas and the gloo process group while the interpreter is alive: left to its
    # shutdown, a gloo thread can abort a rank after a successful run.
    accelerator.free_memory()
    accelerator.end_training()
    return metrics


def _pretrain_and_evaluate(config: LSAConfig, accelerator: Accelerator) -> dict:
    output_dir = Path(config.output_dir)
    held_out = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        held_out = _held_out(config, accelerator.device)

    metrics: dict[str, Any] = {}
    ablation_curves: dict[str, dict] = {}
    others = [name for name in LOSSES if name != config.loss] if config.ablation else []
    for loss_name in [config.loss, *others]:
        model, curve = train_lsa(config, loss_name, accelerator, held_out)
        if not accelerator.is_main_process:
            continue
        result = assess(config, model, held_out)
        if loss_name == config.loss:
            regret_curves = {"lsa": result.cumulative_regret, **reference_regret(config, held_out)}
            metrics = {
                "imitation_kl": result.imitation_kl_per_step.mean().item(),
                "imitation_kl_per_step": result.imitation_kl_per_step.tolist(),
                "regret": {name: c[:, -1].mean().item() for name, c in regret_curves.items()},
                "regret_stderr": {
                    name: (c[:, -1].std() / len(c) ** 0.5).item() for name, c in regret_curves.items()
                },
                "gamma_error": result.gamma_error,
                "effective_gamma": model.effective_gamma().cpu().tolist(),
                "training_curve": curve,
                "num_processes": accelerator.num_processes,
                "config": to_dict(config),
            }
            plot_regret(regret_curves, config.teacher, output_dir / "regret.png")
            plot_imitation_kl(
                metrics["imitation_kl_per_step"], config.teacher, output_dir / "imitation_kl.png"
            )
        if config.ablation:
            metrics.setdefault("ablation", {})[loss_name] = {
                "imitation_kl": result.imitation_kl_per_step.mean().item(),
                "regret": result.cumulative_regret[:, -1].mean().item(),
                "gamma_error": result.gamma_error,
            }
            ablation_curves[loss_name] = curve
        _write_json(output_dir / "metrics.json", metrics)

    if config.ablation and accelerator.is_main_process:
        plot_ablation(
            metrics["ablation"], ablation_curves, metrics["regret"]["teacher"], output_dir / "ablation.png"
        )
    return broadcast_object_list([metrics])[0]


def format_summary(metrics: dict) -> str:
    """A short table of a run's results, for the console."""
    config = metrics["config"]
    gamma = (
        "n/a (teacher not realizable)" if metrics["gamma_error"] is None else f"{metrics['gamma_error']:.2%}"
    )
    lines = [
        f"LSA imitating the {config['teacher']} teacher (K={config['num_arms']}, d={config['dim']}, "
        f"T={config['horizon']}, loss={config['loss']})",
        f"  imitation KL(teacher || LSA): {metrics['imitation_kl']:.2e} nats   effective-Gamma error: {gamma}",
        f"  {'policy':<10}{'cumulative regret at T':>24}",
    ]
    for name, regret in metrics["regret"].items():
        lines.append(f"  {name:<10}{regret:>16.2f} ± {metrics['regret_stderr'][name]:.2f}")
    if "ablation" in metrics:
        lines.append(f"  {'loss':<10}{'imitation KL':>16}{'LSA regret':>12}")
        for name, result in metrics["ablation"].items():
            lines.append(f"  {name:<10}{result['imitation_kl']:>16.2e}{result['regret']:>12.2f}")
    lines.append(f"  plots and metrics.json in {config['output_dir']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(LSAConfig, argv, prog="icpo-train lsa")
    metrics = run_lsa(config)
    if PartialState().is_main_process:
        with run_log(config.output_dir):
            print(format_summary(metrics))
    return 0
