"""ME-ICPO (Minimum-Entropy In-Context Policy Optimization) and the test-time methods it is compared with.

Baselines: ``single`` (k samples), ``majority`` (their majority vote), ``best-of-n`` (the sample the
model is most confident in: mean token log-probability, or a reward model's score) and
``self-refine`` (k chains of answer, self-feedback and refinement).

In the ICPO methods every question keeps a chronological history of attempt summaries, each tagged
reward 1 or 0 (:func:`icpo_infer.prompts.render_prompt` shows them as two buckets). A round samples ``k``
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

The methods with rounds save the chunk in progress after every round (each question's history, rounds,
self-refine chains and generator state: :meth:`icpo_infer.records.QuestionState.saved`); a resumed run
restores it and goes on from the next round, so an interruption loses at most the round in progress.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from icpo_infer.backends import resolve_context_length
from icpo_infer.backends.base import (
    Backend,
    Generation,
    derive_seed,
    encode_prompt,
)
from icpo_infer.config import check
from icpo_infer.data import Problem
from icpo_infer.grading import equivalence_classes, extract_answer, is_equivalent, vote
from icpo_infer.infer_config import ICPO_METHODS, InferConfig
from icpo_infer.prompts import (
    Attempt,
    PromptTemplates,
    answer_type_of,
    render_feedback_prompt,
    render_prompt,
    render_refine_prompt,
    render_summary_prompt,
)
from icpo_infer.records import Pick, QuestionResult, QuestionState, RefineRound, RoundRecord, Samples
from icpo_infer.results import ChunkState

if (
    TYPE_CHECKING
):  # loading a reward model needs the hf backend's modules; only best-of-n's users pay for them
    from icpo_infer.reward_model import RewardModel

logger = logging.getLogger(__name__)


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


def _texts(generation: Generation) -> list[str]:
    return [c.text for c in generation.completions]


def _grade(texts: list[str], q: QuestionState) -> Samples:
    """The question's responses with their answers, correctness and majority (ties: the question's rng)."""
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

    def __init__(
        self,
        backend: Backend,
        config: InferConfig,
        reward_model: RewardModel | None = None,
        state: ChunkState | None = None,
    ) -> None:
        if (reward_model is None) != (config.reward_model is None):
            raise ValueError("pass the loaded reward model exactly when config.reward_model names one")
        self.backend = backend
        self.reward_model = reward_model
        self.config = config
        self.tokenizer = backend.tokenizer
        self.templates = PromptTemplates.from_yaml(config.templates) if config.templates else None
        self.state = state
        # Set by run_method: a bar over questions that a chunk of m advances by m / (rounds + 1) per finished
        # round (its ETA moves within a chunk), and the count of questions done.
        self.progress: tqdm | None = None
        self.finished = 0
        self.in_flight = 0

    # -- prompts and engine calls -------------------------------------------------------------

    def prompt_tokens(self, prompt: str) -> int:
        return len(encode_prompt(self.tokenizer, prompt))

    def fit(self, q: QuestionState, history: Sequence[Attempt]) -> tuple[str, list[Attempt], int]:
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

    def bare_requests(self, questions: list[QuestionState]) -> list[tuple[QuestionState, str, int]]:
        """Each question's prompt without history, and its room for new tokens."""
        requests = []
        for q in questions:
            prompt, _, room = self.fit(q, [])
            requests.append((q, prompt, room))
        return requests

    def request(self, q: QuestionState, prompt: str, fallback: str) -> tuple[QuestionState, str, int] | None:
        """(question, prompt, room), or None with a warning saying ``fallback`` when the prompt fills the context."""
        room = self.config.context_length - self.prompt_tokens(prompt)
        if room >= 1:
            return q, prompt, room
        logger.warning(
            "question %s: a prompt overflows context_length=%d; %s",
            q.problem.id,
            self.config.context_length,
            fallback,
        )
        return None

    def generate(
        self,
        phase: str,
        requests: list[tuple[QuestionState, str, int]],
        n: int,
        summary: bool = False,
        max_new_tokens: int | None = None,
    ) -> list[Generation]:
        """ONE engine call for a whole phase: ``n`` samples for each (question, prompt, room) request.

        The seed derives from the run seed and the phase; the backends draw each prompt's samples
        from (seed, prompt) alone, so a question samples the same whatever else is in flight: in any
        chunk of ``batch_questions`` and in a resumed run. ``max_new_tokens`` defaults to the answer
        length (the summary length for summaries).
        """
        self.show(phase)
        generations = []
        if requests:
            seed = derive_seed(self.config.seed, phase)
            limit = max_new_tokens or (
                self.config.summary_max_tokens if summary else self.config.max_new_tokens
            )
            params = [self.config.sampling(n, min(limit, room), seed, summary) for _, _, room in requests]
            # The run's adapter on every call, so one loaded backend can evaluate several adapters.
            prompts = [prompt for _, prompt, _ in requests]
            generations = self.backend.generate(prompts, params, adapter=self.config.adapter)
        return generations

    def show(self, phase: str | None = None) -> None:
        """The bar's text: questions finished, and the chunk in flight (its questions finish together,
        at its last phase) with its phase."""
        done = f"{self.finished}/{self.progress.total} questions done"
        if phase:
            done += f", {self.in_flight} in progress: {phase}"
        self.progress.set_postfix_str(done)

    def finish_round(self, questions: list[QuestionState], r: int) -> None:
        """Save the chunk after its round ``r``: from here on an interruption does not lose it."""
        if self.state is not None:
            self.state.save({"round": r, "questions": [q.saved() for q in questions]})
        self.progress.update(len(questions) / (self.config.rounds + 1))

    # -- methods ------------------------------------------------------------------------------

    def run(self, questions: list[QuestionState], rounds_done: int = 0) -> None:
        """The configured method on one chunk of questions, from the round after ``rounds_done``."""
        method = self.config.method
        if method in ICPO_METHODS:
            self.icpo(questions, rounds_done)
        elif method == "self-refine":
            self.self_refine(questions, rounds_done)
        elif method == "best-of-n":
            self.best_of_n(questions)
        else:
            self.sample_only(questions)

    def sample_only(self, questions: list[QuestionState]) -> list[tuple[QuestionState, str, int]]:
        """single / majority / best-of-n: k samples with no history; returns the requests sent."""
        requests = self.bare_requests(questions)
        for q, generation in zip(questions, self.generate("samples", requests, self.config.k), strict=True):
            q.final = _grade(_texts(generation), q)
        return requests

    def best_of_n(self, questions: list[QuestionState]) -> None:
        """k samples, then ONE scoring call over all of them; each question picks its highest-scored
        sample among those with an answer (an empty or answerless response is no pick), the first on ties."""
        requests = self.sample_only(questions)
        self.show("score")
        pairs = [(q, prompt, text) for q, prompt, _ in requests for text in q.final.texts]
        if self.reward_model is None:
            scorer = "mean_logprob"
            scored = self.backend.score(
                [prompt for _, prompt, _ in pairs],
                [text for _, _, text in pairs],
                adapter=self.config.adapter,
            )
            scores = [s.logprob / max(s.num_tokens, 1) for s in scored]
        else:
            scorer = self.config.reward_model
            scores = self.reward_model.score(
                [q.problem.problem for q, _, _ in pairs], [text for _, _, text in pairs]
            )
        start = 0
        for q in questions:
            own = scores[start : start + len(q.final.texts)]
            start += len(own)
            answered = [j for j, answer in enumerate(q.final.answers) if answer is not None]
            chosen = max(answered or range(len(own)), key=own.__getitem__)
            q.pick = Pick(scorer, own, chosen, q.final.correct[chosen])

    def self_refine(self, questions: list[QuestionState], rounds_done: int = 0) -> None:
        """k chains per question: an answer, then per round the model's feedback on it and a refined
        answer. Feedback and refinement are one engine call each over all chains of all questions; a
        chain whose prompt no longer fits the context keeps its response."""
        config = self.config
        if rounds_done == 0:
            generations = self.generate("samples", self.bare_requests(questions), config.k)
            for q, generation in zip(questions, generations, strict=True):
                q.chains = _texts(generation)
        keep = "the chain keeps its response"
        for r in range(rounds_done + 1, config.rounds + 1):
            phase = f"round {r}/{config.rounds}"
            requests, owners = [], []
            for q in questions:
                # A copy: the refinement below replaces the chains' responses, not this round's record.
                q.rounds.append(RefineRound(r, _grade(list(q.chains), q), [None] * len(q.chains)))
                for j, text in enumerate(q.chains):
                    prompt = render_feedback_prompt(self.tokenizer, q.problem.problem, text, self.templates)
                    request = self.request(q, prompt, keep)
                    if request is not None:
                        requests.append(request)
                        owners.append((q, j))
            generations = self.generate(
                f"{phase}: feedback", requests, n=1, max_new_tokens=config.feedback_max_tokens
            )
            for (q, j), generation in zip(owners, generations, strict=True):
                q.rounds[-1].feedback[j] = generation.completions[0].text.strip()
            requests, refined = [], []
            for q in questions:
                for j, feedback in enumerate(q.rounds[-1].feedback):
                    if feedback is None:
                        continue
                    prompt = render_refine_prompt(
                        self.tokenizer,
                        q.problem.problem,
                        q.chains[j],
                        feedback,
                        q.answer_type,
                        self.templates,
                    )
                    request = self.request(q, prompt, keep)
                    if request is not None:
                        requests.append(request)
                        refined.append((q, j))
            for (q, j), generation in zip(
                refined, self.generate(f"{phase}: refine", requests, n=1), strict=True
            ):
                q.chains[j] = generation.completions[0].text
            self.finish_round(questions, r)
        for q in questions:
            q.final = _grade(q.chains, q)

    def icpo(self, questions: list[QuestionState], rounds_done: int = 0) -> None:
        config = self.config
        for r in range(rounds_done + 1, config.rounds + 1):
            phase = f"round {r}/{config.rounds}"
            self.sample_round(questions, r, phase)
            with_candidates = [q for q in questions if q.rounds[-1].candidates()]
            self.summarise(with_candidates, phase)
            self.select(with_candidates, phase)
            self.evict([q for q in with_candidates if self.overfull(q)], phase)
            self.finish_round(questions, r)
        requests = []
        for q in questions:
            prompt, q.history, room = self.fit(q, q.history)
            requests.append((q, prompt, room))
        for q, generation in zip(questions, self.generate("final", requests, config.final_k), strict=True):
            q.final = _grade(_texts(generation), q)

    def sample_round(self, questions: list[QuestionState], r: int, phase: str) -> None:
        requests = []
        for q in questions:
            prompt, q.history, room = self.fit(q, q.history)
            requests.append((q, prompt, room))
        for q, generation in zip(
            questions, self.generate(f"{phase}: sample", requests, self.config.k), strict=True
        ):
            samples = _grade(_texts(generation), q)
            label = samples.majority if self.config.reward == "self" else q.problem.answer
            rewards = [
                None if answer is None else int(label is not None and is_equivalent(answer, label))
                for answer in samples.answers
            ]
            unset = [None] * len(rewards)
            q.rounds.append(RoundRecord(r, list(q.history), samples, label, rewards, unset, unset.copy()))

    def summarise(self, questions: list[QuestionState], phase: str) -> None:
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
                request = self.request(q, prompt, "using the truncated response")
                if request is not None:
                    requests.append(request)
                    owners.append((record, j))
        generations = self.generate(f"{phase}: summarise", requests, n=1, summary=True)
        for (record, j), generation in zip(owners, generations, strict=True):
            record.summaries[j] = generation.completions[0].text.strip()

    def select(self, questions: list[QuestionState], phase: str) -> None:
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

    def overfull(self, q: QuestionState) -> bool:
        reward = q.history[-1].reward
        return sum(a.reward == reward for a in q.history) > self.config.max_keep

    def evict(self, questions: list[QuestionState], phase: str) -> None:
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


