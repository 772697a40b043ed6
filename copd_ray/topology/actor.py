"""The TopologyActor: the graph plus each branch's live scorer endpoint.

A branch never holds another branch's handle: it asks here for its teachers, every time,
so a restarted scorer registered again is picked up without restarting anything else.
"""

from __future__ import annotations

import os
import uuid

import ray

from copd_ray.topology.graph import Topology


@ray.remote(num_cpus=0)
class TopologyActor:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.endpoints: dict[str, object] = {}
        self.registrations: dict[str, int] = {}
        # New in every process Ray (re)starts: the driver tells a restarted one by it, and gives
        # it the run's graph (a restart runs __init__ with the first run's) and endpoints again.
        self.incarnation = uuid.uuid4().hex

    def ready(self) -> dict:
        return {"pid": os.getpid(), "incarnation": self.incarnation, "node": ray.get_runtime_context().get_node_id()}

    def reset(self, topology: Topology) -> None:
        """Another run's graph, no endpoints yet (a `WarmPool` keeps this actor between runs)."""
        incarnation = self.incarnation
        self.__init__(topology)
        self.incarnation = incarnation

    def register(self, branch: str, endpoint) -> int:
        """Set (or replace) a branch's scorer endpoint; returns how often it was set."""
        if branch not in self.topology.branches:
            raise KeyError(f"{branch!r} is not a branch of {list(self.topology.branches)}")
        self.endpoints[branch] = endpoint
        self.registrations[branch] = self.registrations.get(branch, 0) + 1
        return self.registrations[branch]

    def teachers_of(self, branch: str) -> dict[str, object]:
        """{teacher name: live scorer endpoint} for every teacher of `branch`."""
        teachers = self.topology.teachers_of(branch)
        missing = [t for t in teachers if t not in self.endpoints]
        if missing:
            raise RuntimeError(f"teachers {missing} of {branch!r} have no registered scorer yet")
        return {t: self.endpoints[t] for t in teachers}
