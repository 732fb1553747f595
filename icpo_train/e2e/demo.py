"""`make demo`: the framework's main job, with nothing to download, in a few minutes on 2 CPU cores.

1. The toy theory (an LSA pretrained with Fisher-weighted logit matching imitates a policy-optimization
   algorithm in context) on ``LSAConfig``'s defaults, which are ``recipes/lsa/linear_bandit.yaml``.
2. The end-to-end loop at smoke-test scale, one seed: ``icpo-train pipeline`` on ``recipes/e2e/demo.yaml``
   (a tiny base model pretrained from scratch, ICPO and SFT adapters, ME-ICPO evaluation).

Both reuse what an earlier run left in the output directory and say so: a second run only evaluates the
LSA again and prints the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from icpo_infer.config import parse_config
from icpo_train.e2e.pipeline import (
    PipelineConfig,
    format_legend,
    format_report,
    questions_label,
    run_pipeline,
)
from icpo_train.lsa.experiment import LSAConfig, format_summary, run_lsa

LSA_READING = (
    "The LSA has learned the teacher's algorithm when its imitation KL is near 0 and its regret matches "
    "the teacher's\n(lower regret is better; LinUCB and uniform play are references, not targets)."
)


def smoke_test_note(report: dict) -> str:
    """Why the demo's table is no measurement, and where the measurement is."""
    seeds = len(report["seeds"]["values"])
    return (
        f"{seeds} seed{'s' if seeds > 1 else ''} of a tiny model on {questions_label(report)} questions: "
        "a smoke test that every stage runs, not a measurement;\n"
        "differences of a few points are noise. The measurement is "
        "`icpo-train pipeline --config recipes/e2e/full.yaml`\n"
        "(6 seeds, 200 questions, hours on 2 CPU cores): its results are in the README, how they were "
        "reached\nin docs/e2e-findings.md."
    )


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where every stage writes its outputs."})
    pipeline_recipe: str = field(
        default="recipes/e2e/demo.yaml",
        metadata={
            "help": "Recipe of the end-to-end pipeline (paths in it are relative to the repository root)."
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(DemoConfig, argv, prog="icpo-train demo")
    output_dir = Path(config.output_dir)
    pipeline = parse_config(
        PipelineConfig,
        ["--config", config.pipeline_recipe, "--output_dir", str(output_dir / "e2e")],
        prog="icpo-train demo",
    )
    print("== 1. Toy theory: a linear self-attention model learns policy optimization in context ==")
    lsa_summary = format_summary(run_lsa(LSAConfig(output_dir=str(output_dir / "lsa"))))
    print(lsa_summary)
    print(
        f"\n== 2. End to end: does ICPO training improve test-time self-improvement? ({config.pipeline_recipe}) =="
    )
    report = run_pipeline(pipeline)
    print("\n== Results ==")
    print(lsa_summary)
    print(LSA_READING)
    print()
    print(format_report(report))
    print(format_legend(report))
    print(smoke_test_note(report))
    print(f"report: {report['report']}\nplot: {report['plot']}")
    return 0
