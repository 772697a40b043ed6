"""`copd-ray compare`: CoPD against its baselines and ablations, at stated budgets.

Every row is a configuration of the one training loop (`driver.train`), derived from the
CoPD config the user gives. With T = cycles x (rl_steps + opd_steps) steps per branch and
K branches:

    experts          each branch alone, RL only, T steps (topology none); its checkpoint
                     at T/2 is where static OPD and MOPD start from
    mixed            one branch on the union of the data, K*T RL steps
    static_opd_a_b   frozen expert a (at T/2) teaches expert b (at T/2) for K*T - K*T/2
                     steps: the same total as CoPD once the experts' steps are counted
    mopd             every frozen expert (at T/2) teaches one student from the base, which
                     also keeps a GRPO batch on the union; K*T - K*T/2 steps
    copd             the config as given
    copd_without_a_b CoPD with the edge a -> b removed
    copd_ratio_x_y   CoPD with rl_steps:opd_steps = x:y in each cycle (same T)
    copd_merge_each_cycle  CoPD whose branches are merged at each cycle's end and continue from
                     the merge (merge.every_cycle; same T)
    copd_adaptive    CoPD whose branches switch phase by their pair metrics (schedule.kind=
                     adaptive, thresholds from the config's schedule section; same T)

Rows also come from models a run already has: each CoPD branch alone (no merge), the
merge of the experts (no OPD), and the CoPD branches merged the other way. A finished
run (its eval.json exists) is never run again, and an unfinished one resumes from its
checkpoints, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from copd_ray.config import Config, ConfigError
from copd_ray.metrics_log import budget, read_metrics, redacted


@dataclass
class Run:
    name: str
    changes: dict  # top-level config keys replaced for this run
    after: str | None = None  # the run whose checkpoints it starts from


@dataclass
class Row:
    name: str
    group: str  # "reference", "baseline", "CoPD" or "ablation"
    run: str
    model: str  # a key of the run's eval (or "merged:<method>" for an extra merge)
    budget_branches: list[str] | None = None  # None: every trained branch of the run
    inherits: bool = False  # add the experts' first T/2 steps to the budget
    expected_steps: int | None = None


@dataclass
class Plan:
    cfg: Config
    names: list[str]
    steps_per_branch: int
    half: int
    runs: list[Run] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


def _ratio(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"ratio {text!r} is not of the form RL:OPD, e.g. 1:1") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ConfigError(f"ratio {text!r}: both parts must be >= 0 and not both 0")
    return a, b


def plan(cfg: Config, ratios: list[str], runs: list[str] | None = None) -> Plan:
    """Every run and row of the comparison, each run's config checked before anything runs.
    `runs` keeps only those runs (with `copd` and the runs they start from) and their rows:
    `experts,mixed,mopd` gives the shape of the paper's Table 2."""
    if any(b.frozen or b.init for b in cfg.branch_list()):
        raise ConfigError("compare takes a plain CoPD config: no frozen or initialised branches")
    names = [b.name for b in cfg.branch_list()]
    if len(names) < 2:
        raise ConfigError(f"compare needs at least two branches, the config has {names}")
    s = cfg.schedule
    per_cycle = s.rl_steps + s.opd_steps
    t = s.cycles * per_cycle
    if t < 2:
        raise ConfigError(f"compare needs at least 2 steps per branch (schedule gives {t})")
    k, half = len(names), t // 2
    student_steps = k * t - k * half
    data = {b.name: cfg.branch_data(b) for b in cfg.branch_list()}
    branch = lambda n, **kw: {"name": n, "data": data[n], **kw}  # noqa: E731
    ckpt = f"{{experts}}/checkpoints/step_{half:06d}/branches"
    only_rl = lambda steps: {"cycles": 1, "rl_steps": steps, "opd_steps": 0}  # noqa: E731
    opd_only = {"cycles": 1, "rl_steps": 0, "opd_steps": student_steps}
    transport = cfg.topology.transport
    topo = lambda kind, edges=(): {"kind": kind, "hub": None, "edges": [list(e) for e in edges],  # noqa: E731
                                   "transport": transport}
    alone = {"weights": None}  # merge weights name the CoPD branches, which these runs do not have
    p = Plan(cfg, names, t, half)
    # The experts log their pair metrics too (teaching nobody): Figure 4's "static pipeline" curve.
    p.runs.append(Run("experts", {"topology": topo("none"), "metrics": {"pairs": "all"},
                                  "schedule": {**only_rl(t), "save_every": half, "keep_checkpoints": 1000}}))
    p.runs.append(Run("mixed", {"branches": [{"name": "mixed", "data": [c.name for c in cfg.capabilities]}],
                                "topology": topo("none"), "merge": alone, "schedule": only_rl(k * t)}))
    edges = [(a, b) for a in names for b in names if a != b]
    for a, b in edges:
        p.runs.append(Run(f"static_opd_{a}_{b}", {
            "branches": [branch(b, init=f"{ckpt}/{b}"), branch(a, init=f"{ckpt}/{a}", frozen=True)],
            "topology": topo("edges", [(a, b)]), "merge": alone, "schedule": opd_only}, after="experts"))
    student = "student" if "student" not in names else "mopd_student"
    p.runs.append(Run("mopd", {
        "branches": [{"name": student, "data": [c.name for c in cfg.capabilities]}]
                    + [branch(n, init=f"{ckpt}/{n}", frozen=True) for n in names],
        "topology": topo("edges", [(n, student) for n in names]), "merge": alone, "schedule": opd_only},
        after="experts"))
    p.runs.append(Run("copd", {}))
    tp, copd_edges = cfg.topology, list(cfg.topology_graph().edges)
    for a, b in copd_edges:
        rest = [e for e in copd_edges if e != (a, b)]
        p.runs.append(Run(f"copd_without_{a}_{b}", {"topology": topo("edges", rest) if rest else topo("none")}))
    swept = []
    for text in ratios:
        x, y = _ratio(text)
        rl = round(per_cycle * x / (x + y))
        if (rl, per_cycle - rl) != (s.rl_steps, s.opd_steps) and (rl, per_cycle - rl) not in swept:
            swept.append((rl, per_cycle - rl))
    for rl, opd in swept:
        p.runs.append(Run(f"copd_ratio_{rl}_{opd}", {"schedule": {"rl_steps": rl, "opd_steps": opd}}))
    if not cfg.merge.every_cycle and s.cycles > 1:
        p.runs.append(Run("copd_merge_each_cycle", {"merge": {"every_cycle": True}}))
    if s.kind == "fixed":  # the same budget, phases switched by the pair metrics (schedule.kl_high, ...)
        p.runs.append(Run("copd_adaptive", {"schedule": {"kind": "adaptive"},
                                            "metrics": {"pair_every": cfg.metrics.pair_every or 5}}))

    other_merge = "task_arithmetic" if cfg.merge.method == "mean" else "mean"
    p.rows += [Row("base", "reference", "experts", "base", budget_branches=[], expected_steps=0)]
    p.rows += [Row(f"expert {n}", "baseline", "experts", f"branch:{n}", budget_branches=[n], expected_steps=t)
               for n in names]
    p.rows += [Row("experts merged (no OPD)", "baseline", "experts", "merged", expected_steps=k * t),
               Row("mixed RLVR", "baseline", "mixed", "branch:mixed", expected_steps=k * t)]
    p.rows += [Row(f"static OPD {a}→{b}", "baseline", f"static_opd_{a}_{b}", f"branch:{b}", inherits=True,
                   expected_steps=k * t) for a, b in edges]
    p.rows += [Row("MOPD (all experts → one student)", "baseline", "mopd", f"branch:{student}", inherits=True,
                   expected_steps=k * t)]
    p.rows += [Row(f"CoPD (merged, {cfg.merge.method})", "CoPD", "copd", "merged", expected_steps=k * t)]
    p.rows += [Row(f"CoPD branch {n} alone (no merge)", "ablation", "copd", f"branch:{n}", expected_steps=k * t)
               for n in names]
    p.rows += [Row(f"CoPD merged by {other_merge}", "ablation", "copd", f"merged:{other_merge}", expected_steps=k * t),
               Row("CoPD merged, weighted by training reward", "ablation", "copd", "merged:reward_weighted",
                   expected_steps=k * t)]
    if tp.kind == "hub_and_spoke":
        p.rows += [Row(f"CoPD merged, hub {tp.hub} weighted 2x", "ablation", "copd", "merged:hub_weighted",
                       expected_steps=k * t)]
    p.rows += [Row(f"CoPD without {a}→{b}", "ablation", f"copd_without_{a}_{b}", "merged", expected_steps=k * t)
               for a, b in copd_edges]
    p.rows += [Row(f"CoPD ratio {rl}:{opd}", "ablation", f"copd_ratio_{rl}_{opd}", "merged", expected_steps=k * t)
               for rl, opd in swept]
    if not cfg.merge.every_cycle and s.cycles > 1:
        p.rows += [Row("CoPD merged each cycle, continued from the merge", "ablation", "copd_merge_each_cycle",
                       "merged", expected_steps=k * t)]
    if s.kind == "fixed":
        drift = " or ".join(([f"overlap < {s.overlap_low}"] if s.overlap_low is not None else [])
                            + ([f"KL > {s.kl_high}"] if s.kl_high is not None else []))
        p.rows += [Row(f"CoPD adaptive (OPD while {drift})", "ablation", "copd_adaptive", "merged",
                       expected_steps=k * t)]
    for run in p.runs:  # a run that cannot start must fail now, not an hour in
        run_config(p, run, Path("/nonexistent"), cfg.seed, check_paths=False)
    if runs is not None:
        _select(p, runs)
    return p


