"""The CoPD controller: Algorithm 1 of the paper, top to bottom.

    for cycle in 1..N:
        Phase I  (branch RLVR):  every branch k runs S_RL GRPO steps on D_k with r_k
        Phase II (mutual OPD):   every branch k runs S_OPD steps; each combines its native
                                 GRPO batch with, per teacher j, its own rollouts on
                                 prompts from D_j scored by j: A_t = beta_k (log pi_j - log pi_k)
    merge the branches in parameter space; evaluate base, branches and merged model

`Loop.algorithm_1` below is that loop, and `train` the whole run around it (Ray, data and
actors up; `Loop.run`, which resumes a checkpoint and rolls back to the last one when a
trainer is lost; the merge and the final evaluation). A step of a branch is `branch_step`:
the driver hands it prompts, rollouts and scores move actor to actor by reference, and a
record of numbers comes back. With schedule.max_staleness = 0 (the default) every branch finishes step t
and broadcasts its weights before any starts step t + 1; with k > 0 each branch runs on
its own clock between barriers, generating up to k steps ahead of its trainer. Which phase
a branch is in comes from `copd_ray/schedule.py`: the cycles, or its pair metrics (adaptive).
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray

from copd_ray import branch_step
from copd_ray.checkpoints import save_checkpoint
from copd_ray.config import Config
from copd_ray.metrics_log import MetricsLog, read_metrics
from copd_ray.monitor import PairMetrics, Stopwatch, evaluate_branches, log_eval, log_step, step_line
from copd_ray.recovery import Rollback, SelfHealing, restore
from copd_ray.run_data import BranchData, Prompter, draw_prompts, prepare
from copd_ray.ray_start import beside_ray
from copd_ray.runtime import Runtime, WarmPool
from copd_ray.schedule import Phases, checkpoint_due, schedule, segment
from copd_ray.teacher_clocks import TeacherClocks
from copd_ray.topology import Topology
from copd_ray.topology.graph import measured_pairs


@dataclass
class Loop:
    """The training steps of a run, on the actors `runtime` holds."""

    cfg: Config
    plan: list[tuple[int, str]]
    phases: Phases  # each branch's phase at each step: the plan's, or adaptive
    pairs: list[tuple[str, str]]  # (teacher, student) pairs whose metrics are logged
    runtime: Runtime
    data: dict[str, BranchData]
    prompter: Prompter
    log: MetricsLog
    healer: SelfHealing
    progress: object  # a rich Progress; its task 0 counts steps
    pair_metrics: PairMetrics
    out: Path
    base_path: str
    edges: tuple  # the topology's (teacher, student) edges, recorded in every checkpoint
    last_checkpoint: tuple = (0, None)  # (step, folder): where a lost trainer sends the run back

    def run(self, resume: tuple[int, Path] | None) -> dict[str, str]:
        """Algorithm 1 from the start, or from the checkpoint `resume` (step, folder); returns
        each branch's folder as it ends training. A lost trainer (`Rollback`) sends every branch
        back to the last checkpoint, and the steps since run again."""
        restore_to, redo = resume, []
        self.last_checkpoint = resume or self.last_checkpoint
        while True:
            try:
                self.algorithm_1(self.back_to(restore_to[1], redo) if restore_to is not None else 0)
                # The branches as they end training, for the merge and the final evaluation.
                return self.healer.each(list(self.runtime.trainable), lambda n: self.runtime.trainable[n].save(
                    str(self.out / "branches" / n), with_optimizer=False))
            except Rollback as rollback:
                restore_to = self.last_checkpoint
                redo = [{**e, "steps_redone": e["step"] - restore_to[0]} for e in rollback.events]

    def algorithm_1(self, step: int) -> None:
        """From after `step` to the plan's end: for cycle in 1..N, Phase I (schedule.rl_steps of
        RLVR), then Phase II (schedule.opd_steps of mutual OPD), each branch in the phase that
        `phases` gives it; a checkpoint at every cycle's end and every schedule.save_every steps."""
        cfg, plan = self.cfg, self.plan
        while step < len(plan):
            cycle, phase = plan[step]
            self.progress.update(0, description=f"cycle {cycle + 1}/{cfg.schedule.cycles} "
                                                f"{'Phase I  (RLVR)' if phase == 'rl' else 'Phase II (OPD) '}"
                                                f"{' (adaptive)' if self.phases.adaptive else ''}")
            self.healer.begin(step + 1)  # an actor that died between steps is back before the step starts
            if cfg.schedule.max_staleness:
                steps = segment(plan, step + 1, cfg)
                self.on_own_clocks(steps)
                step = steps[-1]
            else:
                step += 1
                self.lockstep(step)
            if checkpoint_due(plan, step, cfg):
                self.checkpoint(step)
            self.progress.update(0, completed=step)

    def checkpoint(self, step: int) -> None:
        """Every branch, its optimizer and data streams saved at `step` (merge.every_cycle: at a
        cycle's end the branches first continue from their merge)."""
        cfg, plan, trainable = self.cfg, self.plan, self.runtime.trainable
        if cfg.merge.every_cycle and step < len(plan) and plan[step][0] != plan[step - 1][0]:
            merge_and_continue(self.out / "cycle_merges" / f"cycle_{plan[step - 1][0] + 1}", trainable, cfg,
                               self.base_path, self.healer)
        self.last_checkpoint = (step, self.healer.call(lambda: save_checkpoint(
            self.out, step, trainable, self.data, self.base_path, cfg.schedule.keep_checkpoints, self.edges)))

    def back_to(self, folder: Path | None, redo_events: list[dict]) -> int:
        """Branches, data streams, metrics and phases as a checkpoint left them (None: the run's
        start), with the events of the steps to run again; returns the checkpoint's step."""
        step = restore(folder, self.runtime.trainable, self.data, self.healer)
        self.log.rewind(step)
        self.phases.replay(read_metrics(self.out / "metrics.jsonl"))
        for event in redo_events:
            self.log.log({"kind": "event", **event, "rolled_back_to": step})
        self.progress.update(0, completed=step)
        return step

    def draw(self, step: int) -> dict:
        """Step `step`'s prompts of every branch; the teachers asked of the topology first (a
        restarted TopologyActor is healed and asked again before any prompt is drawn)."""
        phases = self.phases.at(step)
        opd = [n for n, phase in phases.items() if phase == "opd"]
        teachers = self.healer.call(lambda: self.runtime.teachers_of(opd))
        return draw_prompts(phases, step, self.cfg, self.data, self.prompter, teachers)

    def lockstep(self, step: int) -> None:
        """Step `step` of Algorithm 1 in every branch, then every weight broadcast."""
        cfg, trainable = self.cfg, self.runtime.trainable
        prompts = self.draw(step)
        # Every branch takes its step in parallel (one that fails is retried after recovery) ...
        records = self.healer.each(list(trainable), lambda n: branch_step.run(
            trainable[n], prompts[n], cfg))
        # ... then every branch broadcasts its new weights to its generators and scorer.
        synced = self.healer.each(list(trainable), lambda n: trainable[n].sync()) \
            if step % cfg.schedule.sync_every == 0 else {}
        self.report(step, records, synced, trainable, self.pairs, self.healer.call)
        self.progress.update(0, completed=step)

    def report(self, step: int, records: dict, synced: dict, groups: dict, edges, call=lambda fn: fn()) -> None:
        """After step `step` of `groups` (all in lockstep; one on its own clock): records, pair
        metrics of `edges` and evals when due, the console line; `call` wraps actor calls."""
        cfg, cycle = self.cfg, self.plan[step - 1][0]
        for n, r in records.items():
            r.update({"cycle": cycle + 1, "version": groups[n].version,  # from 1, as the progress bar counts
                      "time/sync": synced[n]["seconds"] if synced else 0.0})
        self.phases.observe(call(lambda: self.pair_metrics(step, edges, self.runtime.groups, self.data,
                                                           self.prompter)))
        log_step(self.log, step, records)
        if cfg.eval.every and step % cfg.eval.every == 0:
            log_eval(self.log, step, call(lambda: evaluate_branches(groups, self.prompter, cfg,
                                                                    cfg.eval.during_training_size)))
        self.progress.console.print(step_line(step, records))

    def on_own_clocks(self, steps: list[int]) -> None:
        """Steps `steps` with each branch on its own clock: its generators sample step
        t + k while its trainer trains on step t (k = schedule.max_staleness), and its
        teachers score with their weights of the same step as the student's rollouts
        (`TeacherClocks`). The prompts are drawn first, in the lockstep order, so that a
        resumed run draws the same ones."""
        cfg, trainable, k = self.cfg, self.runtime.trainable, self.cfg.schedule.max_staleness
        prompts = {s: self.draw(s) for s in steps}
        clocks = TeacherClocks(steps, k, prompts, list(trainable))

        def branch(n: str) -> None:
            group, flights, ahead = trainable[n], deque(), 0
            try:
                for i, step in enumerate(steps):
                    while ahead < len(steps) and ahead <= i + k:
                        flights.append(branch_step.launch(group, prompts[steps[ahead]][n], cfg, clocks))
                        ahead += 1
                    record = branch_step.finish(group, flights.popleft())
                    clocks.before_sync(n, step)
                    synced = group.sync()
                    clocks.synced_to(n, step)
                    self.report(step, {n: record}, {n: synced}, {n: group}, [e for e in self.pairs if e[1] == n])
                    self.progress.advance(0, 1 / len(trainable))
            except BaseException as e:
                clocks.fail(e)
                raise

        with ThreadPoolExecutor(max_workers=len(trainable)) as pool:
            futures = [pool.submit(branch, n) for n in trainable]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the pipelines are broken: recover the actors, then replay from the checkpoint
            self.healer.recover(errors[0], rollback=True)


