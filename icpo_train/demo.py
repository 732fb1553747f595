"""`make demo`: the framework's main job on embedded defaults, with nothing to download.

The toy theory (an LSA pretrained with Fisher-weighted logit matching imitates a policy-optimization
algorithm in context) runs with ``LSAConfig``'s defaults, which are ``recipes/lsa/linear_bandit.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from icpo_infer.config import parse_config
from icpo_train.lsa.experiment import LSAConfig, format_summary, run_lsa


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where every stage writes its outputs."})


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(DemoConfig, argv, prog="icpo-train demo")
    output_dir = Path(config.output_dir)
    print("== Toy theory: a linear self-attention model learns policy optimization in context ==")
    print(format_summary(run_lsa(LSAConfig(output_dir=str(output_dir / "lsa")))))
    return 0
