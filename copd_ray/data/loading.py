"""Capability datasets from JSONL, Parquet or a saved Hugging Face dataset folder.

A row without what a prompt record needs (or that cannot be read at all: not UTF-8, not
JSON) is skipped and counted, never fatal: one bad line in a million-row file should cost
one row, and the report says how many and why. A dataset that cannot be read as a whole
raises a DataError.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copd_ray.data.records import PromptRecord
from copd_ray.errors import CopdError

PROMPT_KEYS = ("prompt", "problem", "question")
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")  # besides a saved dataset folder


class DataError(CopdError, ValueError):
    """A dataset that cannot be used: missing, unreadable, or with no usable rows."""


@dataclass
class _Unreadable:
    """A line that is not a row at all; it keeps its place so later rows keep their ids."""

    reason: str


@dataclass
class LoadReport:
    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    def __str__(self) -> str:
        if not self.skipped:
            return f"{self.path}: {self.kept} rows"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.path}: {self.kept} rows kept, {sum(self.skipped.values())} skipped ({reasons})"


def _rows(path: Path, split: str):
    """Yield raw rows (a JSON line may hold any value), or _Unreadable for a line that is none."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        yield from ds
    elif path.suffix == ".parquet":
        import datasets

        yield from datasets.Dataset.from_parquet(str(path))
    elif path.suffix in DATASET_SUFFIXES:
        # Line by line, each decoded on its own, rather than datasets' json builder or a
        # text-mode file: either fails the whole file on one malformed line or byte.
        with path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield _Unreadable("not UTF-8")
                except json.JSONDecodeError:
                    yield _Unreadable("malformed row")
    else:
        raise ValueError("unsupported dataset format (use .jsonl, .parquet or a saved dataset folder)")


def _valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list) and len(messages) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    )


def _media(items: Any, base: Path, kind: str) -> list | str:
    """A row's images or videos with file paths made absolute (relative ones are relative to
    the dataset's folder), or the reason the row is skipped. A picture may also be bytes or
    a nested list of pixels; a video a list of frames, a folder of frame images or a .npy."""
    if items is None:
        return []
    if not isinstance(items, list):
        return f"malformed {kind!r}"
    out = []
    for item in items:
        if isinstance(item, str):
            path = Path(item).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                return f"missing {kind[:-1]} file"
            if kind == "videos" and not (path.is_dir() or path.suffix == ".npy"):
                return "video not given as frames (a folder of images or a .npy)"
            item = str(path)
        out.append(item)
    return out


def _to_record(row: Any, index: int, capability: str, prompt_key: str | None, answer_key: str,
               base: Path = Path(".")) -> PromptRecord | str:
    """The record, or the reason the row was skipped."""
    if isinstance(row, _Unreadable):
        return row.reason
    if not isinstance(row, dict):
        return "malformed row"
    answer = row.get(answer_key)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return f"missing {answer_key!r}"
    if isinstance(answer, (list, dict)):
        return f"non-scalar {answer_key!r}"
    messages = row.get("messages")
    if messages is not None:
        if not _valid_messages(messages):
            return "malformed 'messages'"
        prompt = None
    else:
        keys = (prompt_key,) if prompt_key else PROMPT_KEYS
        prompt = next((row[k] for k in keys if isinstance(row.get(k), str) and row[k].strip()), None)
        if prompt is None:
            return f"missing prompt (looked for {', '.join(map(repr, keys))})"
    images, videos = _media(row.get("images"), base, "images"), _media(row.get("videos"), base, "videos")
    for media in (images, videos):
        if isinstance(media, str):
            return media
    return PromptRecord(
        id=str(row.get("id", f"{capability}-{index}")),
        prompt=prompt,
        messages=messages,
        answer=str(answer),
        capability=capability,
        images=images,
        videos=videos,
    )


def load_records(
    path: str | Path,
    capability: str,
    prompt_key: str | None = None,
    answer_key: str = "answer",
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[PromptRecord], LoadReport]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    report = LoadReport(str(path))
    records: list[PromptRecord] = []
    base = path if path.is_dir() else path.parent
    try:
        for index, row in enumerate(_rows(path, split)):
            try:
                result = _to_record(row, index, capability, prompt_key, answer_key, base)
            except (TypeError, ValueError, OSError) as e:  # whatever else a row holds costs that row only
                result = f"unreadable row ({type(e).__name__})"
            if isinstance(result, str):
                report.skipped[result] += 1
                continue
            records.append(result)
            if limit is not None and len(records) >= limit:
                break
    except (OSError, ValueError) as e:  # the dataset itself: a corrupt parquet, a folder that is no dataset
        raise DataError(f"dataset {path} cannot be read: {e}") from None
    report.kept = len(records)
    return records, report
