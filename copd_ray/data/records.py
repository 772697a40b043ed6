"""The prompt record: one problem of one capability, as every layer passes it around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptRecord:
    id: str
    answer: str
    capability: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"record {self.id!r}: give exactly one of prompt or messages")
