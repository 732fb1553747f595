"""ME-ICPO (Minimum-Entropy In-Context Policy Optimization) and its baselines.

Every question keeps a chronological history of attempt summaries, each tagged reward 1 or 0
(:func:`icpo_infer.prompts.render_prompt` shows them as two buckets). A round samples ``k``
responses, labels them against the majority answer (or the gold answer), summarises the candidates,
picks one to append (minimum answer entropy of a probe for ``me-icpo``, at random for
``random-icpo``) and trims an overfull bucket. After the last round ``final_k`` responses are
sampled from the final prompt.

Each phase is ONE backend call over all questions of a chunk and all their candidates, so the
number of engine calls per round does not grow with the number of questions or with ``k``.
Randomness on our side comes from a per-question generator seeded by the run seed and the question
id; each engine call carries a seed derived from the run seed and the phase, and the backends draw a
prompt's samples from that seed and the prompt alone. A question's results therefore do not depend
on the questions run with it: any ``batch_questions`` and a resumed run reproduce them.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from icpo_infer.backends import BACKENDS
from icpo_infer.backends.base import (
    Backend,
    Generation,
    SamplingParams,
    adapter_problem,
    derive_seed,
    encode_prompt,
)
from icpo_infer.config import ConfigError, check, option
from icpo_infer.data import Problem
from icpo_infer.grading import equivalence_classes, extract_answer, is_equivalent, vote
from icpo_infer.prompts import (
    Attempt,
    PromptTemplates,
    answer_type_of,
    render_prompt,
    render_summary_prompt,
)

logger = logging.getLogger(__name__)

METHODS = ("single", "majority", "random-icpo", "me-icpo")
REWARDS = ("self", "gt")


@dataclass
class InferConfig:
    """Everything `icpo-infer run` takes; recipes in recipes/infer/ set these fields."""

    model: str = field(metadata={"help": "Model path or Hub id."})
    dataset: str = field(
        metadata={"help": "Local .json/.jsonl/.parquet file, a Hub dataset id, or aime24, amc, math500."}
    )
    output_dir: str = field(metadata={"help": "Where results.jsonl, metrics.json and the plot go."})
    adapter: str | None = option(None, "LoRA adapter path to apply to the model.")
    split: str | None = option(None, "Dataset split (Hub datasets).")
    limit: int | None = option(None, "Only the first N questions.")
    problem_field: str = option("problem", "Dataset field holding the question.")
    answer_field: str = option("answer", "Dataset field holding the gold answer.")
    id_field: str = option("id", "Dataset field holding the question id (row index when absent).")
    skip_invalid: bool = option(False, "Skip (and count) rows without a problem or answer.")
    method: str = option("me-icpo", f"One of {', '.join(METHODS)}.")
    reward: str = option("self", "self: majority-vote pseudo-reward; gt: ground-truth reward (ablation).")
    rounds: int = option(3, "Rounds of in-context refinement.")
    k: int = option(16, "Responses sampled per question and round (single/majority: the samples).")
    entropy_k: int = option(16, "Responses sampled per probe prompt to score a candidate's entropy.")
    final_k: int = option(16, "Responses sampled from the final prompt (mean@k, maj@k, pass@k).")
    temperature: float = option(0.6, "Sampling temperature for answers and probes.")
    top_p: float = option(0.95, "Nucleus sampling threshold.")
    top_k: int = option(0, "Top-k filter (0: off).")
    repetition_penalty: float = option(1.1, "Repetition penalty (1: off).")
    max_new_tokens: int = option(5000, "Answer length: at most this many new tokens per response.")
    context_length: int = option(8192, "Prompt + response budget; history is trimmed to fit.")
    summary: bool = option(True, "Summarise candidates (--no-summary: use the truncated response).")
    summary_max_tokens: int = option(500, "Summary length in tokens (also the truncation without summaries).")
    summary_temperature: float = option(0.05, "Sampling temperature of the summaries.")
    entropy_penalty: bool = option(True, "Add log2(entropy_k) * invalid fraction to a probe's entropy.")
    epsilon: float = option(0.0, "me-icpo: probability of picking a random candidate instead.")
    max_keep: int = option(5, "Most entries per bucket; an overfull bucket evicts one.")
    templates: str | None = option(None, "YAML file overriding the prompt wording.")
    seed: int = option(0, "Seed of every random choice and every sampling request.")
    backend: str = option("hf", f"One of {', '.join(BACKENDS)}.")
    dtype: str = option("auto", "Model dtype (auto: bf16 where supported).")
    device: str = option("auto", "hf backend device.")
    max_batch_tokens: int = option(16384, "hf backend: token budget of one generation batch.")
    tensor_parallel_size: int = option(1, "vllm backend: tensor parallel size.")
    data_parallel_size: int = option(1, "vllm backend: data parallel size.")
    gpu_memory_utilization: float = option(0.9, "vllm backend: fraction of GPU memory to use.")
    kv_cache_gb: float | None = option(
        None,
        "vllm backend: GiB of KV cache (default: what --gpu-memory-utilization leaves on a GPU, 4 on a CPU).",
    )
    enforce_eager: bool = option(
        False, "vllm backend: no torch.compile or CUDA graphs: the engine starts in seconds, decodes slower."
    )
    trust_remote_code: bool = option(False, "Run the model repository's own code (only for repos you trust).")
    batch_questions: int = option(
        64,
        "Questions per chunk; an interrupted run loses at most one chunk. The samples do not depend on it.",
    )
    overwrite: bool = option(False, "Start over in an output dir that holds results.")

    def __post_init__(self) -> None:
        check(self.method in METHODS, f"method '{self.method}' is unknown; use one of {', '.join(METHODS)}.")
        check(
            self.backend in BACKENDS,
            f"backend '{self.backend}' is unknown; use one of {', '.join(BACKENDS)}.",
        )
        check(self.reward in REWARDS, f"reward '{self.reward}' is unknown; use one of {', '.join(REWARDS)}.")
        for name in (
            "rounds",
            "k",
            "entropy_k",
            "final_k",
            "max_new_tokens",
            "context_length",
            "summary_max_tokens",
            "max_keep",
            "batch_questions",
        ):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; use {name} >= 1.")
        check(
            self.limit is None or self.limit >= 1,
            f"limit={self.limit} is invalid; use limit >= 1 or leave it out.",
        )
        check(
            self.method != "me-icpo" or self.entropy_k >= 2,
            f"entropy_k={self.entropy_k}: one probe sample always has entropy 0; use entropy_k >= 2 for me-icpo.",
        )
        check(0 <= self.epsilon <= 1, f"epsilon={self.epsilon} is invalid; use 0 <= epsilon <= 1.")
        for summary in (False, True):  # SamplingParams validates the sampling fields
            self.sampling(n=1, max_new_tokens=1, seed=0, summary=summary)
        if self.templates is not None:  # a bad templates file fails now, not after the model loads
            PromptTemplates.from_yaml(self.templates)
        problem = adapter_problem(self.adapter)
        check(
            problem is None,
            f"adapter '{self.adapter}' {problem}; --adapter takes a LoRA adapter of --model (a fully "
            "fine-tuned model goes in --model, and --adapter is left out).",
        )

    @property
    def iterative(self) -> bool:
        """Whether the method refines over rounds (the ICPO methods) or only samples (baselines)."""
        return self.method.endswith("icpo")

    @property
    def eval_k(self) -> int:
        """How many samples mean@k, maj@k and pass@k are taken over."""
        return self.final_k if self.iterative else self.k

    def sampling(self, n: int, max_new_tokens: int, seed: int, summary: bool = False) -> SamplingParams:
        """Sampling parameters of one request (summaries use their own temperature)."""
        try:
            return SamplingParams(
                n=n,
                temperature=self.summary_temperature if summary else self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_new_tokens=max_new_tokens,
                repetition_penalty=self.repetition_penalty,
                seed=seed,
            )
        except ValueError as err:
            options = (
                f"--{'summary-' if summary else ''}temperature, --top-p, --top-k or --repetition-penalty"
            )
            raise ConfigError(f"{err} (set by {options})") from err


# Options that change how a run executes but not what it measures: a run may resume with new values.
RUN_ONLY_FIELDS = frozenset(
    {
        "limit",
        "skip_invalid",
        "output_dir",
        "overwrite",
        "batch_questions",
        "device",
        "max_batch_tokens",
        "tensor_parallel_size",
        "data_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_gb",
        "enforce_eager",
    }
)


@dataclass
class Samples:
    """Responses to one prompt, graded against the gold answer."""

    texts: list[str]
    answers: list[str | None]
    correct: list[bool]
    majority: str | None  # majority answer over equivalence classes (None: no valid answer)
    majority_correct: bool

    @property
    def mean(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass
class RoundRecord:
    """One round of one question, as results.jsonl stores it."""

    round: int
    history: list[Attempt]  # the history this round's prompt showed
    samples: Samples
    pseudo_label: str | None  # what rewards compare to: the majority (reward self) or the gold (gt)
    rewards: list[int | None]  # per sample; None: no valid answer, so not a candidate
    summaries: list[str | None]  # per sample: its history text (None: not a candidate)
    entropies: list[float | None]  # per sample: probe score (None: not probed)
    chosen: int | None = None  # index of the sample appended to the history
    chosen_summary: str | None = None
    evicted: Attempt | None = None
    eviction_entropies: list[float] = field(default_factory=list)  # probe score without each bucket entry

    def candidates(self) -> list[int]:
        """Samples with a valid answer: only they get a reward and may enter the history."""
        return [j for j, reward in enumerate(self.rewards) if reward is not None]

    def attempt(self, j: int) -> Attempt:
        return Attempt(text=self.summaries[j], answer=self.samples.answers[j], reward=self.rewards[j])


@dataclass
class QuestionResult:
    """Everything one question went through; one line of results.jsonl."""

    id: str
    problem: str
    answer: str
    answer_type: str
    method: str
    rounds: list[RoundRecord]
    history: list[Attempt]  # what the final prompt showed
    final: Samples
    metrics: dict[str, Any]  # mean, maj, pass of the final samples; mean_per_round, maj_per_round


def answer_entropy(answers: Sequence[str | None], invalid_penalty: bool = True) -> float:
    """Shannon entropy (bits) of the answers' equivalence classes; lower means more consistent.

    Invalid answers are left out of the distribution and, with ``invalid_penalty``, cost
    log2(n) per unit of invalid fraction; all invalid scores 5 * log2(n), worse than any mix.
    """
    n = len(answers)
    valid = [label for label in equivalence_classes(answers) if label is not None]
    if not valid:
        return 5 * math.log2(n)
    entropy = sum(c / len(valid) * math.log2(len(valid) / c) for c in Counter(valid).values())
    if invalid_penalty:
        entropy += math.log2(n) * (n - len(valid)) / n
    return entropy


@dataclass
class _Question:
    problem: Problem
    answer_type: str
    rng: random.Random
    history: list[Attempt] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    final: Samples | None = None


def _grade(generation: Generation, q: _Question) -> Samples:
    """The question's responses with their answers, correctness and majority (ties: the question's rng)."""
    texts = [c.text for c in generation.completions]
    answers = [extract_answer(text) for text in texts]
    gold = q.problem.answer
    voted = vote(answers, q.rng)
    majority = voted[0] if voted else None
    return Samples(
        texts=texts,
        answers=answers,
        correct=[is_equivalent(answer, gold) for answer in answers],
        majority=majority,
        majority_correct=is_equivalent(majority, gold),
    )


class _Run:
    """Questions through one method, a chunk at a time; each phase is one backend call."""

    def __init__(self, backend: Backend, config: InferConfig) -> None:
        self.backend = backend
        self.config = config
        self.tokenizer = backend.tokenizer
        self.templates = PromptTemplates.from_yaml(config.templates) if config.templates else None
        self.progress: tqdm | None = None  # one step per phase, set by run_method

    # -- prompts and engine calls -------------------------------------------------------------

    def prompt_tokens(self, prompt: str) -> int:
        return len(encode_prompt(self.tokenizer, prompt))

    def fit(self, q: _Question, history: Sequence[Attempt]) -> tuple[str, list[Attempt], int]:
        """Render question + history, dropping the oldest entries until the prompt fits the context.

        Returns the prompt, the history it shows and the room left for new tokens.
        """
        history = list(history)
        dropped = 0
        while True:
            prompt = render_prompt(self.tokenizer, q.problem.problem, history, q.answer_type, self.templates)
            room = self.config.context_length - self.prompt_tokens(prompt)
            if room >= 1 or not history:
                break
            history.pop(0)
            dropped += 1
        if dropped:
            logger.warning(
                "question %s: prompt overflows context_length=%d; dropped the %d oldest history entries",
                q.problem.id,
                self.config.context_length,
                dropped,
            )
        return prompt, history, room

    def generate(
        self, phase: str, requests: list[tuple[_Question, str, int]], n: int, summary: bool = False
    ) -> list[Generation]:
        """ONE engine call for a whole phase: ``n`` samples for each (question, prompt, room) request.

        The seed derives from the run seed and the phase; the backends draw each prompt's samples
        from (seed, prompt) alone, so a question samples the same whatever else is in flight: in any
        chunk of ``batch_questions`` and in a resumed run.
        """
        self.progress.set_postfix_str(phase)
        generations = []
        if requests:
            seed = derive_seed(self.config.seed, phase)
            limit = self.config.summary_max_tokens if summary else self.config.max_new_tokens
            params = [self.config.sampling(n, min(limit, room), seed, summary) for _, _, room in requests]
            # The run's adapter on every call, so one loaded backend can evaluate several adapters.
            prompts = [prompt for _, prompt, _ in requests]
            generations = self.backend.generate(prompts, params, adapter=self.config.adapter)
        self.progress.update(1)
        return generations

    # -- methods ------------------------------------------------------------------------------

    def sample_only(self, questions: list[_Question]) -> None:
        """single / majority: k samples with no history."""
        requests = []
        for q in questions:
            prompt, _, room = self.fit(q, [])
            requests.append((q, prompt, room))
        for q, generation in zip(questions, self.generate("samples", requests, self.config.k), strict=True):
            q.final = _grade(generation, q)

    def icpo(self, questions: list[_Question]) -> None:
        config = self.config
        for r in range(1, config.rounds + 1):
            phase = f"round {r}/{config.rounds}"
            self.sample_round(questions, r, phase)
            with_candidates = [q for q in questions if q.rounds[-1].candidates()]
            self.summarise(with_candidates, phase)
            self.select(with_candidates, phase)
            self.evict([q for q in with_candidates if self.overfull(q)], phase)
        requests = []
        for q in questions:
            prompt, q.history, room = self.fit(q, q.history)
            requests.append((q, prompt, room))
        for q, generation in zip(questions, self.generate("final", requests, config.final_k), strict=True):
            q.final = _grade(generation, q)

    def sample_round(self, questions: list[_Question], r: int, phase: str) -> None:
        requests = []
        for q in questions:
            prompt, q.history, room = self.fit(q, q.history)
            requests.append((q, prompt, room))
        for q, generation in zip(
            questions, self.generate(f"{phase}: sample", requests, self.config.k), strict=True
        ):
            samples = _grade(generation, q)
            label = samples.majority if self.config.reward == "self" else q.problem.answer
            rewards = [
                None if answer is None else int(label is not None and is_equivalent(answer, label))
                for answer in samples.answers
            ]
            unset = [None] * len(rewards)
            q.rounds.append(RoundRecord(r, list(q.history), samples, label, rewards, unset, unset.copy()))

    def summarise(self, questions: list[_Question], phase: str) -> None:
        """The history text of every candidate: a summary of its response, or the truncated response."""
        requests, owners = [], []
        for q in questions:
            record = q.rounds[-1]
            # The truncated response is the text without summaries, and the fallback when none fits.
            record.summaries = [
                None if reward is None else self.truncate(text)
                for text, reward in zip(record.samples.texts, record.rewards, strict=True)
            ]
            if not self.config.summary:
                continue
            for j in record.candidates():
                text = record.samples.texts[j]
                prompt = render_summary_prompt(self.tokenizer, q.problem.problem, text, self.templates)
                room = self.config.context_length - self.prompt_tokens(prompt)
                if room < 1:
                    logger.warning(
                        "question %s: summary prompt overflows context_length=%d; using the truncated response",
                        q.problem.id,
                        self.config.context_length,
                    )
                    continue
                requests.append((q, prompt, room))
                owners.append((record, j))
        generations = self.generate(f"{phase}: summarise", requests, n=1, summary=True)
        for (record, j), generation in zip(owners, generations, strict=True):
            record.summaries[j] = generation.completions[0].text.strip()

    def select(self, questions: list[_Question], phase: str) -> None:
        """Pick one candidate per question and append it to the history."""
        config = self.config
        probe = config.method == "me-icpo"
        requests, owners = [], []
        for q in questions:
            record = q.rounds[-1]
            candidates = record.candidates()
            if probe and len(candidates) >= 2:
                for j in candidates:
                    prompt, _, room = self.fit(q, [*q.history, record.attempt(j)])
                    requests.append((q, prompt, room))
                    owners.append((record, j))
        for (record, j), generation in zip(
            owners, self.generate(f"{phase}: probe", requests, config.entropy_k), strict=True
        ):
            record.entropies[j] = self.entropy(generation)
        for q in questions:
            record = q.rounds[-1]
            candidates = record.candidates()
            if len(candidates) == 1:
                chosen = candidates[0]
            elif not probe or (config.epsilon > 0 and q.rng.random() < config.epsilon):
                chosen = q.rng.choice(candidates)
            else:  # minimum entropy, the first on ties
                chosen = min(candidates, key=record.entropies.__getitem__)
            record.chosen = chosen
            record.chosen_summary = record.summaries[chosen]
            q.history.append(record.attempt(chosen))

    def overfull(self, q: _Question) -> bool:
        reward = q.history[-1].reward
        return sum(a.reward == reward for a in q.history) > self.config.max_keep

    def evict(self, questions: list[_Question], phase: str) -> None:
        """Remove one entry from each overfull bucket: the one whose removal leaves the lowest
        probe entropy (me-icpo; the oldest on ties), else the oldest."""
        requests, owners = [], []
        for q in questions:
            reward = q.history[-1].reward
            bucket = [i for i, a in enumerate(q.history) if a.reward == reward]
            first = len(requests)
            if self.config.method == "me-icpo":
                for i in bucket:
                    prompt, _, room = self.fit(q, q.history[:i] + q.history[i + 1 :])
                    requests.append((q, prompt, room))
            owners.append((q, bucket, range(first, len(requests))))
        generations = self.generate(f"{phase}: evict", requests, self.config.entropy_k)
        for q, bucket, request_ids in owners:
            record = q.rounds[-1]
            record.eviction_entropies = [self.entropy(generations[n]) for n in request_ids]
            scores = record.eviction_entropies or [0.0]  # without a probe: the oldest
            record.evicted = q.history.pop(bucket[scores.index(min(scores))])

    def entropy(self, generation: Generation) -> float:
        answers = [extract_answer(c.text) for c in generation.completions]
        return answer_entropy(answers, self.config.entropy_penalty)

    def truncate(self, text: str) -> str:
        ids = encode_prompt(self.tokenizer, text)[: self.config.summary_max_tokens]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _result(q: _Question, method: str) -> QuestionResult:
    per_round = [record.samples for record in q.rounds] or [q.final]
    metrics = {
        "mean": q.final.mean,
        "maj": float(q.final.majority_correct),
        "pass": float(any(q.final.correct)),
        "mean_per_round": [samples.mean for samples in per_round],
        "maj_per_round": [float(samples.majority_correct) for samples in per_round],
    }
    p = q.problem
    return QuestionResult(
        p.id, p.problem, p.answer, q.answer_type, method, q.rounds, q.history, q.final, metrics
    )


def in_chunks(items: list, size: int) -> Iterable[list]:
    """``items`` in consecutive slices of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_method(
    backend: Backend,
    problems: Sequence[Problem],
    config: InferConfig,
    done_ids: Iterable[str] = (),
    on_result: Callable[[QuestionResult], None] | None = None,
) -> list[QuestionResult]:
    """Run ``config.method`` on the problems (unique ids) not in ``done_ids``.

    Questions go through in chunks of ``config.batch_questions``. ``on_result`` gets each question's
    result as soon as its chunk finishes (results.jsonl appends there): an interrupted run loses at
    most one chunk.
    """
    done = set(done_ids)
    chunks = list(in_chunks([p for p in problems if p.id not in done], config.batch_questions))
    run = _Run(backend, config)
    for chunk in chunks:  # refuse before any work when a bare question cannot fit the context
        for p in chunk:
            bare = render_prompt(run.tokenizer, p.problem, [], answer_type_of(p.answer), run.templates)
            check(
                run.prompt_tokens(bare) < config.context_length,
                f"question {p.id} alone fills context_length={config.context_length}; raise --context-length.",
            )
    phases = 4 * config.rounds + 1 if config.iterative else 1  # icpo rounds: sample, summarise, probe, evict
    results = []
    with tqdm(total=len(chunks) * phases, desc=config.method, unit="phase") as run.progress:
        for chunk in chunks:
            questions = [
                _Question(p, answer_type_of(p.answer), random.Random(derive_seed(config.seed, p.id)))
                for p in chunk
            ]
            (run.icpo if config.iterative else run.sample_only)(questions)
            for q in questions:
                result = _result(q, config.method)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results
