"""Checkpoints on disk: writing them, telling a usable one from a damaged one, and picking
the one a run resumes from. Pure files, no Ray.

    <output_dir>/checkpoints/step_000040/
        branches/<name>/        each trainable branch: a Hugging Face folder + trainer_state.pt
        driver_state.json       step, data streams, versions, base, branches, topology edges,
                                and a manifest {relative path: [size, CRC-32]} of every other file

driver_state.json is renamed into place last, so a folder without it is an interrupted
save. The manifest records each file's size and CRC-32: sizes catch truncation cheaply,
and the checksums damage of the same size (weights overwritten with NaN); CRC-32 runs at
~6 GB/s a core here, files in parallel, so checking is bounded by the disk's reads. On top
of it every file gets a structural check: JSON files parse, each safetensors header parses
and accounts for exactly the file's bytes, each trainer_state.pt is a readable zip whose
pickle asks for nothing but tensors and plain values (what the trainer's safe loader takes).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from copd_ray.errors import CheckpointError

STATE = "driver_state.json"
TRAINER_STATE = "trainer_state.pt"


# -- writing ---------------------------------------------------------------------------------


def save_checkpoint(output_dir: str | Path, step: int, groups: dict, data: dict, base: str, keep: int,
                    topology_edges: Iterable[tuple[str, str]]) -> Path:
    """Each branch (weights, tokenizer, optimizer) then the driver state with the manifest.

    A save at `step` first removes every checkpoint at or after it: those belong to a
    timeline this run has rolled back from (a damaged newest one it resumed before, or the
    one it replays to), and left in place `resume=auto` would pick them. Afterwards only
    the newest `keep` usable checkpoints stay; the one just written is checked first, so a
    damaged save never costs the previous good one."""
    root = Path(output_dir) / "checkpoints"
    for old_step, old in _step_folders(root):
        if old_step >= step:
            shutil.rmtree(old)
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True)
    names = list(groups)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(lambda n: groups[n].save(str(folder / "branches" / n)), names))
    state = {"step": step, "drawn": {n: d.drawn for n, d in data.items()},
             "versions": {n: g.version for n, g in groups.items()}, "base": base, "branches": names,
             "edges": [list(e) for e in topology_edges], "files": _manifest(folder)}
    tmp = folder / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, folder / STATE)
    reason = verify_checkpoint(folder, names, content=False)  # the checksums were just taken from these files
    if reason:
        # Every node writes into output_dir; a file the driver cannot see means it is not shared.
        raise CheckpointError(f"checkpoint {folder} is unusable right after writing it ({reason}): check free disk "
                              "space and that output_dir is on storage every node shares")
    _prune(root, keep)
    return folder


def _manifest(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, CRC-32]} of every file of the branches."""
    files = [p for p in sorted((folder / "branches").rglob("*")) if p.is_file()]
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, c] for p, c in zip(files, _crc32s(files))}


def _crc32s(paths: list[Path]) -> list[int]:
    """Each file's CRC-32, files read in parallel."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_crc32, paths))


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(64 << 20):
            crc = zlib.crc32(chunk, crc)  # releases the GIL: files are read in parallel
    return crc


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, oldest first (by number: names outgrow the padding)."""
    found = []
    for p in root.glob("step_*"):
        suffix = p.name.removeprefix("step_")
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    # Structure only: reading every kept checkpoint back at every save would cost more than the save.
    usable = [p for _, p in _step_folders(root) if verify_checkpoint(p, content=False) is None]
    kept = set(usable[-keep:])
    for _, p in _step_folders(root):
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


# -- reading and verifying ----------------------------------------------------------------------


def read_state(folder: str | Path) -> dict:
    """The driver state of a checkpoint; CheckpointError when there is none that parses."""
    state, reason = _state(Path(folder))
    if reason:
        raise CheckpointError(f"checkpoint {folder} is unusable ({reason}): pick another checkpoint or set resume=never")
    return state


def _state(folder: Path) -> tuple[dict | None, str | None]:
    path = folder / STATE
    if not folder.is_dir():
        return None, "no such folder"
    if not path.is_file():
        return None, f"no {STATE}"
    text = path.read_text(errors="replace")
    if not text.strip():
        return None, f"{STATE} is empty"
    try:
        state = json.loads(text)
    except ValueError:
        return None, f"{STATE} does not parse"
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("drawn"), dict) and isinstance(state.get("versions"), dict)):
        return None, f"{STATE} lacks step, drawn or versions"
    return state, None


def saved_branches(state: dict) -> list[str]:
    """The branches a checkpoint holds (checkpoints before the `branches` field: its versions)."""
    return list(state.get("branches") or state["versions"])


