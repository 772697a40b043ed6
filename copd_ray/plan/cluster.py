"""The cluster: node types and their GPUs, read from cluster.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from copd_ray.plan.constants import INSTANCE_TYPES, GiB, PlanError


# -- the cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    name: str
    instance_type: str
    gpus: int | None  # None: an unknown instance type that cluster.yaml gives no GPU count
    gpu: str
    gpu_bytes: int | None  # None: unknown instance type
    host_bytes: int | None
    max_workers: int  # how many of it the cluster may run (1 for the head)
    head: bool


@dataclass(frozen=True)
class Cluster:
    source: str
    node_types: tuple[NodeType, ...]
    max_workers: int

    def gpu_capacity(self) -> int | None:
        """GPUs of the head plus the largest workers up to the cluster's max_workers (None: unknown)."""
        if any(n.gpus is None for n in self.node_types):
            return None
        head = sum(n.gpus for n in self.node_types if n.head)
        workers = sorted((n for n in self.node_types if not n.head), key=lambda n: -n.gpus)
        left, total = self.max_workers, head
        for n in workers:
            take = min(n.max_workers, left)
            total, left = total + take * n.gpus, left - take
        return total


def read_cluster(path: str | Path) -> Cluster:
    """The node types of a Ray cluster config (`ray up`'s YAML)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"cannot read the cluster config {path}: {e}") from None
    types = tree.get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        raise PlanError(f"{path} names no available_node_types")
    head_name = tree.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        spec = spec or {}
        instance = str((spec.get("node_config") or {}).get("InstanceType", ""))
        known = INSTANCE_TYPES.get(instance)
        resources = spec.get("resources") or {}
        gpus = resources.get("GPU", known.gpus if known else None)
        gpus = None if gpus is None else int(gpus)
        head = name == head_name
        nodes.append(NodeType(
            name, instance, gpus, known.gpu if known else "",
            int(known.gpu_gib * GiB) if known and known.gpu_gib else None,
            int(known.host_gib * GiB) if known else None,
            1 if head else int(spec.get("max_workers", tree.get("max_workers", 0)) or 0), head))
    return Cluster(str(path), tuple(nodes), int(tree.get("max_workers", 0) or 0))


