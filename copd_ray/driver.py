"""The CoPD controller: Algorithm 1 of the paper, top to bottom.

    for cycle in 1..N:
        Phase I  (branch RLVR):  every branch k runs S_RL GRPO steps on D_k with r_k
        Phase II (mutual OPD):   every branch k runs S_OPD steps; each combines its native
                                 GRPO batch with, per teacher j, its own rollouts on
                                 prompts from D_j scored by j: A_t = beta_k (log pi_j - log pi_k)
    merge the branches in parameter space; evaluate base, branches and merged model

`train` below is that loop; each step fans out to the branches' actors in parallel
(one driver thread per branch) and ends with a weight broadcast in every branch.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from copd_ray.actors import BranchGroup, TrainBatch
from copd_ray.algo import symmetric_kl, topk_overlap
from copd_ray.capabilities import Capability, build_capability, check_chat_template
from copd_ray.checkpoints import find_resume, read_state, save_checkpoint
from copd_ray.config import Config, ConfigError
from copd_ray.data import PromptRecord, encode_prompt
from copd_ray.engines import SamplingParams
from copd_ray.errors import CopdError
from copd_ray.metrics_log import MetricsLog
from copd_ray.recovery import Rollback, SelfHealing
from copd_ray.topology import Topology
from copd_ray.topology.actor import TopologyActor


class BranchDataError(CopdError, ValueError):
    pass


# -- data: each branch's D_k --------------------------------------------------------------


@dataclass
class BranchData:
    """D_k: the capabilities a branch learns from, drawn in turn (one for a CoPD branch)."""

    name: str
    capabilities: list[Capability]
    beta: float
    drawn: int = 0

    def sample(self, n: int) -> list[PromptRecord]:
        out = [self.capabilities[(self.drawn + i) % len(self.capabilities)].sample(1)[0] for i in range(n)]
        self.drawn += n
        return out

    def replay(self, drawn: int) -> None:
        """Fresh streams advanced by `drawn` prompts: where a checkpoint left them."""
        self.capabilities = [c.fork(f"/{self.name}") for c in self.capabilities]
        self.drawn = 0
        self.sample(drawn)


@dataclass
class Prompter:
    """Prompt records -> what the policy reads (token ids, or VisualInputs with the pixels of
    a vision-language policy), their answers and reward names."""

    caps: dict[str, Capability]
    tokenizer: object
    vision: object = None  # a VisionInputBuilder for a vision-language policy

    def __call__(self, records: list[PromptRecord]) -> tuple[list, list, list]:
        ids = [encode_prompt(r, self.tokenizer, self.caps[r.capability].template, self.vision) for r in records]
        return ids, [r.answer for r in records], [self.caps[r.capability].reward_name for r in records]


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# -- one step of a branch -------------------------------------------------------------------


def _rollouts(group: BranchGroup, records, prompter: Prompter, n: int, cfg: Config, seed: int,
              temperature: float | None = None) -> tuple[list, dict]:
    ids, answers, rewards = prompter(records)
    g = cfg.grpo
    params = SamplingParams(n=n, temperature=g.temperature if temperature is None else temperature, top_p=g.top_p,
                            max_new_tokens=g.max_new_tokens, seed=seed)
    return ids, group.rollout(ids, params, answers, rewards)


def _opd_temperature(cfg: Config) -> float:
    return cfg.grpo.temperature if cfg.opd.temperature is None else cfg.opd.temperature


def draw_prompts(names, phase: str, cfg: Config, data: dict[str, BranchData], topology_actor) -> dict:
    """Every prompt of this step, drawn in the driver's thread (streams are not thread-safe
    and a fixed draw order makes resuming exact). Each branch asks the topology for its
    teachers now, so a re-registered scorer is used from the next step on."""
    plan = {}
    for name in names:
        native = phase == "rl" or cfg.opd.native_rl
        step_plan = {"native": data[name].sample(cfg.grpo.prompts_per_step) if native else [], "teachers": {}}
        if phase == "opd":
            for teacher, scorer in ray.get(topology_actor.teachers_of.remote(name)).items():
                step_plan["teachers"][teacher] = (scorer, data[teacher].sample(cfg.opd.prompts_per_teacher))
        plan[name] = step_plan
    return plan


def branch_step(name: str, phase: str, step: int, cfg: Config, group: BranchGroup, prompts: dict,
                prompter: Prompter, beta: float) -> dict:
    """One training step of branch `name`: its native GRPO batch and, in Phase II, one
    cross-branch OPD batch per teacher, all in one update. The record counts what the
    step spent (rollouts generated, teacher tokens scored) for the budget tables."""
    t = {"generate": 0.0, "score": 0.0}
    record: dict = {"kind": "step", "step": step, "phase": phase, "branch": name,
                    "opd_batches": len(prompts["teachers"]), "teacher_tokens": 0}
    batch = TrainBatch(group_size=cfg.grpo.group_size)

    # Native GRPO batch: prompts from D_k, rewarded by r_k (absent only when opd.native_rl=false).
    if prompts["native"]:
        ids, roll = _rollouts(group, prompts["native"], prompter, cfg.grpo.group_size, cfg,
                              _seed(cfg.seed, name, step, "rl"))
        t["generate"] += roll["seconds"]
        samples, rewards = roll["samples"], roll["rewards"]
        batch.grpo_sequences = [ids[s.prompt_index] + s.token_ids for s in samples]
        batch.grpo_prompt_lengths = [len(ids[s.prompt_index]) for s in samples]
        batch.grpo_rewards = rewards
        record.update(reward_mean=sum(rewards) / len(rewards),
                      pass_rate=sum(r >= 1.0 for r in rewards) / len(rewards),
                      response_length=sum(len(s.token_ids) for s in samples) / len(samples))

    # Phase II: per teacher j, the student's rollouts on prompts from D_j, scored by j.
    for teacher, (scorer, peer_records) in prompts["teachers"].items():
        peer_ids, peer_roll = _rollouts(group, peer_records, prompter, cfg.opd.samples_per_prompt, cfg,
                                        _seed(cfg.seed, name, step, "opd", teacher), _opd_temperature(cfg))
        sequences = [peer_ids[s.prompt_index] + s.token_ids for s in peer_roll["samples"]]
        plens = [len(peer_ids[s.prompt_index]) for s in peer_roll["samples"]]
        scores = _score(scorer, sequences, plens)  # log pi_j(y_t | x, y_<t)
        t["generate"] += peer_roll["seconds"]
        t["score"] += scores.extra["seconds"]
        batch.opd_sequences += sequences
        batch.opd_prompt_lengths += plens
        batch.opd_teacher_logprobs += scores.logprobs
        batch.opd_beta += [beta] * len(sequences)
        student = [lp for s in peer_roll["samples"] for lp in s.logprobs]
        teacher_lp = [lp for row in scores.logprobs for lp in row]
        record["teacher_tokens"] += len(teacher_lp)
        record.update({
            f"opd/{teacher}/teacher_version": scores.version,
            f"opd/{teacher}/reward_mean": sum(peer_roll["rewards"]) / len(peer_roll["rewards"]),
            f"opd/{teacher}/logp_gap": (sum(teacher_lp) - sum(student)) / max(len(student), 1),
        })

    trained = group.train(batch)  # old log-probs, GRPO + OPD advantages, clipped update
    t["train"] = trained.pop("seconds")
    record.update(trained)
    record["rollouts"] = len(batch.grpo_sequences) + len(batch.opd_sequences)
    record.update({f"time/{k}": v for k, v in t.items()})
    return record


def _score(endpoint, sequences, plens):
    """A teacher's scores through whichever endpoint the topology gave: a ScorerActor
    handle, or the Serve deployment handle in front of it."""
    from ray.serve.handle import DeploymentHandle

    if isinstance(endpoint, DeploymentHandle):
        return endpoint.score.remote(sequences, plens).result()
    return ray.get(endpoint.score.remote(sequences, plens))


# -- health signals and evaluation -----------------------------------------------------------------


def pair_metrics(teacher: str, student: str, groups, data: dict[str, BranchData], prompter: Prompter,
                 cfg: Config) -> dict:
    """Top-k overlap and symmetric KL of teacher and student along the student's own
    rollouts on a fixed probe set: the first metrics.pair_sequences held-out prompts of the
    teacher's data, sampled as in OPD with a fixed seed, so that the curve over training
    moves with the policies, not with the draw."""
    m, teacher_caps = cfg.metrics.pair_sequences, data[teacher].capabilities
    per_cap = -(-m // len(teacher_caps))
    probe = [r for c in teacher_caps for r in c.heldout[:per_cap]][:m]
    ids, roll = _rollouts(groups[student], probe, prompter, 1, cfg, _seed(cfg.seed, "probe", teacher, student),
                          _opd_temperature(cfg))
    sequences = [ids[s.prompt_index] + s.token_ids for s in roll["samples"]]
    plens = [len(ids[s.prompt_index]) for s in roll["samples"]]
    t_rows, s_rows = ray.get([groups[teacher].scorer.distributions.remote(sequences, plens),
                              groups[student].scorer.distributions.remote(sequences, plens)])
    width = max(r.shape[0] for r in s_rows)
    vocab = s_rows[0].shape[-1]
    s_pad, t_pad = torch.zeros(len(s_rows), width, vocab), torch.zeros(len(s_rows), width, vocab)
    mask = torch.zeros(len(s_rows), width)
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        s_pad[i, : len(s)], t_pad[i, : len(t)], mask[i, : len(s)] = s, t, 1.0
    return {"topk_overlap": topk_overlap(s_pad, t_pad, cfg.metrics.topk, mask).item(),
            "symmetric_kl": symmetric_kl(s_pad, t_pad, mask).item()}


def evaluate_branches(groups, prompter: Prompter, cfg: Config, size: int) -> dict[str, dict[str, float]]:
    """Greedy held-out pass@1 of every branch's live policy on every capability."""
    def one(name):
        out = {}
        for cap in prompter.caps.values():
            ids, answers, rewards = prompter(cap.heldout[:size])
            out[cap.name] = groups[name].evaluate(ids, answers, rewards, cfg.eval.max_new_tokens)
        return out
    return _each(groups, one)


