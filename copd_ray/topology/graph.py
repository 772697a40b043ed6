"""Who teaches whom: a directed graph over branch names (edge = teacher -> student)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    branches: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]  # (teacher, student)

    def __post_init__(self) -> None:
        if len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branch names repeat: {list(self.branches)}")
        for teacher, student in self.edges:
            for end in (teacher, student):
                if end not in self.branches:
                    raise ValueError(f"edge {teacher} -> {student}: {end!r} is not a branch of {list(self.branches)}")
            if teacher == student:
                raise ValueError(f"edge {teacher} -> {student}: a branch cannot teach itself")

    @classmethod
    def pairwise(cls, branches: Sequence[str]) -> Topology:
        """Every pair, both directions."""
        return cls(tuple(branches), tuple((t, s) for s in branches for t in branches if t != s))

    @classmethod
    def hub_and_spoke(cls, hub: str, spokes: Sequence[str]) -> Topology:
        """The hub teaches each spoke and each spoke teaches the hub; spokes do not talk."""
        if hub in spokes:
            raise ValueError(f"hub {hub!r} is also listed as a spoke")
        edges = [(hub, s) for s in spokes] + [(s, hub) for s in spokes]
        return cls((hub, *spokes), tuple(edges))

    @classmethod
    def from_edges(cls, branches: Sequence[str], edges: Iterable[tuple[str, str]]) -> Topology:
        return cls(tuple(branches), tuple((t, s) for t, s in edges))

    @classmethod
    def from_config(cls, kind: str, branches: Sequence[str], hub: str | None = None,
                    edges: Iterable[tuple[str, str]] = ()) -> Topology:
        if kind == "pairwise":
            return cls.pairwise(branches)
        if kind == "hub_and_spoke":
            if hub not in branches:
                raise ValueError(f"hub {hub!r} is not a branch of {list(branches)}")
            return cls.hub_and_spoke(hub, [b for b in branches if b != hub])
        if kind == "edges":
            return cls.from_edges(branches, edges)
        if kind == "none":
            return cls(tuple(branches), ())
        raise ValueError(f"unknown topology kind {kind!r}")

    def teachers_of(self, student: str) -> list[str]:
        if student not in self.branches:
            raise KeyError(f"{student!r} is not a branch of {list(self.branches)}")
        return [t for t, s in self.edges if s == student]

    def students_of(self, teacher: str) -> list[str]:
        return [s for t, s in self.edges if t == teacher]
