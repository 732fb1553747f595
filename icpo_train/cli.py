"""`icpo-train SUBCOMMAND ...`: each subcommand is the ``main(argv)`` of one module, imported on use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import version

from icpo_infer.backends.base import ServerError
from icpo_infer.config import ConfigError, interrupt_status, stop_on_sigterm

SUBCOMMANDS = {
    "lsa": (
        "icpo_train.lsa.experiment",
        "the toy theory: pretrain a linear self-attention model on linear bandits",
    ),
    "build-trajectories": (
        "icpo_train.trajectories",
        "roll out ICPO histories and reference groups into a dataset",
    ),
    "train": ("icpo_train.train", "fine-tune an LLM (LoRA) with the Fisher-weighted ICPO loss"),
    "pipeline": (
        "icpo_train.e2e.pipeline",
        "the end-to-end proof: pretrain, trajectories, icpo/sft/mse adapters, evaluation, report",
    ),
    "demo": ("icpo_train.e2e.demo", "the main job of `make demo`"),
}


def usage() -> str:
    lines = ["usage: icpo-train SUBCOMMAND [--config RECIPE.yaml] [--field value ...]"]
    lines += ["       icpo-train --version", "", "subcommands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"icpo {version('icpo')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"icpo-train: unknown subcommand '{name}'. Valid: {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        with stop_on_sigterm():  # unwinds like Ctrl-C: engines close, no worker process is left behind
            return module.main(rest) or 0
    except ConfigError as err:
        print(f"icpo-train {name}: error: {err}", file=sys.stderr)
        return 2
    except ServerError as err:
        print(f"icpo-train {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM where a subcommand turns it into one
        stop, status = interrupt_status(err)
        print(
            f"icpo-train {name}: {stop}; what was saved stays in the output directory and the same "
            "command resumes (train: add --resume_from_checkpoint last).",
            file=sys.stderr,
        )
        return status


if __name__ == "__main__":
    sys.exit(main())
