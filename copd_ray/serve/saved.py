"""`copd-ray serve`: serve saved branches (a run's output folder, or model folders)."""

from __future__ import annotations

from pathlib import Path


def find_branches(paths: list[str]) -> dict[str, Path]:
    """{branch name: model folder}. A run's output folder contributes each of its
    `branches/<name>/` (and `merged/` as "merged"); a model folder is a branch named after it."""
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if (path / "branches").is_dir():
            folders = sorted(p for p in (path / "branches").iterdir() if (p / "config.json").exists())
            if (path / "merged" / "config.json").exists():
                folders.append(path / "merged")
        elif (path / "config.json").exists():
            folders = [path]
        else:
            raise ValueError(f"{path} is neither a run's output folder (with branches/) nor a model folder (with config.json)")
        for folder in folders:
            if folder.name in found:
                raise ValueError(f"two branches are named {folder.name!r}: {found[folder.name]} and {folder}")
            found[folder.name] = folder
    if not found:
        raise ValueError(f"no model folders under {paths}")
    return found


def serve_saved(paths: list[str], host: str, port: int, token: str | None, engine_cfg: dict, engine_kind: str = "hf",
                scorer_cpus: float = 0.25, block: bool = True, limits: dict | None = None) -> dict:
    """Start a scorer per saved branch and the HTTP app; block until interrupted. `limits`:
    the request limits of `start_serving` (serve.max_* of a config)."""
    import os
    import time

    import ray

    from copd_ray.actors import ScorerActor
    from copd_ray.serve.app import check_address, check_token, start_serving

    check_token(token)
    branches = find_branches(paths)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local Ray of its own: no dashboard (as `train` starts it), nothing more listening.
        ray.init(address=address, log_to_driver=False, **({} if address else {"include_dashboard": False}))
    check_address(host, port)  # before the scorers load: a busy port costs nothing then
    scorers = {name: ScorerActor.options(num_cpus=scorer_cpus).remote(name, str(folder), engine_kind, engine_cfg)
               for name, folder in branches.items()}
    ray.get([s.ready.remote() for s in scorers.values()])
    start_serving(scorers, {n: str(f) for n, f in branches.items()}, host, port, token, **(limits or {}))
    if block:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            from ray import serve

            serve.shutdown()
    return {"branches": branches, "scorers": scorers}
