"""Peak memory of one ICPO response-level training step against the group size G, memory-lean on and off.

Every configuration (G, memory_lean) runs in a fresh subprocess, so no measurement inherits another's
allocator state or peak. It builds an ``ICPOTrainer`` (LoRA, FW loss) on a randomly initialised Llama
made locally (a small digit tokenizer; the output layer padded to ``--vocab-size`` so the logits are
as large as a real model's), then times ``--steps`` calls of ``trainer.training_step`` (forward and
backward of the loss, no optimizer step) on one group of G responses of ``--response-tokens`` tokens
after a ``--prompt-tokens`` prompt. A group of 1 has zero FW loss but the same work per member; it is
the baseline here (the trainer itself skips such groups).

Peak memory is what the step adds on top of the loaded trainer after one warm-up step (model, adapter
and its gradients): on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
measured steps; on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
resident set at that moment. Goal: with memory_lean, G = 16 within 1.3x of G = 1.

    python benchmarks/response_memory.py                       # G in 1 4 16, lean on and off
    python benchmarks/response_memory.py --vocab-size 151936 --hidden-size 1024 --layers 8 \\
        --prompt-tokens 1024 --response-tokens 2048            # closer to Qwen2.5-Math on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from icpo_infer.backends.base import encode_completion
from icpo_train.e2e.tiny_lm import init_tiny_llama, train_tokenizer
from icpo_train.icpo_config import ICPOConfig
from icpo_train.trainer import ICPOTrainer
from icpo_train.trajectory_data import tokenizer_fingerprint


def build_model(directory: Path, args: argparse.Namespace) -> None:
    tokenizer = train_tokenizer(["0123456789 " * 10], vocab_size=300)
    context = args.prompt_tokens + args.response_tokens + 64
    model = init_tiny_llama(tokenizer, args.hidden_size, args.layers, args.heads, context, seed=0)
    model.resize_token_embeddings(args.vocab_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def one_small_group(tokenizer) -> Dataset:
    """A valid one-row trajectory dataset: what ICPOTrainer needs to be built (it is not measured)."""
    responses = ["1", "2"]
    row = {
        "question_id": "0",
        "question": "0",
        "answer": "0",
        "answer_type": "integer",
        "round": 1,
        "history": [],
        "responses": responses,
        "ref_logps": [-1.0, -1.0],
        "ref_num_tokens": [len(encode_completion(tokenizer, r)) for r in responses],
        "response_answers": [None, None],
        "gold_rewards": [0, 0],
        "icl_rewards": [0.0, 0.0],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    return Dataset.from_list([row])


def group_batch(trainer: ICPOTrainer, group_size: int, args: argparse.Namespace) -> dict:
    """One row with G random responses, collated exactly as training batches are."""
    generator = torch.Generator().manual_seed(0)
    vocab = len(trainer.processing_class)

    def tokens(count: int) -> list[int]:
        return torch.randint(vocab, (count,), generator=generator).tolist()

    feature = {
        "prompt_ids": tokens(args.prompt_tokens),
        "completion_ids": [tokens(args.response_tokens) for _ in range(group_size)],
        "ref_logps": (-2.3 * args.response_tokens + torch.randn(group_size, generator=generator)).tolist(),
        "icl_rewards": torch.randint(-1, 2, (group_size,), generator=generator).float().tolist(),
        "gold_rewards": [0] * group_size,
        "question_id": "0",
        "round": 2,
    }
    return trainer.data_collator([feature])


def _memory_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def benchmark_trainer(model_dir: Path, device: str, **options) -> ICPOTrainer:
    """An ICPOTrainer with LoRA r=16 on ``model_dir`` (bf16 on CUDA), its data built in memory."""
    cuda = device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as output_dir:
        config = ICPOConfig(
            output_dir=output_dir,
            model_name_or_path=str(model_dir),
            trajectories="(in memory)",
            lora_r=16,
            lora_dropout=0.0,
            bf16=cuda,
            use_cpu=not cuda,
            report_to="none",
            **options,
        )
        return ICPOTrainer(config, train_dataset=one_small_group(tokenizer))


def time_steps(trainer: ICPOTrainer, batch: dict, device: str, steps: int, clock) -> tuple[list[float], int]:
    """``steps`` training steps on ``batch`` after one warm-up: each one's time by ``clock`` and the peak
    memory they add (CUDA allocations, or the process's resident set on a CPU)."""
    cuda = device == "cuda"
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here

    def step() -> float:
        trainer.model.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        trainer.training_step(trainer.model, batch)
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    step()  # warm-up: gradient buffers, kernels
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        baseline = _memory_bytes("VmRSS")
    times = [step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else _memory_bytes("VmHWM")
    return times, peak - baseline


def measure(model_dir: Path, group_size: int, lean: bool, args: argparse.Namespace) -> dict:
    """Training steps in this process and the peak memory they add (see module docstring)."""
    trainer = benchmark_trainer(model_dir, args.device, memory_lean=lean)
    batch = group_batch(trainer, group_size, args)
    times, peak = time_steps(trainer, batch, args.device, args.steps, time.perf_counter)
    return {
        "group_size": group_size,
        "memory_lean": lean,
        "peak_bytes": peak,
        "step_time_s": statistics.median(times),
    }


def run_isolated(model_dir: Path, group_size: int, lean: bool, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        *args.argv,
        "--worker",
        str(model_dir),
        str(group_size),
        str(int(lean)),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"group_size": group_size, "memory_lean": lean, "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    """Markdown table: peak memory and step time, each also relative to G = 1 in the same mode."""
    base = {r["memory_lean"]: r for r in results if r["group_size"] == 1 and "peak_bytes" in r}
    lines = [
        "| memory_lean | G | peak (MiB) | peak / G=1 | step time (s) | time / G=1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = f"| {'on' if r['memory_lean'] else 'off'} | {r['group_size']} |"
        if "peak_bytes" not in r:
            lines.append(f"{head} {r['error']} | | | |")
            continue
        one = base.get(r["memory_lean"])
        peak_ratio = f"{r['peak_bytes'] / one['peak_bytes']:.2f}x" if one else "n/a"
        time_ratio = f"{r['step_time_s'] / one['step_time_s']:.2f}x" if one else "n/a"
        lines.append(
            f"{head} {r['peak_bytes'] / 2**20:.0f} | {peak_ratio} | {r['step_time_s']:.2f} | {time_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="measured training steps (after one warm-up)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        model_dir, group_size, lean = args.worker
        print(json.dumps(measure(Path(model_dir), int(group_size), lean == "1", args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(Path(model_dir), args)
        for lean in (True, False):
            for group_size in args.group_sizes:
                row = run_isolated(Path(model_dir), group_size, lean, args)
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    print(format_table(results))
    lean = {r["group_size"]: r["peak_bytes"] for r in results if r["memory_lean"] and "peak_bytes" in r}
    if 1 in lean and max(lean) > 1:
        largest = max(lean)
        ratio = lean[largest] / lean[1]
        print(f"\nmemory_lean: peak at G={largest} is {ratio:.2f}x the peak at G=1 (goal: within 1.3x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
