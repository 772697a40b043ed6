"""What a run asks Ray for: each branch's placement-group bundles, and their sum."""

from __future__ import annotations

from collections import Counter

from copd_ray.config import Config
from copd_ray.topology.graph import scoring_branches


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def branch_bundles(cfg: Config, frozen: bool, scores: bool) -> list[dict]:
    """The placement-group bundles of a branch: trainer ranks, generators, then its scorer."""
    r = cfg.resources
    bundles = [] if frozen else ([_bundle(r.trainer_cpus, r.trainer_gpus)] * r.num_trainers
                                 + [_bundle(r.generator_cpus, r.generator_gpus)] * r.num_generators)
    return bundles + ([_bundle(r.scorer_cpus, r.scorer_gpus)] if scores else [])


def run_needs(cfg: Config) -> Counter:
    """CPUs and GPUs of every branch's bundles together (they are all placed at once)."""
    scoring = scoring_branches(cfg, cfg.topology_graph().edges)
    need: Counter = Counter()
    for b in cfg.branch_list():
        for bundle in branch_bundles(cfg, b.frozen, b.name in scoring):
            need.update(bundle)
    return need
