"""What a run watches while it trains: the pair metrics of every teacher -> student edge,
held-out accuracy of the live branches, and the step log. Numbers come back to the
driver; rollouts and distributions stay with the actors."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import ray

from copd_ray.branch_step import fetch
from copd_ray.config import Config
from copd_ray.engines import SamplingParams
from copd_ray.metrics_log import MetricsLog
from copd_ray.run_data import BranchData, Prompter, opd_temperature, sampling, seed_of


def pair_metrics(teacher: str, student: str, groups, data: dict[str, BranchData], prompter: Prompter,
                 cfg: Config) -> dict:
    """Top-k overlap and symmetric KL of teacher and student along the student's own
    rollouts on a fixed probe set: the first metrics.pair_sequences validation (else held-out)
    prompts of the teacher's data, sampled as in OPD with a fixed seed, so that the curve over training
    moves with the policies, not with the draw. The teacher's scorer sends its top
    metrics.kl_topk tokens per position to the student's scorer, which computes both."""
    m, teacher_caps = cfg.metrics.pair_sequences, data[teacher].capabilities
    per_cap = -(-m // len(teacher_caps))
    probe = [r for c in teacher_caps for r in c.watched[:per_cap]][:m]
    batch = prompter(probe, sampling(cfg, 1, seed_of(cfg.seed, "probe", teacher, student), opd_temperature(cfg)))
    rollouts = [parts[0] for parts in groups[student].sample(batch)]
    top = groups[teacher].scorer.top_k.remote(cfg.metrics.kl_topk, *rollouts)
    return fetch([groups[student].scorer.pair_metrics.remote(top, cfg.metrics.topk, *rollouts)])[0][0]


class PairMetrics:
    """The logged pair metrics of teacher -> student edges, at step 0 and every
    metrics.pair_every steps, until a scorer engine turns out not to give top-k log-probs:
    from then on none, with an event that says why."""

    def __init__(self, cfg: Config, log: MetricsLog, console) -> None:
        self.cfg, self.log, self.console = cfg, log, console
        self.every = cfg.metrics.pair_every

    def __call__(self, step: int, edges, groups, data, prompter: Prompter) -> list[dict]:
        """The metrics of `edges` after step `step` when due: logged, and returned."""
        cfg = self.cfg
        if not self.every or step % self.every:
            return []
        try:
            pairs = [{"kind": "pair", "step": step, "teacher": teacher, "student": student,
                      **pair_metrics(teacher, student, groups, data, prompter, cfg)} for teacher, student in edges]
            for record in pairs:
                self.log.log(record)
            return pairs
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, NotImplementedError):
                raise
            if cfg.schedule.kind == "adaptive":
                raise RuntimeError(f"schedule.kind=adaptive needs the pair metrics, which this scorer cannot give: "
                                   f"{e.cause}") from None
            self.every = 0  # this scorer engine cannot give top-k log-probs
            self.log.log({"kind": "event", "step": step, "event": "pair_metrics_off", "why": str(e.cause)})
            self.console.print(f"[yellow]pair metrics off: {e.cause}[/yellow]")
            return []


def evaluate_branches(groups, prompter: Prompter, cfg: Config, size: int) -> dict[str, dict[str, float]]:
    """Greedy pass@1 of every branch's live policy on every capability's validation (else held-out) set."""
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    batches = {cap.name: prompter(cap.watched[:size], greedy) for cap in prompter.caps.values()}
    names = list(groups)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:  # every branch at once
        return dict(zip(names, pool.map(lambda n: {c: groups[n].evaluate(b) for c, b in batches.items()}, names)))


def log_eval(log: MetricsLog, step: int, results: dict[str, dict[str, float]]) -> None:
    for branch, per_cap in results.items():
        for cap, rate in per_cap.items():
            log.log({"kind": "eval", "step": step, "branch": branch, "capability": cap, "pass_rate": rate})


def log_step(log: MetricsLog, step: int, records: dict) -> None:
    """Per-branch step records and NaN events."""
    for r in records.values():
        log.log(r)
        if r["nan_skipped"]:
            log.log({"kind": "event", "step": step, "event": "nan_loss_skipped", "branch": r["branch"],
                     "updates": r["nan_skipped"]})


def step_line(step: int, records: dict[str, dict]) -> str:
    phases = {r["phase"] for r in records.values()}
    phase = phases.pop() if len(phases) == 1 else "mix"  # an adaptive schedule's branches may differ
    parts = []
    for n, r in records.items():
        t = r["time/generate"] + r["time/score"] + r["time/train"] + r["time/sync"]
        reward = f"r={r['reward_mean']:.2f} " if "reward_mean" in r else ""
        lag = f" lag {r['lag/steps']}" if r["lag/steps"] else ""
        parts.append(f"{n} {reward}L={r['loss']:+.3f} v{r['version']}{lag} {t:.1f}s")
    return f"{step:4d} {phase:3s}| " + " | ".join(parts)


class Stopwatch:
    """Seconds since the run started at named points (where start-up and the end went)."""

    def __init__(self) -> None:
        self.start, self.marks = time.perf_counter(), {}

    def mark(self, name: str) -> float:
        self.marks[name] = round(time.perf_counter() - self.start, 2)
        return self.marks[name]