def merge(branch_dirs: dict[str, str], folder: Path, cfg: Config, base_path: str) -> Path:
    """The branches merged in parameter space by merge.method and merge.weights."""
    from copd_ray.models.merge_folders import merge_folders

    weights = [cfg.merge.weights[n] for n in branch_dirs] if cfg.merge.weights else None
    return merge_folders(list(branch_dirs.values()), folder, cfg.merge.method, weights, base_folder=base_path)


def merge_and_continue(folder: Path, trainable: dict, cfg: Config, base_path: str, healer: SelfHealing) -> None:
    """merge.every_cycle (a variant): at a cycle's end every branch continues from the merge."""
    dirs = healer.each(list(trainable), lambda n: trainable[n].save(str(folder / n), with_optimizer=False))
    merged = merge(dirs, folder / "merged", cfg, base_path)
    healer.each(list(trainable), lambda n: trainable[n].adopt(str(merged)))


def train(cfg: Config, topology: Topology | None = None, console=None, pool: WarmPool | None = None) -> dict:
    """Algorithm 1 end to end; returns {"eval", "models", "budget", "steps", "resumed_at" (the
    checkpoint's step a resume started from, else 0), "seconds", "timing", "plots"}. With a
    `pool` the run takes warm actors from it and leaves its own there."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from copd_ray.metrics_log import budget
    from copd_ray.plots import plot_run

    console = console or Console()
    out = Path(cfg.output_dir)
    clock, plan = Stopwatch(), schedule(cfg)
    # Data, base policy and checks run while Ray starts; what fails there stops the run
    # before any actor exists (and stops the Ray this call started).
    prepared, started_ray = beside_ray(cfg, lambda: prepare(cfg, topology, console), topology)
    topology, caps, data, (resume, resume_state), base_path, prompter = prepared
    clock.mark("ray_and_data")
    runtime, log = None, None
    try:
        runtime = Runtime(cfg, topology, base_path, console, pool)
        groups, trainable = runtime.groups, runtime.trainable  # frozen teachers never step
        names = list(trainable)
        frozen = [n for n in groups if n not in trainable]
        console.print(f"ray: {len(groups)} branches up ({', '.join(names)}"
                      f"{'; frozen teachers ' + ', '.join(frozen) if frozen else ''}), topology "
                      f"{[f'{t}->{s}' for t, s in topology.edges]}, {clock.mark('actors_up'):.0f} s")
        resume_step = resume_state["step"] if resume else None  # as find_resume read and checked it
        log = MetricsLog(out, cfg.wandb, cfg.run_name, cfg.model_dump(mode="json"), resume_step)
        healer = SelfHealing(groups, runtime.topology_actor, topology, runtime.endpoints, cfg.ray.max_failures,
                             cfg.ray.restart_timeout_s, lambda e: log.log({"kind": "event", **e}), console,
                             out / "actors.json")
        console.print(healer.node_line())
        pair_metrics, pairs = PairMetrics(cfg, log, console), measured_pairs(cfg, topology.edges)
        phases = Phases(cfg, names, topology.edges)
        if resume is not None:
            log.log({"kind": "event", "step": resume_step, "event": "resumed", "from": str(resume)})
        else:
            phases.observe(pair_metrics(0, pairs, groups, data, prompter))
            if cfg.eval.every:
                log_eval(log, 0, evaluate_branches(trainable, prompter, cfg, cfg.eval.during_training_size))

        clock.mark("first_step")
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            progress.add_task("CoPD", total=len(plan))
            loop = Loop(cfg, plan, phases, pairs, runtime, data, prompter, log, healer, progress, pair_metrics, out,
                        base_path, topology.edges)
            branch_dirs = loop.run((resume_step, resume) if resume is not None else None)

        clock.mark("trained")
        # Merge the branches in parameter space into the unified model (when there are several).
        models = {"base": base_path, **{f"branch:{n}": branch_dirs[n] for n in names}}
        if len(names) > 1:
            models["merged"] = str(merge(branch_dirs, out / "merged", cfg, base_path))
        # Evaluate base, every branch and the merged model on every capability (on the
        # generators, whose engines are warm), then free the cluster.
        results = runtime.evaluate(models, cfg, {n: c.heldout for n, c in caps.items()})
        runtime.close(keep=not started_ray)  # a Ray this call stops takes the actors with it
        clock.mark("evaluated")
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
               "steps": len(plan), "resumed_at": resume_step or 0, "seconds": clock.mark("done"),
               "timing": clock.marks}
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    summary["plots"] = [str(p) for p in plot_run(out)]
    return summary
