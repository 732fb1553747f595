"""How close does a model come to the ICPO target on its trajectories? The training loss per round.

    python -m icpo_train.e2e.trajectory_fit --seed-dir runs/e2e-full/seed-0 [--models base icpo sft mse] \\
        [--loss-type fw] [--tail-bucket] [--eta 2] [--rows 480] [--templates recipes/e2e/templates.yaml] \\
        [--reward-scale counted] [--no-answer-penalty 0] [--tail-reward zero] [--gt-coef 0]

For the first rows of an `icpo-train pipeline` seed directory's trajectories, computes each model's
response-level loss (the trainer's own, `fw` by default) of ``z_j = log pi(y_j | prompt_t)`` against
``z*_j = ref_logps_j + eta R_j`` and prints its mean per round. The base model's round 1 (empty
history) is 0, as the trajectories were scored with it. The row ``ignore`` is the loss of a model
whose answers do not depend on the history at all (``z_j = ref_logps_j``): a model below it uses
its history the way the target asks; a model above it reacts to the history in other ways. The target
options mean what the trainer's do: pass the recipe's to measure the target an adapter was trained on.

With ``--tail-bucket`` it also prints each model's ``log_group_mass_ratio`` per round, the mean of
log pi(group) / pi_ref(group) over the rows (as the trainer logs it): 0 for a model that keeps the
reference's mass on the sampled responses, far below 0 for one that has moved its mass off them.
The base model is the seed's ``base`` or, when the pipeline started from a given model, the model that
scored the trajectories (their ``build_config.json``); the adapters are loaded on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from icpo_infer.config import ConfigError, check
from icpo_train.icpo_config import LOSS_TYPES, REWARD_SCALES, TAIL_REWARDS, ICPOConfig
from icpo_train.objective import group_losses
from icpo_train.trainer import ICPOTrainer
from icpo_train.trajectories import CONFIG_FILE
from icpo_train.trajectory_data import load_trajectories

IGNORE = "ignore"  # the reference row: z = ref_logps, a model that ignores its history
GROUP_MASS = "log_group_mass_ratio"

Table = dict[str, dict[int, float]]  # model -> round -> mean over the rows


@torch.no_grad()
def fit(
    seed_dir: Path,
    models: Sequence[str],
    loss_type: str,
    eta: float,
    rows: int,
    templates: str | None,
    tail_bucket: bool = False,
    target: dict[str, Any] | None = None,
) -> tuple[Table, Table]:
    """The mean loss of every model (and ``ignore``) per round over the first ``rows`` trajectory rows,
    and with ``tail_bucket`` every model's mean ``log_group_mass_ratio`` per round (else empty).
    ``target``: the trainer's target options (reward_scale, no_answer_penalty, tail_reward, gt_coef)."""
    trajectories = load_trajectories(seed_dir / "trajectories")
    trajectories = trajectories.select(range(min(rows, len(trajectories))))
    reference = _reference_model(seed_dir)
    losses: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ratios: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as scratch:
        config = ICPOConfig(
            output_dir=scratch,
            model_name_or_path=reference,
            trajectories=str(seed_dir / "trajectories"),
            templates=templates,
            loss_type=loss_type,
            eta=eta,
            tail_bucket=tail_bucket,
            **(target or {}),
            use_peft=False,
            per_device_eval_batch_size=1,  # compute_loss of one row is that row's loss
            report_to="none",
        )
        # One trainer tokenizes and batches the rows once; every model is scored on the same batches.
        trainer = ICPOTrainer(config, train_dataset=trajectories)
        batches = [trainer._prepare_inputs(b) for b in trainer.get_eval_dataloader(trainer.train_dataset)]
        for inputs in batches:  # a model that ignores the history: pi_ref itself
            ignoring, _ = group_losses(inputs["ref_logps"], inputs, config)
            losses[IGNORE][int(inputs["round"][0])].append(ignoring.item())
        for model_name in models:
            if model_name == "base":
                model = trainer.model  # the trainer loaded the base model (use_peft=False)
            else:
                base = AutoModelForCausalLM.from_pretrained(reference)
                model = PeftModel.from_pretrained(base, seed_dir / "adapters" / model_name)
            model.to(trainer.accelerator.device).eval()
            for inputs in batches:
                round_ = int(inputs["round"][0])
                losses[model_name][round_].append(trainer.compute_loss(model, inputs).item())
                if tail_bucket:  # the trainer records it with the loss
                    ratios[model_name][round_].append(trainer._metrics[GROUP_MASS][-1].item())

    def means(values: dict[str, dict[int, list[float]]], names: Sequence[str]) -> Table:
        return {name: {r: sum(v) / len(v) for r, v in sorted(values[name].items())} for name in names}

    return means(losses, [*models, IGNORE]), means(ratios, models if tail_bucket else [])


def _reference_model(seed_dir: Path) -> str:
    """pi_ref: the seed's pretrained base model, else the model its trajectories' build names."""
    if (seed_dir / "base").is_dir():
        return str(seed_dir / "base")
    build_config = seed_dir / "trajectories" / CONFIG_FILE
    model = json.loads(build_config.read_text()).get("model") if build_config.is_file() else None
    check(model is not None, f"--seed-dir: neither {seed_dir / 'base'} nor a model in {build_config}.")
    return model


def format_table(table: Table, title: str) -> str:
    rounds = sorted({r for row in table.values() for r in row})
    width = max(len(title), *map(len, table)) + 1
    lines = [f"{title:<{width}}" + "".join(f"{'round ' + str(r):>10}" for r in rounds)]
    for name, row in table.items():
        lines.append(f"{name:<{width}}" + "".join(f"{row.get(r, float('nan')):>10.3f}" for r in rounds))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed-dir", required=True, type=Path, help="DIR/seed-N of `icpo-train pipeline`.")
    parser.add_argument("--models", nargs="+", default=["base", "icpo", "sft", "mse"])
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default="fw")
    parser.add_argument("--eta", type=float, default=2.0, help="The eta of the target (the recipe's).")
    parser.add_argument(
        "--tail-bucket",
        action="store_true",
        help="The tail-bucket form of the loss (the trainer's tail_bucket).",
    )
    parser.add_argument("--reward-scale", choices=REWARD_SCALES, default="counted")
    parser.add_argument("--no-answer-penalty", type=float, default=0.0)
    parser.add_argument("--tail-reward", choices=TAIL_REWARDS, default="zero")
    parser.add_argument("--gt-coef", type=float, default=0.0)
    parser.add_argument("--rows", type=int, default=480, help="First N trajectory rows.")
    parser.add_argument(
        "--templates", default="recipes/e2e/templates.yaml", help="The pipeline's prompt wording."
    )
    args = parser.parse_args(argv)
    missing = [m for m in args.models if m != "base" and not (args.seed_dir / "adapters" / m).is_dir()]
    if missing:
        parser.error(f"--models: no adapter {missing} in {args.seed_dir / 'adapters'}; train it first.")
    try:
        losses, ratios = fit(
            args.seed_dir,
            args.models,
            args.loss_type,
            args.eta,
            args.rows,
            args.templates or None,
            args.tail_bucket,
            {
                "reward_scale": args.reward_scale,
                "no_answer_penalty": args.no_answer_penalty,
                "tail_reward": args.tail_reward,
                "gt_coef": args.gt_coef,
            },
        )
    except ConfigError as error:  # no trajectories, a bad templates file: one line, not a traceback
        parser.error(str(error))
    print(format_table(losses, f"{args.loss_type} loss"))
    if ratios:
        print(f"\n{format_table(ratios, GROUP_MASS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
