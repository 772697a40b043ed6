"""`copd-ray pilot`: does OPD gain follow teacher-student overlap? (the paper's Section 2.3)

Experiment 1 as the paper runs it (design "rlvr-temperature", the default): students are
first trained by RLVR on their own data, each at another sampling temperature tau, so they
end at different overlaps with the teacher; then every one gets the same on-policy
distillation from one frozen teacher (an RL expert), at one OPD temperature, for the same
number of steps. For each student we record the top-k overlap with the teacher on its own
rollouts just before OPD, and the gain in held-out accuracy on the teacher's capability
that OPD bought; then fit gain = a * overlap + b and report r.

A different experiment (design "opd-temperature"): one student (the other expert) is
distilled at several OPD temperatures; tau changes where it samples during OPD itself,
not where RLVR left it.

Experiment 2 (`--divergence`, below): how far independent experts drift from the base
and from each other along RLVR.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from copd_ray.compare import derived_config, plan, run_config
from copd_ray.config import Config, ConfigError
from copd_ray.metrics_log import read_metrics

DESIGNS = ("rlvr-temperature", "opd-temperature")


def pilot_config(cfg: Config, student_init: Path, teacher_init: Path, teacher: str, student: str,
                 tau: float | None, steps: int, folder: Path, check_paths: bool = True) -> Config:
    """Pure OPD of `student` (from `student_init`) by the frozen `teacher`, at OPD
    temperature tau (None: the config's)."""
    branches = {b.name: b for b in cfg.branch_list()}
    changes = {
        "branches": [{"name": student, "data": cfg.branch_data(branches[student]), "init": str(student_init)},
                     {"name": teacher, "data": cfg.branch_data(branches[teacher]), "init": str(teacher_init),
                      "frozen": True}],
        "topology": {"kind": "edges", "hub": None, "edges": [[teacher, student]]},
        "schedule": {"cycles": 1, "rl_steps": 0, "opd_steps": steps},
        "opd": {"native_rl": False, "temperature": cfg.opd.temperature if tau is None else tau},
        "metrics": {"pair_every": steps},  # overlap before (step 0) and after
        "merge": {"weights": None},
    }
    name = f"{cfg.run_name}-pilot-opd" + (f"-t{tau:g}" if tau is not None else f"-{Path(student_init).parent.parent.name}")
    return derived_config(cfg, changes, folder, cfg.seed, name, check_paths)


def rlvr_config(cfg: Config, student: str, tau: float, steps: int, folder: Path, check_paths: bool = True) -> Config:
    """The student alone, from the base, by RLVR on its own data at sampling temperature tau."""
    branch = next(b for b in cfg.branch_list() if b.name == student)
    changes = {"branches": [{"name": student, "data": cfg.branch_data(branch)}],
               "topology": {"kind": "none", "hub": None, "edges": [], "transport": cfg.topology.transport},
               "schedule": {"cycles": 1, "rl_steps": steps, "opd_steps": 0, "save_every": 0},
               "grpo": {"temperature": tau}, "metrics": {"pair_every": 0}, "merge": {"weights": None}}
    return derived_config(cfg, changes, folder, cfg.seed, f"{cfg.run_name}-pilot-rlvr-t{tau:g}", check_paths)


def fit_line(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line and Pearson r, written out (no numpy needed for five points)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else float("nan")
    r = sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")
    return {"slope": slope, "intercept": my - slope * mx if sxx else float("nan"), "r": r}


def run_pilot(cfg: Config, out: Path, teacher: str, student: str, temperatures: list[float], steps: int,
              experts: Path | None, console, design: str = "rlvr-temperature", rl_steps: int = 50,
              pool=None) -> dict:
    """The study's runs (the experts unless given, then per temperature a student's RLVR and its
    OPD), their pair metrics and gains, the line fits, pilot.json and pilot.png. The runs
    reload each other's actors through `pool` (a WarmPool; default: one of its own)."""
    from copd_ray.driver import train
    from copd_ray.ray_start import init_ray
    from copd_ray.runtime import WarmPool

    names = [b.name for b in cfg.branch_list()]
    for role, name in (("teacher", teacher), ("student", student)):
        if name not in names:
            raise ConfigError(f"pilot {role} {name!r} is not a branch of the config: {names}")
    if teacher == student:
        raise ConfigError("pilot teacher and student must differ")
    if design not in DESIGNS:
        raise ConfigError(f"pilot design {design!r} is not one of {list(DESIGNS)}")
    if len(temperatures) < 3:
        raise ConfigError(f"pilot needs at least 3 temperatures to fit a line, got {temperatures}")
    paper = design == "rlvr-temperature"
    nowhere = Path("/nonexistent")
    for tau in temperatures:  # every run's config is checked before any actor starts
        if paper:
            rlvr_config(cfg, student, tau, rl_steps, nowhere, check_paths=False)
        pilot_config(cfg, nowhere, nowhere, teacher, student, None if paper else tau, steps, nowhere, check_paths=False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_ray = init_ray(cfg)
    import ray

    def trained(folder: Path, run_cfg: Config, title: str) -> dict:
        if not (folder / "eval.json").exists():
            console.rule(f"pilot: {title}")
            train(run_cfg, console=console, pool=pool)
        return json.loads((folder / "eval.json").read_text())["eval"]

    own_pool = pool is None
    pool = pool or WarmPool()  # each run reloads the last run's actors where it can
    try:
        if experts is None:  # the comparison's expert run, trained here
            p = plan(cfg, [])
            experts = out / "experts"
            trained(experts, run_config(p, p.runs[0], experts, cfg.seed), "training the experts")
        if not (experts / "eval.json").exists():
            raise ConfigError(f"{experts} is not a finished run (no eval.json)")
        caps = cfg.branch_data(next(b for b in cfg.branch_list() if b.name == teacher))
        points = []
        for tau in temperatures:
            if paper:  # RLVR at tau from the base, then the same OPD for every student
                rlvr = out / f"rlvr_tau_{tau:g}"
                before = trained(rlvr, rlvr_config(cfg, student, tau, rl_steps, rlvr),
                                 f"{student} by RLVR at tau {tau:g}, {rl_steps} steps")[f"branch:{student}"]
                start, folder, opd_tau = rlvr / "branches" / student, out / f"opd_after_tau_{tau:g}", None
            else:
                before = json.loads((experts / "eval.json").read_text())["eval"][f"branch:{student}"]
                start, folder, opd_tau = experts / "branches" / student, out / f"tau_{tau:g}", tau
            after = trained(folder, pilot_config(cfg, start, experts / "branches" / teacher, teacher, student, opd_tau,
                                                 steps, folder),
                            f"{steps} OPD steps {teacher} -> {student} (tau {tau:g})")[f"branch:{student}"]
            pairs = sorted((r for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "pair"),
                           key=lambda r: r["step"])
            gain = statistics.fmean(after[c] - before[c] for c in caps)
            points.append({"temperature": tau, "overlap": pairs[0]["topk_overlap"],
                           "symmetric_kl": pairs[0]["symmetric_kl"], "overlap_after": pairs[-1]["topk_overlap"],
                           "before": before, "after": after, "gain": gain})
    finally:
        if own_pool:
            pool.close()
        if started_ray:
            ray.shutdown()
    gains = [p["gain"] for p in points]
    result = {"design": design, "teacher": teacher, "student": student, "steps": steps,
              "rl_steps": rl_steps if paper else 0, "opd_temperature": None if not paper else
              (cfg.opd.temperature if cfg.opd.temperature is not None else cfg.grpo.temperature),
              "topk": cfg.metrics.topk, "experts": str(experts), "points": points,
              "fit": fit_line([p["overlap"] for p in points], gains),
              "fit_symmetric_kl": fit_line([p["symmetric_kl"] for p in points], gains),
              # A confound to read beside the fit: a student that starts lower has more to gain.
              "fit_start_accuracy": fit_line([statistics.fmean(p["before"][c] for c in caps) for p in points], gains),
              "seconds_this_call": round(time.perf_counter() - started, 1)}
    (out / "pilot.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(plot_pilot(result, out / "pilot.png"))
    return result


def plot_pilot(result: dict, path: Path) -> Path:
    from copd_ray.plots import plt, save_figure  # the Agg backend, set where plots live

    pts = result["points"]
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    taus = [p["temperature"] for p in pts]
    ax_a.plot(taus, [p["overlap"] for p in pts], marker="o", label=f"top-{result['topk']} overlap")
    ax_kl = ax_a.twinx()
    ax_kl.plot(taus, [p["symmetric_kl"] for p in pts], marker="s", color="C1", label="symmetric KL")
    paper = result.get("design", "opd-temperature") == "rlvr-temperature"
    ax_a.set(title="(a) the student's overlap with the teacher, before OPD",
             xlabel="the student's RLVR sampling temperature" if paper else "the student's OPD sampling temperature",
             ylabel="overlap before OPD")
    ax_kl.set_ylabel("symmetric KL before OPD")
    ax_a.legend(loc="lower left", fontsize=8)
    ax_kl.legend(loc="upper right", fontsize=8)
    ax_a.grid(alpha=0.3)
    xs, ys = [p["overlap"] for p in pts], [p["gain"] for p in pts]
    ax_b.scatter(xs, ys, zorder=3)
    for p in pts:
        ax_b.annotate(f"τ={p['temperature']:g}", (p["overlap"], p["gain"]), fontsize=8, xytext=(4, 4),
                      textcoords="offset points")
    f = result["fit"]
    lo, hi = min(xs), max(xs)
    ax_b.plot([lo, hi], [f["slope"] * lo + f["intercept"], f["slope"] * hi + f["intercept"]], "--", color="black",
              label=f"gain = {f['slope']:.3f}·overlap + {f['intercept']:.3f}, r = {f['r']:.2f}")
    fig.suptitle(f"{result['teacher']} teaches {result['student']}: " + (
        f"students after {result['rl_steps']} RLVR steps at τ, then the same {result['steps']} OPD steps" if paper
        else f"{result['steps']} OPD steps at student temperature τ (a variant of Experiment 1)"), fontsize=10)
    ax_b.set(title="(b) OPD gain vs overlap before it",
             xlabel="overlap before OPD", ylabel=f"Δ held-out pass@1 on {result['teacher']}")
    ax_b.legend(fontsize=8)
    ax_b.grid(alpha=0.3)
    return save_figure(fig, path)


# -- Experiment 2: how far independent experts drift (the paper's Figure 2 c-d) -------------

def divergence_config(cfg: Config, base: str, folder: Path, check_paths: bool = True) -> Config:
    """The experts run of `compare` (each branch alone, RL only), with the base policy beside
    them as a frozen branch and every ordered pair's metrics logged: each expert against the
    base and against the other experts, along its RLVR."""
    branches = [{"name": b.name, "data": cfg.branch_data(b)} for b in cfg.branch_list()]
    name = next(n for n in ("base", "base_policy", "base_0") if n not in {b["name"] for b in branches})
    p = plan(cfg, [])
    changes = {**p.runs[0].changes, "metrics": {"pairs": "all"}, "merge": {"weights": None},
               "branches": branches + [{"name": name, "data": [c.name for c in cfg.capabilities], "init": base,
                                        "frozen": True}]}
    changes["schedule"] = {**changes["schedule"], "save_every": 0}
    return derived_config(cfg, changes, folder, cfg.seed, f"{cfg.run_name}-divergence", check_paths)


def run_divergence(cfg: Config, out: Path, base: str, console, pool=None) -> dict:
    """Train the experts beside the frozen base (on `pool`'s warm actors, if given); write
    divergence.json and divergence.png."""
    from copd_ray.driver import train
    from copd_ray.ray_start import init_ray

    run_cfg = divergence_config(cfg, base, out / "experts")
    started_ray = init_ray(cfg)
    import ray

    try:
        if not (out / "experts" / "eval.json").exists():
            train(run_cfg, console=console, pool=pool)
    finally:
        if started_ray:
            ray.shutdown()
    base_name = run_cfg.branch_list()[-1].name
    curves: dict[str, list] = {}
    for r in sorted((r for r in read_metrics(out / "experts" / "metrics.jsonl") if r["kind"] == "pair"),
                    key=lambda r: r["step"]):
        curves.setdefault(f"{r['teacher']}→{r['student']}", []).append(
            {"step": r["step"], "overlap": r["topk_overlap"], "symmetric_kl": r["symmetric_kl"]})
    result = {"base": base_name, "topk": cfg.metrics.topk, "steps": run_cfg.schedule.rl_steps, "curves": curves}
    (out / "divergence.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(plot_divergence(result, out / "divergence.png"))
    return result


def plot_divergence(result: dict, path: Path) -> Path:
    from copd_ray.plots import plt, save_figure

    fig, (ax_o, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (pair, points) in enumerate(sorted(result["curves"].items())):
        style = "-" if pair.startswith(result["base"] + "→") else "--"  # solid: against the base
        steps = [p["step"] for p in points]
        ax_o.plot(steps, [p["overlap"] for p in points], style, color=f"C{i}", marker="o", markersize=2.5, label=pair)
        ax_k.plot(steps, [p["symmetric_kl"] for p in points], style, color=f"C{i}", marker="o", markersize=2.5,
                  label=pair)
    ax_o.set(title=f"(c) top-{result['topk']} overlap along independent RLVR", xlabel="RL steps", ylabel="overlap")
    ax_k.set(title="(d) symmetric KL along independent RLVR", xlabel="RL steps", ylabel="KL(S||T) + KL(T||S)")
    for ax in (ax_o, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="teacher→student (rollouts: student's)", title_fontsize=7)
    return save_figure(fig, path)
