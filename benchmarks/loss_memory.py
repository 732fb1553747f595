"""Time and peak memory of the token-level FW-LM loss against cross-entropy and TRL's generalized JSD.

For each vocabulary size V and number of tokens N, every loss runs forward + backward on ``N x V`` student
logits in a fresh subprocess, so one measurement never inherits another's allocator state or peak:

- ``ce``: ``F.cross_entropy`` against sampled labels (the baseline every ratio is taken against);
- ``fw``: dense ``fisher_weighted_logit_matching`` against full ``N x V`` teacher logits;
- ``fw-topk``: ``sparse_fisher_weighted_logit_matching`` against the teacher's top-k logits and its
  log-normaliser (what a trajectory dataset stores);
- ``jsd``: TRL's ``GKDTrainer.generalized_jsd_loss`` (beta 0.5) against full teacher logits.

With the output layer, as a trainer computes them: the student's ``N x H`` last hidden states (``--hidden``)
go through a frozen ``V x H`` head (LoRA trains the layers below it), and the live teacher's logits come
from its own hidden states and head:

- ``ce-head``, ``fw-head``, ``fw-topk-head``: the logits of all N positions, then ``ce``, ``fw``, ``fw-topk``
  (``ce-head`` is the baseline of this group);
- ``fw-fused``, ``fw-topk-fused``: ``fused_fisher_weighted_logit_matching`` and
  ``fused_sparse_fisher_weighted_logit_matching``, which hold one chunk of positions' logits at a time.

Time is the median of ``--repeats`` timed runs after one warm-up run: wall time on CUDA, the process's
CPU time on CPU (so that other tenants of a shared machine do not count). Peak memory includes the
inputs (student logits, their gradient, the teacher) and is measured on CUDA with
``torch.cuda.max_memory_allocated`` and on CPU as the growth of the process's peak resident set
(``ru_maxrss``) over its resident set before the inputs were created, with glibc's mmap threshold fixed
at 1 MiB so that freed tensors leave the resident set. Configurations whose estimated peak (from the
same loss's smaller runs) exceeds ``--memory-limit-gb`` are skipped and reported as such.

    python benchmarks/loss_memory.py                 # V in {32000, 151936}, N in {2048, 4096, 8192}
    python benchmarks/loss_memory.py --quick         # V 32000, N 2048, 2 repeats
    python benchmarks/loss_memory.py --vocab 151936 --tokens 2048 --losses ce fw-topk
    python benchmarks/loss_memory.py --losses ce-head fw-head fw-fused fw-topk-head fw-topk-fused
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from icpo_train.losses import (
    fisher_weighted_logit_matching,
    fused_fisher_weighted_logit_matching,
    fused_sparse_fisher_weighted_logit_matching,
    sparse_fisher_weighted_logit_matching,
)

HEAD_LOSSES = ("ce-head", "fw-head", "fw-topk-head", "fw-fused", "fw-topk-fused")
LOSSES = ("ce", "fw", "fw-topk", "jsd", *HEAD_LOSSES)
# Rows of the teacher generated at a time, so building the sparse teacher never holds an N x V tensor.
TEACHER_CHUNK = 256


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sparse_teacher(n: int, vocab: int, top_k: int, generator, device, dtype) -> tuple[torch.Tensor, ...]:
    """Top-k logits, their ids and the log-normaliser of random teacher logits, never all N x V at once."""
    values, indices, normalizer = [], [], []
    for start in range(0, n, TEACHER_CHUNK):
        rows = min(TEACHER_CHUNK, n - start)
        teacher = 2 * torch.randn(rows, vocab, generator=generator, device=device, dtype=dtype)
        top = teacher.topk(top_k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
        normalizer.append(teacher.logsumexp(-1))
        del teacher
    return torch.cat(indices), torch.cat(values), torch.cat(normalizer)


def _head(hidden: int, vocab: int, generator, device, dtype) -> torch.nn.Linear:
    """A frozen output layer whose logits have about the spread of the other losses' (std 2)."""
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    head.weight.copy_(
        torch.randn(vocab, hidden, generator=generator, device=device, dtype=dtype) / hidden**0.5
    )
    return head


def _make_loss(
    name: str, student: torch.Tensor, vocab: int, top_k: int, generator: torch.Generator
) -> Callable[[], torch.Tensor]:
    """The loss as a closure over its inputs (created here, so they count towards the peak). ``student``:
    the logits ``N x V``, or for the losses with the output layer the hidden states ``N x H``."""
    n = student.shape[0]
    device, dtype = student.device, student.dtype
    if name in HEAD_LOSSES:
        head = _head(student.shape[-1], vocab, generator, device, dtype)
        if name.startswith("fw-topk"):
            indices, values, normalizer = _sparse_teacher(n, vocab, top_k, generator, device, dtype)
            if name == "fw-topk-fused":
                return lambda: fused_sparse_fisher_weighted_logit_matching(
                    student, head, indices, values, target_log_normalizer=normalizer
                )
            return lambda: sparse_fisher_weighted_logit_matching(
                head(student), indices, values, target_log_normalizer=normalizer
            )
        if name == "ce-head":
            labels = torch.randint(vocab, (n,), generator=generator, device=device)
            return lambda: F.cross_entropy(head(student), labels)
        teacher_head = _head(student.shape[-1], vocab, generator, device, dtype)
        teacher_hidden = 2 * torch.randn(student.shape, generator=generator, device=device, dtype=dtype)
        if name == "fw-fused":
            return lambda: fused_fisher_weighted_logit_matching(student, head, teacher_hidden, teacher_head)

        def unfused() -> torch.Tensor:
            with torch.no_grad():
                teacher = teacher_head(teacher_hidden)
            return fisher_weighted_logit_matching(head(student), teacher)

        return unfused
    if name == "ce":
        labels = torch.randint(vocab, (n,), generator=generator, device=device)
        return lambda: F.cross_entropy(student, labels)
    if name == "fw-topk":
        indices, values, normalizer = _sparse_teacher(n, vocab, top_k, generator, device, dtype)
        return lambda: sparse_fisher_weighted_logit_matching(
            student, indices, values, target_log_normalizer=normalizer
        )
    teacher = 2 * torch.randn(n, vocab, generator=generator, device=device, dtype=dtype)
    if name == "fw":
        return lambda: fisher_weighted_logit_matching(student, teacher)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return lambda: GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.5)


