"""Bounded, reproducible teachers for branches on their own clocks (schedule.max_staleness = k > 0).

A student's rollouts for step s come from its own weights of step V(s) = max(first - 1, s - 1 - k)
(`first`: the segment's first step, where every branch stood still). Each trainable teacher
scores them with its weights of that same step V(s), whatever the timing, by two rules:

- the student submits the scoring of step s only once the teacher's sync of step V(s) is done;
- the teacher syncs step V(s) + 1 only once every scoring that needs V(s) is done.

So the bound covers teachers as it covers rollouts, and two identical runs score with the
same teacher weights. Which scorings each teacher owes is known before the segment starts
(the driver draws every step's prompts first). The rules cannot wait on each other in a
circle: a scoring that needs step u of its teacher waits only on work of step u or before.
Frozen teachers never change and are not clocked.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import ray

from copd_ray.step_data import StepPrompts


class TeacherClocks:
    def __init__(self, steps: list[int], k: int, prompts: dict[int, dict[str, StepPrompts]],
                 trainable: list[str]) -> None:
        self.first, self.k = steps[0], k
        self.synced = {b: self.first - 1 for b in trainable}  # the step whose weights each branch serves
        self.owed: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)  # (teacher, V) -> (student, s)
        for s in steps:
            for student, p in prompts[s].items():
                for teacher in p.teachers:
                    if teacher in self.synced:
                        self.owed[(teacher, self.version(s))].add((student, s))
        self.scorings: dict[tuple[str, str, int], list] = {}  # (teacher, student, step) -> its references
        self.failed: BaseException | None = None
        self.changed = threading.Condition()

    def version(self, step: int) -> int:
        """The step whose weights score (and sample) step `step`."""
        return max(self.first - 1, step - 1 - self.k)

    def before_scoring(self, teacher: str, step: int) -> None:
        """Wait until `teacher` serves the weights that score step `step`."""
        if teacher in self.synced:
            self._wait(lambda: self.synced[teacher] >= self.version(step))

    def scored(self, teacher: str, student: str, step: int, refs: list) -> None:
        with self.changed:
            self.scorings[(teacher, student, step)] = refs
            self.changed.notify_all()

    def before_sync(self, branch: str, step: int) -> None:
        """Wait until every scoring that needs `branch`'s weights of step - 1 is done."""
        owed = self.owed.get((branch, step - 1), set())
        self._wait(lambda: all((branch, n, s) in self.scorings for n, s in owed))
        refs = [r for n, s in owed for r in self.scorings[(branch, n, s)]]
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)

    def synced_to(self, branch: str, step: int) -> None:
        with self.changed:
            self.synced[branch] = step
            self.changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """A branch's pipeline broke: every wait ends (and raises) instead of waiting on it."""
        with self.changed:
            self.failed = error
            self.changed.notify_all()

    def _wait(self, ready) -> None:
        with self.changed:
            while not ready():
                if self.failed is not None:
                    raise RuntimeError("another branch's pipeline failed") from self.failed
                self.changed.wait()
