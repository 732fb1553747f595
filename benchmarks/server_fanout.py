"""ME-ICPO through one vLLM OpenAI server against the same run spread over two.

Two local vLLM servers (the CPU build here, on 127.0.0.1) serve the same model; the same ME-ICPO
run (``run_method`` through ``--backend openai``) goes to the first alone, then to both, alternating,
``--repeats`` times after one warm-up each. Both variants sample the same texts (checked), so the
generated tokens are the same and the throughput ratio is the wall-time ratio.

What the figure shows: whether the driver keeps two servers busy (requests in flight on both, least
outstanding first) and what that buys on this machine. On a machine whose servers have their own
GPUs (or cores), the second server adds its compute; on a 2-core machine both servers share the same
two cores, so the ratio there measures the driver's fan-out overhead, not the gain of a second node.

The model is a small Llama built from scratch and taught to answer in \\boxed{} (see
benchmarks/me_icpo_calls.py); ``--hidden-size`` and ``--layers`` set its size.

    python benchmarks/server_fanout.py                    # 16 AIME questions, 2 rounds, k = 8, CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from me_icpo_calls import SHARED_DATA, build_model  # puts tests/ on the path, for vllm_server
from vllm_server import VLLMServer

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import Backend, BackendOptions
from icpo_infer.data import Problem, load_problems
from icpo_infer.icpo import run_method
from icpo_infer.infer_config import InferConfig


def measure(backend: Backend, problems: list[Problem], config: InferConfig) -> tuple[float, int, list]:
    """Wall seconds, generated tokens and the final texts of one run."""
    generated = backend.usage.generated_tokens
    start = time.perf_counter()
    results = run_method(backend, problems, config)
    wall = time.perf_counter() - start
    return wall, backend.usage.generated_tokens - generated, [r.final.texts for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=16, help="AIME 2024 questions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=8, help="k, entropy_k and final_k")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer and summary length")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    problems, _ = load_problems(SHARED_DATA / "aime2024.jsonl", limit=args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), [p.problem for p in problems], args.hidden_size, args.layers)
        servers = []
        try:
            for name in ("a", "b"):
                servers.append(VLLMServer(model_dir, Path(tmp) / f"{name}.log").start())
            config = InferConfig(
                model=str(model_dir), dataset="aime2024", output_dir=tmp, method="me-icpo",
                rounds=args.rounds, k=args.k, entropy_k=args.k, final_k=args.k, temperature=1.0, top_p=1.0,
                repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
                summary_max_tokens=args.max_new_tokens, context_length=2048, max_keep=1,
            )  # fmt: skip
            variants = {
                f"{count} server{'s' if count > 1 else ''}": make_backend(
                    "openai",
                    BackendOptions(
                        str(model_dir),
                        base_url=[s.url for s in servers[:count]],
                        max_concurrency=args.max_concurrency,
                    ),
                )
                for count in (1, 2)
            }
            runs: dict[str, list[tuple[float, int, list]]] = {name: [] for name in variants}
            for backend in variants.values():
                measure(backend, problems, config)  # warm-up: prefix caches and first-call kernels
            for _ in range(args.repeats):
                for name, backend in variants.items():
                    runs[name].append(measure(backend, problems, config))
        finally:
            for server in servers:
                server.stop()

    one, two = runs.values()
    assert one[-1][2] == two[-1][2], "one and two servers should sample the same texts"
    print(
        f"\nME-ICPO on {len(problems)} AIME questions, {args.rounds} rounds, k = entropy_k = final_k = {args.k}, "
        f"{args.max_new_tokens} new tokens, hidden size {args.hidden_size}, {args.layers} layers, "
        f"--max-concurrency {args.max_concurrency}; wall time: median of {args.repeats}"
    )
    print(f"{'':<12}{'generated tok':>15}{'wall s':>9}{'tok/s':>9}")
    throughput = {}
    for name, measured in runs.items():
        wall = statistics.median(m[0] for m in measured)
        throughput[name] = measured[-1][1] / wall
        print(f"{name:<12}{measured[-1][1]:>15}{wall:>9.2f}{throughput[name]:>9.1f}")
    print(f"throughput ratio, 2 servers / 1 server: {throughput['2 servers'] / throughput['1 server']:.2f}x")


if __name__ == "__main__":
    main()
