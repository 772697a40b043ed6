"""The English word-problem capabilities, their validation split and system prompts:
answers recomputed from the prompt text by a reader written here, splits disjoint."""

import re

import pytest

from copd_ray.capabilities import build_capability, check_chat_template
from copd_ray.config import CapabilityConfig
from copd_ray.data import DataError, heldout_set
from copd_ray.data.synthetic import TASKS
from copd_ray.rewards import math_reward


def _solve(prompt: str) -> int:
    """Read the story the way a person would: start, then gain or loss; or groups x each."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    if " in each " in prompt:
        return numbers[0] * numbers[1]
    return numbers[0] + numbers[1] if " more." in prompt else numbers[0] - numbers[1]


@pytest.mark.parametrize("task", ["word_addsub", "word_times"])
def test_answers_follow_from_the_text_and_are_never_negative(task):
    for r in heldout_set(task, 300, seed=0):
        assert int(r.answer) == _solve(r.prompt) >= 0, r.prompt
        assert r.prompt.endswith("?")


@pytest.mark.parametrize("task", ["word_addsub", "word_times"])
def test_heldout_validation_and_training_never_meet(task):
    cap = build_capability(CapabilityConfig(name="w", source=f"synthetic:{task}", heldout_size=200,
                                            validation_size=50), seed=3)
    held, val = {r.prompt for r in cap.heldout}, {r.prompt for r in cap.validation}
    assert len(held) == 200 and len(val) == 50 and not held & val
    train = {r.prompt for r in cap.sample(400)}
    assert not train & (held | val)
    again = build_capability(CapabilityConfig(name="w", source=f"synthetic:{task}", heldout_size=200,
                                              validation_size=50), seed=3)
    assert [r.prompt for r in again.validation] == [r.prompt for r in cap.validation]
    assert cap.watched is cap.validation


def test_without_validation_runs_watch_the_heldout_set():
    cap = build_capability(CapabilityConfig(name="add", source="synthetic:add", heldout_size=20))
    assert cap.validation == [] and cap.watched is cap.heldout


def test_a_file_source_spares_validation_rows_too(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(30)))
    cap = build_capability(CapabilityConfig(name="f", source=str(path), heldout_size=10, validation_size=5))
    parts = [{r.prompt for r in rows} for rows in (cap.heldout, cap.validation, cap.sample(60))]
    assert [len(p) for p in parts] == [10, 5, 15] and set.union(*parts) == {f"q{i}" for i in range(30)}
    with pytest.raises(DataError, match="cannot spare 30 held out and for validation"):
        build_capability(CapabilityConfig(name="f", source=str(path), heldout_size=25, validation_size=5))


def test_a_system_prompt_makes_chat_rows_led_by_it(tiny_tokenizer):
    cfg = CapabilityConfig(name="t", source="synthetic:word_times", heldout_size=5, system="Be brief.",
                           template="Question: {prompt}")
    cap = build_capability(cfg)
    for r in cap.heldout + cap.sample(3):
        assert r.prompt is None and r.messages[0] == {"role": "system", "content": "Be brief."}
        assert r.messages[1]["role"] == "user" and r.messages[1]["content"].startswith("Question: ")
    with pytest.raises(DataError, match=r"'t' \(5\) have chat rows .*system prompt.* no chat template"):
        check_chat_template({"t": cap}, tiny_tokenizer)


def test_the_math_reward_reads_a_tutors_final_line():
    assert math_reward("Max has 2 boxes with 3 shells each, so 2 * 3 = 6.\nThe answer is 6.", "6") == 1.0
    assert math_reward("Max has 7 boxes with 3 books in each box.\n\nThe answer is 7.", "21") == 0.0
    assert math_reward("2 * 3 = 6 shells", "6") == 0.0  # no stated final answer earns nothing
    assert set(TASKS) >= {"word_addsub", "word_times"}
