"""What a run asks Ray for: each branch's placement-group bundles, and their sum."""

from __future__ import annotations

from collections import Counter

from copd_ray.config import Config
from copd_ray.topology.graph import scoring_branches


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


BRANCH_NODE = "copd_branch_node"  # the custom resource of a node that holds one branch (ray.branch_nodes=own)


def branch_bundles(cfg: Config, frozen: bool, scores: bool) -> list[dict]:
    """The placement-group bundles of a branch: trainer ranks, generators, then its scorer.
    With ray.branch_nodes=own the first also takes its node's one `copd_branch_node`."""
    r = cfg.resources
    bundles = [] if frozen else ([_bundle(r.trainer_cpus, r.trainer_gpus)] * r.num_trainers
                                 + [_bundle(r.generator_cpus, r.generator_gpus)] * r.num_generators)
    bundles += [_bundle(r.scorer_cpus, r.scorer_gpus)] if scores else []
    if cfg.ray.branch_nodes == "own":
        bundles[0] = {**bundles[0], BRANCH_NODE: 1}
    return bundles


def strategy(cfg: Config) -> str:
    """A branch's placement strategy: all on one node where it must have a node of its own."""
    return "STRICT_PACK" if cfg.ray.branch_nodes == "own" else "PACK"


def run_needs(cfg: Config, edges) -> Counter:
    """CPUs and GPUs of every branch's bundles together (they are all placed at once), for the
    run's topology `edges` (which branches have a scorer)."""
    scoring = scoring_branches(cfg, edges)
    need: Counter = Counter()
    for b in cfg.branch_list():
        for bundle in branch_bundles(cfg, b.frozen, b.name in scoring):
            need.update(bundle)
    return need
