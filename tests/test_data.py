import json
import subprocess
import sys

import pytest

from copd_ray.data import PromptRecord, heldout_set, load_records, prompt_ids, training_stream


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_skips_and_counts_bad_rows(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"problem": "1+1=", "answer": "2"}),
        "{not json",
        json.dumps({"problem": "2+2="}),
        json.dumps({"answer": "5"}),
        json.dumps({"question": "3+3=", "answer": 6, "id": "q3"}),
        json.dumps({"messages": "oops", "answer": "1"}),
        json.dumps([1, 2]),
        "",
    ])
    records, report = load_records(path, "math")
    assert [(r.prompt, r.answer, r.capability) for r in records] == [("1+1=", "2", "math"), ("3+3=", "6", "math")]
    assert records[1].id == "q3"
    assert report.kept == 2 and sum(report.skipped.values()) == 5
    assert report.skipped["malformed row"] == 2  # the bad JSON line and the list
    assert report.skipped["missing 'answer'"] == 1
    assert "5 skipped" in str(report)


def test_explicit_keys_and_messages(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"q": "hi", "a": "x"}),
        json.dumps({"messages": [{"role": "user", "content": "hey"}], "a": "y", "images": ["img.png"]}),
    ])
    (tmp_path / "img.png").write_bytes(b"")  # paths are checked to exist here, decoded later
    records, report = load_records(path, "chat", prompt_key="q", answer_key="a")
    assert records[0].prompt == "hi" and records[1].messages[0]["content"] == "hey"
    assert records[1].images == [str(tmp_path / "img.png")] and report.kept == 2  # relative to the dataset


def test_parquet_and_saved_dataset_folder(tmp_path):
    import datasets

    rows = {"problem": ["1+1=", "", "5*5="], "answer": ["2", "0", "25"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    records, report = load_records(tmp_path / "d.parquet", "arith")
    assert [r.answer for r in records] == ["2", "25"] and sum(report.skipped.values()) == 1

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "folder"))
    test_split, _ = load_records(tmp_path / "folder", "arith", split="test")
    assert [r.prompt for r in test_split] == ["1+1="]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_records(tmp_path / "folder", "arith", split="dev")


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported dataset format"):
        load_records(tmp_path / "d.csv", "x")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.jsonl", "x")


def test_record_needs_exactly_one_prompt_form():
    with pytest.raises(ValueError, match="exactly one"):
        PromptRecord(id="a", answer="1", capability="c")


def test_synthetic_answers_are_correct():
    for r in heldout_set("add", 50) + heldout_set("mul", 50):
        expr = r.prompt.rstrip("=")
        a, op, b = (expr.partition("+") if "+" in expr else expr.partition("*"))
        assert int(r.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_heldout_is_fixed_across_processes_and_excluded_from_training():
    code = "from copd_ray.data import heldout_set; print([r.prompt for r in heldout_set('mul', 20)])"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
        for seed in (1, 2)
    }
    assert len(runs) == 1
    held = heldout_set("mul", 500)
    assert len({r.prompt for r in held}) == 500
    assert str([r.prompt for r in held[:20]]) == runs.pop().strip()
    stream = training_stream("mul", held)
    train_prompts = {next(stream).prompt for _ in range(3000)}
    assert not train_prompts & {r.prompt for r in held}


def test_prompt_ids_plain_and_chat_template(tiny_tokenizer):
    record = PromptRecord(id="1", prompt="12+34=", answer="46", capability="add")
    ids = prompt_ids(record, tiny_tokenizer)
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "12+34="

    chat = PromptRecord(id="2", messages=[{"role": "user", "content": "1+1="}], answer="2", capability="add")
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(chat, tiny_tokenizer)

    import copy

    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}a:"
    ids = prompt_ids(record, templated, template="q {prompt}")
    assert templated.decode(ids, skip_special_tokens=True) == "u:q 12+34= a:"
    assert templated.decode(prompt_ids(chat, templated)) == "u:1+1= a:"