def eval_task_options(cfg: Config) -> dict:
    """Ray options of an evaluation task: a generator's CPUs and GPUs, since it runs the same
    engine. Only a task that asks for a GPU has one reserved and named in its
    CUDA_VISIBLE_DEVICES; one that asks for none lands on any node and ran on its CPU (or on a
    GPU it had not reserved, beside the actors that had)."""
    return {"num_cpus": cfg.resources.generator_cpus, "num_gpus": cfg.resources.generator_gpus}


def eval_device(cfg: Config) -> str:
    """Where an evaluation loads its engine: as a generator does (EngineHost), on "cuda" only
    when the config gives generators a GPU."""
    return "cuda" if cfg.resources.generator_gpus > 0 and torch.cuda.is_available() else "cpu"


@ray.remote
def evaluate_folder(folder: str, cfg: Config, held: dict[str, list[PromptRecord]]) -> dict[str, float]:
    """Greedy held-out pass@1 of a saved model folder on every capability, as a Ray task;
    launch it with `.options(**eval_task_options(cfg))` so that it has a generator's GPUs."""
    from copd_ray.engines.factory import make_engine
    from copd_ray.evaluation import evaluate
    from copd_ray.models.vl_inputs import VisionInputBuilder
    from copd_ray.rewards import get_reward

    torch.set_num_threads(cfg.resources.actor_threads)
    device = eval_device(cfg)
    engine, tokenizer = make_engine(cfg.engine.kind, folder, cfg.engine.model_dump(), cfg.model.dtype,
                                    cfg.model.trust_remote_code, device, cfg.resources.actor_threads, cfg.seed)
    vision = VisionInputBuilder.for_folder(folder, cfg.model.trust_remote_code)
    return {
        c.name: evaluate(engine, tokenizer, held[c.name], get_reward(c.reward), c.template, cfg.eval.max_new_tokens,
                         vision)["pass_rate"]
        for c in cfg.capabilities
    }


