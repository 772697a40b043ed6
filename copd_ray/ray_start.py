"""Joining or starting Ray, on its own: the CLI starts it while torch and the driver import."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import ray

from copd_ray.bundles import run_needs
from copd_ray.config import Config, ConfigError
from copd_ray.topology.graph import Topology

T = TypeVar("T")


class _DefaultAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


_AUTH_NOTICE = _DefaultAuthNotice()  # one instance: adding it again is a no-op


def init_ray(cfg: Config, topology: Topology | None = None) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS (as under `ray job submit`), or
    start a local Ray. `topology`: the run's, when given from Python instead of topology.*.
    Returns whether this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # A local Ray of this run: its start-up INFO lines and the notice that Ray's default
        # token authentication is on would come before the run's own output, every run.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AUTH_NOTICE)
        refuse_what_no_local_ray_holds(cfg, topology)
        try:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except ValueError as e:  # ray.init() joins a head already running here (`ray start --head`)
            if "existing cluster" not in str(e):
                raise
            raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus:g}: a Ray already runs on this machine (ray start "
                              "--head?) and this run joins it, where ray.num_cpus cannot be set; leave it out, or "
                              "run `ray stop` first (it stops every Ray of this user here)") from None
    return True


def refuse_what_no_local_ray_holds(cfg: Config, topology: Topology | None = None) -> None:
    """A local Ray has this machine's CPUs (or ray.num_cpus) and GPUs. Branches that ask for
    more would wait out ray.placement_timeout_s and then fail: refused before Ray starts."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    if cfg.ray.branch_nodes == "own":
        raise ConfigError("ray.branch_nodes=own places each branch on a node of its own, and a local Ray is one "
                          "node: join a cluster (ray.address) whose nodes offer copd_branch_node, or use any")
    need = run_needs(cfg, (topology or cfg.topology_graph()).edges)
    have = {"CPU": cfg.ray.num_cpus if cfg.ray.num_cpus is not None else get_num_cpus()}
    if need.get("GPU"):
        have["GPU"] = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    short = [f"{need[k]:g} {k}s, and a local Ray here has {have[k]:g}" for k in have if need.get(k, 0) > have[k]]
    if short:
        r = cfg.resources
        raise ConfigError(f"the run's actors ask for {'; '.join(short)} (resources: {r.num_trainers} trainers x "
                          f"{r.trainer_cpus:g} CPUs, {r.num_generators} generators x {r.generator_cpus:g}, a scorer "
                          f"{r.scorer_cpus:g}, per branch): lower resources.*, set ray.num_cpus, or join a cluster "
                          "(ray.address)")


def beside_ray(cfg: Config, work: Callable[[], T], topology: Topology | None = None) -> tuple[T, bool]:
    """work() on another thread while Ray starts (or is joined) on this one, which must be the
    main thread (Ray sets its signal handlers there): ray.init mostly waits for the
    processes it starts (`topology`: as for init_ray). Returns (what work returned, whether
    this call started Ray); if work fails, the Ray this call started is stopped."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        working = pool.submit(work)
        started_ray = init_ray(cfg, topology)
        try:
            return working.result(), started_ray
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
