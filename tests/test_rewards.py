import json
import re
import threading
import time

import pytest

from conftest import EVAL_DATA
from copd_ray.rewards import exact_match, get_reward, math_reward, multiple_choice
from copd_ray.rewards.extract import final_answer, last_boxed


def _rows(name):
    return [json.loads(line) for line in (EVAL_DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def math500():
    return _rows("math500.jsonl")


def test_boxed_ground_truth_scores_one_on_all_of_math500(math500):
    assert len(math500) == 500
    wrong = [r["answer"] for r in math500 if math_reward(f"We find \\boxed{{{r['answer']}}}.", r["answer"]) != 1.0]
    assert wrong == []


def _same_answer(a: str, b: str) -> bool:
    # Pairs that really are the same answer ("7" twice, "x=5" vs "5") are not negatives.
    strip = lambda s: re.sub(r"^[a-z]\s*=\s*", "", s.replace(" ", ""))  # noqa: E731
    return strip(a) == strip(b)


def test_another_problems_answer_scores_zero(math500):
    pairs = [(r["answer"], math500[(i + 7) % 500]["answer"]) for i, r in enumerate(math500)]
    pairs = [(gold, other) for gold, other in pairs if not _same_answer(gold, other)]
    assert len(pairs) > 480
    accepted = [(g, o) for g, o in pairs if math_reward(f"\\boxed{{{o}}}", g) != 0.0]
    assert accepted == []


@pytest.mark.parametrize(
    "response, answer",
    [
        ("so the result is \\boxed{14/3}", "\\frac{14}{3}"),
        ("\\boxed{\\frac{14}{3}}", "14/3"),
        ("\\boxed{\\dfrac{1}{2}}", "0.5"),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
        ("The answer is 42.", "42"),
        ("Final answer: 3\\pi", "3\\pi"),
        ("#### 1,000", "1000"),
        ("first \\boxed{3} then correcting: \\boxed{\\frac{1}{4}}", "0.25"),
    ],
)
def test_equivalent_spellings_score_one(response, answer):
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize(
    "response",
    ["", "no answer here", "\\boxed{", "\\boxed{" * 500, "\x00\\boxed{}", "\\boxed{" + "9^{" * 300 + "}" * 300 + "}",
     "\\boxed{" + "x" * 5000 + "}", "\\boxed{\\frac{1}{0}}"],
)
def test_hostile_text_scores_zero_without_raising(response):
    start = time.perf_counter()
    assert math_reward(response, "1") == 0.0
    assert time.perf_counter() - start < 15


def test_runs_off_the_main_thread_with_its_time_limit():
    out = {}

    def work():
        out["right"] = math_reward("\\boxed{\\frac{14}{3}}", "14/3")
        out["wrong"] = math_reward("\\boxed{2}", "3")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert out == {"right": 1.0, "wrong": 0.0}


def test_final_answer_extraction():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert final_answer("Answer: 17") == "17"
    assert final_answer("nothing") is None


def test_exact_match():
    assert exact_match("168", "168") == 1.0
    assert exact_match(" Paris. ", "paris") == 1.0
    assert exact_match("1680", "168") == 0.0
    assert exact_match("the answer is 168", "168") == 1.0


def test_multiple_choice():
    assert multiple_choice("I think the answer is (C).", "C") == 1.0
    assert multiple_choice("\\boxed{B}", "(B)") == 1.0
    assert multiple_choice("A seems wrong; D", "A") == 0.0
    assert multiple_choice("no letter", "A") == 0.0


def test_registry_names_and_imports():
    assert get_reward("math") is math_reward
    assert get_reward("copd_ray.rewards.simple:exact_match") is exact_match
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        get_reward("bleu")
    with pytest.raises(ValueError, match="cannot be imported"):
        get_reward("copd_ray.nope:f")


def test_other_benchmarks_verify_their_own_answers():
    for name in ["aime24.jsonl", "aime25.jsonl", "hmmt25_feb.jsonl", "minervamath.jsonl"]:
        rows = _rows(name)
        assert all(math_reward(f"\\boxed{{{r['answer']}}}", r["answer"]) == 1.0 for r in rows), name
