"""Checkpoints on real files (the tiny policy, the trainer's own save/load, no Ray):
damage falls back to the previous checkpoint, another run's checkpoint is refused, a
trainer state that would run code is refused, and a resumed metrics.jsonl holds exactly
what an uninterrupted run writes."""

import json
import math
import pickle
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch

from copd_ray.actors.trainer import TrainerActor
from copd_ray.checkpoints import find_resume, read_state, save_checkpoint, verify_checkpoint
from copd_ray.config import GRPOConfig, WandbConfig
from copd_ray.errors import CheckpointError
from copd_ray.metrics_log import MetricsLog, read_metrics, redacted

Trainer = TrainerActor.__ray_actor_class__  # the plain class: its save/load without Ray
BRANCHES = ["add", "mul"]
EDGES = [("add", "mul"), ("mul", "add")]
BASE = "/models/base"


class Group:
    """What save_checkpoint needs of a BranchGroup: a version and save(folder)."""

    def __init__(self, trainer, version):
        self.trainer, self.version = trainer, version

    def save(self, folder):
        return self.trainer.save(folder)


class Stream:
    def __init__(self, drawn):
        self.drawn = drawn


@pytest.fixture(scope="module")
def trainer(tiny_folder):
    t = Trainer("add", 0, 1, str(tiny_folder), GRPOConfig())
    # One optimizer step and a few draws, so there is state to round-trip.
    sum(p.square().sum() for p in t.learner.model.parameters()).backward()
    t.learner.optimizer.step()
    t.learner.rng.random()
    t.learner.steps = 3
    return t


def save(out, step, trainer, branches=BRANCHES, edges=EDGES, keep=3):
    groups = {n: Group(trainer, step) for n in branches}
    return save_checkpoint(out, step, groups, {n: Stream(4 * step) for n in branches}, BASE, keep, edges)


def resume(out, branches=BRANCHES, edges=EDGES, base=BASE, how="auto"):
    warnings = []
    folder, state = find_resume(how, out, base, branches, edges, warn=warnings.append)
    return folder, state, warnings


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, trainer):
    out = tmp_path_factory.mktemp("run")
    save(out, 5, trainer)
    save(out, 10, trainer)
    return out


@pytest.fixture
def run(two_checkpoints, tmp_path):
    """A fresh copy of a run with two good checkpoints, step_000005 and step_000010."""
    shutil.copytree(two_checkpoints, tmp_path / "run")
    return tmp_path / "run"


def test_checkpoint_records_run_and_manifest(run):
    folder, state, warnings = resume(run)
    assert folder.name == "step_000010" and not warnings
    assert state["step"] == 10 and state["branches"] == BRANCHES and state["edges"] == [list(e) for e in EDGES]
    assert state["drawn"] == {"add": 40, "mul": 40} and state["base"] == BASE
    files = state["files"]
    size, crc = files["branches/add/model.safetensors"]
    assert size == (folder / "branches/add/model.safetensors").stat().st_size
    assert crc == zlib.crc32((folder / "branches/add/model.safetensors").read_bytes())
    assert {"branches/mul/trainer_state.pt", "branches/mul/config.json"} <= set(files)
    assert read_state(folder) == state


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "missing driver_state.json": (lambda f: (f / "driver_state.json").unlink(), "no driver_state.json"),
    "empty driver_state.json": (lambda f: (f / "driver_state.json").write_text(""), "driver_state.json is empty"),
    "garbage driver_state.json": (lambda f: (f / "driver_state.json").write_bytes(b"\x00\xffnot json{"),
                                  "driver_state.json does not parse"),
    "driver_state.json of another shape": (lambda f: (f / "driver_state.json").write_text("[1, 2]"),
                                           "lacks step"),
    "truncated model.safetensors": (lambda f: _truncate(f / "branches/mul/model.safetensors"),
                                    "branches/mul/model.safetensors is"),
    "truncated trainer_state.pt": (lambda f: _truncate(f / "branches/add/trainer_state.pt"),
                                   "branches/add/trainer_state.pt is"),
    "missing branch folder": (lambda f: shutil.rmtree(f / "branches/mul"), "branches/mul: folder missing"),
    "every weight NaN, same size": (lambda f: _all_nan(f / "branches/add/model.safetensors"),
                                    "branches/add/model.safetensors: its content differs"),
}


