"""What a run records: every question's samples, rounds and picks (:class:`QuestionResult`, one line of
results.jsonl), and the state a question carries from one round to the next (:class:`QuestionState`),
which a resumed run restores."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from icpo_infer.data import Problem
from icpo_infer.prompts import Attempt, answer_type_of


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
class RefineRound:
    """One self-refine round of one question: each chain's response at the round's start and its feedback."""

    round: int
    samples: Samples
    feedback: list[str | None]  # per chain; None: no room for the feedback, so the chain kept its response


@dataclass
class Pick:
    """best-of-n: every sample's score and the sample picked (the best among those with an answer)."""

    scorer: str  # "mean_logprob" or the reward model's path
    scores: list[float]
    chosen: int
    correct: bool


@dataclass
class QuestionResult:
    """Everything one question went through; one line of results.jsonl."""

    id: str
    problem: str
    answer: str
    answer_type: str
    method: str
    rounds: list[RoundRecord] | list[RefineRound]
    history: list[Attempt]  # what the final prompt showed
    final: Samples
    # mean, maj, pass of the final samples; mean_per_round, maj_per_round; best (best-of-n);
    # self_reward (ICPO methods: per round, the counts :func:`icpo_infer.icpo.self_reward_counts` gives)
    metrics: dict[str, Any]
    pick: Pick | None = None


@dataclass
class QuestionState:
    """One question on its way through a method: its generator, history and rounds so far."""

    problem: Problem
    answer_type: str
    rng: random.Random
    history: list[Attempt] = field(default_factory=list)
    rounds: list[RoundRecord] | list[RefineRound] = field(default_factory=list)
    final: Samples | None = None
    pick: Pick | None = None
    chains: list[str] = field(default_factory=list)  # self-refine: each chain's latest response

    def saved(self) -> dict[str, Any]:
        """What the question carries from one round to the next, as JSON."""
        return {
            "id": self.problem.id,
            "rng": self.rng.getstate(),
            "history": [dataclasses.asdict(a) for a in self.history],
            "rounds": [dataclasses.asdict(record) for record in self.rounds],
            "chains": self.chains,
        }

    @classmethod
    def restored(cls, problem: Problem, saved: dict[str, Any]) -> QuestionState:
        """The question :meth:`saved` wrote, as it was after its last finished round."""
        version, internal, gauss = saved["rng"]
        rng = random.Random()
        rng.setstate((version, tuple(internal), gauss))

        def attempt(a: dict[str, Any] | None) -> Attempt | None:
            return None if a is None else Attempt(**a)

        def record(r: dict[str, Any]) -> RoundRecord | RefineRound:
            samples = Samples(**r["samples"])
            if "feedback" in r:
                return RefineRound(**{**r, "samples": samples})
            history = [attempt(a) for a in r["history"]]
            return RoundRecord(
                **{**r, "samples": samples, "history": history, "evicted": attempt(r["evicted"])}
            )

        return cls(
            problem,
            answer_type_of(problem.answer),
            rng,
            history=[attempt(a) for a in saved["history"]],
            rounds=[record(r) for r in saved["rounds"]],
            chains=saved["chains"],
        )