def _select(p: Plan, runs: list[str]) -> None:
    known = [r.name for r in p.runs]
    unknown = [r for r in runs if r not in known]
    if unknown:
        raise ConfigError(f"compare: no run named {unknown}; the runs are {known}")
    keep = {"copd", *runs}  # every row is measured against CoPD
    keep |= {r.after for r in p.runs if r.name in keep and r.after}
    p.runs[:] = [r for r in p.runs if r.name in keep]
    p.rows[:] = [r for r in p.rows if r.run in keep]


def run_config(p: Plan, run: Run, folder: Path, seed: int, check_paths: bool = True) -> Config:
    changes = copy.deepcopy(run.changes)
    experts = str(folder.parent / "experts")
    for b in changes.get("branches") or []:
        if b.get("init"):
            b["init"] = b["init"].replace("{experts}", experts)
    offset = seed - p.cfg.seed
    if offset and not p.cfg.model.path and not p.cfg.model.gguf:
        # Seeds are independent replicates: each also draws the tiny policy's initial weights
        # and its warm-up's batches anew (the first seed keeps the config's own).
        model = changes.setdefault("model", {})
        model["tiny"] = {**p.cfg.model.tiny.model_dump(), **model.get("tiny", {}), "seed": p.cfg.model.tiny.seed + offset}
        changes["bootstrap"] = {**changes.get("bootstrap", {}), "seed": p.cfg.bootstrap.seed + offset}
    return derived_config(p.cfg, changes, folder, seed, f"{p.cfg.run_name}-{run.name}-s{seed}", check_paths)


