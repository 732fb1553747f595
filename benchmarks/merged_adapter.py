"""A LoRA adapter on the vLLM engine: as a LoRA request against merged into the weights (``--merge-adapter``).

Both engines run the same seeded generation and scoring calls, alternating, in one process: the
prompts are a dataset's questions rendered as `icpo-infer run` renders them, each sampled ``--n``
times, then the samples scored. The adapter is a random LoRA of the model (attention and MLP, rank
16, B weights drawn so that it changes the outputs) unless ``--adapter`` names a trained one.
Printed: generated tokens per second of each, the ratio, and the engine start of each (the merged
one includes writing the merged weights).

    OMP_NUM_THREADS=2 python benchmarks/merged_adapter.py --model ~/.cache/icpo/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import Backend, BackendOptions, SamplingParams
from icpo_infer.data import load_problems
from icpo_infer.prompts import answer_type_of, render_prompt

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_adapter(model_dir: str, directory: Path) -> str:
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=16, target_modules=targets)
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=1e-3)
    model.save_pretrained(directory)
    return str(directory)


def timed_calls(
    backend: Backend, prompts: list[str], adapter: str, n: int, max_new_tokens: int
) -> tuple[int, float]:
    """Generated tokens and seconds of one generation call and one scoring call of its samples."""
    start = time.perf_counter()
    params = SamplingParams(n=n, temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens, seed=0)
    generations = backend.generate(prompts, params, adapter=adapter)
    texts = [(prompt, c.text) for prompt, g in zip(prompts, generations, strict=True) for c in g.completions]
    backend.score([p for p, _ in texts], [t for _, t in texts], adapter=adapter)
    tokens = sum(c.num_tokens for g in generations for c in g.completions)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--dataset", default=str(SHARED_DATA / "math500.jsonl"))
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter or random_adapter(args.model, Path(scratch) / "adapter")
        problems, _ = load_problems(args.dataset, limit=args.questions)
        common = {"model": args.model, "adapter": adapter, "dtype": args.dtype, "kv_cache_gb": 2.0}
        common |= {"enforce_eager": True, "max_model_len": 1024}
        engines, starts = {}, {}
        for name, merge in (("lora", False), ("merged", True)):
            start = time.perf_counter()
            engines[name] = make_backend("vllm", BackendOptions(**common, merge_adapter=merge))
            starts[name] = time.perf_counter() - start
        tokenizer = engines["lora"].tokenizer
        prompts = [render_prompt(tokenizer, p.problem, [], answer_type_of(p.answer)) for p in problems]
        totals = {name: [0, 0.0] for name in engines}
        for _ in range(args.repeats):  # alternating, so that a noisy phase of the machine hits both
            for name, backend in engines.items():
                tokens, seconds = timed_calls(backend, prompts, adapter, args.n, args.max_new_tokens)
                totals[name][0] += tokens
                totals[name][1] += seconds
        for name, (tokens, seconds) in totals.items():
            print(
                f"{name}: engine start {starts[name]:.0f} s, {tokens} tokens in {seconds:.1f} s, {tokens / seconds:.0f} tokens/s"
            )
        speed = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
        print(f"merged / lora throughput: {speed['merged'] / speed['lora']:.2f}x")
        for backend in engines.values():
            backend.close()


if __name__ == "__main__":
    main()