def self_reward_counts(q: QuestionState) -> list[dict[str, Any]]:
    """How the self-assessed rewards of each ICPO round compare with the gold answer.

    Per round: whether the pseudo-label is correct; among the candidates, how many there are, how many
    are correct and how many got the reward the gold answer would give; whether the pick among 2 or
    more candidates (minimum entropy for me-icpo) is correct (None: no such pick); and the reward-1
    entries of the history after the round, with how many of them are correct. Counts, not ratios, so
    that summaries pool them over questions.
    """
    gold = q.problem.answer
    histories_after = [record.history for record in q.rounds[1:]] + [q.history]
    counts = []
    for record, history in zip(q.rounds, histories_after, strict=True):
        candidates = record.candidates()
        correct = record.samples.correct
        reward_1 = [a for a in history if a.reward == 1]
        counts.append(
            {
                "pseudo_label_correct": is_equivalent(record.pseudo_label, gold),
                "candidates": len(candidates),
                "candidates_correct": sum(correct[j] for j in candidates),
                "rewards_right": sum(record.rewards[j] == int(correct[j]) for j in candidates),
                "pick_correct": correct[record.chosen] if len(candidates) >= 2 else None,
                "reward_1_entries": len(reward_1),
                "reward_1_entries_correct": sum(is_equivalent(a.answer, gold) for a in reward_1),
            }
        )
    return counts


