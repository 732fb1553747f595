"""`icpo-infer run ...` (one method on one dataset) and `icpo-infer compare DIR_A DIR_B ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from icpo_infer.backends import make_backend, resolve_context_length
from icpo_infer.backends.base import Backend, BackendOptions, ServerError, Usage
from icpo_infer.config import ConfigError, check, interrupt_status, parse_config, stop_on_sigterm
from icpo_infer.data import Problem, load_run_problems
from icpo_infer.icpo import run_method
from icpo_infer.infer_config import InferConfig
from icpo_infer.records import QuestionResult
from icpo_infer.report import (
    accuracy_curve,
    comparability_problems,
    compare_table,
    incomplete,
    load_metrics,
    plot_accuracy,
    plot_comparison,
    plot_cost,
    run_labels,
    self_reward_table,
    setting_differences,
)
from icpo_infer.results import PLOT_FILE, STATE_FILE, ChunkState, RunDirectory
from icpo_infer.run_log import run_log
from icpo_infer.stats import paired_comparison, paired_table

USAGE = """usage: icpo-infer run [--config recipes/infer/NAME.yaml] --model M --dataset D --output-dir DIR [--field value ...]
       icpo-infer compare DIR_A DIR_B ... [--output compare.png] [--cost-output cost_accuracy.png] [--json]
       icpo-infer compare A_SEED1 A_SEED2 ... --vs B_SEED1 B_SEED2 ... [--json]
       icpo-infer show DIR
       icpo-infer --version

  run      ME-ICPO or another method (single, majority, best-of-n, self-refine, random-icpo) on a
           dataset; `run --help` lists the options
  compare  accuracy, self-improvement and cost of finished runs, with differences against the first
           and their paired-bootstrap intervals (refused for runs of other datasets, questions, k or
           rounds unless --allow-mismatch)
  show     one finished run's summary"""


def run(config: InferConfig, backend: Backend | None = None) -> dict[str, Any]:
    """The whole `icpo-infer run`: load the questions, resume the output dir, run, write metrics and plot.

    Pass ``backend`` to reuse a loaded model (its usage is counted from this call on; it stays open);
    without one, the run loads its own and closes it. Every engine call runs ``config.adapter`` on it
    (None: the backend's own default adapter, if any). The cost counts the reward model's calls and
    tokens too (best-of-n with ``config.reward_model``).
    """
    problems, skipped = load_run_problems(config)
    config = resolve_context_length(config)
    directory = RunDirectory(config)
    directory.check()  # nothing is written until the inputs are valid and the model has loaded
    if backend is not None:
        return _run_on(backend, config, problems, skipped, directory)
    backend = make_backend(config.backend, BackendOptions.from_config(config))
    try:
        return _run_on(backend, config, problems, skipped, directory)
    finally:
        backend.close()  # a merged adapter's weights go with it


def _run_on(
    backend: Backend, config: InferConfig, problems: list[Problem], skipped: int, directory: RunDirectory
) -> dict[str, Any]:
    done = directory.open()
    with run_log(directory.path):
        reward_model = None
        if config.reward_model is not None:
            from icpo_infer.reward_model import RewardModel  # the hf backend's modules, for best-of-n only

            reward_model = RewardModel(
                config.reward_model,
                config.device,
                config.dtype,
                config.max_batch_tokens,
                config.trust_remote_code,
            )
        engines = [engine for engine in (backend, reward_model) if engine is not None]
        usage_before = [Usage(**vars(engine.usage)) for engine in engines]
        start = time.perf_counter()

        def write_metrics() -> dict[str, Any]:
            spent = Usage(
                **{
                    name: sum(
                        getattr(engine.usage, name) - getattr(before, name)
                        for engine, before in zip(engines, usage_before, strict=True)
                    )
                    for name in vars(Usage())
                }
            )
            return directory.write_metrics(spent, time.perf_counter() - start, skipped, len(problems))

        def on_chunk(results: list[QuestionResult]) -> None:
            for result in results:
                directory.add(result)
                write_metrics()

        state = ChunkState(directory.path / STATE_FILE, after_save=write_metrics)
        run_method(backend, problems, config, done, on_chunk, reward_model, state)
        metrics = write_metrics()
        plot_accuracy(metrics, directory.path / PLOT_FILE)
        return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    """A finished run's accuracy (in percent) and cost in one line, and its self-reward diagnostics."""
    k = metrics["k"]
    best = f"best@{k} {100 * metrics['best@k']:.1f}%, " if "best@k" in metrics else ""
    print(
        f"{metrics['num_questions']} questions: mean@{k} {100 * metrics['mean@k']:.1f}%, "
        f"maj@{k} {100 * metrics['maj@k']:.1f}%, pass@{k} {100 * metrics['pass@k']:.1f}%, {best}"
        f"self-improvement {100 * metrics['self_improvement']:+.1f} points; {metrics['engine_calls']} engine "
        f"calls, {metrics['generated_tokens']} generated tokens -> {metrics['config']['output_dir']}"
    )
    diagnostics = self_reward_table([metrics["config"]["method"]], [metrics])
    if diagnostics:
        print(diagnostics)


