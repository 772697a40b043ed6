import json
import subprocess
import sys

import pytest

from copd_ray.data import DataError, PromptRecord, heldout_set, load_records, prompt_ids, training_stream


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


def test_one_bad_byte_costs_one_row(tmp_path):
    rows = [json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)}).encode() for i in range(46)]
    rows[20] = b'{"problem": "caf\xe9", "answer": "1"}'  # Latin-1, not UTF-8
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    records, report = load_records(tmp_path / "d.jsonl", "add")
    assert report.kept == 45 and dict(report.skipped) == {"not UTF-8": 1}
    assert records[20].id == "add-21"  # later rows keep the ids of their lines
    assert "45 rows kept, 1 skipped (1 not UTF-8)" in str(report)


def test_a_row_that_breaks_the_loader_costs_that_row(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"problem": "1+1=", "answer": "2", "images": ["a" * 5000 + ".png"]}),  # too long a name
        json.dumps({"problem": "2+2=", "answer": "4"}),
    ])
    records, report = load_records(path, "x")
    assert [r.answer for r in records] == ["4"] and dict(report.skipped) == {"unreadable row (OSError)": 1}


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
    with pytest.raises(DataError, match="no split 'dev'"):
        load_records(tmp_path / "folder", "arith", split="dev")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet cannot be read"):
        load_records(tmp_path / "broken.parquet", "arith")


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset format"):
        load_records(tmp_path / "d.csv", "x")
    with pytest.raises(DataError, match="does not exist"):
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


def test_chat_rows_need_a_chat_template(tmp_path, tiny_tokenizer):
    from copd_ray.capabilities import build_capability, check_chat_template
    from copd_ray.config import CapabilityConfig

    chat = {"messages": [{"role": "user", "content": "1+1="}], "answer": "2"}
    path = _write_jsonl(tmp_path / "chat.jsonl", [json.dumps(chat)] * 3 + [json.dumps({"prompt": "1+2=", "answer": "3"})])
    caps = {"chat": build_capability(CapabilityConfig(name="chat", source=str(path), heldout_size=1)),
            "add": build_capability(CapabilityConfig(name="add", source="synthetic:add", heldout_size=5))}
    assert caps["chat"].chat_rows == 3 and caps["add"].chat_rows == 0
    with pytest.raises(DataError, match=r"capabilities 'chat' \(3\) have chat rows .* no chat template"):
        check_chat_template(caps, tiny_tokenizer)
    check_chat_template({"add": caps["add"]}, tiny_tokenizer)  # plain prompts need none

    import copy

    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    check_chat_template(caps, templated)
