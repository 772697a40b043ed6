"""Where the base policy of a config lies, and whether it is there yet, without importing
torch: the CLI starts Ray beside its imports only when no warm-up or import is due."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from copd_ray.config import BootstrapConfig, Config

CACHE_FORMAT = 1  # bump when the bootstrap procedure changes what it produces
PATIENCE = BootstrapConfig.model_fields["patience"].default
LATER_CAPABILITY_FIELDS = ("validation_size", "system")  # left out of cache keys at their defaults


def cache_key(cfg: Config) -> str:
    settings = {
        "format": CACHE_FORMAT,
        # "vision" joined the settings later; leaving it out when off keeps older text caches valid.
        "tiny": cfg.model.tiny.model_dump(exclude={"vision"} if not cfg.model.tiny.vision else None),
        # `patience` joined later and only cuts warm-ups that cannot land; at its default it is
        # left out, so older caches stay valid (a landed warm-up is the same with or without it).
        "bootstrap": cfg.bootstrap.model_dump(exclude={"patience"} if cfg.bootstrap.patience == PATIENCE else None),
        # Fields that joined later are left out at their defaults, so older caches stay valid.
        "capabilities": [c.model_dump(exclude={k for k in LATER_CAPABILITY_FIELDS
                                               if getattr(c, k) == type(c).model_fields[k].default})
                         for c in cfg.capabilities],
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(cfg: Config) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"tiny-policy-{cache_key(cfg)}"


def base_policy_ready(cfg: Config) -> bool:
    """A configured model.path, or a warm-up or GGUF import already cached."""
    if cfg.model.path:
        return True
    if cfg.model.gguf:
        from copd_ray.models.gguf import DONE, imported_folder

        return (imported_folder(cfg.model.gguf, cfg.cache_dir) / DONE).exists()
    return (cache_path(cfg) / "bootstrap.json").exists()
