import json

import pytest

from copd_ray.capabilities import build_capability
from copd_ray.config import CapabilityConfig


def test_file_capability_holds_out_a_fixed_disjoint_slice(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)}) for i in range(40)) + "\n{bad\n")
    cfg = CapabilityConfig(name="inc", source=str(path), heldout_size=10)
    cap = build_capability(cfg)
    again = build_capability(cfg)
    assert [r.prompt for r in cap.heldout] == [r.prompt for r in again.heldout] and len(cap.heldout) == 10
    train = {r.prompt for r in cap.sample(90)}
    assert len(train) == 30 and not train & {r.prompt for r in cap.heldout}
    assert cap.reports[0].skipped["malformed row"] == 1


def test_file_capability_with_its_own_heldout_file(tmp_path):
    train, held = tmp_path / "t.jsonl", tmp_path / "h.jsonl"
    train.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n")
    held.write_text(json.dumps({"problem": "b", "answer": "2"}) + "\n")
    cap = build_capability(CapabilityConfig(name="x", source=str(train), heldout=str(held), reward="math"))
    assert [r.prompt for r in cap.heldout] == ["b"] and cap.sample(2)[1].prompt == "a"
    assert cap.reward("\\boxed{2}", "2") == 1.0


def test_too_small_or_empty_sources_fail_clearly(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="cannot spare 500 held out"):
        build_capability(CapabilityConfig(name="x", source=str(path)))
    path.write_text(json.dumps({"problem": "a"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        build_capability(CapabilityConfig(name="x", source=str(path)))


def test_math500_as_a_capability():
    from conftest import EVAL_DATA

    cap = build_capability(CapabilityConfig(name="math", source=str(EVAL_DATA / "math500.jsonl"), heldout_size=100, reward="math"))
    assert len(cap.heldout) == 100 and cap.reports[0].kept == 500
    record = cap.heldout[0]
    assert cap.reward(f"\\boxed{{{record.answer}}}", record.answer) == 1.0
