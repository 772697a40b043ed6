"""Which phase each branch is in at each step: Algorithm 1's fixed cycles, or the adaptive
schedule that switches a branch by its pair metrics. Plain Python; the driver asks it.

Fixed (schedule.kind=fixed): every branch runs rl_steps of Phase I, then opd_steps of
Phase II, cycles times.

Adaptive (schedule.kind=adaptive, beyond the paper): a branch starts in Phase I and moves
to Phase II once its latest pair metric with any of its teachers has drifted (top-k overlap
below schedule.overlap_low, or symmetric KL above schedule.kl_high), and back to Phase I
once every teacher's metric is inside again; it stays at least schedule.min_phase steps in
a phase. The step count is the fixed schedule's, T = cycles x (rl_steps + opd_steps) per
branch, so the budget is K.T either way; cycles then only mark where checkpoints fall.
"""

from __future__ import annotations

from copd_ray.config import Config


def schedule(cfg: Config) -> list[tuple[int, str]]:
    """(cycle, phase) of every global step, in order (the fixed schedule's phases)."""
    s = cfg.schedule
    return [(c, phase) for c in range(s.cycles) for phase, n in (("rl", s.rl_steps), ("opd", s.opd_steps)) for _ in range(n)]


def checkpoint_due(plan, step: int, cfg: Config) -> bool:
    """At the end of every cycle, and every schedule.save_every steps."""
    every = cfg.schedule.save_every
    return step == len(plan) or plan[step][0] != plan[step - 1][0] or bool(every and step % every == 0)


def segment(plan, first: int, cfg: Config) -> list[int]:
    """The steps from `first` on that branches run on their own clocks: up to the next
    checkpoint (where all must stand still), or phase switch with schedule.phase_barrier."""
    steps = [first]
    while not checkpoint_due(plan, steps[-1], cfg) and not (
            cfg.schedule.phase_barrier and plan[steps[-1]][1] != plan[steps[-1] - 1][1]):
        steps.append(steps[-1] + 1)
    return steps


class Phases:
    """The phase of every trainable branch at each step. `at(step)` is asked once per step,
    in order; `observe` takes the pair records the run logs (dicts with teacher, student,
    topk_overlap, symmetric_kl); `replay` rebuilds the state from a run's metrics records
    (a resume or a rollback), since the decisions depend on nothing else."""

    def __init__(self, cfg: Config, branches: list[str], edges) -> None:
        s = cfg.schedule
        self.plan, self.adaptive = schedule(cfg), s.kind == "adaptive"
        self.overlap_low, self.kl_high, self.min_phase = s.overlap_low, s.kl_high, s.min_phase
        self.teachers = {b: [t for t, st in edges if st == b] for b in branches}
        self.phase = {b: "rl" for b in branches}
        self.length = {b: 0 for b in branches}  # steps spent in the current phase
        self.latest: dict[tuple[str, str], dict] = {}  # (teacher, student) -> its last pair record

    def drifted(self, branch: str) -> bool:
        """Whether any teacher's latest pair metric with `branch` is outside the thresholds."""
        for t in self.teachers[branch]:
            m = self.latest.get((t, branch))
            if m is None:
                continue
            if self.overlap_low is not None and m["topk_overlap"] < self.overlap_low:
                return True
            if self.kl_high is not None and m["symmetric_kl"] > self.kl_high:
                return True
        return False

    def at(self, step: int) -> dict[str, str]:
        """Each branch's phase at `step` (1-based)."""
        if not self.adaptive:
            return {b: self.plan[step - 1][1] for b in self.phase}
        for b, phase in self.phase.items():
            if self.length[b] >= self.min_phase and self.drifted(b) == (phase == "rl"):
                self.phase[b], self.length[b] = ("opd" if phase == "rl" else "rl"), 0
            self.length[b] += 1
        return dict(self.phase)

    def observe(self, pairs: list[dict]) -> None:
        for r in pairs:
            self.latest[(r["teacher"], r["student"])] = r

    def replay(self, records: list[dict]) -> None:
        """The state after the last step in `records` (a run's metrics.jsonl, read back)."""
        self.phase = {b: "rl" for b in self.phase}
        self.length = {b: 0 for b in self.phase}
        self.latest = {}
        for r in sorted((r for r in records if r["kind"] in ("step", "pair")), key=lambda r: r["step"]):
            if r["kind"] == "pair":
                self.observe([r])
            elif r["branch"] in self.phase:
                b = r["branch"]
                self.length[b] = self.length[b] + 1 if r["phase"] == self.phase[b] else 1
                self.phase[b] = r["phase"]
