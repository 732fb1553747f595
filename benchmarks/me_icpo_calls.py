"""Engine calls and wall time of ME-ICPO: our batched phases against the reference call pattern.

The reference implementation sends one engine call per summary and per probe; ours sends one call
per phase (sample, summarise, probe, evict, final) for all questions and candidates of the run.
Both variants run the same algorithm code (``icpo_infer.icpo.run_method``) through the same ``hf``
backend: the reference pattern is a thin backend wrapper that splits every batched call into one
call per prompt.

The model is built like tests/conftest.py's tiny model (locally trained tokenizer, random tiny
Llama) and then taught to answer in \\boxed{} (tests/boxed_model.py) so that every phase has work.
Wall time is the median of ``--repeats`` runs per variant, alternating, after one warm-up run each.

    python benchmarks/me_icpo_calls.py                   # 8 AIME questions, 3 rounds, k = entropy_k = final_k = 4
    python benchmarks/me_icpo_calls.py --questions 16 --k 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))  # the taught tiny model is a test fixture

from boxed_model import teach_boxed_answers  # noqa: E402

from icpo_infer.backends import make_backend, params_per_prompt  # noqa: E402
from icpo_infer.backends.base import Backend, BackendOptions, Generation, SamplingParams, Usage  # noqa: E402
from icpo_infer.data import Problem, load_problems  # noqa: E402
from icpo_infer.icpo import run_method  # noqa: E402
from icpo_infer.infer_config import InferConfig  # noqa: E402
from icpo_train.e2e.tiny_lm import init_tiny_llama, train_tokenizer  # noqa: E402


class OneCallPerPrompt:
    """The reference call pattern: every prompt of a batched call goes to the engine on its own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.usage = backend.usage

    def generate(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams], adapter: str | None = None
    ) -> list[Generation]:
        per_prompt = params_per_prompt(prompts, params)
        return [
            self.backend.generate([p], [sp], adapter)[0] for p, sp in zip(prompts, per_prompt, strict=True)
        ]


def build_model(directory: Path, questions: list[str], hidden_size: int = 32, num_layers: int = 2) -> Path:
    """conftest's tiny base model (or a larger one of its kind), saved, then taught to answer in \\boxed{}.

    Heads of 64 dimensions (32 at hidden size 32), which vLLM's CPU attention serves."""
    math500, _ = load_problems(SHARED_DATA / "math500.jsonl")
    texts = [f"{p.problem} The answer is \\boxed{{{p.answer}}}" for p in math500]
    tokenizer = train_tokenizer(texts, vocab_size=384)
    model = init_tiny_llama(
        tokenizer, hidden_size, num_layers, num_heads=max(1, hidden_size // 64), context_length=4096, seed=0
    )
    model.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    return teach_boxed_answers(directory / "base", directory / "boxed", questions)


def measure(backend: Backend, problems: list[Problem], config: InferConfig) -> dict[str, float]:
    before = Usage(**vars(backend.usage))
    start = time.perf_counter()
    results = run_method(backend, problems, config)
    wall = time.perf_counter() - start
    after = backend.usage
    return {
        "engine_calls": after.engine_calls - before.engine_calls,
        "prompt_tokens": after.prompt_tokens - before.prompt_tokens,
        "generated_tokens": after.generated_tokens - before.generated_tokens,
        "wall_time_s": wall,
        "mean@k": sum(r.metrics["mean"] for r in results) / len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8, help="AIME 2024 questions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="k, entropy_k and final_k")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer and summary length")
    parser.add_argument("--max-keep", type=int, default=1, help="small, so that evictions happen")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="hf backend batch budget")
    args = parser.parse_args()

    problems, _ = load_problems(SHARED_DATA / "aime2024.jsonl", limit=args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), [p.problem for p in problems])
        options = BackendOptions(
            model=str(model_dir), device=args.device, max_batch_tokens=args.max_batch_tokens
        )
        backend = make_backend("hf", options)
        config = InferConfig(
            model=str(model_dir),
            dataset="aime2024",
            output_dir=tmp,
            method="me-icpo",
            rounds=args.rounds,
            k=args.k,
            entropy_k=args.k,
            final_k=args.k,
            temperature=1.0,
            top_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=args.max_new_tokens,
            summary_max_tokens=args.max_new_tokens,
            context_length=4096,
            max_keep=args.max_keep,
            device=args.device,
        )
        variants = {"batched (ours)": backend, "one call per prompt (reference)": OneCallPerPrompt(backend)}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for engine in variants.values():
            measure(engine, problems, config)  # warm-up
        for _ in range(args.repeats):
            for name, engine in variants.items():
                runs[name].append(measure(engine, problems, config))

    print(
        f"\nME-ICPO on {len(problems)} AIME questions, {args.rounds} rounds, k = entropy_k = final_k = {args.k}, "
        f"{args.max_new_tokens} new tokens, hf backend on {args.device} (max_batch_tokens {args.max_batch_tokens}); "
        f"wall time: median of {args.repeats}"
    )
    print(f"{'':<32}{'engine calls':>14}{'prompt tok':>12}{'generated tok':>15}{'wall s':>9}{'mean@k':>8}")
    for name, measured in runs.items():
        last = measured[-1]
        wall = statistics.median(m["wall_time_s"] for m in measured)
        print(
            f"{name:<32}{last['engine_calls']:>14}{last['prompt_tokens']:>12}{last['generated_tokens']:>15}"
            f"{wall:>9.2f}{last['mean@k']:>8.3f}"
        )
    batched, reference = (statistics.median(m["wall_time_s"] for m in runs[name]) for name in variants)
    print(f"wall-time ratio, reference / batched: {reference / batched:.1f}x")


if __name__ == "__main__":
    main()
