"""Where a run's numbers go: `<output_dir>/metrics.jsonl` (one record a line, each with a
`kind`: step, eval, pair or event) and wandb (offline unless the config says otherwise).

metrics.jsonl is the run's record: on a resume (and on a roll back to a checkpoint) the
records after the checkpoint's step are dropped, so the file, and the budgets, plots and
`compare` rows read from it, are what an uninterrupted run writes. wandb cannot un-log:
a resumed run starts a new wandb run from the checkpoint's step, and the interrupted one
keeps whatever it logged past that step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from pathlib import Path

# Dotted config keys whose values are secrets: never written to wandb or any dump.
SECRETS = ("serve.token",)


def redacted(config: dict) -> dict:
    """A copy of a config dump with every secret that is set replaced by "***"."""
    out = copy.deepcopy(config)
    for dotted in SECRETS:
        *parents, key = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key):
            node[key] = "***"
    return out


class MetricsLog:
    """resume_step: None starts a fresh metrics.jsonl; a step keeps the records up to it
    (the checkpoint's step) and drops the rest."""

    def __init__(self, output_dir: Path, wandb_cfg, run_name: str, config: dict, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _keep_until(self.path, resume_step)
        self.file = self.path.open("w" if resume_step is None else "a", encoding="utf-8")
        # Branches on their own clocks (schedule.max_staleness > 0) log from their own
        # threads, and their steps interleave; wandb's step must not go back.
        self.lock = threading.Lock()
        self.wandb_step = 0
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            import wandb

            safe = redacted(config)
            # With a secret set, wandb records neither the command line (x_disable_meta: the
            # token may be a `serve.token=` override in it) nor the console.
            # quiet: the run's summary would print ~30 lines before the results table.
            settings = (wandb.Settings(x_disable_meta=True, console="off", quiet=True) if safe != config
                        else wandb.Settings(quiet=True))
            self.wandb = wandb.init(project=wandb_cfg.project, name=run_name, dir=str(output_dir),
                                    mode=wandb_cfg.mode, config=safe, resume="allow", settings=settings)

    def rewind(self, step: int) -> None:
        """Drop every record after `step` (the run rolls back to its checkpoint at `step`)."""
        self.file.close()
        _keep_until(self.path, step)
        self.file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.lock:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
            if self.wandb is not None:
                self.wandb_step = max(self.wandb_step, record["step"])
                self.wandb.log({**self._flat(record), "step": record["step"]}, step=self.wandb_step)

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


def _keep_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl with the records at or before `step`, and every event (a
    recovery happened even though its steps are redone), atomically (a crash leaves the
    old file or the new one). A line cut short by a kill is dropped."""
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "event" or record.get("step", 0) <= step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


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