def verify_checkpoint(folder: str | Path, branches: Iterable[str] | None = None,
                      content: bool = True) -> str | None:
    """None when the checkpoint is usable, else a short reason: the driver state, the
    manifest's sizes, each file's structure, then (`content`) the manifest's checksums (see
    the module doc). `branches`: the folders that must be there; None = the ones the
    checkpoint records."""
    folder = Path(folder)
    state, reason = _state(folder)
    if reason:
        return reason
    for name in saved_branches(state) if branches is None else branches:
        reason = _missing_parts(folder / "branches" / name)
        if reason:
            return f"branches/{name}: {reason}"
    files = {rel: entry if isinstance(entry, list) else [entry, None]  # older manifests: sizes only
             for rel, entry in state.get("files", {}).items()}
    for rel, (size, _) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, the manifest says {size}"
    for path in sorted((folder / "branches").rglob("*")):
        reason = _file_problem(path) if path.is_file() else None
        if reason:
            return f"{path.relative_to(folder).as_posix()}: {reason}"
    checked = [rel for rel, (_, crc) in files.items() if content and crc is not None]
    for rel, crc in zip(checked, _crc32s([folder / rel for rel in checked])):
        if crc != files[rel][1]:
            return f"{rel}: its content differs from what was saved (checksum)"
    return None


def _missing_parts(branch: Path) -> str | None:
    if not branch.is_dir():
        return "folder missing"
    for name in ("config.json", TRAINER_STATE):
        if not (branch / name).is_file():
            return f"{name} missing"
    index = branch / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return f"{index.name} does not parse"
        missing = sorted(s for s in shards if not (branch / s).is_file())
        return f"weight shard {missing[0]} missing" if missing else None
    return None if (branch / "model.safetensors").is_file() else "model.safetensors missing"


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return "does not parse"
    elif path.suffix == ".safetensors":
        return _safetensors_problem(path)
    elif path.name == TRAINER_STATE:
        # torch.save writes a zip; its directory sits at the end, so a cut file has none.
        try:
            with zipfile.ZipFile(path) as z:
                if not any(n.endswith("/data.pkl") for n in z.namelist()):
                    return "not a torch.save file"
        except (zipfile.BadZipFile, OSError):
            return "truncated or not a torch.save file"
        import torch

        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if unsafe:
            return f"asks for {unsafe[0]}, which loading refuses (it could run code)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The header (8-byte length, then JSON) must parse and its tensors end exactly at the file's end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return "truncated header"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "header does not parse"
    if 8 + n + end != size:
        return f"{size} bytes, its header needs {8 + n + end}"
    return None


# -- choosing the checkpoint to resume from --------------------------------------------------------


def find_resume(resume: str, output_dir: str | Path, base_path: str | Path, branches: list[str],
                edges: Iterable[tuple[str, str]], warn: Callable[[str], object] = print
                ) -> tuple[Path | None, dict | None]:
    """(checkpoint folder, its driver state) to resume from, or (None, None) to start fresh.

    resume="never": fresh. "auto": the newest checkpoint in output_dir that verifies; each
    damaged newer one gets one `warn` line; checkpoints that are all damaged stop the run.
    A folder: that checkpoint, which must verify. `branches` are the config's trainable
    branches (the ones a checkpoint holds); a usable checkpoint of another base policy,
    other branches or another topology is refused (CheckpointError, one line)."""
    if resume == "never":
        return None, None
    if resume == "auto":
        folder = _newest_usable(Path(output_dir) / "checkpoints", warn)
        if folder is None:
            return None, None
    else:
        folder = Path(resume).expanduser()
        reason = verify_checkpoint(folder)
        if reason:
            raise CheckpointError(f"resume={resume}: that checkpoint is unusable ({reason}): name another "
                                  "checkpoint folder, or set resume=auto or resume=never")
    state = read_state(folder)
    _check_same_run(folder, state, str(base_path), branches, edges)
    return folder, state


def _newest_usable(root: Path, warn: Callable[[str], object]) -> Path | None:
    damaged = []
    for _, folder in reversed(_step_folders(root)):
        reason = verify_checkpoint(folder)
        if reason is None:
            for bad, why in damaged:
                warn(f"checkpoint {bad} is damaged ({why}); using {folder}")
            return folder
        damaged.append((folder, reason))
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(f"no usable checkpoint in {root}: all {len(damaged)} are damaged (newest {bad.name}: "
                              f"{why}); set resume=never to start over, or use another output_dir")
    return None


def _check_same_run(folder: Path, state: dict, base: str, branches: list[str],
                    edges: Iterable[tuple[str, str]]) -> None:
    """A checkpoint of another run would crash the resume (a branch it lacks) or, worse,
    load and train on from the wrong start."""
    advice = "set resume=never or another output_dir"
    saved_base = state.get("base", base)
    if saved_base != base:
        raise CheckpointError(f"{folder} continues a run from the base policy {saved_base}, not {base}: {advice}")
    saved = saved_branches(state)
    if sorted(saved) != sorted(branches):
        raise CheckpointError(f"{folder} holds the branches {sorted(saved)}, the config trains {sorted(branches)}: "
                              f"{advice}")
    if "edges" in state:  # checkpoints before the field: the branch check above is all there is
        before, now = _edge_names(state["edges"]), _edge_names(edges)
        if before != now:
            raise CheckpointError(f"{folder} was trained with the topology {before}, the config gives {now}: {advice}")


def _edge_names(edges: Iterable) -> list[str]:
    return sorted(f"{t}->{s}" for t, s in edges)
