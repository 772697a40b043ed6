"""PNG plots beside metrics.jsonl: accuracy per capability over steps (on the validation set
where there is one, else the held-out set), each branch's training reward and response
length, and top-k overlap and symmetric KL per directed pair (the paper's Figure 4 a-b)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from copd_ray.metrics_log import read_metrics  # noqa: E402


def plot_run(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / "metrics.jsonl")
    written = []
    opd_spans = _phase_spans(records, "opd")

    evals = defaultdict(list)  # (capability, branch) -> [(step, rate)]
    for r in records:
        if r["kind"] == "eval":
            evals[(r["capability"], r["branch"])].append((r["step"], r["pass_rate"]))
    capabilities = sorted({c for c, _ in evals})
    if capabilities:
        fig, axes = plt.subplots(1, len(capabilities), figsize=(5 * len(capabilities), 4), squeeze=False)
        for ax, cap in zip(axes[0], capabilities):
            for (c, branch), points in sorted(evals.items()):
                if c == cap:
                    xs, ys = zip(*sorted(points))
                    ax.plot(xs, ys, marker="o", markersize=3, label=f"branch {branch}")
            _shade(ax, opd_spans)
            ax.set(title=f"{cap}: accuracy during training (shaded: Phase II, OPD)", xlabel="step",
                   ylabel="pass@1 (greedy)")
            ax.grid(alpha=0.3)
            ax.legend()
        written.append(save_figure(fig, output_dir / "accuracy.png"))

    steps = [r for r in records if r["kind"] == "step" and "reward_mean" in r]
    if steps:
        written.append(_plot_training(steps, opd_spans, output_dir / "training.png"))

    pairs = defaultdict(list)  # "teacher->student" -> [(step, overlap, kl)]
    for r in records:
        if r["kind"] == "pair":
            pairs[f"{r['teacher']}->{r['student']}"].append((r["step"], r["topk_overlap"], r["symmetric_kl"]))
    if pairs:
        lines = {name: tuple(zip(*sorted(points))) for name, points in sorted(pairs.items())}
        written.append(_side_by_side(lines, ("top-k token overlap (teacher vs student)", "overlap"),
                                     ("symmetric KL along student rollouts", "KL(S||T) + KL(T||S)"), opd_spans,
                                     output_dir / "pair_metrics.png"))
    return written


def _plot_training(steps: list[dict], opd_spans, path: Path) -> Path:
    """Each branch's mean reward on its own GRPO batch, and its response length, per step."""
    lines = {f"branch {b}": tuple(zip(*sorted((r["step"], r["reward_mean"], r.get("response_length", 0.0))
                                             for r in steps if r["branch"] == b)))
             for b in sorted({r["branch"] for r in steps})}
    return _side_by_side(lines, ("training reward (own GRPO batch)", "mean reward"),
                         ("response length (own GRPO batch)", "tokens"), opd_spans, path)


def _side_by_side(lines: dict[str, tuple], left: tuple[str, str], right: tuple[str, str], opd_spans,
                  path: Path) -> Path:
    """Two panels over steps: each line is label -> (steps, left values, right values);
    `left` and `right` are (title, y label)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, (xs, left_ys, right_ys) in lines.items():
        axes[0].plot(xs, left_ys, marker="o", markersize=3, label=label)
        axes[1].plot(xs, right_ys, marker="o", markersize=3, label=label)
    for ax, (title, ylabel) in zip(axes, (left, right)):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        _shade(ax, opd_spans)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def _phase_spans(records: list[dict], phase: str) -> list[tuple[int, int]]:
    """(first step - 1, last step) of each run of consecutive steps in `phase`."""
    steps = sorted({r["step"] for r in records if r["kind"] == "step" and r["phase"] == phase})
    spans: list[tuple[int, int]] = []
    for s in steps:
        if spans and spans[-1][1] == s - 1:
            spans[-1] = (spans[-1][0], s)
        else:
            spans.append((s - 1, s))
    return spans


def _shade(ax, spans: list[tuple[int, int]]) -> None:
    for lo, hi in spans:
        ax.axvspan(lo, hi, color="tab:green", alpha=0.08, linewidth=0)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
