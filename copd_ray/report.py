"""The comparison report: compare.json, compare.md (shaped like the paper's Table 1) and
plots (overlap and symmetric KL of CoPD against static OPD, Figure 4 a-b; the RL:OPD
ratio sweep, Figure 4 c; overall accuracy of every row; the adaptive schedule's phases)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from copd_ray.plots import save_figure  # noqa: E402


def write_report(result: dict, out: Path) -> list[Path]:
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    written = [out / "compare.json"]
    (out / "compare.md").write_text(markdown(result))
    written.append(out / "compare.md")
    for plot in (plot_pairs, plot_ratio, plot_overall, plot_adaptive):
        path = plot(result, out)
        if path is not None:
            written.append(path)
    return written


def _cell(mean: float, std: float, n_seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if n_seeds > 1 else f"{mean:.3f}"


def markdown(result: dict) -> str:
    caps, rows, seeds = result["capabilities"], result["rows"], result["seeds"]
    cols = caps + ["overall"]
    ranked = [r for r in rows if r["group"] != "reference"]
    best = {c: max(r["mean"][c] for r in ranked) for c in cols}
    worst = {c: min(r["mean"][c] for r in ranked) for c in cols}
    k, t = len(result["branches"]), result["steps_per_branch"]

    lines = [
        "# CoPD against its baselines and ablations",
        "",
        f"Held-out pass@1 (greedy) per capability and their mean (overall); "
        f"{'mean ± std over ' + str(len(seeds)) + ' seeds ' + str(seeds) if len(seeds) > 1 else 'one seed'}. "
        "Best of each column in **bold**, worst in _italics_ (the base model is not ranked). "
        "Each seed reseeds the whole pipeline, the base policy's warm-up included, so the spread "
        "across seeds is wide; the paired column compares each row with CoPD seed by seed: the "
        "mean difference in overall accuracy (row − CoPD), its 95% Student-t interval over the "
        "seeds, in how many seeds CoPD was ahead, and **resolved** where the interval excludes 0 "
        "(otherwise the ordering is undecided at this number of seeds).",
        "",
        "| method | " + " | ".join(cols) + " | Δ overall vs CoPD, paired | RL steps | OPD steps | rollouts "
        "| teacher tokens | budget |",
        "|---|" + "---:|" * len(cols) + "---:|---:|---:|---:|---:|:---:|",
    ]
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"| *{group}* |" + " |" * (len(cols) + 6))
        cells = []
        for c in cols:
            text = _cell(r["mean"][c], r["std"][c], len(seeds))
            if r["group"] != "reference" and r["mean"][c] == best[c]:
                text = f"**{text}**"
            elif r["group"] != "reference" and r["mean"][c] == worst[c]:
                text = f"_{text}_"
            cells.append(text)
        b, v = r["budget"], r["vs_copd"]
        ok = "✓" if r["budget_ok"] else f"≠ {r['expected_steps']}"
        vs = "" if r["group"] == "CoPD" else (
            f"{v['mean']:+.3f}" + (f" [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v.get("ci95") else "")
            + f" (CoPD ahead {v['copd_ahead']}/{v['seeds']})" + (", **resolved**" if v.get("resolved") else ""))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {vs}"
                     + f" | {b['rl_steps']} | {b['opd_steps']} | {b['rollouts']} | {b['teacher_tokens']} | {ok} |")
    lines += [
        "",
        "## Budgets",
        "",
        "Steps are training steps (one training step is `grpo.minibatches` optimizer steps), summed over "
        f"the branches a row trained. With K = {k} branches and T = {t} steps per CoPD branch: each expert "
        f"takes T = {t} steps; mixed RLVR, CoPD and every ablation take K·T = {k * t}; static OPD and MOPD "
        f"add K·T − K·T/2 student steps to the experts' first T/2 = {result['expert_steps_before_opd']} "
        "steps each, so their total (the experts' steps counted) is also K·T. Static OPD's student is "
        "an expert at T/2, taught by another; MOPD's student starts from the base, taught by every "
        "expert at T/2. The budget column checks each row's recorded steps against that target. "
        "Rollouts and teacher tokens are not equalised: an OPD step generates its native GRPO batch "
        "plus one cross-branch batch per teacher.",
        "",
        "## Where CoPD stands",
        "",
    ]
    lines += standing(result)
    return "\n".join(lines) + "\n"


def standing(result: dict) -> list[str]:
    """Plain sentences: which rows beat CoPD (merged) where, and by how much."""
    cols = result["capabilities"] + ["overall"]
    copd = next(r for r in result["rows"] if r["group"] == "CoPD")
    out = []
    for c in cols:
        ahead = sorted(((r["mean"][c] - copd["mean"][c], r) for r in result["rows"]
                        if r is not copd and r["group"] != "reference" and r["mean"][c] > copd["mean"][c]),
                       key=lambda x: -x[0])
        if not ahead:
            out.append(f"- {c}: CoPD (merged) is best ({copd['mean'][c]:.3f}).")
        else:
            names = ", ".join(f"{r['name']} (+{d:.3f})" for d, r in ahead)
            out.append(f"- {c}: CoPD (merged) {copd['mean'][c]:.3f}; ahead of it: {names}.")
    return out


def plot_pairs(result: dict, out: Path) -> Path | None:
    """Top-k overlap and symmetric KL along the student's rollouts, per ordered pair of
    branches: CoPD (solid) against the same pair trained as independent experts (dashed, the
    paper's static pipeline: RLVR alone, nobody teaching), over the same steps from the base.
    (Static OPD's frozen-teacher curves stay in compare.json.)"""
    series: dict[tuple[str, str], dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for run, per_seed in result["pairs"].items():
        if run not in ("copd", "experts"):
            continue
        method = "CoPD" if run == "copd" else "independent experts"
        for records in per_seed.values():
            for r in records:
                series[(method, f"{r['teacher']}→{r['student']}")][r["step"]].append(
                    (r["topk_overlap"], r["symmetric_kl"]))
    if not series:
        return None
    fig, (ax_o, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for (method, edge), points in sorted(series.items()):
        color = colors.setdefault(edge, f"C{len(colors)}")
        steps = sorted(points)
        overlap = [sum(p[0] for p in points[s]) / len(points[s]) for s in steps]
        kl = [sum(p[1] for p in points[s]) / len(points[s]) for s in steps]
        style = "-" if method == "CoPD" else "--"
        ax_o.plot(steps, overlap, style, color=color, marker="o", markersize=2.5, label=f"{method} {edge}")
        ax_k.plot(steps, kl, style, color=color, marker="o", markersize=2.5, label=f"{method} {edge}")
    ax_o.set(title="top-k overlap, teacher vs student (a)", xlabel="steps since the base", ylabel="overlap")
    ax_k.set(title="symmetric KL along the student's rollouts (b)", xlabel="steps since the base",
             ylabel="KL(S||T) + KL(T||S)")
    for ax in (ax_o, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out / "compare_overlap_kl.png")


def plot_ratio(result: dict, out: Path) -> Path | None:
    """Merged-model accuracy against the share of each cycle spent on OPD (Figure 4 c)."""
    by_name = {r["name"]: r for r in result["rows"]}
    points = sorted(((p["opd_steps"] / (p["rl_steps"] + p["opd_steps"]), p, by_name[p["row"]])
                     for p in result["ratio_points"] if p["row"] in by_name), key=lambda x: x[0])
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [x for x, _, _ in points]
    for i, c in enumerate(result["capabilities"] + ["overall"]):
        style = dict(linewidth=2.5, color="black") if c == "overall" else dict(linestyle="--", color=f"C{i}")
        ax.errorbar(xs, [r["mean"][c] for _, _, r in points], yerr=[r["std"][c] for _, _, r in points],
                    marker="o", capsize=3, label=c, **style)
    ax.set_xticks(xs, [f"{p['rl_steps']}:{p['opd_steps']}" for _, p, _ in points])
    ax.set(title="merged model vs RL:OPD steps per cycle (c)", xlabel="rl_steps:opd_steps (0 OPD = experts merged)",
           ylabel="held-out pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out / "compare_ratio.png")


def plot_overall(result: dict, out: Path) -> Path:
    rows = result["rows"]
    colors = {"reference": "grey", "baseline": "C0", "CoPD": "C3", "ablation": "C2"}
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r["mean"]["overall"] for r in rows], xerr=[r["std"]["overall"] for r in rows],
            color=[colors[r["group"]] for r in rows], capsize=2)
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    ax.set(title="overall held-out pass@1 (mean of the capabilities)", xlabel="pass@1")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, out / "compare_overall.png")


def plot_adaptive(result: dict, out: Path) -> Path | None:
    """The adaptive schedule at work, first seed: per branch, its teachers' symmetric KL (and
    top-k overlap) on its rollouts over the steps, its Phase II steps shaded, the thresholds dotted."""
    if not result.get("adaptive"):
        return None
    seed = result["seeds"][0]
    phases = result["adaptive"].get(seed) or result["adaptive"].get(str(seed))
    records = result["pairs"]["copd_adaptive"].get(seed) or result["pairs"]["copd_adaptive"].get(str(seed))
    s = result["config"]["schedule"]
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.8), squeeze=False)
    for ax, (branch, seq) in zip(axes[0], phases.items()):
        for i, phase in enumerate(seq, start=1):
            if phase == "opd":
                ax.axvspan(i - 1, i, color="C1", alpha=0.15, linewidth=0)
        for j, teacher in enumerate(sorted({r["teacher"] for r in records if r["student"] == branch})):
            pts = sorted((r["step"], r["symmetric_kl"], r["topk_overlap"]) for r in records
                         if r["student"] == branch and r["teacher"] == teacher)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2.5, color=f"C{j}",
                    label=f"KL, teacher {teacher}")
            if s.get("overlap_low") is not None:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=f"C{j}", label=f"overlap, teacher {teacher}")
        for value in (s.get("kl_high"), s.get("overlap_low")):
            if value is not None:
                ax.axhline(value, linestyle=":", color="black")
        n_opd = seq.count("opd")
        ax.set(title=f"{branch}: {len(seq) - n_opd} RL + {n_opd} OPD steps (OPD shaded)", xlabel="step",
               ylabel="pair metric on its rollouts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"adaptive schedule, seed {seed}", fontsize=10)
    return save_figure(fig, out / "compare_adaptive.png")