def _result(q: QuestionState, method: str) -> QuestionResult:
    per_round = [record.samples for record in q.rounds] or [q.final]
    metrics = {
        "mean": q.final.mean,
        "maj": float(q.final.majority_correct),
        "pass": float(any(q.final.correct)),
        "mean_per_round": [samples.mean for samples in per_round],
        "maj_per_round": [float(samples.majority_correct) for samples in per_round],
    }
    if q.pick is not None:
        metrics["best"] = float(q.pick.correct)
    if method in ICPO_METHODS:
        metrics["self_reward"] = self_reward_counts(q)
    p = q.problem
    return QuestionResult(
        p.id, p.problem, p.answer, q.answer_type, method, q.rounds, q.history, q.final, metrics, q.pick
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
    on_chunk: Callable[[list[QuestionResult]], None] | None = None,
    reward_model: RewardModel | None = None,
    state: ChunkState | None = None,
    desc: str | None = None,
) -> list[QuestionResult]:
    """Run ``config.method`` on the problems (unique ids) not in ``done_ids``; ``desc`` names the
    progress bar (default: the method).

    ``reward_model``: the model ``config.reward_model`` names, loaded (best-of-n).

    Questions go through in chunks of ``config.batch_questions``; ``on_chunk`` gets a chunk's results
    as soon as it finishes (results.jsonl appends there). With ``state``, the methods with rounds save
    the chunk in progress after every round and clear it once ``on_chunk`` returns; a run that finds
    a saved chunk goes on from its next round, so an interrupted run loses at most the round in progress.
    """
    if config.context_length is None:
        config = resolve_context_length(config)
    done = set(done_ids)
    todo = [p for p in problems if p.id not in done]
    saved = state.load() if state is not None else None
    by_id = {p.id: p for p in todo}
    # Questions of the saved chunk that are finished since (results written, state not yet cleared)
    # or no longer asked for (a smaller --limit) are left out.
    restored = [
        QuestionState.restored(by_id[q["id"]], q)
        for q in (saved or {}).get("questions", [])
        if q["id"] in by_id
    ]
    rounds_done = saved["round"] if restored else 0
    fresh = [p for p in todo if p.id not in {q.problem.id for q in restored}]
    run = _Run(backend, config, reward_model, state)
    for p in fresh:  # refuse before any work when a bare question cannot fit the context
        bare = render_prompt(run.tokenizer, p.problem, [], answer_type_of(p.answer), run.templates)
        check(
            run.prompt_tokens(bare) < config.context_length,
            f"question {p.id} alone fills context_length={config.context_length}; raise --context-length.",
        )
    chunks = [(restored, rounds_done)] if restored else []
    for chunk in in_chunks(fresh, config.batch_questions):
        questions = [
            QuestionState(p, answer_type_of(p.answer), random.Random(derive_seed(config.seed, p.id)))
            for p in chunk
        ]
        chunks.append((questions, 0))
    finished = len(problems) - len(todo)
    if finished or restored:
        partial = (
            f", {rounds_done} of {config.rounds} rounds done for the next {len(restored)}" if restored else ""
        )
        tqdm.write(f"resuming: {finished}/{len(problems)} questions done{partial}", file=sys.stderr)
    results = []
    run.finished = finished
    initial = finished + len(restored) * rounds_done / (config.rounds + 1)
    bar = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
    with tqdm(
        total=len(problems), initial=initial, desc=desc or config.method, bar_format=bar
    ) as run.progress:
        run.show()
        for questions, start in chunks:
            run.in_flight = len(questions)
            run.run(questions, start)
            chunk_results = [_result(q, config.method) for q in questions]
            if on_chunk is not None:
                on_chunk(chunk_results)
            if state is not None:
                state.clear()
            results += chunk_results
            run.finished += len(questions)
            run.progress.update(run.finished - run.progress.n)  # the rest of the chunk: its final phase
            run.show()
    return results
