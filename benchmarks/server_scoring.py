"""Scoring through a vLLM OpenAI server: every request in flight at once against one at a time.

One local vLLM server (the CPU build here, on 127.0.0.1, started WITHOUT LoRA: with LoRA the CPU build
needs ``--score-concurrency 1``) serves a small Llama; the same ``score()`` call (``--pairs`` prompt and
completion pairs, as best-of-n and the trajectories' groups send them) goes through ``--backend openai``
with ``score_concurrency`` unset (as many requests as ``--max-concurrency``) and set to 1, alternating,
``--repeats`` times after one warm-up each. Both give the same scores (checked).

    python benchmarks/server_scoring.py                   # 64 pairs, CPU
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
from icpo_infer.backends.base import BackendOptions, SamplingParams
from icpo_infer.data import load_problems
from icpo_infer.prompts import answer_type_of, render_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="prompt and completion pairs per call")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    problems, _ = load_problems(SHARED_DATA / "aime2024.jsonl", limit=args.pairs // 4)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), [p.problem for p in problems], args.hidden_size, args.layers)
        server = VLLMServer(model_dir, Path(tmp) / "server.log", lora=False).start()
        try:
            variants = {
                name: make_backend(
                    "openai",
                    BackendOptions(
                        str(model_dir),
                        base_url=[server.url],
                        max_concurrency=args.max_concurrency,
                        score_concurrency=cap,
                    ),
                )
                for name, cap in (("concurrent", None), ("one at a time", 1))
            }
            tokenizer = variants["concurrent"].tokenizer
            prompts = [render_prompt(tokenizer, p.problem, [], answer_type_of(p.answer)) for p in problems]
            params = SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=0)
            generations = variants["concurrent"].generate(prompts, params)
            pairs = [
                (prompt, c.text)
                for prompt, g in zip(prompts, generations, strict=True)
                for c in g.completions
            ]
            walls: dict[str, list[float]] = {name: [] for name in variants}
            scores = {}
            for backend in variants.values():  # warm-up
                backend.score([p for p, _ in pairs], [t for _, t in pairs])
            for _ in range(args.repeats):
                for name, backend in variants.items():
                    start = time.perf_counter()
                    scores[name] = backend.score([p for p, _ in pairs], [t for _, t in pairs])
                    walls[name].append(time.perf_counter() - start)
        finally:
            server.stop()
    assert scores["concurrent"] == scores["one at a time"], "the cap must not change the scores"
    print(
        f"\nscore() of {len(pairs)} pairs through one CPU vLLM server without LoRA; median of {args.repeats}"
    )
    for name, measured in walls.items():
        print(f"{name:<14}{statistics.median(measured):>8.2f} s")
    ratio = statistics.median(walls["one at a time"]) / statistics.median(walls["concurrent"])
    print(f"concurrent scoring is {ratio:.2f}x as fast as one request at a time")


if __name__ == "__main__":
    main()