def derived_config(cfg: Config, changes: dict, folder: Path, seed: int, run_name: str,
                   check_paths: bool = True) -> Config:
    """`cfg` with some sections changed (a dict updates a section, anything else replaces
    it), writing to `folder` and resuming there, validated."""
    tree = cfg.model_dump(mode="json")
    for key, value in copy.deepcopy(changes).items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    tree.update(output_dir=str(folder), seed=seed, run_name=run_name, resume="auto")
    from pydantic import ValidationError

    try:
        return Config.model_validate(tree, context={"check_paths": check_paths})
    except ValidationError as e:
        raise ConfigError(f"run {run_name!r} has an invalid config:\n{e}") from None


# -- running --------------------------------------------------------------------------------------


def merge_recipe(p: Plan, folder: Path, variant: str) -> tuple[str, list[float] | None]:
    """(method, weights) of a merge of a finished run's branches other than the config's own.
    reward_weighted: each branch by its mean reward over its last Phase I (rl_steps records),
    a measure of how well it does its own capability that the held-out sets never see."""
    if variant == "task_arithmetic":  # each branch's whole change (weights 1); with 1/K it is the mean
        return "task_arithmetic", [1.0] * len(p.names)
    if variant == "hub_weighted":
        return "mean", [2.0 if n == p.cfg.topology.hub else 1.0 for n in p.names]
    if variant == "reward_weighted":
        steps = [r for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "step" and r["phase"] == "rl"]
        last = max(p.cfg.schedule.rl_steps, 1)
        rewards = [max(statistics.fmean(r["reward_mean"] for r in [r for r in steps if r["branch"] == n][-last:]), 0.0)
                   for n in p.names]
        return "mean", rewards if sum(rewards) > 0 else None  # no branch earned anything: uniform
    return variant, None