def _all_nan(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    size = path.stat().st_size
    save_file({k: torch.full_like(v, math.nan) for k, v in load_file(str(path)).items()}, str(path), metadata)
    assert path.stat().st_size == size


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_falls_back_with_one_warning(run, damage):
    harm, reason = DAMAGE[damage]
    harm(run / "checkpoints/step_000010")
    folder, state, warnings = resume(run)
    assert folder.name == "step_000005" and state["step"] == 5
    assert len(warnings) == 1 and "step_000010 is damaged" in warnings[0] and reason in warnings[0]
    assert warnings[0].endswith(f"; using {folder}")


@pytest.mark.parametrize("name, harm, reason", [
    ("model.safetensors", _truncate, "its header needs"),
    ("model.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx"),
     "header does not parse"),
    ("trainer_state.pt", _truncate, "truncated or not a torch.save file"),
    ("trainer_state.pt", lambda p: torch.save({"optimizer": CreatesFile(p.parent / "x"), "rng": None, "steps": 0}, p),
     "asks for"),  # what the trainer's safe loader refuses: the resume falls back instead of stopping
])
def test_structure_checked_without_a_manifest(run, name, harm, reason):
    """Checkpoints written before the manifest still get truncation caught."""
    folder = run / "checkpoints/step_000010"
    state = json.loads((folder / "driver_state.json").read_text())
    for key in ("files", "branches", "edges"):
        del state[key]
    (folder / "driver_state.json").write_text(json.dumps(state))
    assert verify_checkpoint(folder) is None
    harm(folder / "branches/add" / name)
    assert reason in verify_checkpoint(folder, BRANCHES)


def test_only_damaged_checkpoints_stop_with_one_line(run):
    (run / "checkpoints/step_000010/driver_state.json").write_text("")
    _truncate(run / "checkpoints/step_000005/branches/add/model.safetensors")
    with pytest.raises(CheckpointError) as e:
        resume(run)
    message = str(e.value)
    assert "\n" not in message and "all 2 are damaged" in message and "resume=never" in message


def test_no_checkpoints_and_never_start_fresh(run, tmp_path):
    assert resume(tmp_path / "empty") == (None, None, [])
    assert resume(run, how="never") == (None, None, [])


def test_explicit_folder_is_verified(run):
    folder = run / "checkpoints/step_000005"
    assert resume(run, how=str(folder))[0] == folder
    (folder / "branches/add/trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.pt missing"):
        resume(run, how=str(folder))
    with pytest.raises(CheckpointError, match="no such folder"):
        resume(run, how=str(run / "nowhere"))


@pytest.mark.parametrize("change, match", [
    (dict(branches=["add", "mul", "mixed"]), r"holds the branches \['add', 'mul'\], the config trains"),
    (dict(edges=[("add", "mul")]), r"topology \['add->mul', 'mul->add'\], the config gives \['add->mul'\]"),
    (dict(base="/models/other"), "from the base policy /models/base, not /models/other"),
])
def test_another_runs_checkpoint_is_refused(run, change, match):
    with pytest.raises(CheckpointError, match=match) as e:
        resume(run, **change)
    assert "\n" not in str(e.value) and "resume=never" in str(e.value)


def test_old_checkpoint_without_new_fields(run):
    """Before the branches/edges fields: branches come from versions, edges go unchecked."""
    folder = run / "checkpoints/step_000010"
    state = json.loads((folder / "driver_state.json").read_text())
    del state["branches"], state["edges"], state["files"]
    (folder / "driver_state.json").write_text(json.dumps(state))
    assert resume(run, edges=[("add", "mul")])[0] == folder
    with pytest.raises(CheckpointError, match="holds the branches"):
        resume(run, branches=["add", "mixed"])


