"""The Ray side of a run: joining or starting Ray, the actors of every branch with the
topology actor and the optional Serve app (`Runtime`), and the evaluation tasks of
saved model folders."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import ray
import torch

from copd_ray.actors import BranchGroup
from copd_ray.bundles import branch_bundles
from copd_ray.config import Config
from copd_ray.data import PromptRecord
from copd_ray.models.loading import actor_device
from copd_ray.topology import Topology
from copd_ray.topology.actor import TopologyActor
from copd_ray.topology.graph import scoring_branches


class WarmPool:
    """Branch actor groups and the topology actor, kept alive between the runs of one Ray
    session (compare, pilot, `train(pool=...)`): a run takes an idle group of its shape and
    reloads its actors (model, optimizer, engine) instead of starting processes that import
    torch and transformers again (~3 s of CPU each). Only groups of hf engines are kept (sharded
    trainer ranks too: a reloaded rank forms a new group with the others); `close()` ends them."""

    def __init__(self) -> None:
        self.idle: list[tuple[tuple, BranchGroup]] = []
        self.topology_actor = None

    @staticmethod
    def shape(cfg: Config, frozen: bool, scores: bool) -> tuple | None:
        """What a reused group must have been created with (its bundles, actors and restart
        budget are fixed then), or None where it is not kept."""
        if not cfg.engine.hf_only:
            return None
        bundles = tuple(tuple(sorted(b.items())) for b in branch_bundles(cfg, frozen, scores))
        return (frozen, scores, cfg.resources.num_trainers, bundles, cfg.ray.max_failures)

    def take(self, shape: tuple | None) -> BranchGroup | None:
        for i, (s, group) in enumerate(self.idle):
            if s == shape:
                return self.idle.pop(i)[1]
        return None

    def give(self, shape: tuple | None, group: BranchGroup) -> None:
        if shape is None:
            group.shutdown()
        else:
            self.idle.append((shape, group))

    def close(self, groups_only: bool = False) -> None:
        """End every idle group (their placement groups are freed) and the topology actor."""
        for _, group in self.idle:
            group.shutdown()
        self.idle = []
        if self.topology_actor is not None and not groups_only:
            ray.kill(self.topology_actor)
            self.topology_actor = None


class Runtime:
    """The Ray side of a run: the topology actor, one actor group per branch, and (when
    asked for) the Serve app in front of the scorers. `close()` releases all of it, or with
    a `pool` and `keep=True` hands the branch groups to the pool for the next run."""

    def __init__(self, cfg: Config, topology: Topology, base_path: str, console, pool: WarmPool | None = None) -> None:
        self.groups: dict[str, BranchGroup] = {}  # every branch, frozen teachers included
        self.trainable: dict[str, BranchGroup] = {}
        self.serving, self.pool, self.shapes = False, pool, {}
        try:
            self._start(cfg, topology, base_path, console)
        except BaseException:
            self.close()  # a branch that cannot be placed must not leave the others holding the cluster
            raise

    def _start(self, cfg: Config, topology: Topology, base_path: str, console) -> None:
        names = list(topology.branches)
        run_id = uuid.uuid4().hex[:8]
        if self.pool and self.pool.topology_actor is not None:
            self.topology_actor, self.pool.topology_actor = self.pool.topology_actor, None
            self.topology_actor.reset.remote(topology)  # runs before any register call below
        else:
            # Restarted by Ray when it dies (SelfHealing gives it the graph and endpoints again).
            self.topology_actor = TopologyActor.options(max_restarts=-1, max_task_retries=0).remote(topology)
        branches = {b.name: b for b in cfg.branch_list()}
        paths = {n: branches[n].init or base_path for n in names}
        scoring = scoring_branches(cfg, topology.edges)
        for n in names:
            self.shapes[n] = WarmPool.shape(cfg, branches[n].frozen, n in scoring)
            warm = self.pool.take(self.shapes[n]) if self.pool else None
            if warm is None and self.pool and n not in scoring:  # a warm group's idle scorer beats a cold start
                with_scorer = WarmPool.shape(cfg, branches[n].frozen, True)
                warm = self.pool.take(with_scorer)
                if warm:
                    self.shapes[n] = with_scorer
            if warm:
                warm.reuse(n, cfg, paths[n], run_id)
                self.groups[n] = warm
        if self.pool and not self._room_beside_idle(cfg, [n for n in names if n not in self.groups], branches,
                                                    scoring):
            self.pool.close(groups_only=True)  # the groups this run does not use hold what the new ones need
        for n in names:
            if n not in self.groups:
                self.groups[n] = BranchGroup(n, cfg, paths[n], run_id, frozen=branches[n].frozen,
                                             scores=n in scoring)
        self.trainable = {n: g for n, g in self.groups.items() if not g.frozen}
        for g in self.groups.values():
            g.wait_placed()
        ray.get([ref for g in self.groups.values() for ref in g.start_actors()])
        with ThreadPoolExecutor(max_workers=len(self.groups)) as pool:  # rendezvous: all at once
            list(pool.map(lambda g: g.wire(), self.groups.values()))
        endpoints = {n: g.scorer for n, g in self.groups.items() if g.scores}
        if cfg.serve.enabled:
            from copd_ray.serve import serve_running, start_serving

            sv = cfg.serve
            self.owns_serve = not serve_running()  # then close() stops Serve and frees its port
            # An empty COPD_RAY_SERVE_TOKEN reaches start_serving, which refuses it: auth
            # never goes off silently.
            token = sv.token if sv.token is not None else os.environ.get("COPD_RAY_SERVE_TOKEN")
            handles = start_serving(endpoints, paths, sv.host, sv.port, token, sv.max_sequences, sv.max_tokens,
                                    sv.max_top_k, max_request_tokens=sv.max_request_tokens,
                                    max_body_bytes=sv.max_body_bytes, body_timeout_s=sv.body_timeout_s)
            self.serving = True
            console.print(f"serve: live teacher scoring at http://{sv.host}:{sv.port}/score/<branch>; GET /branches")
            if cfg.topology.transport == "serve":
                endpoints = handles
        # Each branch's scorer becomes reachable as a teacher through the topology.
        ray.get([self.topology_actor.register.remote(n, e) for n, e in endpoints.items()])
        self.endpoints = endpoints

    @staticmethod
    def _room_beside_idle(cfg: Config, cold: list[str], branches: dict, scoring: set[str]) -> bool:
        """Whether the free CPUs and GPUs of a one-node cluster hold the `cold` branches'
        bundles while a pool's idle groups keep theirs (a later run may still find them warm).
        On several nodes free totals do not say a group packs onto one: never."""
        if sum(node["Alive"] for node in ray.nodes()) > 1:
            return False
        free, need = ray.available_resources(), Counter()
        for n in cold:
            for bundle in branch_bundles(cfg, branches[n].frozen, n in scoring):
                need.update(bundle)
        return all(v <= free.get(k, 0.0) for k, v in need.items())

    def teachers_of(self, students: list[str]) -> dict[str, dict[str, object]]:
        """{student: {teacher: its live scorer endpoint}}, as the topology actor has them now."""
        return dict(zip(students, ray.get([self.topology_actor.teachers_of.remote(n) for n in students])))

    def evaluate(self, folders: dict[str, str], cfg: Config, held: dict[str, list[PromptRecord]]) -> dict:
        """Held-out pass@1 of each saved folder ({name: {capability: rate}}), on the run's own
        generators: their engines are warm (no process to start, no imports, no engine to
        build); each loads a folder's weights over its own and evaluates it, the folders dealt
        to the generators in turn. If a generator fails, evaluation tasks do the work."""
        generators = [g for group in self.trainable.values() for g in group.generators]
        names = list(folders)
        refs = [generators[i % len(generators)].evaluate_folder.remote(folders[n], cfg, held)
                for i, n in enumerate(names)]
        try:
            return dict(zip(names, ray.get(refs)))
        except ray.exceptions.RayActorError:
            task = evaluate_folder.options(**eval_task_options(cfg))
            return dict(zip(names, ray.get([task.remote(folders[n], cfg, held) for n in names])))

    def close(self, keep: bool = False) -> None:
        """Release everything; with `keep` (a run that ended well) a pool takes the groups."""
        if self.serving:
            from copd_ray.serve import stop_serving

            stop_serving(shutdown=self.owns_serve)
            self.serving = False
        for n, g in self.groups.items():
            if keep and self.pool is not None:
                self.pool.give(self.shapes[n], g)
            else:
                g.shutdown()
        self.groups, self.trainable = {}, {}
        if getattr(self, "topology_actor", None) is not None:  # else each run in a Ray session leaves one behind
            if keep and self.pool is not None:
                self.pool.topology_actor = self.topology_actor
            else:
                ray.kill(self.topology_actor)
            self.topology_actor = None


def eval_task_options(cfg: Config) -> dict:
    """Ray options of an evaluation task: a generator's CPUs and GPUs, since it runs the same
    engine. Only a task that asks for a GPU has one reserved and named in its
    CUDA_VISIBLE_DEVICES; one that asks for none lands on any node and ran on its CPU (or on a
    GPU it had not reserved, beside the actors that had)."""
    return {"num_cpus": cfg.resources.generator_cpus, "num_gpus": cfg.resources.generator_gpus}


def eval_device(cfg: Config) -> str:
    """Where an evaluation loads its engine: as a generator does (EngineHost), on "cuda" only
    when the config gives generators a GPU."""
    return actor_device(cfg.resources.generator_gpus)


@ray.remote
def evaluate_folder(folder: str, cfg: Config, held: dict[str, list[PromptRecord]]) -> dict[str, float]:
    """Greedy held-out pass@1 of a saved model folder on every capability, as a Ray task;
    launch it with `.options(**eval_task_options(cfg))` so that it has a generator's GPUs."""
    from copd_ray.engines.factory import make_engine
    from copd_ray.evaluation import pass_rates
    from copd_ray.models.vl_inputs import VisionInputBuilder

    torch.set_num_threads(cfg.resources.actor_threads)
    device = eval_device(cfg)
    engine, tokenizer = make_engine(cfg.engine.kind, folder, cfg.engine.model_dump(), cfg.model.dtype,
                                    cfg.model.trust_remote_code, device, cfg.resources.actor_threads, cfg.seed)
    return pass_rates(engine, tokenizer, held, cfg, VisionInputBuilder.for_folder(folder, cfg.model.trust_remote_code))