def _log_eval(log: MetricsLog, step: int, results: dict[str, dict[str, float]]) -> None:
    for branch, per_cap in results.items():
        for cap, rate in per_cap.items():
            log.log({"kind": "eval", "step": step, "branch": branch, "capability": cap, "pass_rate": rate})


def _step_line(step: int, phase: str, records: dict[str, dict]) -> str:
    parts = []
    for n, r in records.items():
        t = r["time/generate"] + r["time/score"] + r["time/train"] + r["time/sync"]
        reward = f"r={r['reward_mean']:.2f} " if "reward_mean" in r else ""
        parts.append(f"{n} {reward}L={r['loss']:+.3f} v{r['version']} {t:.1f}s")
    return f"{step:4d} {phase:3s}| " + " | ".join(parts)


def _each(names, fn) -> dict:
    """fn(name) for every branch at once, one driver thread each (Ray calls are thread-safe)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(fn, names)))


def restore(folder: Path | None, trainable: dict[str, BranchGroup], data: dict[str, BranchData],
            healer: SelfHealing) -> int:
    """Every trainable branch and every data stream back to a checkpoint (None: the run's
    start), in the running actors; returns the checkpoint's step."""
    state = read_state(folder) if folder else {"step": 0, "drawn": {}, "versions": {}}
    healer.each(list(trainable), lambda n: trainable[n].load(str(folder / "branches" / n) if folder else None,
                                                             state["versions"].get(n, 0)))
    for n, d in data.items():
        d.replay(state["drawn"].get(n, 0))
    healer.console.print(f"resumed from {folder or 'the start'} at step {state['step']}")
    return state["step"]