def compare(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="icpo-infer compare", description="Compare finished runs.")
    parser.add_argument(
        "dirs", nargs="+", help="Output directories of `icpo-infer run`; the first is the baseline."
    )
    parser.add_argument(
        "--vs",
        nargs="+",
        default=None,
        metavar="DIR",
        help="Side B, one directory per seed: the positional directories are side A, one per seed, "
        "paired with these in order.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print only the paired comparison of B (the second directory, or --vs) against A as one "
        "JSON object; no table, no plots.",
    )
    parser.add_argument(
        "--output", default=None, help="Accuracy against round (default: compare.png in the first run)."
    )
    parser.add_argument(
        "--cost-output",
        default=None,
        help="Accuracy against generated tokens (default: cost_accuracy.png in the first run).",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="Compare runs of other datasets, questions, k or rounds (refused without it).",
    )
    args = parser.parse_args(argv)
    dirs = [*args.dirs, *(args.vs or [])]
    if args.vs is None:
        check(
            not args.json or len(dirs) == 2,
            f"--json compares two sides: pass two directories (got {len(dirs)}), or "
            "A_SEED1 A_SEED2 ... --vs B_SEED1 B_SEED2 ....",
        )
        sides = [([0], [i]) for i in range(1, len(dirs))]  # (A, B) run indices: every run against the first
    else:
        n = len(args.dirs)
        check(
            len(args.vs) == n,
            f"{n} directories before --vs and {len(args.vs)} after; pass one run directory per seed on "
            "each side, in the same seed order.",
        )
        sides = [(list(range(n)), list(range(n, 2 * n)))]
    runs = load_metrics(dirs)
    labels = run_labels(dirs)
    if args.vs is None:
        problems = comparability_problems(labels, runs, dirs)
    else:  # seeds may hold other test questions, so only the two runs of each seed must match
        problems = [
            problem
            for i, j in zip(*sides[0], strict=True)
            for problem in comparability_problems(
                [labels[i], labels[j]], [runs[i], runs[j]], [dirs[i], dirs[j]]
            )
        ]
    check(
        not problems or args.allow_mismatch,
        f"the runs measure different things: {'; '.join(problems)}. Compare runs of the same dataset, "
        "questions, k and rounds, or pass --allow-mismatch.",
    )
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    for note in setting_differences(labels, runs):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        a, b = sides[0]
        print(json.dumps(paired_comparison([dirs[i] for i in a], [dirs[i] for i in b]), indent=2))
        return
    print(compare_table(labels, runs))
    diagnostics = self_reward_table(labels, runs)
    if diagnostics:
        print(f"\n{diagnostics}")
    comparisons = []
    for a, b in sides:
        try:
            comparison = paired_comparison([dirs[i] for i in a], [dirs[i] for i in b])
        except ConfigError as err:  # e.g. other questions under --allow-mismatch: the table still stands
            print(f"warning: no paired differences: {err}", file=sys.stderr)
            continue
        comparisons.append((",".join(labels[i] for i in a), ",".join(labels[i] for i in b), comparison))
    if comparisons:
        print(f"\n{paired_table(comparisons)}")
    for label_a, label_b, comparison in comparisons:
        low, high = comparison["final_accuracy_diff_ci95"]
        if low <= 0 <= high:
            print(
                f"note: {label_b} against {label_a}: {comparison['final_accuracy_diff']:+.1f} points of final "
                f"accuracy, within the noise of {sum(comparison['questions'])} questions (95% interval "
                f"[{low:+.1f}, {high:+.1f}] holds 0)",
                file=sys.stderr,
            )
    first = Path(dirs[0])
    output = args.output or first / "compare.png"
    cost_output = args.cost_output or first / "cost_accuracy.png"
    plot_comparison(labels, runs, output)
    plot_cost(labels, runs, cost_output)
    print(f"plots: {output}, {cost_output}")


def show(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="icpo-infer show", description="One finished run's summary.")
    parser.add_argument("dir", help="Output directory of `icpo-infer run`.")
    args = parser.parse_args(argv)
    [run] = load_metrics([args.dir])
    labels = run_labels([args.dir])
    config = run["config"]
    print(
        f"{config['method']} of {config['model']}{' + ' + config['adapter'] if config.get('adapter') else ''} "
        f"on {config['dataset']}: {run['num_questions']} questions, k = {run['k']}"
    )
    missing = incomplete(run)
    if missing:
        print(f"INCOMPLETE: {missing}; rerun its `icpo-infer run` command to finish it")
    rounds, mean, _ = accuracy_curve(run)
    if len(rounds) > 1:
        print(
            "mean@k per round: " + ", ".join(f"{r} {100 * m:.1f}" for r, m in zip(rounds, mean, strict=True))
        )
    print(compare_table(labels, [run]))
    diagnostics = self_reward_table(labels, [run])
    if diagnostics:
        print(f"\n{diagnostics}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"icpo {version('icpo')}")
        return 0
    command, rest = argv[0], argv[1:]
    with stop_on_sigterm():
        try:
            if command == "run":
                metrics = run(parse_config(InferConfig, rest, prog="icpo-infer run"))
                with run_log(metrics["config"]["output_dir"]):
                    print_summary(metrics)
            elif command == "compare":
                compare(rest)
            elif command == "show":
                show(rest)
            else:
                print(
                    f"icpo-infer: unknown command '{command}'. Valid: run, compare, show.\n\n{USAGE}",
                    file=sys.stderr,
                )
                return 2
        except ConfigError as err:
            print(f"icpo-infer {command}: error: {err}", file=sys.stderr)
            return 2
        except ServerError as err:
            print(f"icpo-infer {command}: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            stop, status = interrupt_status(err)
            print(
                f"icpo-infer {command}: {stop}; finished questions and finished rounds are kept, and the same "
                "command resumes.",
                file=sys.stderr,
            )
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