def _extra_merge(p: Plan, folder: Path, variant: str, cfg: Config) -> dict[str, float]:
    """The CoPD branches merged another way, evaluated once and cached."""
    import ray

    from copd_ray.capabilities import build_capability
    from copd_ray.runtime import eval_task_options, evaluate_folder
    from copd_ray.models.merge_folders import merge_folders

    cache = folder / f"eval_merged_{variant}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    models = json.loads((folder / "eval.json").read_text())["models"]
    method, weights = merge_recipe(p, folder, variant)
    merged = merge_folders([models[f"branch:{n}"] for n in p.names], folder / f"merged_{variant}", method, weights,
                           base_folder=models["base"])
    held = {c.name: build_capability(c, cfg.seed).heldout for c in cfg.capabilities}
    result = ray.get(evaluate_folder.options(**eval_task_options(cfg)).remote(str(merged), cfg, held))
    cache.write_text(json.dumps({**result, "merge": {"method": method, "weights": weights}}, indent=2))
    return result


def run_compare(cfg: Config, out: Path, seeds: int, ratios: list[str], console, runs: list[str] | None = None,
                pool=None) -> dict:
    """Every run for every seed (skipping finished ones), then compare.json, compare.md and plots.
    The runs reload each other's actors through `pool` (a WarmPool; default: one of its own)."""
    from copd_ray.driver import train
    from copd_ray.ray_start import init_ray
    from copd_ray.runtime import WarmPool

    p = plan(cfg, ratios, runs)
    out.mkdir(parents=True, exist_ok=True)
    seed_list = [cfg.seed + i for i in range(seeds)]
    todo = [(s, r) for s in seed_list for r in p.runs]
    started = time.perf_counter()
    extra = [(seed, row) for seed in seed_list for row in p.rows if row.model.startswith("merged:")]
    pending = [(s, r) for s, r in todo if not (out / f"seed_{s}" / r.name / "eval.json").exists()] + [
        (s, r) for s, r in extra if not (out / f"seed_{s}" / r.run / f"eval_merged_{r.model.split(':', 1)[1]}.json").exists()]
    started_ray = bool(pending) and init_ray(cfg)  # a finished comparison only rewrites its report
    import ray

    own_pool = pool is None
    pool = pool or WarmPool()  # each run reloads the last run's actors where it can, instead of starting its own
    try:
        for i, (seed, run) in enumerate(todo, start=1):
            folder = out / f"seed_{seed}" / run.name
            if (folder / "eval.json").exists():
                console.print(f"[dim]compare {i}/{len(todo)}: seed {seed} {run.name} done already[/dim]")
                continue
            console.rule(f"compare {i}/{len(todo)}: seed {seed}, {run.name} "
                         f"({time.perf_counter() - started:.0f} s so far)")
            train(run_config(p, run, folder, seed), console=console, pool=pool)
        if extra:
            pool.close(groups_only=True)  # the evaluation tasks below need the CPUs the idle actors hold
        for seed, row in extra:
            folder = out / f"seed_{seed}" / row.run
            _extra_merge(p, folder, row.model.split(":", 1)[1], run_config(p, Run(row.run, {}), folder, seed))
    finally:
        if own_pool:
            pool.close()
        if started_ray:
            ray.shutdown()
    result = collect(p, out, seed_list)
    result["seconds_this_call"] = round(time.perf_counter() - started, 1)
    from copd_ray.report import write_report

    result["files"] = [str(f) for f in write_report(result, out)]
    return result


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t interval of the mean of paired differences (one per seed), or None with
    fewer than two seeds. Seeds are the unit: each reseeds the whole pipeline."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    half = t.ppf((1 + level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return float(mean - half), float(mean + half)  # plain floats: compare.json cannot hold numpy's


def _row_eval(row: Row, folder: Path) -> dict[str, float]:
    if row.model.startswith("merged:"):
        return json.loads((folder / f"eval_merged_{row.model.split(':', 1)[1]}.json").read_text())
    return json.loads((folder / "eval.json").read_text())["eval"][row.model]


