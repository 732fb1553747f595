"""Evaluate every checkpoint of an `icpo-train train` run with icpo-infer, once each, as they appear.

    python scripts/eval_checkpoints.py --run-dir runs/qwen-1.5b --dataset ../shared/data/aime2024.jsonl \\
        [--config recipes/infer/me_icpo_paper_r3.yaml] [--method me-icpo] [--backend vllm|hf] [--watch]

Every `icpo-infer run` option is accepted (`icpo-infer run --help` lists them) and means the same;
``--model`` defaults to the run's base model and ``--output-dir`` (the evaluation directory) to
RUN_DIR/eval. The base model is evaluated as step 0, then every complete ``checkpoint-N`` and the
final save. Each evaluation is an `icpo-infer run` output directory (EVAL_DIR/base,
EVAL_DIR/checkpoint-N, ...), so an interrupted one resumes; EVAL_DIR/results.jsonl gets one row per
evaluated model, and EVAL_DIR/accuracy_vs_round.png and EVAL_DIR/accuracy_vs_step.png are redrawn
after each.

``--report-to tensorboard`` (or wandb, trackio, ...) files each evaluation's figures in those trackers
at the checkpoint's global step, beside what training logged.

``--watch`` polls the run directory until the run is finished: `icpo-train train` writes
RUN_DIR/trainer_state.json last, after the final adapter (see icpo_train/callbacks.py).

With ``--backend openai --base-url URL`` (repeatable) the evaluations run on vLLM servers that are
already up: each LoRA checkpoint is loaded into them at run time, evaluated and unloaded, without a
restart (start them with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; they must see the
run directory). ``--model`` is then the served base model's name.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from icpo_infer.config import ConfigError, check, parse_config
from icpo_infer.infer_config import InferConfig
from icpo_train.callbacks import CheckpointEvaluator, Trackers, base_model_of, final_step

PROG = "eval_checkpoints.py"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, InferConfig]:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, type=Path, help="Output directory of `icpo-train train`.")
    parser.add_argument("--watch", action="store_true", help="Keep polling until the run is finished.")
    parser.add_argument("--poll-seconds", type=float, default=60.0, help="Wait between polls with --watch.")
    parser.add_argument("--no-base", action="store_true", help="Do not evaluate the base model (step 0).")
    parser.add_argument(
        "--report-to",
        nargs="+",
        default=[],
        metavar="TRACKER",
        help="Also file each evaluation in these trackers (tensorboard, wandb, trackio, ...) at its "
        "checkpoint's step, as the Trainer files its loss (TensorBoard: RUN_DIR/runs/).",
    )
    args, infer_argv = parser.parse_known_args(argv)
    check(
        args.run_dir.is_dir(),
        f"--run-dir: '{args.run_dir}' is not a directory; pass the output_dir of `icpo-train train`.",
    )
    check(args.poll_seconds > 0, f"--poll-seconds={args.poll_seconds} is invalid; use a positive number.")
    defaults = ["--output-dir", str(args.run_dir / "eval")]
    base_model = base_model_of(args.run_dir)
    if base_model is not None:
        defaults += ["--model", base_model]
    config = parse_config(InferConfig, [*defaults, *infer_argv], prog=f"{PROG} (icpo-infer run options)")
    check(
        config.adapter is None,
        "--adapter: the adapters evaluated are the run's checkpoints; leave --adapter out "
        "(--model names the base model).",
    )
    return args, config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, config = parse_args(argv)
        evaluator = CheckpointEvaluator(args.run_dir, config)
        trackers = Trackers(args.run_dir, args.report_to) if args.report_to else None
        while True:
            finished = final_step(args.run_dir) is not None  # read before the scan, so no save is missed
            for row in evaluator.evaluate_pending(include_base=not args.no_base):
                if trackers is not None:
                    trackers.log(row)
                print(
                    f"step {row['step']} ({row['name']}): mean@{row['k']} {row['mean@k']:.3f}, "
                    f"maj@{row['k']} {row['maj@k']:.3f}, self-improvement {row['self_improvement']:+.3f}",
                    flush=True,
                )
            if finished or not args.watch:
                break
            time.sleep(args.poll_seconds)
        evaluator.close()
        if trackers is not None:
            trackers.close()
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"results: {evaluator.eval_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