# -- the run -----------------------------------------------------------------------------------


def init_ray(cfg: Config) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS (as under `ray job submit`), or
    start a local Ray. Returns whether this call started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def schedule(cfg: Config) -> list[tuple[int, str]]:
    """(cycle, phase) of every global step, in order."""
    s = cfg.schedule
    return [(c, phase) for c in range(s.cycles) for phase, n in (("rl", s.rl_steps), ("opd", s.opd_steps)) for _ in range(n)]


class Runtime:
    """The Ray side of a run: the topology actor, one actor group per branch, and (when
    asked for) the Serve app in front of the scorers. `close()` releases all of it."""

    def __init__(self, cfg: Config, topology: Topology, base_path: str, console) -> None:
        self.groups: dict[str, BranchGroup] = {}  # every branch, frozen teachers included
        self.trainable: dict[str, BranchGroup] = {}
        self.serving = False
        try:
            self._start(cfg, topology, base_path, console)
        except BaseException:
            self.close()  # a branch that cannot be placed must not leave the others holding the cluster
            raise

    def _start(self, cfg: Config, topology: Topology, base_path: str, console) -> None:
        names = list(topology.branches)
        run_id = uuid.uuid4().hex[:8]
        self.topology_actor = TopologyActor.remote(topology)
        branches = {b.name: b for b in cfg.branch_list()}
        paths = {n: branches[n].init or base_path for n in names}
        for n in names:
            self.groups[n] = BranchGroup(n, cfg, paths[n], run_id, frozen=branches[n].frozen)
        self.trainable = {n: g for n, g in self.groups.items() if not g.frozen}
        for g in self.groups.values():
            g.wait_placed()
        ray.get([ref for g in self.groups.values() for ref in g.start_actors()])
        _each(self.groups, lambda n: self.groups[n].wire())
        endpoints = {n: g.scorer for n, g in self.groups.items()}
        if cfg.serve.enabled:
            from copd_ray.serve import serve_running, start_serving

            sv = cfg.serve
            self.owns_serve = not serve_running()  # then close() stops Serve and frees its port
            # An empty COPD_RAY_SERVE_TOKEN reaches start_serving, which refuses it: auth
            # never goes off silently.
            token = sv.token if sv.token is not None else os.environ.get("COPD_RAY_SERVE_TOKEN")
            handles = start_serving(endpoints, paths, sv.host, sv.port, token, sv.max_sequences, sv.max_tokens,
                                    sv.max_top_k, max_request_tokens=sv.max_request_tokens,
                                    max_body_bytes=sv.max_body_bytes)
            self.serving = True
            console.print(f"serve: live teacher scoring at http://{sv.host}:{sv.port}/score/<branch>; GET /branches")
            if cfg.topology.transport == "serve":
                endpoints = handles
        # Each branch's scorer becomes reachable as a teacher through the topology.
        ray.get([self.topology_actor.register.remote(n, e) for n, e in endpoints.items()])
        self.endpoints = endpoints

    def close(self) -> None:
        if self.serving:
            from copd_ray.serve import stop_serving

            stop_serving(shutdown=self.owns_serve)
            self.serving = False
        for g in self.groups.values():
            g.shutdown()
        self.groups, self.trainable = {}, {}


