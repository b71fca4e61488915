"""On-disk cache for datasets that are slow to build (synthetic cohort, compositional canvases,
resampled BIDS volumes): built once, then loaded, so every run of a grid sees identical data.

Entries are keyed by the builder's parameters plus a version string (bump the version when the
generator changes, old entries are then simply never read again) and written atomically
(temporary file in the same folder + ``os.replace``), so parallel runs never see a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from moebench.training.records import atomic_write

ENV_VAR = "MOEBENCH_CACHE"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path`` if given, else ``$MOEBENCH_CACHE``, else ``~/.cache/moebench``."""
    if path is None:
        path = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "moebench"
    return Path(path).expanduser()


def cache_key(params: dict, version: str) -> str:
    """Stable short hash of the parameters and version (JSON with sorted keys, so order is irrelevant)."""
    blob = json.dumps({"params": params, "version": version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(
    name: str,
    params: dict,
    build: Callable[[], dict],
    version: str,
    root: str | os.PathLike | None = None,
    enabled: bool = True,
) -> dict:
    """Return ``build()``'s result (a dict of tensors / lists / str / numbers), from
    ``<cache_dir>/<name>-<key>.pt`` when present, else build it and store it there.

    An unreadable entry (e.g. a file truncated by a full disk) is rebuilt with a warning rather than
    failing the run. ``enabled=False`` builds without touching the disk."""
    if not enabled:
        return build()
    path = cache_dir(root) / f"{name}-{cache_key(params, version)}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
            warnings.warn(f"cache entry {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    data = build()
    atomic_write(path, lambda f: torch.save(data, f))
    return data
