"""Self-healing: a run survives a killed trainer, generator or scorer.

Ray restarts a dead actor in its own placement-group bundle (`max_restarts`); what Ray
cannot know is the run's state, so the driver restores it:

- a generator or scorer comes back with the base weights and no weight group: its
  branch's group is rebuilt (a new generation, every member), the trainer's current
  weights are pushed, the scorer is registered again with the topology, and the step
  that failed is retried (branches that had finished it keep their result);
- a trainer comes back with the base weights and a fresh optimizer: its branch is
  re-wired and `Rollback` tells the driver to reload the last complete checkpoint in
  every branch and replay from there.

A failure is noticed by the call that hit it, or, for an actor that died while idle, by
`check()` at the start of every step (a restarted actor answers with a new incarnation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from copd_ray.actors import BranchGroup
from copd_ray.checkpoints import read_state
from copd_ray.errors import ActorFailure


TOPOLOGY = ("*", "topology")  # the TopologyActor's key among the branches' actors (actors.json too)


class Rollback(Exception):
    """A trainer restarted: every branch must go back to the last complete checkpoint.
    Carries the recovery events, to be logged once the metrics are rewound."""

    def __init__(self, events: list[dict]) -> None:
        super().__init__("a trainer restarted")
        self.events = events


class SelfHealing:
    def __init__(self, groups: dict[str, BranchGroup], topology_actor, topology, endpoints: dict, max_failures: int,
                 restart_timeout_s: float, log_event: Callable[[dict], None], console, pid_file: Path) -> None:
        self.groups, self.topology_actor, self.topology, self.endpoints = groups, topology_actor, topology, endpoints
        self.topology_incarnation, self.nodes = None, {}
        self.max_failures, self.restart_timeout_s = max_failures, restart_timeout_s
        self.log_event, self.console, self.pid_file = log_event, console, pid_file
        self.failures = 0
        self.step = 0  # the step being run (begin), for the records
        self.record_members()

    # -- who is alive ---------------------------------------------------------------------

    def _answers(self) -> dict[tuple[str, str], dict]:
        """ready() of every actor of every branch, waiting out restarts in progress. An
        actor that does not answer in time (stuck in a collective with a dead peer) is
        killed once, so that Ray restarts it too."""
        actors = {(n, role): a for n, g in self.groups.items() for role, a in g.members().items()}
        actors[TOPOLOGY] = self.topology_actor
        refs = {key: a.ready.remote() for key, a in actors.items()}
        out, killed = {}, set()
        deadline = time.monotonic() + self.restart_timeout_s
        while refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                if set(refs) <= killed:
                    n, role = next(iter(refs))
                    node = self.nodes.get(n, {}).get(role)
                    where = f" (on node {node[:8]} before)" if node else ""
                    raise ActorFailure(f"{role} of branch {n!r}{where} did not come back within "
                                       f"{self.restart_timeout_s:.0f} s at step {self.step} (ray.restart_timeout_s: no "
                                       "node has room for it); rerun the same command to resume from the last "
                                       "checkpoint")
                for key in set(refs) - killed:
                    ray.kill(actors[key], no_restart=False)
                    refs[key] = actors[key].ready.remote()
                killed |= set(refs)
                deadline = time.monotonic() + self.restart_timeout_s
                continue
            key = next(k for k, r in refs.items() if r == ready[0])
            try:
                out[key] = ray.get(refs.pop(key))
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                time.sleep(0.2)
                refs[key] = actors[key].ready.remote()
            except ray.exceptions.ActorDiedError as e:
                raise ActorFailure(f"{key[1]} of branch {key[0]!r} died and Ray could not restart it "
                                   f"({_first_line(e)}); rerun the same command to resume from the last "
                                   "checkpoint") from None
        return out

    def record_members(self) -> None:
        """Note every actor's incarnation, and its pid in pid_file (which process is which)."""
        answers = self._answers()
        topology = answers.pop(TOPOLOGY)
        self.topology_incarnation = topology["incarnation"]
        for (n, role), a in answers.items():
            self.groups[n].incarnations[role] = a["incarnation"]
        self.pids = {n: {role: a["pid"] for (b, role), a in answers.items() if b == n} for n in self.groups}
        self.pids[TOPOLOGY[0]] = {TOPOLOGY[1]: topology["pid"]}
        self.nodes = {n: {role: a["node"] for (b, role), a in answers.items() if b == n} for n in self.groups}
        self.nodes[TOPOLOGY[0]] = {TOPOLOGY[1]: topology["node"]}
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(json.dumps(self.pids, indent=2))
        # Which Ray node runs each actor (the state API's node ids), beside the pids.
        self.pid_file.with_name("actor_nodes.json").write_text(json.dumps(self.nodes, indent=2))

    def node_line(self) -> str:
        """Which node holds each branch's actors, in one line (node ids cut to 8 characters)."""
        where = {n: sorted({node[:8] for node in roles.values()}) for n, roles in self.nodes.items()
                 if n != TOPOLOGY[0]}
        return "nodes: " + ", ".join(f"{n} on {' + '.join(ids)}" for n, ids in where.items())

    def restarted(self) -> dict[tuple[str, str], dict]:
        """{(branch, role): its new ready() answer} for every actor Ray restarted since it was wired."""
        return {key: a for key, a in self._answers().items()
                if a["incarnation"] != (self.topology_incarnation if key == TOPOLOGY
                                        else self.groups[key[0]].incarnations[key[1]])}

    # -- recovery -------------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """Step `step` starts: failures are recorded at it, and actors that died while nobody
        was calling them are recovered first."""
        self.step = step
        if self.restarted():
            self.recover(RuntimeError("an actor restarted between steps"))

    def recover(self, error: BaseException, rollback: bool = False) -> None:
        """Restore every restarted actor's place in the run, or re-raise `error` when no
        actor restarted (then it was not a fault of the cluster but a bug or bad input).
        `rollback`: replay from the last checkpoint even when no trainer was lost (branches
        on their own clocks cannot retry one step: their pipelines hold several)."""
        start = time.perf_counter()
        replaced = self.restarted()
        if not replaced:
            raise error
        self.failures += 1
        what = ", ".join(f"{role} of branch {n!r} (pid {self.pids[n][role]})" for n, role in replaced)
        if self.failures > self.max_failures:
            raise ActorFailure(f"{what} died at step {self.step}: failure {self.failures} of this run, more than "
                               f"ray.max_failures={self.max_failures}; rerun the same command to resume from the "
                               "last checkpoint") from None
        branches = sorted({n for n, _ in replaced} - {TOPOLOGY[0]})
        trainer_lost = any(role.startswith("trainer") for _, role in replaced)
        rollback = rollback or trainer_lost
        for n in branches:
            g = self.groups[n]
            if g.reused:  # a WarmPool's actor came back as its first run's: make it this run's again
                ray.get(g.reload([role for b, role in replaced if b == n]))
            g.wire(g.generation + 1)
            if trainer_lost or g.frozen:
                continue
            if g.trained_since_sync and (n, "scorer") in replaced:
                # Its trainer has stepped, and the students retrying this step expect the
                # teacher they would have met: the last synced version, which the generators
                # hold (the trainer's new weights reach everyone at the step's sync). Where no
                # generator can hand it over (one was lost too, or its engine does not expose
                # its weights), a replay from the checkpoint keeps the run exact.
                lost_generator = any(b == n and role.startswith("generator") for b, role in replaced)
                rollback = rollback or lost_generator or not g.scorer_from_generator()
            else:
                g.push()
        # A restarted scorer keeps its actor handle, so students reach it as soon as it is
        # registered again (the Serve deployments in front of scorers hold the same handle). A
        # restarted topology actor holds the first run's graph and no endpoint: all again.
        if TOPOLOGY in replaced:
            self.topology_actor.reset.remote(self.topology)  # runs before the register calls below
            branches = sorted(self.groups)
        ray.get([self.topology_actor.register.remote(n, self.endpoints[n]) for n in branches if n in self.endpoints])
        old_pids = {key: self.pids[key[0]][key[1]] for key in replaced}
        self.record_members()
        events = [{"step": self.step, "event": "actor_recovered", "branch": n, "actor": role, "pid_before": old_pids[(n, role)],
                   "pid_after": new["pid"], "failure": self.failures, "error": _first_line(error),
                   "seconds": round(time.perf_counter() - start, 2),
                   "then": "rollback to the last checkpoint" if rollback else "retry the step"}
                  for (n, role), new in replaced.items()]
        self.console.print(f"[yellow]recovered {what} at step {self.step} in {time.perf_counter() - start:.1f} s "
                           f"(failure {self.failures}/{self.max_failures}); "
                           f"{'rolling back to the last checkpoint' if rollback else 'retrying the step'}[/yellow]")
        if rollback:
            raise Rollback(events)
        for event in events:
            self.log_event(event)

    def each(self, names, fn: Callable[[str], object]) -> dict:
        """fn(name) for every branch at once (one driver thread each). A branch whose call
        failed is retried after recovery; one whose call succeeded is not run again."""
        done: dict = {}
        while True:
            pending = [n for n in names if n not in done]
            if not pending:
                return {n: done[n] for n in names}
            with ThreadPoolExecutor(max_workers=len(pending)) as pool:
                outcomes = dict(zip(pending, pool.map(lambda n: _attempt(fn, n), pending)))
            errors = [e for e in outcomes.values() if isinstance(e, _Failed)]
            done.update({n: r for n, r in outcomes.items() if not isinstance(r, _Failed)})
            if errors:
                self.recover(errors[0].error)

    def call(self, fn: Callable[[], object]):
        """fn() retried after recovery (fn must be safe to repeat)."""
        return self.each(["-"], lambda _: fn())["-"]


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _attempt(fn, name):
    try:
        return fn(name)
    except Exception as e:  # noqa: BLE001 - sorted out by recover(): a fault, or re-raised
        return _Failed(e)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def restore(folder: Path | None, trainable: dict, data: dict, healer: SelfHealing) -> int:
    """Every trainable branch and every data stream back to a checkpoint (None: the run's
    start), in the running actors; returns the checkpoint's step."""
    state = read_state(folder) if folder else {"step": 0, "drawn": {}, "versions": {}}
    healer.each(list(trainable), lambda n: trainable[n].load(str(folder / "branches" / n) if folder else None,
                                                             state["versions"].get(n, 0)))
    for n, d in data.items():
        d.replay(state["drawn"].get(n, 0))
    healer.console.print(f"resumed from {folder or 'the start'} at step {state['step']}")
    return state["step"]