def measure(
    name: str, vocab: int, tokens: int, top_k: int, hidden: int, dtype: str, device: str, repeats: int
) -> dict:
    """Forward + backward of one loss on one shape; run in its own process (see module docstring)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    generator = torch.Generator(device).manual_seed(0)
    torch.ones(2, 2, device=device, requires_grad=True).logsumexp(-1).sum().backward()  # load kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()

    width = hidden if name in HEAD_LOSSES else vocab
    student = 2 * torch.randn(tokens, width, generator=generator, device=device, dtype=getattr(torch, dtype))
    student.requires_grad_(True)
    loss_fn = _make_loss(name, student, vocab, top_k, generator)

    # CPU time of this process, not wall time: on a shared CPU machine it does not count other tenants' load.
    clock = time.perf_counter if cuda else time.process_time

    def step() -> float:
        student.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        loss_fn().backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    step()  # warm-up
    times = [step() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {"time_s": statistics.median(times), "peak_bytes": peak - baseline}


def _run_isolated(name: str, vocab: int, tokens: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, str(vocab), str(tokens)]
    command += ["--top-k", str(args.top_k), "--hidden", str(args.hidden), "--dtype", args.dtype]
    command += ["--device", args.device]
    command += ["--repeats", str(args.repeats)]
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed, keeps later blocks in
    # its heap after they are freed, and the resident set then counts memory no tensor holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def _default_memory_limit_gb(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return 0.9 * free / 2**30
    with open("/proc/meminfo") as meminfo:
        available_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
    return 0.6 * available_kib / 2**20


def run_grid(args: argparse.Namespace) -> list[dict]:
    """Every (V, N, loss), smallest shapes first, skipping those estimated to exceed the memory limit."""
    results, bytes_per_element = [], {}
    for vocab, tokens in sorted(((v, n) for v in args.vocab for n in args.tokens), key=lambda s: s[0] * s[1]):
        for name in args.losses:
            row = {"vocab": vocab, "tokens": tokens, "loss": name}
            estimate = bytes_per_element.get(name, 0.0) * vocab * tokens
            if estimate > args.memory_limit_gb * 2**30:
                row["skipped"] = (
                    f"estimated peak {estimate / 2**30:.1f} GiB > --memory-limit-gb {args.memory_limit_gb:.1f}"
                )
            else:
                row.update(_run_isolated(name, vocab, tokens, args))
                if "peak_bytes" in row:
                    bytes_per_element[name] = max(
                        bytes_per_element.get(name, 0.0), row["peak_bytes"] / (vocab * tokens)
                    )
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    return results


# The unfused loss each fused one replaces.
UNFUSED = {"fw-fused": "fw-head", "fw-topk-fused": "fw-topk-head"}


def format_table(results: list[dict]) -> str:
    """Markdown table with time and peak memory, each also as a ratio to cross-entropy on the same inputs
    (``ce``, or ``ce-head`` for the losses with the output layer) and, for the fused losses, to the unfused
    loss they replace."""
    done = {(r["vocab"], r["tokens"], r["loss"]): r for r in results if "time_s" in r}
    lines = [
        "| vocab | tokens | loss | time (ms) | time / CE | peak (MiB) | peak / CE | time / unfused | peak / unfused |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(r: dict, other: dict | None, key: str) -> str:
        return f"{r[key] / other[key]:.2f}x" if other else "n/a"

    for r in results:
        head = f"| {r['vocab']} | {r['tokens']} | {r['loss']} |"
        if "time_s" not in r:
            lines.append(f"{head} {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        shape = (r["vocab"], r["tokens"])
        ce = done.get((*shape, "ce-head" if r["loss"] in HEAD_LOSSES else "ce"))
        unfused = done.get((*shape, UNFUSED[r["loss"]])) if r["loss"] in UNFUSED else None
        fused = (
            f"{ratio(r, unfused, 'time_s')} | {ratio(r, unfused, 'peak_bytes')}"
            if r["loss"] in UNFUSED
            else " | "
        )
        lines.append(
            f"{head} {1000 * r['time_s']:.0f} | {ratio(r, ce, 'time_s')} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{ratio(r, ce, 'peak_bytes')} | {fused} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--top-k", type=int, default=64, help="teacher logits stored per token by fw-topk")
    parser.add_argument(
        "--hidden", type=int, default=256, help="hidden size H of the losses with the output layer"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="default: 60%% of available RAM")
    parser.add_argument("--quick", action="store_true", help="V 32000, N 2048, 2 repeats: a smoke run")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "VOCAB", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.repeats = [32000], [2048], 2
    if args.memory_limit_gb is None and not args.worker:
        args.memory_limit_gb = _default_memory_limit_gb(args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        name, vocab, tokens = args.worker
        print(
            json.dumps(
                measure(
                    name,
                    int(vocab),
                    int(tokens),
                    args.top_k,
                    args.hidden,
                    args.dtype,
                    args.device,
                    args.repeats,
                )
            )
        )
        return 0
    print(
        f"device {args.device}, dtype {args.dtype}, top-k {args.top_k}, {args.repeats} repeats (median), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = run_grid(args)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
