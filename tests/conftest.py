import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "data" / "eval"


# Small actors (so that several branches share the two cores' Ray) and small step batches,
# for the tests on the untrained tiny policy.
SMALL_ACTORS = ["resources.trainer_cpus=0.2", "resources.generator_cpus=0.1", "resources.scorer_cpus=0.1"]
SMALL_STEPS = ["grpo.prompts_per_step=4", "grpo.group_size=4", "opd.prompts_per_teacher=4", "opd.samples_per_prompt=2"]
# The runs of the tests (one list, so that the runs share a shape and the warm pool's actors).
FAST = ["wandb.mode=disabled", *SMALL_ACTORS, *SMALL_STEPS, "capabilities.0.heldout_size=40",
        "capabilities.1.heldout_size=40", "eval.during_training_size=20", "metrics.pair_sequences=8"]

# A whole comparison on the untrained tiny policy in about two minutes: T = 4 steps per branch.
TINY_COMPARE = [
    "wandb.mode=disabled", *SMALL_ACTORS, *SMALL_STEPS, "capabilities.0.heldout_size=20", "capabilities.1.heldout_size=20", "eval.every=0", "metrics.pair_sequences=8",
    "metrics.pair_every=1", "schedule.cycles=1", "schedule.rl_steps=2", "schedule.opd_steps=2"]


def sigint_reaches_child() -> None:
    """preexec_fn of a child process a test stops with SIGINT (Ctrl-C). A shell that starts
    a job in the background without job control (`cmd &` in a script, nohup) leaves SIGINT
    ignored, every child inherits that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from copd_ray.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """An untrained tiny policy: enough for engine mechanics, fast to build."""
    import torch

    from copd_ray.models import build_tiny_policy

    torch.set_num_threads(2)
    return build_tiny_policy(tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the session (never a mock): 4 logical CPUs so three small
    branches fit; the machine has 2 cores and the actors mostly take turns."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def warm_pool(ray_session):
    """The session's WarmPool: runs of one shape reuse the last run's actor processes
    (reloaded in place; tests/test_warm_pool.py checks a warm run computes what a cold one
    does) instead of starting and importing torch in new ones. Tests that kill actors or
    need the cluster's whole capacity run cold."""
    from copd_ray.runtime import WarmPool

    pool = WarmPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The untrained tiny policy saved as a Hugging Face folder."""
    from copd_ray.models import save_policy

    return save_policy(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "policy")


@contextlib.contextmanager
def started_branch(name, cfg, model_folder, run_id, frozen=False):
    """A BranchGroup placed, started and wired, shut down on exit (`frozen`: a fixed
    teacher, its scorer alone)."""
    import ray

    from copd_ray.actors import BranchGroup

    group = BranchGroup(name, cfg, str(model_folder), run_id, frozen=frozen)
    try:
        group.wait_placed()
        ray.get(group.start_actors())
        group.wire()
        yield group
    finally:
        group.shutdown()


def sample(group, prompts, params, answers=None, rewards=None):
    """A branch's rollouts of `prompts` (a Rollouts, gathered from every generator)."""
    import ray

    from copd_ray.step_data import PromptBatch, Rollouts

    n = len(prompts)
    batch = PromptBatch(prompts, answers or [""] * n, rewards or ["exact_match"] * n, params)
    return Rollouts.concat(ray.get([parts[0] for parts in group.sample(batch)]))


def train_on(group, batch) -> dict:
    """Every trainer rank's update on a hand-made TrainBatch (a run's steps build theirs
    inside the trainer); rank 0's metrics."""
    import ray

    world = len(group.trainers)
    results = ray.get([t.__ray_call__.remote(lambda actor, b: actor.learner.train_step(b), batch.shard(i, world))
                       for i, t in enumerate(group.trainers)])
    group.trained_since_sync = True
    return results[0]
