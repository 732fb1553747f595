"""Grading on the real benchmark answers and on messy model outputs."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import read_benchmark

from icpo_infer import grading
from icpo_infer.grading import equivalence_classes, extract_answer, grade, is_equivalent, majority_vote, vote

BENCHMARKS = ("aime2024", "amc", "math500")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_gold_answer_boxed_grades_correct_against_itself(name):
    golds = [row["answer"] for row in read_benchmark(name)]
    assert [g for g in golds if not grade(f"So the final result is \\boxed{{{g}}}.", g)] == []
    # Written differently (inside $...$), so math-verify must parse and verify every gold itself.
    assert [g for g in golds if not grade(f"Hence \\boxed{{${g}$}}", g)] == []


def test_real_golds_that_differ_stay_apart():
    golds = [row["answer"] for row in read_benchmark("amc")]  # floats written like "142.0"
    labels = equivalence_classes(golds)
    value_of_label = {}
    for gold, label in zip(golds, labels, strict=True):
        assert value_of_label.setdefault(label, float(gold)) == float(gold)
    assert len(value_of_label) == len({float(g) for g in golds})


def test_reference_formats_of_the_benchmarks():
    assert grade("\\boxed{142}", "142.0")  # AMC golds are floats
    assert grade("\\boxed{-4}", "-4.0")
    assert not grade("\\boxed{143}", "142.0")
    assert grade("The answer is \\boxed{25}.", "025")  # AIME golds keep leading zeros
    assert grade("\\boxed{025}", "25")
    assert not grade("\\boxed{26}", "025")
    assert grade("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert grade("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}")
    assert not grade("\\boxed{\\text{Bob}}", "\\text{Evelyn}")
    assert grade("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}")
    assert grade("\\boxed{0.5}", "\\frac{1}{2}")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("We get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
        ("First \\boxed{3}, but that is wrong, so \\boxed{5}.", "5"),  # the last box counts
        ("\\boxed{3} or rather \\boxed{7}", "7"),  # not joined into "3,7"
        ("The result is \\fbox{12}.", "12"),
        ("\\boxed {12}", "12"),
        ("\\boxed{7} then \\boxed{\\frac{1}{2", "7"),  # a truncated box is no answer
        ("<think>maybe \\boxed{1}</think>So \\boxed{2}", "2"),
        ("reasoning opened by the template \\boxed{1}</think> final: \\boxed{4}", "4"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),  # declared, no box
        ("Final Answer: 42", "42"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("The final answer is 3/4.", "3/4"),
        ("The final answer is 5 minutes.", "5"),  # a unit that starts like an operator word
        ("The answer is 27 times as large, so the final answer is 27.", "27"),
    ],
)
def test_extract_answer_from_messy_outputs(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        "   ",
        "We compute 3+4=7 and then 12.",  # numbers, but no declared answer
        "To find the answer, we compute $x^2$ first. Then",  # truncated mid-solution
        "Let me compute the final answer. First, 3+3=6. Then",  # announced, never given
        "\\boxed{}",
        "\\boxed{\\frac{1}{2}",  # cut inside the box
        "<think>I am still thinking, \\boxed{5} maybe",  # unfinished reasoning
        "The final answer is 3 times 9, which equals 27.",  # a formula in words, not the number 3
        "The answer is 12 divided by 4, so",
        "Final answer: 2 Plus 2",
        "The final answer is 6 multiplied by 7.",
        "the answer is 8 minus 3",
    ],
)
def test_responses_without_an_answer_are_invalid(text):
    assert extract_answer(text) is None
    assert not grade(text, "5")
    assert majority_vote([text, text]) is None


# Every answer form a careful human grader accepts, as (form, gold, accepted responses, rejected
# responses): the rejected ones are that form's near misses (no answer, or not this answer).
ANSWER_FORMS = [
    (
        "boxed without backslash",
        "204",
        ["Thus, the answer is boxed{204.0}", "so boxed{204}."],
        ["Thus, the answer is boxed{204", "the answer should be boxed{} as asked", "boxed{240}"],
    ),
    (
        "bold inside the box",
        "204",
        ["\\boxed{\\textbf{204}}", "\\boxed{\\mathbf{204}}"],
        ["We get \\textbf{204} apples in the first step, then", "\\boxed{\\textbf{240}}"],
    ),
    ("fbox", "12", ["The result is \\fbox{12}.", "\\fbox{$12$}"], ["\\fbox{12", "\\fbox{}", "\\fbox{21}"]),
    (
        "box of one token",
        "5",
        ["so \\boxed 5", "hence \\boxed 5.", "$\\boxed 5$"],
        ["the value in the boxed 5 cells is", "\\boxed", "\\boxed 6"],
    ),
    (
        "units inside the box",
        "18",
        [
            "\\boxed{18\\text{ dollars}}",
            "\\boxed{\\text{18 dollars}}",
            "\\boxed{18 \\mbox{ cm}}",
            "\\boxed{\\$18}",
            "The answer is $\\$18$.",
        ],
        ["\\boxed{118\\text{ dollars}}", "\\boxed{\\text{1 8 dollars}}"],
    ),
    (
        "minus signs",
        "-3",
        ["\\boxed{-3}", "\\boxed{−3}", "The answer is −3.", "The answer is $-3$."],
        ["\\boxed{3}", "\\boxed{--3}"],
    ),
    (
        "degrees inside the box",
        "30",
        ["\\boxed{30^\\circ}", "\\boxed{30^{\\circ}}", "\\boxed{30°}", "\\boxed{30\\degree}"],
        ["\\boxed{30^2}", "\\boxed{60^\\circ}"],
    ),
    (
        "dfrac and tfrac",
        "\\frac{14}{3}",
        ["\\boxed{\\dfrac{14}{3}}", "\\boxed{\\tfrac{14}{3}}", "\\boxed{\\dfrac{28}{6}}"],
        ["\\boxed{\\dfrac{3}{14}}", "\\boxed{\\dfrac{14}{3"],
    ),
    (
        "thousands separators",
        "1000",
        [
            "\\boxed{1,000}",
            "\\boxed{1{,}000}",
            "\\boxed{1\\,000}",
            "\\boxed{1\\ 000}",
            "The answer is 1,000.",
        ],
        ["\\boxed{1,2}", "\\boxed{1\\,2}", "\\boxed{10,00}", "The answer is 1,2"],
    ),
    (
        "trailing period",
        "5",
        ["\\boxed{5.}", "\\boxed{5\\.}", "The answer is $5.$", "Final answer: 5."],
        ["\\boxed{5.5}", "\\boxed{.5}"],
    ),
    (
        "math delimiters around the box",
        "5",
        ["$\\boxed{5}$", "$$\\boxed{5}$$", "\\[ \\boxed{5} \\]", "\\(\\boxed{5}\\)."],
        ["$5$", "We find $x = 5$ and then"],
    ),
    (
        "answer tags",
        "\\frac{1}{2}",
        [
            "<answer>\\frac{1}{2}</answer>",
            "<answer> $0.5$ </answer>",
            "<answer>\\boxed{1/2}</answer>",
            "<answer>The final answer is $\\frac{1}{2}$.</answer>",
        ],
        ["<answer>\\frac{1}{2}", "<answer></answer>", "<answer>\\frac{1}{3}</answer>"],
    ),
    (
        "declared final answer",
        "\\frac{1}{2}",
        [
            "The final answer is $\\frac{1}{2}$. I hope it is correct.",
            "**Final Answer:** $\\frac{1}{2}$",
            "So the answer is \\(\\frac{1}{2}\\).",
            "Answer: 1/2",
            "The final answer is: 0.5",
        ],
        [
            "The final answer is the ratio of 1 and 2, which",
            "the answer is not obvious; we compute 1/2 + 1/4",
            "the answer is 1 + 1/2 = 3/2, then",  # a formula, not a declared value
            "We need the answer: first 1/2 then",
        ],
    ),
    (
        "choice letters",
        "C",
        [
            "\\boxed{C}",
            "\\boxed{(C)}",
            "\\boxed{\\text{(C)}}",
            "\\boxed{\\textbf{(C) } 12}",
            "\\boxed{\\mathrm{(C)}}",
            "\\boxed{C.}",
            "The answer is (C).",
            "**Answer:** C",
            "The final answer is $\\textbf{(C)}$",
        ],
        [
            "\\boxed{D}",
            "\\boxed{(D) 12}",
            "The answer is Clearly 12",
            "\\boxed{AC}",
            "Options (C) and (D) remain, so",
            "\\boxed{(C), (D)}",
            "\\boxed{C), D)}",
        ],
    ),
]


@pytest.mark.parametrize(
    ("gold", "accepted", "rejected"), [f[1:] for f in ANSWER_FORMS], ids=[f[0] for f in ANSWER_FORMS]
)
def test_every_answer_form_a_human_grader_accepts_and_its_near_misses(gold, accepted, rejected):
    assert [text for text in accepted if not grade(text, gold)] == []
    assert [text for text in rejected if grade(text, gold)] == []
    # Stored answers are the normalised ones: they grade against the gold and vote as one class.
    answers = [extract_answer(text) for text in accepted]
    assert all(is_equivalent(gold, answer) for answer in answers)
    assert vote(answers) == (answers[0], len(answers))


def test_choice_golds_in_any_form_match_a_letter():
    for gold in ("C", "(C)", "\\text{(C)}", "\\textbf{(C)}", "$\\text{(C)}$"):
        assert grade("\\boxed{\\textbf{(C)}\\ 12}", gold) and grade("The answer is C.", gold)
        assert not grade("\\boxed{B}", gold)
    assert extract_answer("\\boxed{A + B}") == "A + B"  # a formula in letters is no option letter
    assert not grade("\\boxed{A+B}", "A")


def test_the_last_declared_answer_wins_whatever_its_form():
    assert extract_answer("\\boxed{5}. Wait, that is wrong: the final answer is $6$.") == "6"
    assert extract_answer("The answer is $6$. Let me check... no, it is \\boxed{5}") == "5"
    assert extract_answer("<answer>7</answer> Also, boxed{8}") == "8"
    # A later sentence that declares nothing does not override a box.
    assert extract_answer("\\boxed{5}. I hope the final answer is correct.") == "5"
    assert extract_answer("\\boxed{5}, so the answer is not 6 but 5 as boxed") == "5"


def test_votes_group_the_same_answer_written_in_different_forms():
    texts = [
        "\\boxed{1\\,000}",
        "so boxed{1000.0}",
        "The answer is 1,000.",
        "<answer>1000</answer>",
        "\\boxed{999}",
        "I think it is 1000 but I am not sure",  # no answer
    ]
    assert majority_vote(texts) == ("1000", 4)


def test_is_equivalent_is_symmetric_and_rejects_missing_answers():
    for a, b in [("0.5", "\\frac{1}{2}"), ("x=5", "5"), ("10\\%", "10"), ("\\{1,2\\}", "\\{2,1\\}")]:
        assert is_equivalent(a, b) and is_equivalent(b, a)
    assert not is_equivalent("\\frac{1}{3}", "0.5")
    assert not is_equivalent(None, None)
    assert not is_equivalent("", "")


def test_votes_count_equivalence_classes_not_strings():
    answers = ["3", "0.5", "\\frac{1}{2}", None, "3.0", "\\dfrac12", ""]
    assert equivalence_classes(answers) == [0, 1, 1, None, 0, 1, None]
    assert vote(answers) == ("0.5", 3)  # reported as the class's first answer
    assert vote([None, ""]) is None
    assert vote([]) is None
    texts = [
        "\\boxed{1}",
        "no answer",
        "\\boxed{2}",
        "\\boxed{2.0}",
        "<think>\\boxed{1}</think>\\boxed{1}",
        "\\boxed{1}",
    ]
    assert majority_vote(texts) == ("1", 3)


def test_ties_are_broken_by_the_seeded_generator():
    answers = ["4", "7", "\\frac{8}{2}", "7.0"]  # two classes of two votes
    assert vote(answers) == ("4", 2)  # without a generator: the class seen first
    winners = [vote(answers, random.Random(seed)) for seed in range(20)]
    assert set(winners) == {("4", 2), ("7", 2)}
    assert winners == [vote(answers, random.Random(seed)) for seed in range(20)]


def test_grouping_compares_each_new_answer_with_one_representative_per_class(monkeypatch):
    calls = []
    real_verify = grading.verify

    def counting_verify(gold, target, **kwargs):
        calls.append(1)
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(grading, "verify", counting_verify)
    # Strings seen nowhere else, so no verdict is cached yet.
    answers = ["\\frac{9001}{7}", "\\frac{9002}{7}", "\\frac{18004}{14}", "\\frac{9003}{7}"] * 12
    assert equivalence_classes(answers) == [0, 1, 1, 2] * 12
    # 3 new keys after the first, each compared with at most 2 representatives, in 2 directions.
    assert 0 < len(calls) <= 2 * (1 + 2 + 2)


def test_grading_from_worker_threads_matches_the_main_thread():
    # Fresh strings, so parsing and verification really run inside the worker threads.
    cases = [
        (f"so \\boxed{{\\frac{{{3 * i}}}{{{6 * i}}}}}", "0.5" if i % 2 else "\\frac{1}{3}")
        for i in range(1, 41)
    ]

    def grade_in_worker(case):
        assert threading.current_thread() is not threading.main_thread()
        return grade(*case)

    with ThreadPoolExecutor(max_workers=4) as pool:
        in_threads = list(pool.map(grade_in_worker, cases))
    assert in_threads == [i % 2 == 1 for i in range(1, 41)]
    assert in_threads == [grade(*case) for case in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        votes = list(pool.map(majority_vote, [[text for text, _ in cases[:8]]] * 4))
    assert votes == [("\\frac{3}{6}", 8)] * 4
