"""One training step of one branch, from the driver's side: it hands out prompts and
object references and gets numbers back.

    generators --Rollouts--> teacher scorer j --TeacherScores--+
        |                                                       v
        +------------------- Rollouts --------------------> trainer(s) --record--> driver

`launch` submits the step's generation and scoring (nothing waits); `finish` submits
the update and waits for its record. Between the two the driver may launch the next
step, which is how generation overlaps training when schedule.max_staleness > 0.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import ray

from copd_ray.actors import BranchGroup
from copd_ray.config import Config
from copd_ray.step_data import OPDEdge, Rollouts, StepPrompts, StepSpec, TeacherScores


@dataclass
class InFlight:
    """A launched step: its layout and the references of its inputs, in that layout."""

    spec: StepSpec
    inputs: list  # [native Rollouts refs..., per edge: its Rollouts refs..., its TeacherScores ref]


def launch(group: BranchGroup, prompts: StepPrompts, cfg: Config, beta: float) -> InFlight:
    """Submit the step's rollouts (native batch, then each teacher's prompts) and have each
    teacher score the student's rollouts on its prompts: log pi_j(y_t | x, y_<t)."""
    native = group.sample(prompts.native) if prompts.native is not None else []
    spec = StepSpec(prompts.step, prompts.phase, cfg.grpo.group_size, native_parts=len(native),
                    behaviour_exact=cfg.engine.kind == "hf" and cfg.model.dtype == "float32")
    inputs = list(native)
    for teacher, (endpoint, batch) in prompts.teachers.items():
        rollouts = group.sample(batch)
        inputs += rollouts + [score(endpoint, rollouts)]
        spec.edges.append(OPDEdge(teacher, len(rollouts), beta))
    return InFlight(spec, inputs)


def finish(group: BranchGroup, flight: InFlight) -> dict:
    """The clipped update on the launched inputs (old log-probs, GRPO + OPD advantages,
    importance weights where the rollouts are off-policy); returns the step's record."""
    flight.spec.trainer_version = group.version + group.trained_since_sync
    results, nbytes = fetch(group.train(flight.spec, flight.inputs))
    group.trained()  # only now: a step that failed is retried from the same count
    world = len(results)
    train = results[0]["train"] if world == 1 else {
        k: (sum(r["train"][k] for r in results) / world if k != "nan_skipped" else max(r["train"][k] for r in results))
        for k in results[0]["train"]}
    record = {**results[0]["step"], "branch": group.name, **train}
    record["time/train"] = record.pop("seconds")
    record["driver/bytes_received"] = nbytes
    return record


def run(group: BranchGroup, prompts: StepPrompts, cfg: Config, beta: float) -> dict:
    return finish(group, launch(group, prompts, cfg, beta))


def fetch(refs: list) -> tuple[list, int]:
    """ray.get, and the bytes that reached the driver (pickled size of what it got)."""
    values = ray.get(refs)
    return values, sum(len(pickle.dumps(v)) for v in values)


def score(endpoint, rollouts: list) -> ray.ObjectRef:
    """A TeacherScores reference, through whichever endpoint the topology gave: a
    ScorerActor handle, or the Serve deployment handle in front of it (then a small task
    hands the rollouts to it, so that they still bypass the driver)."""
    from ray.serve.handle import DeploymentHandle

    if isinstance(endpoint, DeploymentHandle):
        return _score_through_serve.remote(endpoint, *rollouts)
    return endpoint.score_rollouts.remote(*rollouts)


@ray.remote(num_cpus=0)
def _score_through_serve(handle, *parts: Rollouts) -> TeacherScores:
    rollouts = Rollouts.concat(list(parts))
    scores = handle.score.remote(rollouts.sequences, rollouts.prompt_lengths).result()
    return TeacherScores(scores.logprobs, scores.version, scores.extra["seconds"])
