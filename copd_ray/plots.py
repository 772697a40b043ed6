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
        fig, (ax_o, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
        for name, points in sorted(pairs.items()):
            steps, overlap, kl = zip(*sorted(points))
            ax_o.plot(steps, overlap, marker="o", markersize=3, label=name)
            ax_k.plot(steps, kl, marker="o", markersize=3, label=name)
        ax_o.set(title="top-k token overlap (teacher vs student)", xlabel="step", ylabel="overlap")
        ax_k.set(title="symmetric KL along student rollouts", xlabel="step", ylabel="KL(S||T) + KL(T||S)")
        for ax in (ax_o, ax_k):
            _shade(ax, opd_spans)
            ax.grid(alpha=0.3)
            ax.legend()
        written.append(save_figure(fig, output_dir / "pair_metrics.png"))
    return written


def _plot_training(steps: list[dict], opd_spans, path: Path) -> Path:
    """Each branch's mean reward on its own GRPO batch, and its response length, per step."""
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for branch in sorted({r["branch"] for r in steps}):
        mine = sorted((r["step"], r["reward_mean"], r.get("response_length", 0.0)) for r in steps
                      if r["branch"] == branch)
        xs, rewards, lengths = zip(*mine)
        ax_r.plot(xs, rewards, marker="o", markersize=3, label=f"branch {branch}")
        ax_l.plot(xs, lengths, marker="o", markersize=3, label=f"branch {branch}")
    ax_r.set(title="training reward (own GRPO batch)", xlabel="step", ylabel="mean reward")
    ax_l.set(title="response length (own GRPO batch)", xlabel="step", ylabel="tokens")
    for ax in (ax_r, ax_l):
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