def test_pruning_keeps_complete_checkpoints(run, trainer):
    """A damaged newest checkpoint never costs a complete one: the run resumed from step 5
    and saves step 7; step 10 (damaged, and of the abandoned timeline) goes."""
    (run / "checkpoints/step_000010/driver_state.json").unlink()
    save(run, 7, trainer, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000007"]
    save(run, 8, trainer, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000007", "step_000008"]
    _truncate(run / "checkpoints/step_000008/branches/add/model.safetensors")
    save(run, 9, trainer, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000009"]


# -- the trainer's state ---------------------------------------------------------------------


def test_trainer_state_round_trips_weights_only(run, trainer, tiny_folder):
    fresh = Trainer("add", 0, 1, str(tiny_folder), GRPOConfig())
    assert fresh.load(str(run / "checkpoints/step_000010/branches/add")) == 3
    assert fresh.learner.rng.getstate() == trainer.learner.rng.getstate()
    saved, loaded = trainer.learner.optimizer.state_dict(), fresh.learner.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, s in saved["state"].items():
        assert all(torch.equal(s[k], loaded["state"][i][k]) for k in s)
    for a, b in zip(trainer.learner.model.parameters(), fresh.learner.model.parameters()):
        assert torch.equal(a, b)


def test_folder_without_trainer_state_loads_weights_only(trainer, tiny_folder, tmp_path):
    weights = trainer.save(str(tmp_path / "final"), with_optimizer=False)
    fresh = Trainer("add", 0, 1, str(tiny_folder), GRPOConfig())
    assert fresh.load(weights) == 0 and not fresh.learner.optimizer.state_dict()["state"]
    assert all(torch.equal(a, b) for a, b in zip(trainer.learner.model.parameters(), fresh.learner.model.parameters()))


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_crafted_trainer_state_is_refused(run, tiny_folder, tmp_path):
    # The payload is live: an ordinary unpickling runs it.
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    folder = run / "checkpoints/step_000010/branches/add"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": CreatesFile(marker), "rng": None, "steps": 0}, folder / "trainer_state.pt")
    fresh = Trainer("add", 0, 1, str(tiny_folder), GRPOConfig())
    with pytest.raises(CheckpointError, match="refusing .*trainer_state.pt: it asks for .*open") as e:
        fresh.load(str(folder))
    assert not marker.exists() and "\n" not in str(e.value)


def test_truncated_trainer_state_is_one_line(run, tiny_folder):
    folder = run / "checkpoints/step_000010/branches/add"
    _truncate(folder / "trainer_state.pt")
    fresh = Trainer("add", 0, 1, str(tiny_folder), GRPOConfig())
    with pytest.raises(CheckpointError, match="is damaged"):
        fresh.load(str(folder))


# -- metrics on resume, and secrets ----------------------------------------------------------------


OFF = WandbConfig(mode="disabled")


def _write_run(out, last_step):
    log = MetricsLog(out, OFF, "r", {})
    for step in range(last_step + 1):
        log.log({"kind": "step", "step": step, "branch": "add", "rollouts": 8})
        log.log({"kind": "eval", "step": step, "branch": "add", "pass_rate": 0.5})
    log.close()


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    _write_run(tmp_path / "a", 6)  # interrupted after step 6; its checkpoint is at step 4
    with (tmp_path / "a/metrics.jsonl").open("a") as f:
        f.write('{"kind": "event", "step": 6, "event": "actor_recovered"}\n')
        f.write('{"kind": "step", "st')  # the line a kill cut short
    log = MetricsLog(tmp_path / "a", OFF, "r", {}, resume_step=4)
    for step in (5, 6, 7):
        log.log({"kind": "step", "step": step, "branch": "add", "rollouts": 8})
        log.log({"kind": "eval", "step": step, "branch": "add", "pass_rate": 0.5})
    log.close()
    _write_run(tmp_path / "b", 7)  # uninterrupted
    resumed = read_metrics(tmp_path / "a/metrics.jsonl")
    # The step and eval records are an uninterrupted run's; what happened (events) stays.
    assert [r for r in resumed if r["kind"] != "event"] == read_metrics(tmp_path / "b/metrics.jsonl")
    assert [r["event"] for r in resumed if r["kind"] == "event"] == ["actor_recovered"]


def test_rewind_drops_later_records_of_an_open_log(tmp_path):
    log = MetricsLog(tmp_path, OFF, "r", {})
    for step in range(5):
        log.log({"kind": "step", "step": step})
    log.rewind(2)
    log.log({"kind": "event", "step": 2, "event": "recovered"})
    log.close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        ("step", 0), ("step", 1), ("step", 2), ("event", 2)]
    assert not list(tmp_path.glob("*.tmp"))


def test_fresh_log_replaces_the_old_file(tmp_path):
    _write_run(tmp_path, 3)
    MetricsLog(tmp_path, OFF, "r", {}).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_redacted():
    config = {"serve": {"token": "s3cret", "port": 8000}, "seed": 1}
    assert redacted(config) == {"serve": {"token": "***", "port": 8000}, "seed": 1}
    assert config["serve"]["token"] == "s3cret"  # a copy, not the config
    assert redacted({"serve": {"token": None}}) == {"serve": {"token": None}}
    assert redacted({"seed": 1}) == {"seed": 1}


def test_token_reaches_no_wandb_file(tmp_path, monkeypatch):
    token = "tok-5e1f0a9b77"
    monkeypatch.setattr(sys, "argv", ["copd-ray", "train", f"serve.token={token}"])
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, WandbConfig(mode="offline"), "r", {"serve": {"token": token}})
    print(f"console line with {token}")
    log.log({"kind": "step", "step": 1, "branch": "add", "rollouts": 8})
    log.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files)
    assert not [p for p in files if token.encode() in p.read_bytes()]
