"""A branch as an actor group: trainer rank(s), generator(s) and a scorer in one
placement group, wired for data parallelism and weight broadcast."""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from copd_ray.actors.generator import GeneratorActor
from copd_ray.actors.scorer import ScorerActor
from copd_ray.actors.trainer import TrainerActor
from copd_ray.bundles import branch_bundles, strategy
from copd_ray.config import Config
from copd_ray.errors import CopdError
from copd_ray.step_data import PromptBatch, StepSpec


class PlacementError(CopdError, RuntimeError):
    pass


ACTOR_CLASSES = {"trainer": TrainerActor, "generator": GeneratorActor, "scorer": ScorerActor}


class BranchGroup:
    """A branch's actors. A frozen branch (a fixed teacher) is its scorer alone; a branch that
    no one asks for log-probs (`scores=False`: no student, no pair metrics, no Serve) has none."""

    def __init__(self, name: str, cfg: Config, model_path: str, run_id: str, frozen: bool = False,
                 scores: bool = True) -> None:
        self.name, self.cfg, self.run_id, self.frozen, self.scores = name, cfg, run_id, frozen, scores or frozen
        self.bundles = branch_bundles(cfg, frozen, self.scores)
        self.pg = placement_group(self.bundles, strategy=strategy(cfg), name=f"copd-{run_id}-{name}")
        self.model_path = model_path
        self.version = 0
        self.steps = 0  # the trainer's optimizer steps (training steps) so far
        self.trained_since_sync = False
        self.generation = 0  # of the weight group: it is rebuilt after a member restarts
        self.incarnations: dict[str, str] = {}  # role -> the incarnation the driver wired
        self.plan = None
        self.trainers: list = []
        self.generators: list = []
        self.scorer = None
        self.reused = False  # reloaded for another run (WarmPool): its processes hold an old weight group

    def wait_placed(self) -> None:
        """Fail fast, saying what was asked and what is free, when the cluster cannot hold the branch."""
        try:
            ray.get(self.pg.ready(), timeout=self.cfg.ray.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            self.shutdown()
            asked = {}
            for b in self.bundles:
                for k, v in b.items():
                    asked[k] = asked.get(k, 0) + v
            raise PlacementError(
                f"branch {self.name!r} could not be placed within {self.cfg.ray.placement_timeout_s:.0f} s: "
                f"it asks for {asked} in {len(self.bundles)} bundles; free now: "
                f"{ {k: round(v, 2) for k, v in free.items() if k in ('CPU', 'GPU', 'memory')} }. "
                "Lower resources.* or give Ray more (ray.num_cpus for a local Ray)."
            ) from None

    def reuse(self, name: str, cfg: Config, model_path: str, run_id: str) -> None:
        """Serve another run with these actors (`WarmPool`): `start_actors` then reloads them."""
        self.name, self.cfg, self.model_path, self.run_id = name, cfg, model_path, run_id
        self.version, self.steps, self.trained_since_sync, self.plan = 0, 0, False, None
        self.reused = True

    def _actor_args(self) -> dict[str, tuple[tuple, dict]]:
        """Each member's constructor arguments for this run, by role (as `members` names them)."""
        c, r = self.cfg, self.cfg.resources
        common = dict(dtype=c.model.dtype, trust_remote_code=c.model.trust_remote_code, threads=r.actor_threads)
        engine = dict(engine_cfg=c.engine.model_dump(), seed=c.seed, **common)
        trainers = {f"trainer {i}": ((self.name, i, r.num_trainers, self.model_path, c.grpo),
                                     dict(gpus=r.trainer_gpus, seed=c.seed, train=c.train,
                                          beta=c.opd_beta(self.name), **common))
                    for i in range(0 if self.frozen else r.num_trainers)}
        generators = {f"generator {i}": ((self.name, self.model_path, c.engine.kind),
                                         dict(gpus=r.generator_gpus, **engine))
                      for i in range(0 if self.frozen else r.num_generators)}
        scorer = {"scorer": ((self.name, self.model_path, c.engine.scorer_kind or c.engine.kind),
                             dict(gpus=r.scorer_gpus, **engine))} if self.scores else {}
        return {**trainers, **generators, **scorer}

    def start_actors(self) -> list:
        """Create the actors, or reload a reused group's, with this run's arguments
        (asynchronously); returns refs that resolve when all are up."""
        members = self._actor_args()
        if self.reused:
            return self.reload(list(members))
        # Members and bundles in one order: the trainer ranks, the generators, the scorer.
        for i, (role, (args, kwargs)) in enumerate(members.items()):
            kind = role.split()[0]
            # Ray restarts a dead actor in its own bundle (once more than the run allows, so
            # that the driver sees the failure over budget and names it); no call is retried
            # on the new process (its state is fresh): the driver re-wires it first.
            actor = ACTOR_CLASSES[kind].options(
                num_cpus=self.bundles[i]["CPU"], num_gpus=self.bundles[i].get("GPU", 0),
                max_restarts=self.cfg.ray.max_failures + 1, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*args, **kwargs)
            if kind == "scorer":
                self.scorer = actor
            else:
                (self.trainers if kind == "trainer" else self.generators).append(actor)
        return [a.ready.remote() for a in self.trainers + self.generators + self._scorers()]

    def reload(self, roles: list[str]) -> list:
        """__init__ again, in their processes, these members with this run's arguments: a
        reused group's, and a member of one that Ray restarted (its new process ran __init__
        with the arguments it was created with, another run's). Returns refs of their ready()."""
        args, members = self._actor_args(), self.members()
        return [members[role].reload.remote(*args[role][0], **args[role][1]) for role in roles]

    def _scorers(self) -> list:
        return [self.scorer] if self.scorer is not None else []

    def members(self) -> dict[str, object]:
        """Every actor of the branch by role ("trainer 0", "generator 0", "scorer")."""
        return {**{f"trainer {i}": t for i, t in enumerate(self.trainers)},
                **{f"generator {i}": g for i, g in enumerate(self.generators)},
                **{"scorer": s for s in self._scorers()}}

    def wire(self, generation: int = 0) -> None:
        """Join the trainer ranks' group (sharded trainers) and the weight-sync group (trainer rank 0,
        generators, scorer); every member joins concurrently, as rendezvous requires. A
        frozen branch has nothing to wire: its weights never change. After a member
        restarts, every member joins a new `generation` of both groups."""
        self.generation = generation
        if self.frozen:
            return
        # Sharded trainer ranks form their group (and shard the policy) once; again only
        # when one of them restarted, since rejoining rebuilds every rank's state.
        if len(self.trainers) > 1 and not all(ray.get([t.dp_ready.remote() for t in self.trainers])):
            wait = self.cfg.ray.trainer_timeout_s
            host, port = ray.get(self.trainers[0].dp_address.remote(wait))
            ray.get([t.join_dp_group.remote(host, port, generation, wait) for t in self.trainers])
        receivers = self.generators + self._scorers()
        group = f"copd-{self.run_id}-{self.name}-weights-{generation}"
        world = 1 + len(receivers)
        backend = self.cfg.ray.sync_backend
        # vLLM and SGLang engines take torch's default process group in their actor, where a
        # Ray collective group would also need it: their branches use a standalone group.
        # So does a rebuilt group or a reused one (WarmPool): a Ray collective group builds on
        # the default group, which the members still hold for the old one.
        self.transport = self.cfg.ray.sync_transport
        if self.transport == "auto":
            self.transport = "ray" if self.cfg.engine.hf_only else "torch"
        if generation or self.reused or len(self.trainers) > 1:  # sharded ranks hold the default group themselves
            self.transport = "torch"
        wait = self.cfg.ray.collective_timeout_s
        address = ray.get(self.trainers[0].weight_store.remote(world, wait)) if self.transport == "torch" else None
        ray.get([self.trainers[0].join_weight_group.remote(group, world, 0, backend, self.transport, None, wait)]
                + [a.join_weight_group.remote(group, world, i + 1, backend, self.transport, address, wait)
                   for i, a in enumerate(receivers)])
        self.plan = ray.get(self.trainers[0].weight_plan.remote(self.cfg.ray.bucket_mb))

    # -- the three jobs of a step -------------------------------------------------------------
    # Each returns object references: rollouts and scores go actor to actor, and only
    # the trainers' records reach the driver (`copd_ray/branch_step.py`).

    def _spread(self, batch: PromptBatch) -> list[tuple[object, PromptBatch]]:
        """Whole prompts over the generators, in prompt order: (generator, its slice)."""
        g, n = len(self.generators), len(batch.prompts)
        cuts = [n * i // g for i in range(g + 1)]
        return [(gen, batch.slice(lo, hi)) for gen, lo, hi in zip(self.generators, cuts, cuts[1:]) if hi > lo]

    def sample(self, batch: PromptBatch, ranks: int = 1) -> list[list]:
        """Rollouts references, `[generator][rank]`, generators in prompt order: each one's
        rows dealt to `ranks` trainer ranks."""
        refs = [gen.sample.options(num_returns=ranks).remote(part, ranks) for gen, part in self._spread(batch)]
        return [list(r) if ranks > 1 else [r] for r in refs]

    def evaluate(self, batch: PromptBatch) -> float:
        """Mean reward (pass@1 for 0/1 verifiers) of greedy rollouts, spread like any rollout."""
        parts = ray.get([gen.pass_count.remote(part) for gen, part in self._spread(batch)])
        return sum(s for s, _ in parts) / sum(c for _, c in parts)

    def train(self, spec: StepSpec, inputs: list[list]) -> list:
        """Every rank's update on its share of the step's inputs (references, `[rank][...]`, laid
        out as `spec` says)."""
        return [t.train_on.remote(spec, *share) for t, share in zip(self.trainers, inputs)]

    def trained(self) -> None:
        """A step's update landed in every rank (its weights are not yet broadcast)."""
        self.trained_since_sync = True
        self.steps += 1

    def trainer_state(self) -> dict:
        """The trainer's whole float32 weights on CPU (gathered from every rank when sharded)."""
        return ray.get([t.state_dict.remote() for t in self.trainers])[0]

    def sync(self) -> dict:
        """Broadcast rank 0's weights to the generators and scorer under a new version."""
        start = time.perf_counter()
        sent = self._broadcast(self.version + 1)
        self.version += 1  # only once every receiver holds it: a failed sync is retried whole
        self.trained_since_sync = False
        return {"seconds": time.perf_counter() - start, "bytes": sent, "version": self.version}

    def scorer_from_generator(self) -> bool:
        """A restarted scorer takes the last synced weights from a generator (the trainer has
        stepped since, and the students still to score this step expect that version).
        False where the generators' engine does not expose its weights (vLLM, SGLang)."""
        if self.cfg.engine.kind != "hf" or not self.generators or self.scorer is None:
            return False
        ray.get(self.scorer.load_weights.remote(self.generators[0].state_dict.remote(), self.version))
        return True

    def push(self) -> None:
        """Resend rank 0's weights (to a restarted receiver); weights trained since the
        last sync carry the version that sync will give them, so answers stay honest."""
        self._broadcast(self.version + self.trained_since_sync)

    def _broadcast(self, version: int) -> int:
        receivers = self.generators + self._scorers()
        world = len(self.trainers)  # sharded ranks all gather each bucket; rank 0 sends
        sent, *received = ray.get([t.send_weights.remote(self.plan) for t in self.trainers]
                                  + [a.receive_weights.remote(self.plan, version, self.steps) for a in receivers])
        received = received[world - 1 :]
        versions = {r["version"] for r in received}
        if versions != {version}:
            raise RuntimeError(f"branch {self.name!r}: receivers hold versions {versions}, expected {version}")
        return sent["bytes"]

    # -- checkpoints and shutdown ----------------------------------------------------------------

    def save(self, folder: str, with_optimizer: bool = True) -> str:
        if self.frozen:
            return self.model_path  # unchanged since it was loaded
        return ray.get([t.save.remote(folder, with_optimizer) for t in self.trainers])[0]

    def load(self, folder: str | None, version: int) -> None:
        """Trainers take the checkpoint (None: back to the run's start); generators and
        scorer get it by broadcast."""
        steps = ray.get([t.load.remote(folder) if folder else t.reset.remote() for t in self.trainers])[0]
        self.version, self.steps, self.trained_since_sync = version, steps or 0, False
        self.push()

    def adopt(self, folder: str) -> dict:
        """Trainers take these weights (their optimizer state and step count stay), and the
        generators and scorer get them as a new version."""
        ray.get([t.load.remote(folder) for t in self.trainers])
        self.trained_since_sync = True
        return self.sync()

    def shutdown(self) -> None:
        """Kill the actors and free the placement group (safe to call more than once)."""
        for a in self.trainers + self.generators + self._scorers():
            ray.kill(a)
        self.trainers, self.generators, self.scorer = [], [], None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
