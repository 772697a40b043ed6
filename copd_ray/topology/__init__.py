"""Who teaches whom (the graph) and where each teacher's scorer lives (the actor)."""

from copd_ray.topology.graph import Topology

__all__ = ["Topology"]