def _row_budget(p: Plan, row: Row, seed_dir: Path) -> dict[str, int]:
    records = read_metrics(seed_dir / row.run / "metrics.jsonl")
    spent = budget(records, set(row.budget_branches) if row.budget_branches is not None else None)
    if row.inherits:
        experts = budget(read_metrics(seed_dir / "experts" / "metrics.jsonl"), last_step=p.half)
        spent = {k: spent[k] + experts[k] for k in spent}
    return spent


def collect(p: Plan, out: Path, seeds: list[int]) -> dict:
    """Per row: accuracy per capability and overall for each seed, mean and std, budget."""
    caps = [c.name for c in p.cfg.capabilities]
    rows = []
    for row in p.rows:
        per_seed, budgets = {}, []
        for seed in seeds:
            acc = _row_eval(row, out / f"seed_{seed}" / row.run)
            per_seed[seed] = {**{c: acc[c] for c in caps}, "overall": statistics.fmean(acc[c] for c in caps)}
            budgets.append(_row_budget(p, row, out / f"seed_{seed}"))
        cols = caps + ["overall"]
        mean = {c: statistics.fmean(v[c] for v in per_seed.values()) for c in cols}
        std = {c: statistics.stdev([v[c] for v in per_seed.values()]) if len(seeds) > 1 else 0.0 for c in cols}
        spent = {k: round(statistics.fmean(b[k] for b in budgets)) for k in budgets[0]}
        steps = spent["rl_steps"] + spent["opd_steps"]
        rows.append({"name": row.name, "group": row.group, "run": row.run, "model": row.model, "per_seed": per_seed,
                     "mean": mean, "std": std, "budget": spent, "expected_steps": row.expected_steps,
                     "budget_ok": row.expected_steps is None or steps == row.expected_steps})
    # Seeds differ in more than noise (each reseeds the base policy's warm-up), so each row is
    # also compared with CoPD seed by seed: the paired difference in overall accuracy.
    copd = next(r for r in rows if r["group"] == "CoPD")
    for r in rows:
        diffs = [r["per_seed"][s]["overall"] - copd["per_seed"][s]["overall"] for s in seeds]
        ci = paired_interval(diffs)
        r["vs_copd"] = {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                        "ci95": list(ci) if ci else None, "resolved": bool(ci and (ci[0] > 0 or ci[1] < 0)),
                        "copd_ahead": sum(d < 0 for d in diffs), "copd_behind": sum(d > 0 for d in diffs),
                        "seeds": len(diffs)}
    pairs = {}
    for run in [r for r in p.runs if r.name in ("copd", "experts", "copd_adaptive") or r.name.startswith("static_opd_")]:
        pairs[run.name] = {seed: [r for r in read_metrics(out / f"seed_{seed}" / run.name / "metrics.jsonl")
                                  if r["kind"] == "pair"] for seed in seeds}
    adaptive = {}  # seed -> branch -> the phase of each step, where the comparison has copd_adaptive
    if any(r.name == "copd_adaptive" for r in p.runs):
        for seed in seeds:
            steps = [r for r in read_metrics(out / f"seed_{seed}" / "copd_adaptive" / "metrics.jsonl") if r["kind"] == "step"]
            adaptive[seed] = {n: [r["phase"] for r in sorted(steps, key=lambda r: r["step"]) if r["branch"] == n]
                              for n in p.names}
    ratio_points = []  # (rl_steps, opd_steps, run) for the ratio plot: RL only, the config, the sweep
    s = p.cfg.schedule
    ratio_points.append({"rl_steps": p.steps_per_branch, "opd_steps": 0, "row": "experts merged (no OPD)"})
    ratio_points.append({"rl_steps": s.rl_steps, "opd_steps": s.opd_steps, "row": f"CoPD (merged, {p.cfg.merge.method})"})
    for run in p.runs:
        if run.name.startswith("copd_ratio_"):
            rl, opd = run.changes["schedule"]["rl_steps"], run.changes["schedule"]["opd_steps"]
            ratio_points.append({"rl_steps": rl, "opd_steps": opd, "row": f"CoPD ratio {rl}:{opd}"})
    return {"capabilities": caps, "branches": p.names, "seeds": seeds, "steps_per_branch": p.steps_per_branch,
            "expert_steps_before_opd": p.half, "schedule": s.model_dump(), "rows": rows, "pairs": pairs,
            "ratio_points": ratio_points, "adaptive": adaptive, "config": redacted(p.cfg.model_dump(mode="json"))}
