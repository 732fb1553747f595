"""Does a model read the reward tags of its history? A screening probe that costs minutes.

    python -m icpo_train.e2e.history_probe --model DIR [--adapter ADAPTER_DIR ...] --questions FILE.jsonl \\
        [--templates recipes/e2e/smollm2_templates.yaml] [--limit N] [--k 4] [--max-new-tokens 64] \\
        [--seed 0] [--json OUT.json]

Any model directory (or Hub id) and any of its LoRA adapters: the model is loaded once on the hf backend
and every adapter runs on it; the base model is always probed, as ``base``. The questions are the first
``--limit`` rows of a JSONL file with fields id, problem, answer. Prompts are rendered as inference
renders them (``icpo_infer.prompts.render_prompt``, the answer type from the gold answer), answers read
by ``icpo_infer.grading``.

The histories come from the base model: it samples k responses per question without history (seeded).
A response y with an extracted answer becomes a one-entry history as ME-ICPO without summaries shows
it, ``Attempt(text=y, answer=its answer, reward)``. Per model:

- tag discrimination (teacher-forced): log p(y | history y tagged reward 1) - log p(y | history y tagged
  reward 0), the same y as the answer, summed over its tokens (EOS included), in nats; the mean over
  every (question, response with an answer), and split by whether y's answer is right or wrong. A model
  that reads the tags repeats what was rewarded: positive. Under gold tags a right answer is shown
  tagged 1 and a wrong one tagged 0, and a good in-context optimizer repeats the first and leaves the
  second: positive in both splits;
- log p(gold): the model's log-probability, with no history, of ``--gold-completion`` (default "The
  final answer is {gold}."), mean over questions, in nats;
- sampled with no history (k samples per question, the same seeds for every model): the share of
  samples with an answer, the share of right ones, and their mean length in tokens (EOS included).

One table, a row per model; ``--json`` writes {model: {tag_discrimination, tag_discrimination_right,
tag_discrimination_wrong, logp_gold_no_history, answer_rate, accuracy, mean_tokens, questions,
seconds, pairs_right, pairs_wrong}} (null where no response had an answer of that kind). ``seconds``
is each model's own sampling and scoring, the model load aside. Each phase is one batched engine call.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import Backend, BackendOptions, SamplingParams, adapter_problem
from icpo_infer.config import ConfigError, check
from icpo_infer.data import Problem, load_problems
from icpo_infer.grading import extract_answer, is_equivalent
from icpo_infer.prompts import Attempt, PromptTemplates, answer_type_of, render_prompt
from icpo_infer.report import run_labels
from icpo_infer.results import write_json_atomic

GOLD_COMPLETION = "The final answer is {gold}."
METRICS = (  # JSON key, table heading, format
    ("tag_discrimination", "tag disc.", "{:+.3f}"),
    ("tag_discrimination_right", "disc. right", "{:+.3f}"),
    ("tag_discrimination_wrong", "disc. wrong", "{:+.3f}"),
    ("logp_gold_no_history", "logp gold", "{:.3f}"),
    ("answer_rate", "answered", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("mean_tokens", "tokens", "{:.1f}"),
    ("questions", "questions", "{}"),
    ("seconds", "seconds", "{:.1f}"),
)


@dataclass
class _Entry:
    """One base response with an answer: the history entry shown and the completion scored."""

    text: str
    answer: str
    right: bool


def model_names(adapters: Sequence[str]) -> dict[str, str | None]:
    """Model name -> adapter path (None: the base model). An adapter is named as `icpo-infer compare`
    labels runs (its directory's name, or the path where names repeat), and by its path when that is
    "base"."""
    labels = [
        str(adapter) if label == "base" else label
        for label, adapter in zip(run_labels(adapters), adapters, strict=True)
    ]
    names: dict[str, str | None] = {"base": None, **dict(zip(labels, adapters, strict=True))}
    check(len(names) == len(adapters) + 1, f"--adapter: an adapter is given twice in {list(adapters)}.")
    return names


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe(
    model: str,
    questions: str | Path | Sequence[Problem],
    adapters: Sequence[str] = (),
    *,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    **settings: Any,
) -> dict[str, dict[str, float | int | None]]:
    """model name ("base", then each adapter) -> its figures (see the module docstring).

    ``questions``: a JSONL file (or any ``load_problems`` source) or the problems themselves; the first
    ``limit`` are probed. ``settings``: :func:`probe_backend`'s options (templates, k, sampling, the gold
    completion, a progress ``log``).
    """
    for adapter in adapters:
        problem = adapter_problem(adapter)
        check(problem is None, f"--adapter: '{adapter}' {problem}.")
    names = model_names(adapters)
    if isinstance(questions, (str, Path)):
        problems = load_problems(questions, limit=limit)[0]
    else:
        problems = list(questions)[:limit]
    check(bool(problems), "--questions: no questions to probe.")
    backend = make_backend("hf", BackendOptions(model=model, device=device, dtype=dtype))
    try:
        return probe_backend(backend, problems, names, **settings)
    finally:
        backend.close()


def probe_backend(
    backend: Backend,
    problems: Sequence[Problem],
    names: dict[str, str | None],
    *,
    templates: PromptTemplates | None = None,
    k: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    gold_completion: str = GOLD_COMPLETION,
    log=None,
) -> dict[str, dict[str, float | int | None]]:
    """:func:`probe` on a loaded backend; ``names``: model name -> adapter (None: base, probed first)."""
    check(k >= 1, f"--k: {k} is invalid; use k >= 1.")
    check(names.get("base", 0) is None, "the probe needs the base model, named 'base', among its models.")
    tokenizer = backend.tokenizer
    types = [answer_type_of(p.answer) for p in problems]
    bare = [
        render_prompt(tokenizer, p.problem, [], t, templates) for p, t in zip(problems, types, strict=True)
    ]
    gold = [gold_completion.replace("{gold}", p.answer) for p in problems]
    params = SamplingParams(
        n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
    )

    entries: list[_Entry] = []
    tagged: list[str] = []  # per entry: its prompt tagged reward 1, then tagged reward 0
    table: dict[str, dict[str, float | int | None]] = {}
    for name, adapter in sorted(names.items(), key=lambda item: item[1] is not None):
        start = time.perf_counter()
        generations = backend.generate(bare, params, adapter=adapter)
        samples = [c for g in generations for c in g.completions]
        answers = [[extract_answer(c.text) for c in g.completions] for g in generations]
        if adapter is None:  # the base model's responses are every model's histories
            for i, (problem, generation, row) in enumerate(zip(problems, generations, answers, strict=True)):
                for completion, answer in zip(generation.completions, row, strict=True):
                    if answer is None:
                        continue
                    entries.append(_Entry(completion.text, answer, is_equivalent(answer, problem.answer)))
                    for reward in (1, 0):
                        history = [Attempt(completion.text, answer, reward)]
                        tagged.append(render_prompt(tokenizer, problem.problem, history, types[i], templates))
        scores = backend.score(tagged, [e.text for e in entries for _ in (1, 0)], adapter=adapter)
        differences = [scores[2 * n].logprob - scores[2 * n + 1].logprob for n in range(len(entries))]
        gold_scores = backend.score(bare, gold, adapter=adapter)
        seconds = time.perf_counter() - start
        if adapter is not None:
            backend.release(adapter)
        answered = [a for row in answers for a in row if a is not None]
        right = [is_equivalent(a, p.answer) for p, row in zip(problems, answers, strict=True) for a in row]
        by_kind = {True: [], False: []}  # is the response's answer right
        for difference, entry in zip(differences, entries, strict=True):
            by_kind[entry.right].append(difference)
        table[name] = {
            "tag_discrimination": _mean(differences),
            "tag_discrimination_right": _mean(by_kind[True]),
            "tag_discrimination_wrong": _mean(by_kind[False]),
            "logp_gold_no_history": _mean([s.logprob for s in gold_scores]),
            "answer_rate": len(answered) / len(samples),
            "accuracy": sum(right) / len(samples),
            "mean_tokens": _mean([c.num_tokens for c in samples]),
            "questions": len(problems),
            "seconds": seconds,
            "pairs_right": sum(e.right for e in entries),
            "pairs_wrong": sum(not e.right for e in entries),
        }
        if log is not None:
            log(f"{name}: {seconds:.1f} s")
    return table


def format_table(table: dict[str, dict[str, float | int | None]]) -> str:
    """One row per model; '-' where a figure has no responses to average."""
    width = max(len("model"), *map(len, table)) + 1
    columns = [max(len(heading), 9) + 2 for _, heading, _ in METRICS]
    lines = [
        f"{'model':<{width}}"
        + "".join(f"{heading:>{c}}" for (_, heading, _), c in zip(METRICS, columns, strict=True))
    ]
    for name, row in table.items():
        cells = [
            "-" if row[key] is None else fmt.format(row[key])
            for (key, _, fmt), c in zip(METRICS, columns, strict=True)
        ]
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{c}}" for v, c in zip(cells, columns, strict=True)))
    pairs = next(iter(table.values()))
    lines.append(
        f"tag discrimination: nats, over {pairs['pairs_right']} right and {pairs['pairs_wrong']} wrong "
        "base responses with an answer; logp gold: nats; answered, accuracy, tokens: k samples, no history"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m icpo_train.e2e.history_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Base model directory (or Hub id).")
    parser.add_argument(
        "--adapter",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADAPTER_DIR",
        help="LoRA adapters of --model to probe beside it (repeat the flag or list them).",
    )
    parser.add_argument("--questions", required=True, help="JSONL file with fields id, problem, answer.")
    parser.add_argument("--templates", default=None, help="Prompt wording (YAML); default: the built-in one.")
    parser.add_argument("--limit", type=int, default=None, help="Probe the first N questions (default: all).")
    parser.add_argument(
        "--k", type=int, default=4, help="Base responses (histories) and samples per question."
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default: 1).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (default: 1, off).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gold-completion",
        default=GOLD_COMPLETION,
        help="The text scored for log p(gold); {gold} is replaced by the gold answer (default: %(default)r).",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: cpu).")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on a CPU), float32, bfloat16, float16.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    try:
        templates = PromptTemplates.from_yaml(args.templates) if args.templates else None
        start = time.perf_counter()
        table = probe(
            args.model,
            args.questions,
            args.adapter,
            templates=templates,
            limit=args.limit,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            gold_completion=args.gold_completion,
            device=args.device,
            dtype=args.dtype,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ConfigError as error:  # a bad path, adapter or templates file: one line, not a traceback
        parser.error(str(error))
    print(format_table(table))
    print(f"wall time {time.perf_counter() - start:.1f} s (model load included)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
