"""How close does a model come to the ICPO target on its trajectories? The training loss per round.

    python -m icpo_train.e2e.trajectory_fit --seed-dir runs/e2e-full/seed-0 [--models base icpo sft mse] \\
        [--loss-type fw] [--tail-bucket] [--eta 2] [--rows 480] [--templates recipes/e2e/templates.yaml]

For the first rows of an `icpo-train pipeline` seed directory's trajectories, computes each model's
response-level loss (the trainer's own, `fw` by default) of ``z_j = log pi(y_j | prompt_t)`` against
``z*_j = ref_logps_j + eta R_j`` and prints its mean per round. The base model's round 1 (empty
history) is 0, as the trajectories were scored with it. The row ``ignore`` is the loss of a model
whose answers do not depend on the history at all (``z_j = ref_logps_j``): a model below it uses
its history the way the target asks; a model above it reacts to the history in other ways.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from icpo_infer.config import ConfigError
from icpo_train.trainer import LOSS_TYPES, ICPOConfig, ICPOTrainer, response_losses
from icpo_train.trajectory_data import load_trajectories

IGNORE = "ignore"  # the reference row: z = ref_logps, a model that ignores its history


@torch.no_grad()
def fit(
    seed_dir: Path,
    models: Sequence[str],
    loss_type: str,
    eta: float,
    rows: int,
    templates: str | None,
    tail_bucket: bool = False,
) -> dict[str, dict[int, float]]:
    """model (and ``ignore``) -> round -> mean loss over the first ``rows`` trajectory rows."""
    trajectories = load_trajectories(seed_dir / "trajectories")
    trajectories = trajectories.select(range(min(rows, len(trajectories))))
    losses: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as scratch:
        config = ICPOConfig(
            output_dir=scratch,
            model_name_or_path=str(seed_dir / "base"),
            trajectories=str(seed_dir / "trajectories"),
            templates=templates,
            loss_type=loss_type,
            eta=eta,
            tail_bucket=tail_bucket,
            use_peft=False,
            per_device_eval_batch_size=1,  # compute_loss of one row is that row's loss
            report_to="none",
        )
        # One trainer tokenizes and batches the rows once; every model is scored on the same batches.
        trainer = ICPOTrainer(config, train_dataset=trajectories)
        batches = [trainer._prepare_inputs(b) for b in trainer.get_eval_dataloader(trainer.train_dataset)]
        for inputs in batches:
            ref = inputs["ref_logps"]
            ignoring = response_losses(
                loss_type, ref, ref, trainer.group_rewards(inputs), eta, inputs["group_mask"], tail_bucket
            )
            losses[IGNORE][int(inputs["round"][0])].append(ignoring.item())
        for model_name in models:
            if model_name == "base":
                model = trainer.model  # the trainer loaded the base model (use_peft=False)
            else:
                base = AutoModelForCausalLM.from_pretrained(seed_dir / "base")
                model = PeftModel.from_pretrained(base, seed_dir / "adapters" / model_name)
            model.to(trainer.accelerator.device).eval()
            for inputs in batches:
                losses[model_name][int(inputs["round"][0])].append(trainer.compute_loss(model, inputs).item())
    return {name: {r: sum(v) / len(v) for r, v in sorted(losses[name].items())} for name in [*models, IGNORE]}


def format_table(table: dict[str, dict[int, float]], loss_type: str) -> str:
    rounds = sorted({r for row in table.values() for r in row})
    width = max(len(loss_type) + 6, *map(len, table)) + 1
    lines = [f"{loss_type + ' loss':<{width}}" + "".join(f"{'round ' + str(r):>10}" for r in rounds)]
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
    parser.add_argument("--rows", type=int, default=480, help="First N trajectory rows.")
    parser.add_argument(
        "--templates", default="recipes/e2e/templates.yaml", help="The pipeline's prompt wording."
    )
    args = parser.parse_args(argv)
    missing = [m for m in args.models if m != "base" and not (args.seed_dir / "adapters" / m).is_dir()]
    if missing:
        parser.error(f"--models: no adapter {missing} in {args.seed_dir / 'adapters'}; train it first.")
    try:
        table = fit(
            args.seed_dir,
            args.models,
            args.loss_type,
            args.eta,
            args.rows,
            args.templates or None,
            args.tail_bucket,
        )
    except ConfigError as error:  # no trajectories, a bad templates file: one line, not a traceback
        parser.error(str(error))
    print(format_table(table, args.loss_type))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
