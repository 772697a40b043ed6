"""Errors a user can cause or fix. The CLI prints each as one line (its message) and
keeps the traceback for `--debug` and the run's error log; anything else is a bug."""

from __future__ import annotations


class CopdError(Exception):
    """Something the user can act on; its message says what happened and what to do."""


class CheckpointError(CopdError):
    """No usable checkpoint where one was asked for, or one from another run."""


class ActorFailure(CopdError):
    """An actor died more often than ray.max_failures allows, or could not be recovered."""
