"""Answer extraction, equivalence and majority voting, built on math-verify.

Answers travel through the framework as strings (what the response declares as its final answer,
normalised): they are stored in results and trajectories and shown back to the model in the
history. Two answers are the same when math-verify says so (``0.5`` = ``\\frac{1}{2}``, ``025`` =
``25``, ``142.0`` = ``142``), and majority votes count equivalence classes, not raw strings.

What counts as a final answer (docs/inference.md, "Grading", lists the same): the last of

- a box: ``\\boxed{...}`` (nested braces), ``\\fbox{...}``, ``boxed{...}`` written without its
  backslash, ``\\boxed 5`` (one token, as LaTeX allows);
- an ``<answer>...</answer>`` tag;
- a declaration: "final answer is / final answer: / the answer is / Answer:" followed directly by a
  math span (``$...$``, ``\\(...\\)``, ``\\[...\\]``), a number or fraction (not one that opens a
  formula, in symbols or words: "3 times 9"), or an option letter.

A number elsewhere in free text is not an answer: unanchored extraction (the last number anywhere)
turns a truncated or rambling response into a confident-looking answer, which would poison
majority votes. math-verify's own anchored patterns are not used for declarations either, since
they reach past the anchor ("final answer is the sum of 3 and 4" reads as 3).

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

from math_verify import LatexExtractionConfig, parse, verify

MATH_VERIFY_TIMEOUT_S = 5

# How a lone answer string is read: as the content of a \boxed{}, with math-verify's normalisation.
_ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0),)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# A box opening: \boxed{ / \fbox{ / boxed{ without its backslash (not inside a word such as
# "unboxed{"), or \boxed followed by a single token.
_BOX = re.compile(r"(?:\\fbox|(?<![A-Za-z])\\?boxed)\s*\{|\\boxed[ \t]+(?!\{)(?P<token>[^\s$]+)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "final answer is", "Final Answer:", "the answer is", or "Answer:" opening a line, with Markdown
# emphasis around it.
_DECLARATION = re.compile(
    r"(?:\bfinal answer|\bthe answer|^[\s*_#>-]*answer)\b[\s*_]*(?:is\b|:|=)[\s*_:]*",
    re.IGNORECASE | re.MULTILINE,
)
# What a declaration may declare, right after it: a math span, a number or fraction (units after it
# are ignored), or an option letter ("(C)", or "C" ending the sentence).
_DECLARED_VALUE = re.compile(
    r"\$\$(?P<display>.+?)\$\$|\$(?P<inline>(?:\\\$|[^$\n])+?)\$|\\\((?P<paren>.+?)\\\)|\\\[(?P<bracket>.+?)\\\]"
    r"|(?P<number>[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*\\?%)?)"
    r"(?=[.,;:!?)*]*(?:\s|$))"
    r"(?![ \t]*(?:[-+−*/=^×÷<>]|(?i:times|plus|minus|(?:divided|multiplied)\s+by)\b))"  # not a formula's start
    r"|(?P<choice>\(?[A-E]\)|[A-E](?=[.*]*\s*$|[.*]+\s))",
    re.DOTALL | re.MULTILINE,
)
# A multiple-choice answer: an option letter, bare or in parentheses, optionally wrapped in a text
# or bold command, optionally followed by the option's content ("\textbf{(C) }12" is C).
_CHOICE = re.compile(
    r"(?:\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{\s*)?"
    r"(?:\(\s*(?P<paren>[A-E])\s*\)|(?P<bare>[A-E])(?:\s*\}\s*$|\s*$|\)))"
    r"(?!.*(?:\(\s*[A-E]\s*\)|(?<![A-Za-z])[A-E]\)))"  # several options ("(A), (C)") are no one letter
)
# Digit groups separated by LaTeX spacing ("1\,000", "1\ 000", "1~000"); commas are math-verify's.
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: ]|~)\d{3})+(?![\d])")
_THOUSANDS_SPACING = re.compile(r"\\[,;: ]|~")
# A number with its unit written inside one text command: "\text{5 apples}".
_NUMBER_IN_TEXT = re.compile(r"^\\(?:text|textrm|mbox)\s*\{\s*([-+]?[\d.,]+)\s+([^{}]*)\}$")
_DEGREES = re.compile(r"\s*(?:\\degree\b|°|\^\s*\{?\\circ\}?)")


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


def _boxes(text: str) -> list[tuple[int, str]]:
    """(end position, content) of every complete, non-empty box, in order. math-verify's own box
    extraction joins neighbouring boxes ("\\boxed{3}, so \\boxed{5}" -> "3,5"); a response that
    corrects itself must be graded on its last box only."""
    found = []
    for opening in _BOX.finditer(text):
        if opening["token"]:
            found.append((opening.end(), opening["token"]))
            continue
        depth = 1
        for end in range(opening.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                if text[opening.end() : end].strip():
                    found.append((end + 1, text[opening.end() : end]))
                break
    return found


def _unwrap(value: str) -> str | None:
    """A declared or tagged value as an answer: the box inside it if it has one, else the value
    without its math delimiters."""
    boxes = _boxes(value)
    if boxes:
        return boxes[-1][1]
    value = value.strip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if value.startswith(opening) and value.endswith(closing) and len(value) > len(opening + closing):
            value = value[len(opening) : -len(closing)]
            break
    return value.strip() or None


def _declarations(text: str) -> list[tuple[int, str]]:
    """(end position, value) of every declaration followed directly by a value."""
    found = []
    for declaration in _DECLARATION.finditer(text):
        value = _DECLARED_VALUE.match(text, declaration.end())
        if value:
            content = _unwrap(next(group for group in value.groups() if group is not None))
            if content:
                found.append((value.end(), content))
    return found


def _tags(text: str) -> list[tuple[int, str]]:
    """(end position, content) of every non-empty ``<answer>`` tag."""
    found = []
    for tag in _ANSWER_TAG.finditer(text):
        inner = tag[1]
        declared = _declarations(inner)
        content = declared[-1][1] if declared and not _boxes(inner) else _unwrap(inner)
        if content:
            found.append((tag.end(), content))
    return found


def choice_letter(answer: str) -> str | None:
    """The option letter A-E that ``answer`` names ("C", "(C)", "\\text{(C)}", "\\textbf{(C) } 12",
    "C) 12"), or None when it is no option letter."""
    match = _CHOICE.match(answer.strip())
    return (match["paren"] or match["bare"]) if match else None


def normalise_answer(answer: str) -> str:
    """The answer in the form it is stored, voted and verified in: whitespace runs collapsed, the
    Unicode minus written "-", an option letter reduced to the letter, a closing period dropped,
    LaTeX spacing between digit groups removed ("1\\,000"), a number and its unit in one
    ``\\text{}`` split, degree signs written ``^\\circ``. math-verify normalises the rest
    (``\\dfrac``, ``\\text{}`` units, ``\\%``, thousands commas, ``x =``)."""
    answer = " ".join(answer.replace("−", "-").split()).removesuffix("\\.").rstrip(".").strip()
    letter = choice_letter(answer)
    if letter:
        return letter
    answer = _SPACED_THOUSANDS.sub(lambda m: _THOUSANDS_SPACING.sub("", m[0]), answer)
    answer = _NUMBER_IN_TEXT.sub(r"\1\\text{ \2}", answer)
    return _DEGREES.sub(r"^\\circ", answer)


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response (normalised), or None when it gives none (an invalid response).

    Reasoning blocks are ignored; of the boxes, ``<answer>`` tags and declarations ("The final
    answer is $x$", "Answer: x") the one that ends last counts; anything else (a bare last number,
    a truncated solution) is None.
    """
    if not text:
        return None
    text = strip_thinking(text)
    found = _boxes(text) + _tags(text) + _declarations(text)
    if not found:
        return None
    return normalise_answer(max(found, key=lambda item: item[0])[1]) or None


def _key(answer: str | None) -> str:
    """The normalised answer: equal keys are the same answer, no parse needed."""
    return normalise_answer(answer) if answer else ""


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
