"""Joining or starting Ray, on its own: the CLI starts it while torch and the driver import."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import ray

from copd_ray.config import Config, ConfigError

T = TypeVar("T")


class _DefaultAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


_AUTH_NOTICE = _DefaultAuthNotice()  # one instance: adding it again is a no-op


def init_ray(cfg: Config) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS (as under `ray job submit`), or
    start a local Ray. Returns whether this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # A local Ray of this run: its start-up INFO lines and the notice that Ray's default
        # token authentication is on would come before the run's own output, every run.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AUTH_NOTICE)
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


def beside_ray(cfg: Config, work: Callable[[], T]) -> tuple[T, bool]:
    """work() on another thread while Ray starts (or is joined) on this one, which must be the
    main thread (Ray sets its signal handlers there): ray.init mostly waits for the
    processes it starts. Returns (what work returned, whether this call started Ray); if
    work fails, the Ray this call started is stopped."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        working = pool.submit(work)
        started_ray = init_ray(cfg)
        try:
            return working.result(), started_ray
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
