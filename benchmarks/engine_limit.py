"""ME-ICPO through vLLM against the engine's own limit and against the reference call pattern.

Three runs on one vLLM engine, in the same process, alternating:

- ours: ME-ICPO as ``icpo-infer run --backend vllm`` runs it, one engine call per phase;
- reference: the same algorithm with one engine call per prompt (the reference implementation's
  pattern: a call per question, per summary and per probe);
- limit: one saturated ``LLM.generate`` call that produces as many completions of the same mean
  length as ours did (``ignore_eos``, so every completion has that length), from the questions'
  prompts: what this engine on this machine can generate at best.

Ours is also split into time inside engine calls and time outside them (prompt rendering, grading,
voting: the framework's Python), and the prompt tokens of each run are printed: ME-ICPO's prompts
carry histories, so it processes more prompt tokens than the limit call. Last, the engine's
throughput for one sequence against the saturated call bounds what any call pattern can gain from
batching on the machine at hand.

The model is a small Llama built from scratch (tests/conftest.py's tokenizer; ``--hidden-size`` and
``--layers`` set its size) and taught to answer in \\boxed{} so that every phase has work.

    OMP_NUM_THREADS=2 python benchmarks/engine_limit.py            # 8 AIME questions, 3 rounds, k = 4, CPU
    python benchmarks/engine_limit.py --questions 30 --k 16 --hidden-size 1024 --layers 8   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from me_icpo_calls import SHARED_DATA, OneCallPerPrompt, build_model

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import Backend, BackendOptions, Generation, encode_prompt
from icpo_infer.data import Problem, load_problems
from icpo_infer.icpo import run_method
from icpo_infer.infer_config import InferConfig
from icpo_infer.prompts import answer_type_of, render_prompt


class Timed:
    """A backend that counts completions and the time spent inside its generation calls."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.tokenizer, self.usage = backend, backend.tokenizer, backend.usage
        self.completions, self.engine_seconds = 0, 0.0

    def generate(self, prompts, params, adapter=None) -> list[Generation]:
        start = time.perf_counter()
        generations = self.backend.generate(prompts, params, adapter)
        self.engine_seconds += time.perf_counter() - start
        self.completions += sum(len(g.completions) for g in generations)
        return generations

    def score(self, prompts, completions, adapter=None):
        return self.backend.score(prompts, completions, adapter)

    def release(self, adapter: str) -> None:
        self.backend.release(adapter)


def run_icpo(backend: Backend, problems: list[Problem], config: InferConfig) -> dict[str, float]:
    timed = Timed(backend)
    calls, prompt_tokens, generated = (
        backend.usage.engine_calls,
        backend.usage.prompt_tokens,
        backend.usage.generated_tokens,
    )
    start = time.perf_counter()
    run_method(timed, problems, config)
    return {
        "wall": time.perf_counter() - start,
        "engine": timed.engine_seconds,
        "calls": backend.usage.engine_calls - calls,
        "prompt_tokens": backend.usage.prompt_tokens - prompt_tokens,
        "generated": backend.usage.generated_tokens - generated,
        "completions": timed.completions,
    }


def run_limit(backend, problems: list[Problem], completions: int, length: int) -> dict[str, float]:
    """One call: ``completions`` completions of ``length`` tokens, spread over the questions' prompts."""
    import vllm

    prompts = [render_prompt(backend.tokenizer, p.problem, [], answer_type_of(p.answer)) for p in problems]
    n = math.ceil(completions / len(prompts))
    requests = [{"prompt_token_ids": encode_prompt(backend.tokenizer, prompt)} for prompt in prompts]
    sampling = vllm.SamplingParams(n=n, max_tokens=length, ignore_eos=True, seed=0)
    start = time.perf_counter()
    outputs = backend.llm.generate(requests, sampling, use_tqdm=False)
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "engine": wall,
        "calls": 1,
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in requests),
        "generated": sum(len(c.token_ids) for o in outputs for c in o.outputs),
        "completions": n * len(prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8, help="AIME 2024 questions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="k, entropy_k and final_k")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer and summary length")
    parser.add_argument("--max-keep", type=int, default=1, help="small, so that evictions happen")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto: float32 on a CPU, bf16 on a GPU")
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile the model (slow start)")
    args = parser.parse_args()

    problems, _ = load_problems(SHARED_DATA / "aime2024.jsonl", limit=args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), [p.problem for p in problems], args.hidden_size, args.layers)
        options = BackendOptions(
            model=str(model_dir),
            dtype=args.dtype,
            kv_cache_gb=args.kv_cache_gb,
            max_model_len=4096,
            enforce_eager=not args.compile,
        )
        backend = make_backend("vllm", options)
        config = InferConfig(
            model=str(model_dir), dataset="aime2024", output_dir=tmp, method="me-icpo", backend="vllm",
            rounds=args.rounds, k=args.k, entropy_k=args.k, final_k=args.k, temperature=1.0, top_p=1.0,
            repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
            summary_max_tokens=args.max_new_tokens, context_length=4096, max_keep=args.max_keep,
        )  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "reference": [], "limit": []}
        run_icpo(backend, problems, config)  # warm-up (kernels, prefix cache layout)
        for _ in range(args.repeats):
            runs["ours"].append(run_icpo(backend, problems, config))
            runs["reference"].append(run_icpo(OneCallPerPrompt(backend), problems, config))
            ours = runs["ours"][-1]
            length = max(1, round(ours["generated"] / ours["completions"]))
            runs["limit"].append(run_limit(backend, problems, ours["completions"], length))
        single = [run_limit(backend, problems[:1], 1, length) for _ in range(args.repeats)]
        backend.close()

    median = {name: statistics.median(r["wall"] for r in measured) for name, measured in runs.items()}
    print(
        f"\nME-ICPO through vLLM ({backend.llm.llm_engine.vllm_config.model_config.dtype}, "
        f"{'compiled' if args.compile else 'eager'}), {len(problems)} AIME questions, {args.rounds} rounds, "
        f"k = entropy_k = final_k = {args.k}, {args.max_new_tokens} new tokens, Llama hidden "
        f"{args.hidden_size} x {args.layers} layers; wall time: median of {args.repeats}"
    )
    print(
        f"{'':<12}{'calls':>7}{'prompt tok':>12}{'generated':>11}{'completions':>13}{'engine s':>10}{'wall s':>9}"
    )
    for name, measured in runs.items():
        last = measured[-1]
        engine = statistics.median(r["engine"] for r in measured)
        print(
            f"{name:<12}{last['calls']:>7}{last['prompt_tokens']:>12}{last['generated']:>11}"
            f"{last['completions']:>13}{engine:>10.2f}{median[name]:>9.2f}"
        )
    outside = statistics.median(r["wall"] - r["engine"] for r in runs["ours"])
    print(f"ours outside engine calls (rendering, grading, voting): {outside:.2f} s")
    saturated = runs["limit"][-1]["generated"] / median["limit"]
    alone = statistics.median(r["generated"] / r["wall"] for r in single)
    print(
        f"engine throughput: {alone:.0f} tokens/s for one sequence, {saturated:.0f} saturated "
        f"({saturated / alone:.1f}x: no call pattern gains more than this from batching on this machine)"
    )
    print(
        f"ME-ICPO / limit: {median['ours'] / median['limit']:.2f}x, "
        f"reference / ours: {median['reference'] / median['ours']:.2f}x"
    )


if __name__ == "__main__":
    main()
