"""Answer extraction, equivalence and majority voting, built on math-verify.

Answers travel through the framework as strings (the content of the response's last ``\\boxed{}``):
they are stored in results and trajectories and shown back to the model in the history. Two
answers are the same when math-verify says so (``0.5`` = ``\\frac{1}{2}``, ``025`` = ``25``,
``142.0`` = ``142``), and majority votes count equivalence classes, not raw strings.

Votes run on every group of samples many times per round, so parses and pairwise verdicts are
cached, identical strings skip math-verify, and each new answer is compared with one
representative per class.

Thread safety: math-verify bounds its work with ``signal.alarm``, which only works in the main
thread. Off the main thread we switch its timeouts off (``parsing_timeout=None``,
``timeout_seconds=None``); a pathological expression then runs to completion there.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MATH_VERIFY_TIMEOUT_S = 5

# How a lone answer string is read: as the content of a \boxed{}, with math-verify's normalisation.
_ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0),)
# Without a \boxed{}, only answers the text itself declares ("... final answer is $x$") count:
# unanchored extraction (the last number or formula anywhere) turns a truncated or rambling
# response into a confident-looking answer, which would poison majority votes.
_DECLARED_CONFIG = (
    LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=-1),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DECLARATION = re.compile(r"final answer\s*(?:is|:)[^\n]*", re.IGNORECASE)


def _timeout() -> int | None:
    """math-verify's timeout: signal-based, so only usable in the main thread."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def strip_thinking(text: str) -> str:
    """The response without its reasoning blocks: ``<think>...</think>`` removed; text before a
    lone ``</think>`` (the block was opened by the chat template) removed; an unfinished block
    (``<think>`` never closed) removed to the end, since it holds no final answer."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0]


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces
    allowed). math-verify's own box extraction joins neighbouring boxes ("\\boxed{3}, so
    \\boxed{5}" -> "3,5"); a response that corrects itself must be graded on its last box only."""
    for opening in reversed(list(_BOX_OPENING.finditer(text))):
        depth = 1
        for end in range(opening.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                content = text[opening.end() : end].strip()
                if content:
                    return content
                break
    return None


def _declared_answer(text: str) -> str | None:
    """The answer declared on the text's last "final answer is ..." / "final answer: ..." line,
    read by math-verify's anchored patterns."""
    declarations = _DECLARATION.findall(text)
    if not declarations:
        return None
    found = parse(
        declarations[-1],
        extraction_config=_DECLARED_CONFIG,
        fallback_mode="first_match",
        parsing_timeout=_timeout(),
    )
    # A sentence's closing period can stick to an expression ("... is 3/4.").
    return next((item.strip().rstrip(".") for item in found if isinstance(item, str) and item.strip()), None)


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response, or None when it gives none (an invalid response).

    Reasoning blocks are ignored; the last complete ``\\boxed{}``/``\\fbox{}`` counts; without
    one, an answer the text declares ("The final answer is $x$", "Final answer: x") counts;
    anything else (a bare last number, a truncated solution) is None.
    """
    if not text:
        return None
    text = strip_thinking(text)
    return _last_boxed(text) or _declared_answer(text)


def _key(answer: str | None) -> str:
    """The answer with whitespace runs collapsed: equal keys are the same answer, no parse needed."""
    return " ".join(answer.split()) if answer else ""


@lru_cache(maxsize=1 << 16)
def _parsed(key: str) -> tuple:
    return tuple(
        parse(
            "\\boxed{" + key + "}",
            extraction_config=_ANSWER_CONFIG,
            fallback_mode="first_match",
            parsing_timeout=_timeout(),
        )
    )


@lru_cache(maxsize=1 << 18)
def _verified(a: str, b: str) -> bool:
    """math-verify's verdict on two distinct keys, in both directions (``verify`` treats its first
    argument as the reference, and equivalence must not depend on the order)."""
    parsed_a, parsed_b = list(_parsed(a)), list(_parsed(b))
    timeout = _timeout()
    return verify(parsed_a, parsed_b, timeout_seconds=timeout) or verify(
        parsed_b, parsed_a, timeout_seconds=timeout
    )


def _same(key_a: str, key_b: str) -> bool:
    if key_a == key_b:
        return True
    return _verified(*sorted((key_a, key_b)))  # one cache entry per unordered pair


def is_equivalent(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are mathematically the same (False if either is missing)."""
    key_a, key_b = _key(a), _key(b)
    return bool(key_a and key_b) and _same(key_a, key_b)


def grade(text: str | None, gold: str) -> bool:
    """Whether a response's final answer equals the reference answer ``gold``."""
    return is_equivalent(gold, extract_answer(text))


def equivalence_classes(answers: Sequence[str | None]) -> list[int | None]:
    """A class label per answer (0, 1, ... in order of first appearance; None for a missing answer).

    Each new distinct answer is compared with one representative per class, so a group of n
    answers with c classes costs at most n * c (cached) comparisons.
    """
    representatives: list[str] = []
    label_of_key: dict[str, int] = {}
    labels: list[int | None] = []
    for answer in answers:
        key = _key(answer)
        if not key:
            labels.append(None)
            continue
        if key not in label_of_key:
            label = next((i for i, rep in enumerate(representatives) if _same(rep, key)), None)
            if label is None:
                label = len(representatives)
                representatives.append(key)
            label_of_key[key] = label
        labels.append(label_of_key[key])
    return labels


def vote(answers: Sequence[str | None], rng: random.Random | None = None) -> tuple[str, int] | None:
    """The majority answer over equivalence classes and its vote count; None if no answer is valid.

    The winner is reported as its class's first answer. Ties go to ``rng.choice`` among the tied
    classes (in order of first appearance), or to the class seen first when ``rng`` is None.
    """
    labels = equivalence_classes(answers)
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return None
    top = max(counts.values())
    tied = [label for label, count in counts.items() if count == top]
    winner = rng.choice(tied) if rng is not None and len(tied) > 1 else tied[0]
    return answers[labels.index(winner)], top


def majority_vote(texts: Sequence[str | None], rng: random.Random | None = None) -> tuple[str, int] | None:
    """Extract each response's answer, then :func:`vote`."""
    return vote([extract_answer(text) for text in texts], rng)
