"""One ICPO training step on groups that share their prompt: per member against shared prefix.

The per-member path scores ``prompt + response`` for each of the G members (the prompt runs G times,
forward and backward); ``shared_prefix`` runs the prompt once and every response on its key/value cache.
Both run as ``ICPOTrainer.training_step`` (LoRA r=16, FW loss; forward and backward, no optimizer
step) on one row of G random responses of ``--response-tokens`` after a ``--prompt-tokens`` prompt, on
a randomly initialised Llama made locally (the output layer padded to ``--vocab-size``), with
memory_lean off and on. Every configuration runs in a fresh subprocess (one torch thread).

Step time is the median of ``--repeats`` steps after one warm-up step: CPU time of the process on CPU
(other tenants of a shared machine do not count), wall time after synchronising on CUDA. Peak memory is
what the measured steps add on top of the loaded trainer, as in ``response_memory.py`` (CUDA
``max_memory_allocated``; on CPU the peak resident set, VmHWM, with glibc's mmap threshold fixed at
1 MiB so that freed tensors leave the resident set). The gradients of the last step are
compared: ``max grad rel diff`` is the largest ``max |g_shared - g_member| / max |g_member|`` over the
trainable parameters. The last line compares the memory-lean steps (the recipes' setting).

    python benchmarks/group_prefix.py                     # prompt 2048, responses 512, G = 8
    python benchmarks/group_prefix.py --grid              # also the speedup over prompt lengths and G
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from response_memory import benchmark_trainer, build_model, group_batch, time_steps


def measure(model_dir: Path, lean: bool, shared: bool, grads_path: Path, args: argparse.Namespace) -> dict:
    """Training steps of one configuration in this process (see module docstring)."""
    torch.set_num_threads(1)
    trainer = benchmark_trainer(model_dir, args.device, memory_lean=lean, shared_prefix=shared)
    batch = group_batch(trainer, args.group_size, args)
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    times, peak = time_steps(trainer, batch, args.device, args.repeats, clock)
    grads = {n: p.grad.float().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save(grads, grads_path)
    return {"peak_bytes": peak, "step_time_s": statistics.median(times)}


def run_isolated(model_dir: Path, lean: bool, shared: bool, grads_path: Path, args) -> dict:
    command = [
        sys.executable,
        __file__,
        *args.argv,
        "--worker",
        str(model_dir),
        str(int(lean)),
        str(int(shared)),
    ]
    command += ["--grads", str(grads_path)]
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps later ones in its
    # heap once freed, so the resident set after the warm-up step would already hold the step's peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"memory_lean": lean, "shared_prefix": shared}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {**row, "error": tail[0]}
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def max_grad_rel_diff(reference: dict, other: dict) -> float:
    return max(
        ((other[name] - grad).abs().max() / grad.abs().max()).item()
        for name, grad in reference.items()
        if grad.abs().max() > 0
    )


def compare(args: argparse.Namespace, lean_modes: tuple[bool, ...] = (False, True)) -> dict[bool, dict]:
    """Both paths for each memory_lean setting, in one run: per setting the speedup, peak ratio, grad diff."""
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        build_model(scratch / "model", args)
        for lean, shared in [(lean, shared) for lean in lean_modes for shared in (False, True)]:
            row = run_isolated(scratch / "model", lean, shared, scratch / f"grads-{lean}-{shared}.pt", args)
            print(json.dumps(row), file=sys.stderr, flush=True)
            results[lean, shared] = row
        summary = {}
        for lean in lean_modes:
            member, shared = results[lean, False], results[lean, True]
            if "error" in member or "error" in shared:
                continue
            grads = [torch.load(scratch / f"grads-{lean}-{s}.pt") for s in (False, True)]
            summary[lean] = {
                "member": member,
                "shared": shared,
                "speedup": member["step_time_s"] / shared["step_time_s"],
                "peak_ratio": shared["peak_bytes"] / member["peak_bytes"],
                "grad_diff": max_grad_rel_diff(*grads),
            }
    return summary


def summary_line(entry: dict) -> str:
    return (
        f"shared-prefix speedup: {entry['speedup']:.2f}x, peak memory ratio: {entry['peak_ratio']:.2f}x, "
        f"max grad rel diff: {entry['grad_diff']:.2e}"
    )


def format_table(summary: dict[bool, dict]) -> str:
    lines = [
        "| memory_lean | path | step time (s) | peak (MiB) |",
        "|---|---|---:|---:|",
    ]
    for lean, entry in summary.items():
        for path in ("member", "shared"):
            row = entry[path]
            lines.append(
                f"| {'on' if lean else 'off'} | {'per member' if path == 'member' else 'shared prefix'} | "
                f"{row['step_time_s']:.2f} | {row['peak_bytes'] / 2**20:.0f} |"
            )
    return "\n".join(lines)


def grid(args: argparse.Namespace) -> str:
    """Speedup and peak ratio of the memory-lean step over prompt lengths and group sizes."""
    lines = ["| prompt tokens | G | speedup | peak ratio |", "|---:|---:|---:|---:|"]
    for prompt_tokens in args.grid_prompt_tokens:
        for group_size in args.grid_group_sizes:
            cell = parse_args(
                [*args.argv, "--prompt-tokens", str(prompt_tokens), "--group-size", str(group_size)]
            )
            cell.argv = [a for a in cell.argv if a != "--grid"]
            entry = compare(cell, lean_modes=(True,))[True]
            lines.append(
                f"| {prompt_tokens} | {group_size} | {entry['speedup']:.2f}x | {entry['peak_ratio']:.2f}x |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="measured steps (after one warm-up)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--grid", action="store_true", help="also the memory-lean speedup over the grid below"
    )
    parser.add_argument("--grid-prompt-tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--grid-group-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--grads", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        model_dir, lean, shared = args.worker
        print(json.dumps(measure(Path(model_dir), lean == "1", shared == "1", args.grads, args)))
        return
    print(
        f"device {args.device}; prompt {args.prompt_tokens}, responses {args.response_tokens}, G {args.group_size}; "
        f"Llama hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}; "
        f"median of {args.repeats}",
        flush=True,
    )
    if args.grid:
        print(grid(args), flush=True)
    summary = compare(args)
    print(format_table(summary))
    if False in summary:
        print("memory_lean off: " + summary_line(summary[False]))
    if True in summary:
        print(summary_line(summary[True]))


if __name__ == "__main__":
    main()