def log_pairs(log: MetricsLog, step: int, cfg: Config, topology: Topology, groups, data, prompter: Prompter,
              pair_state: dict, console) -> None:
    """At the interval (and at step 0), the pair metrics of every teacher -> student edge."""
    if not pair_state["every"] or step % pair_state["every"]:
        return
    try:
        pairs = [{"kind": "pair", "step": step, "teacher": teacher, "student": student,
                  **pair_metrics(teacher, student, groups, data, prompter, cfg)} for teacher, student in topology.edges]
        for record in pairs:
            log.log(record)
    except ray.exceptions.RayTaskError as e:
        if not isinstance(e.cause, NotImplementedError):
            raise
        pair_state["every"] = 0  # this scorer engine cannot give full distributions
        log.log({"kind": "event", "step": step, "event": "pair_metrics_off", "why": str(e.cause)})
        console.print(f"[yellow]pair metrics off: {e.cause}[/yellow]")


def log_step(log: MetricsLog, step: int, records: dict) -> None:
    """Per-branch step records and NaN events."""
    for r in records.values():
        log.log(r)
        if r["nan_skipped"]:
            log.log({"kind": "event", "step": step, "event": "nan_loss_skipped", "branch": r["branch"],
                     "updates": r["nan_skipped"]})


def prepare(cfg: Config, topology: Topology | None, console):
    """Everything that can fail before any actor starts: topology, data, base policy."""
    from transformers import AutoTokenizer

    from copd_ray.models.bootstrap import ensure_base_policy
    from copd_ray.models.vl_inputs import VisionInputBuilder

    branch_cfgs = cfg.branch_list()
    names = [b.name for b in branch_cfgs]
    topology = topology or Topology.from_config(cfg.topology.kind, names, cfg.topology.hub, cfg.topology.edges)
    if sorted(topology.branches) != sorted(names):
        raise ConfigError(f"the topology's branches {list(topology.branches)} are not the config's {names}")
    caps = {}
    for c in cfg.capabilities:
        try:
            caps[c.name] = build_capability(c, cfg.seed)
        except ValueError as e:
            users = [b.name for b in branch_cfgs if c.name in cfg.branch_data(b)]
            raise BranchDataError(f"branch(es) {users} cannot train: {e}") from None
        for report in caps[c.name].reports:
            console.print(f"data: {report}")
    # D_k for every branch, each with streams of its own.
    data = {b.name: BranchData(b.name, [caps[d].fork(f"/{b.name}") for d in cfg.branch_data(b)],
                               cfg.opd.beta if b.beta is None else b.beta)
            for b in branch_cfgs}
    base_path, _ = ensure_base_policy(cfg)
    # The newest usable checkpoint of this very run (same base, branches and topology);
    # a damaged one is reported and skipped.
    trained = [b.name for b in cfg.trainable_branches()]
    resume, resume_state = find_resume(cfg.resume, cfg.output_dir, str(base_path), trained, topology.edges,
                                       warn=lambda m: console.print(m, style="yellow", markup=False))
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    check_chat_template(caps, tokenizer)
    vision = VisionInputBuilder.for_folder(str(base_path), cfg.model.trust_remote_code)
    visual = [n for n, c in caps.items() if any(r.images or r.videos for r in c.heldout)]
    if visual and vision is None:
        raise BranchDataError(f"capabilities {visual} have images or videos but the policy at {base_path} "
                              "reads text only: use a vision-language model")
    if visual and cfg.topology.transport == "serve":
        raise BranchDataError(f"capabilities {visual} have images or videos, and the HTTP scoring API takes token "
                              "ids only: use topology.transport=actor")
    return topology, caps, data, (resume, resume_state), str(base_path), Prompter(caps, tokenizer, vision)


