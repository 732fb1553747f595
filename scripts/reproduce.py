"""Reproduce a paper result: every method of a recipe in recipes/reproduce/ on its model and benchmark,
then a table of the measured accuracy and cost next to the paper's figures.

    python scripts/reproduce.py --config recipes/reproduce/qwen2.5-math-7b.yaml \\
        --output-dir runs/reproduce/qwen2.5-math-7b [--methods single,me-icpo] [--FIELD VALUE ...]

A recipe is an `icpo-infer run` recipe plus ``methods`` (the methods to run, in order) and, where the
paper reports them, ``paper_mean_at_k`` (benchmark: method: mean@k in percent); the table shows the
figures of the benchmark the run used. Every other option is an
`icpo-infer run` option (`icpo-infer run --help`) and applies to every method, e.g. ``--limit 5`` or
``--dataset math500``. The model is loaded once; each method is an `icpo-infer run` output directory
(OUTPUT_DIR/METHOD), so a rerun resumes where it stopped. OUTPUT_DIR/table.md holds the table, and
OUTPUT_DIR/run_recipe.yaml the recipe the methods ran with.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions
from icpo_infer.cli import run
from icpo_infer.config import ConfigError, check, load_recipe, parse_config
from icpo_infer.data import BENCHMARKS, benchmark_name
from icpo_infer.infer_config import InferConfig

PROG = "reproduce.py"
TABLE_FILE = "table.md"
RUN_RECIPE_FILE = "run_recipe.yaml"


def plan(argv: Sequence[str] | None) -> tuple[list[InferConfig], dict[str, float], Path]:
    """One validated config per method (before any model loads), the paper's figures for the run's
    benchmark (method: mean@k), the output dir."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --method is an icpo-infer option (refused below), not short for --methods
    )
    parser.add_argument("--config", required=True, help="A recipe from recipes/reproduce/.")
    parser.add_argument("--output-dir", required=True, type=Path, help="One run directory per method inside.")
    parser.add_argument("--methods", default=None, help="Comma-separated methods instead of the recipe's.")
    args, overrides = parser.parse_known_args(argv)
    recipe = load_recipe(args.config)
    methods = recipe.pop("methods", None)
    paper = recipe.pop("paper_mean_at_k", None) or {}
    if args.methods:
        methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    check(
        isinstance(methods, list) and bool(methods) and all(isinstance(m, str) for m in methods),
        f"recipe '{args.config}': 'methods' must list the methods to run (e.g. [single, me-icpo]), "
        "or pass --methods.",
    )
    check(
        isinstance(paper, dict)
        and all(
            benchmark in BENCHMARKS
            and isinstance(figures, dict)
            and all(isinstance(value, (int, float)) for value in figures.values())
            for benchmark, figures in paper.items()
        ),
        f"recipe '{args.config}': 'paper_mean_at_k' must map benchmarks ({', '.join(BENCHMARKS)}) to "
        "method: mean@k in percent.",
    )
    for flag in ("--method", "--output_dir"):
        check(
            not any(arg.replace("-", "_").startswith(flag.replace("-", "_")) for arg in overrides),
            f"{flag.replace('_', '-')}: set by {PROG} for each method; use --methods and --output-dir.",
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run_recipe = args.output_dir / RUN_RECIPE_FILE
    run_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    configs = [
        parse_config(
            InferConfig,
            [
                "--config",
                str(run_recipe),
                *overrides,
                "--method",
                method,
                "--output-dir",
                str(args.output_dir / method),
            ],
            prog=f"{PROG} (icpo-infer run options)",
        )
        for method in methods
    ]
    figures = paper.get(benchmark_name(configs[0].dataset), {})
    return configs, {str(method): float(value) for method, value in figures.items()}, args.output_dir


def reproduction_table(
    configs: Sequence[InferConfig], runs: Sequence[dict[str, Any]], paper: dict[str, float]
) -> str:
    """Markdown: per method, mean@k next to the paper's, maj@k, pass@k, self-improvement and the cost."""
    first = runs[0]
    title = (
        f"{first['config']['model']} on {first['config']['dataset']} ({first['num_questions']} questions, "
        f"seed {first['config']['seed']})"
    )
    header = (
        "| method | mean@k | paper mean@k | maj@k | pass@k | self-improvement | k "
        "| generated tokens | engine calls | wall time (h) |"
    )
    lines = [title, "", header, "|" + "---|" * (header.count("|") - 1)]
    for config, metrics in zip(configs, runs, strict=True):
        reported = paper.get(config.method)
        lines.append(
            f"| {config.method} | {100 * metrics['mean@k']:.1f} | "
            f"{'-' if reported is None else f'{reported:.1f}'} | {100 * metrics['maj@k']:.1f} | "
            f"{100 * metrics['pass@k']:.1f} | {100 * metrics['self_improvement']:+.1f} | {metrics['k']} | "
            f"{metrics['generated_tokens']:,} | {metrics['engine_calls']} | {metrics['wall_time_s'] / 3600:.2f} |"
        )
    lines += ["", "Accuracy in percent; the paper's figures are read off its plots (mean@16)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        configs, paper, output_dir = plan(argv)
        # The methods differ only in what they run, not in the engine: load the model once.
        backend = make_backend(configs[0].backend, BackendOptions.from_config(configs[0]))
        runs = []
        for config in configs:
            runs.append(run(config, backend))
            print(f"{config.method}: mean@{runs[-1]['k']} {runs[-1]['mean@k']:.3f} -> {config.output_dir}")
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    table = reproduction_table(configs, runs, paper)
    (output_dir / TABLE_FILE).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
