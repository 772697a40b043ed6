"""Where a run's numbers go: `<output_dir>/metrics.jsonl` (one record a line, each with a
`kind`: step, eval, pair or event) and wandb (offline unless the config says otherwise)."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir: Path, wandb_cfg, run_name: str, config: dict, append: bool) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a" if append else "w", encoding="utf-8")
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, name=run_name, dir=str(output_dir),
                                    mode=wandb_cfg.mode, config=config, resume="allow")

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(self._flat(record), step=record["step"])

    @staticmethod
    def _flat(record: dict) -> dict:
        kind = record["kind"]
        if kind == "step":
            prefix = f"{record['branch']}/"
        elif kind == "eval":
            prefix = f"eval/{record['branch']}/{record['capability']}/"
        elif kind == "pair":
            prefix = f"pair/{record['teacher']}->{record['student']}/"
        else:
            prefix = f"{kind}/"
        skip = {"kind", "step", "branch", "capability", "teacher", "student", "cycle", "phase"}
        return {prefix + k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))}

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def time_split(records: list[dict]) -> dict[str, dict[str, float]]:
    """Mean seconds per step of each part (generate, score, train, sync), per phase,
    averaged over branches: where a step's time goes."""
    parts = ("generate", "score", "train", "sync")
    out: dict[str, dict[str, float]] = {}
    for phase in ("rl", "opd"):
        rows = [r for r in records if r["kind"] == "step" and r["phase"] == phase]
        if rows:
            out[phase] = {p: sum(r[f"time/{p}"] for r in rows) / len(rows) for p in parts}
    return out


def budget(records: list[dict], branches: set[str] | None = None, last_step: int | None = None) -> dict[str, int]:
    """What training spent, summed over branch steps: RL-only steps, steps with an OPD
    batch, rollouts generated and teacher tokens scored (optionally for some branches, up
    to some step)."""
    steps = [r for r in records if r["kind"] == "step"
             and (branches is None or r["branch"] in branches) and (last_step is None or r["step"] <= last_step)]
    return {"rl_steps": sum(1 for r in steps if not r["opd_batches"]),
            "opd_steps": sum(1 for r in steps if r["opd_batches"]),
            "rollouts": sum(r["rollouts"] for r in steps),
            "teacher_tokens": sum(r["teacher_tokens"] for r in steps)}