def train(cfg: Config, topology: Topology | None = None, console=None) -> dict:
    """Algorithm 1 end to end; returns {"eval", "models", "budget", "steps", "seconds", "plots"}."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from copd_ray.metrics_log import budget, read_metrics
    from copd_ray.models.merge_folders import merge_folders
    from copd_ray.plots import plot_run

    console = console or Console()
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    topology, caps, data, (resume, resume_state), base_path, prompter = prepare(cfg, topology, console)
    plan = schedule(cfg)

    started_ray = init_ray(cfg)
    runtime, log = None, None
    try:
        runtime = Runtime(cfg, topology, base_path, console)
        groups, trainable = runtime.groups, runtime.trainable  # frozen teachers never step
        names = list(trainable)
        frozen = [n for n in groups if n not in trainable]
        console.print(f"ray: {len(groups)} branches up ({', '.join(names)}"
                      f"{'; frozen teachers ' + ', '.join(frozen) if frozen else ''}), topology "
                      f"{[f'{t}->{s}' for t, s in topology.edges]}, {time.perf_counter() - started:.0f} s")
        resume_step = resume_state["step"] if resume else None  # as find_resume read and checked it
        log = MetricsLog(out, cfg.wandb, cfg.run_name, cfg.model_dump(mode="json"), resume_step)
        healer = SelfHealing(groups, runtime.topology_actor, runtime.endpoints, cfg.ray.max_failures,
                             cfg.ray.restart_timeout_s, lambda e: log.log({"kind": "event", "step": healer.step, **e}),
                             console, out / "actors.json")
        pair_state = {"every": cfg.metrics.pair_every}
        step, restore_to, redo_events = 0, None, []
        last_checkpoint = (0, None)  # (step, folder): where a lost trainer sends the run back
        if resume is not None:
            restore_to = last_checkpoint = (resume_step, resume)
            log.log({"kind": "event", "step": restore_to[0], "event": "resumed", "from": str(resume)})
        else:
            log_pairs(log, 0, cfg, topology, groups, data, prompter, pair_state, console)
            if cfg.eval.every:
                _log_eval(log, 0, evaluate_branches(trainable, prompter, cfg, cfg.eval.during_training_size))

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("CoPD", total=len(plan))
            while True:
                try:
                    if restore_to is not None:  # a resume, or a rollback after a trainer was lost
                        step = restore(restore_to[1], trainable, data, healer)
                        log.rewind(step)
                        for event in redo_events:
                            log.log({"kind": "event", **event, "rolled_back_to": step})
                        restore_to, redo_events = None, []
                        progress.update(task, completed=step)
                    # for cycle in 1..N: Phase I (rl_steps of RLVR), then Phase II (opd_steps of mutual OPD)
                    while step < len(plan):
                        cycle, phase = plan[step]
                        step = healer.step = step + 1
                        progress.update(task, description=f"cycle {cycle + 1}/{cfg.schedule.cycles} "
                                                          f"{'Phase I  (RLVR)' if phase == 'rl' else 'Phase II (OPD) '}")
                        healer.check()  # an actor that died between steps is back before the step starts
                        # Every branch takes its step in parallel (one that fails is retried after recovery) ...
                        prompts = draw_prompts(names, phase, cfg, data, runtime.topology_actor)
                        records = healer.each(names, lambda n: branch_step(n, phase, step, cfg, trainable[n], prompts[n],
                                                                           prompter, data[n].beta))
                        # ... then every branch broadcasts its new weights to its generators and scorer.
                        synced = healer.each(names, lambda n: trainable[n].sync()) if step % cfg.schedule.sync_every == 0 else {}
                        for n, r in records.items():
                            r.update({"cycle": cycle, "version": trainable[n].version,
                                      "time/sync": synced[n]["seconds"] if synced else 0.0})
                        healer.call(lambda: log_pairs(log, step, cfg, topology, groups, data, prompter, pair_state,
                                                      progress.console))
                        log_step(log, step, records)
                        if cfg.eval.every and step % cfg.eval.every == 0:
                            _log_eval(log, step, healer.call(lambda: evaluate_branches(
                                trainable, prompter, cfg, cfg.eval.during_training_size)))
                        progress.console.print(_step_line(step, phase, records))
                        end_of_cycle = step == len(plan) or plan[step][0] != cycle
                        if end_of_cycle or (cfg.schedule.save_every and step % cfg.schedule.save_every == 0):
                            last_checkpoint = (step, healer.call(lambda: save_checkpoint(
                                out, step, trainable, data, base_path, cfg.schedule.keep_checkpoints, topology.edges)))
                        progress.update(task, completed=step)
                    # The branches as they end training, for the merge and the final evaluation.
                    branch_dirs = healer.each(names, lambda n: trainable[n].save(str(out / "branches" / n),
                                                                                 with_optimizer=False))
                    break
                except Rollback as rollback:
                    restore_to = last_checkpoint
                    redo_events = [{**e, "step": step, "steps_redone": step - last_checkpoint[0]}
                                   for e in rollback.events]

        # Merge the branches in parameter space into the unified model (when there are several).
        models = {"base": base_path, **{f"branch:{n}": branch_dirs[n] for n in names}}
        if len(names) > 1:
            weights = [cfg.merge.weights[n] for n in names] if cfg.merge.weights else None
            models["merged"] = str(merge_folders(
                [branch_dirs[n] for n in names], out / "merged", cfg.merge.method, weights,
                base_folder=base_path if cfg.merge.method == "task_arithmetic" else None))
        runtime.close()  # frees the cluster for the evaluation tasks

        # Evaluate base, every branch and the merged model on every capability.
        held = {n: c.heldout for n, c in caps.items()}
        task = evaluate_folder.options(**eval_task_options(cfg))
        results = dict(zip(models, ray.get([task.remote(p, cfg, held) for p in models.values()])))
        log.log({"kind": "event", "step": len(plan), "event": "final_eval",
                 **{f"{m}/{c}": v for m, per in results.items() for c, v in per.items()}})
    finally:
        if runtime is not None:
            runtime.close()
        if log is not None:
            log.close()
        if started_ray:
            ray.shutdown()

    summary = {"eval": results, "models": models, "budget": budget(read_metrics(out / "metrics.jsonl")),
               "steps": len(plan), "seconds": round(time.perf_counter() - started, 1)}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    summary["plots"] = [str(p) for p in plot_run(out)]
    return summary
