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
from copd_ray.batch import step_record
from copd_ray.config import Config
from copd_ray.step_data import OPDEdge, Rollouts, StepPrompts, StepSpec, TeacherScores, one_per_rank
from copd_ray.teacher_clocks import TeacherClocks


@dataclass
class InFlight:
    """A launched step: its layout and, per trainer rank, the references of its share of the inputs."""

    spec: StepSpec
    inputs: list[list]  # [rank][native Rollouts refs..., per edge: its Rollouts refs..., its TeacherScores ref]


def launch(group: BranchGroup, prompts: StepPrompts, cfg: Config, clocks: TeacherClocks | None = None) -> InFlight:
    """Submit the step's rollouts (native batch, then each teacher's prompts), each generator
    dealing its rows to the trainer ranks, and have each teacher score the student's rollouts
    on its prompts: log pi_j(y_t | x, y_<t), dealt the same way. With `clocks` (branches on
    their own clocks) a teacher scores only once it holds the weights the bound gives it."""
    ranks = len(group.trainers)
    native = group.sample(prompts.native, ranks) if prompts.native is not None else []
    spec = StepSpec(prompts.step, prompts.phase, cfg.grpo.group_size, native_parts=len(native),
                    behaviour_exact=cfg.engine.kind == "hf" and cfg.model.dtype == "float32")
    inputs = [[part[r] for part in native] for r in range(ranks)]
    for teacher, (endpoint, batch) in prompts.teachers.items():
        rollouts = group.sample(batch, ranks)
        if clocks is not None:
            clocks.before_scoring(teacher, prompts.step)
        scores = score(endpoint, rollouts, ranks)
        if clocks is not None:
            clocks.scored(teacher, group.name, prompts.step, scores)
        for r in range(ranks):
            inputs[r] += [part[r] for part in rollouts] + [scores[r]]
        spec.edges.append(OPDEdge(teacher, len(rollouts)))
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
    record = {**step_record(flight.spec, [r["tally"] for r in results]), "branch": group.name, **train}
    record["time/train"] = record.pop("seconds")
    record["driver/bytes_received"] = nbytes
    return record


def run(group: BranchGroup, prompts: StepPrompts, cfg: Config) -> dict:
    return finish(group, launch(group, prompts, cfg))


def fetch(refs: list) -> tuple[list, int]:
    """ray.get, and the bytes that reached the driver (pickled size of what it got)."""
    values = ray.get(refs)
    return values, sum(len(pickle.dumps(v)) for v in values)


def score(endpoint, rollouts: list[list], ranks: int) -> list:
    """One TeacherScores reference per trainer rank, through whichever endpoint the topology
    gave: a ScorerActor handle, or the Serve deployment handle in front of it (then a small
    task hands the rollouts to it, so that they still bypass the driver). `rollouts`:
    references, `[generator][rank]`."""
    from ray.serve.handle import DeploymentHandle

    parts = [ref for per_rank in rollouts for ref in per_rank]
    if isinstance(endpoint, DeploymentHandle):
        refs = _score_through_serve.options(num_returns=ranks).remote(endpoint, ranks, *parts)
    else:
        refs = endpoint.score_rollouts.options(num_returns=ranks).remote(ranks, *parts)
    return list(refs) if ranks > 1 else [refs]


@ray.remote(num_cpus=0)
def _score_through_serve(handle, ranks: int, *parts: Rollouts):
    rollouts = Rollouts.concat(list(parts))
    scores = handle.score.remote(rollouts.sequences(), rollouts.prompt_lengths.tolist()).result()
    return one_per_rank(TeacherScores.of(scores).cut(list(parts), ranks))
