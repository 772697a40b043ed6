"""Who teaches whom: a directed graph over branch names (edge = teacher -> student)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from copd_ray.config import Config


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
        """The graph that topology.kind, topology.hub and topology.edges describe (the config's
        checks of them are these, and their errors name those keys)."""
        edges = [tuple(e) for e in edges]
        if hub is not None and kind != "hub_and_spoke":
            raise ValueError(f"topology.hub is only for kind=hub_and_spoke, not {kind!r}")
        if edges and kind != "edges":
            raise ValueError(f"topology.edges is only for kind=edges, not {kind!r}")
        if kind == "pairwise":
            return cls.pairwise(branches)
        if kind == "hub_and_spoke":
            if hub not in branches:
                raise ValueError(f"topology.hub {hub!r} is not a branch; branches: {list(branches)}")
            return cls.hub_and_spoke(hub, [b for b in branches if b != hub])
        if kind == "edges":
            if not edges:
                raise ValueError("topology.kind=edges needs topology.edges: [[teacher, student], ...]")
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


def measured_pairs(cfg: Config, edges: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (teacher, student) pairs whose metrics a run logs (metrics.pairs)."""
    if cfg.metrics.pairs == "edges":
        return list(edges)
    branches = cfg.branch_list()
    return [(t.name, s.name) for s in branches if not s.frozen for t in branches if t.name != s.name]


def scoring_branches(cfg: Config, edges: Iterable[tuple[str, str]]) -> set[str]:
    """The branches that get a scorer actor: teachers, both sides of every measured pair,
    every branch when Serve exposes them, and frozen teachers (a scorer is all they are).
    Any other branch is never asked for a log-prob, and a scorer there would be one more
    process holding a copy of the model (on a GPU, a share of one)."""
    branches = cfg.branch_list()
    if cfg.serve.enabled:
        return {b.name for b in branches}
    edges = list(edges)
    needed = {t for t, _ in edges} | {b.name for b in branches if b.frozen}
    if cfg.metrics.pair_every:  # also on for schedule.kind=adaptive, which the config checks
        needed |= {n for pair in measured_pairs(cfg, edges) for n in pair}
    return needed
