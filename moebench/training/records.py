"""Run records on disk, written atomically so a crash never leaves a half-written file behind.

A run lives in ``<results>/<grid>/<run_id>/``:

- ``spec.yaml``     the fully resolved run spec (see ``moebench.training.spec``)
- ``status.json``   {"state": queued|running|done|failed, "reason": str|null, "updated": iso time,
                     "attempts": int, "owner": "host:pid" of the process running it}
- ``metrics.jsonl`` one JSON object per evaluation:
                     {"step": int, "train_loss": float, "lr": float,
                      "metrics": {task metric -> float},
                      "routing": {"mean": {stat -> float}, "per_layer": [{"layer": str, stat -> float,
                                  "counts": [int per expert]}]}}
- ``final.json``    {"run_id", "grid", "task", "router", "label", "seed", "sweep": {axis: value},
                     "headline": {"name": str, "value": float, "higher_is_better": bool,
                                  "margin": float|null (the task's equivalence margin), "margin_reason": str},
                     "metrics": {task metric -> float},
                     "routing": {"mean": {...}, "per_layer": [{..., "counts": [...],
                                 "label_by_expert": [[count per expert] per label], "labels": [str]}]},
                     "cost": {"params_total", "params_active", "flops_per_token", "router_params",
                              "router_flops_per_token", "ms_per_step", "wall_time_s",
                              "tokens_per_s", "peak_memory_mb"},
                     "env": environment_info()}
- ``eval_items.npz`` per-eval-example outputs of the latest evaluation (the task's ``items``:
                     ``headline`` whose mean is the headline metric, plus raw ``correct`` /
                     ``abs_error`` / ``rank``), for the report's paired bootstrap
- ``probe_top1.npz`` per MoE layer (``layer<i>`` plus ``names``) the dispatched top-1 expert of each
                     fixed probe token at the end (-1 = unrouted), for the report's cross-seed agreement
- ``tensorboard/``, ``wandb/`` mirrors of metrics.jsonl when ``train.log_to`` names them
- ``checkpoint.pt`` latest training state (removed once the run is done); tensors and plain containers
                     only, loaded with ``weights_only=True``
- ``jobs.jsonl``    one line per attempt (host, pid, job ids); ``.lock`` the owner's flock
- ``.stale/<time>/`` records set aside as unreadable or inconsistent (see ``rundir.record_problem``)

status.json may also hold ``retryable`` (the last failure was the machine's: killed, OOM, disk full)
and ``note`` (e.g. why a checkpoint was set aside). Every record path is opened without following
symbolic links (``open_nofollow``; atomic writes replace a link, never write through it).

Routing stat names are those of ``moebench.training.metrics``.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import BinaryIO

import yaml

STATES = ("queued", "running", "done", "failed")


class CorruptRecordError(RuntimeError):
    """A record file exists but cannot be parsed (half-written by an old crash or edited by hand)."""


class UnsafeRecordError(RuntimeError):
    """A record path is a symbolic link (or a run folder leads outside its results root): refused."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file in the same folder, fsync, then rename it over ``path``:
    readers see the old file or the new one, never half of one. The one atomic writer of the suite
    (records, checkpoints, dataset caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shared results and caches must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_write_yaml(path, obj) -> None:
    """``obj`` as YAML (a `RunSpec` as its plain dict)."""
    to_dict = getattr(obj, "to_dict", None)
    atomic_write_text(path, yaml.safe_dump(to_dict() if callable(to_dict) else obj, sort_keys=True))


def json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path) -> dict | None:
    """None if the file is missing; CorruptRecordError if it exists but is not valid JSON."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRecordError(f"{path}: not valid JSON ({err}); delete it or rerun the run") from err


def open_nofollow(path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink at ``path`` (a planted link must not redirect our writes to
    its target); the error names the path."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeRecordError(
                f"{path} is a symbolic link; refusing to write through it "
                f"(remove the link; run folders hold plain files only)"
            ) from err
        raise


def append_jsonl(path, obj) -> None:
    """Append one line and fsync. A torn last line from a crash is skipped by ``read_jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove_temp_files(folder) -> list[str]:
    """Delete what a killed ``atomic_write`` left behind (``.<name>.<random>.tmp``); returns their names.
    Call only while owning the folder (its run lock), so no live writer's file is removed."""
    gone = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() or p.is_symlink():
            p.unlink()
            gone.append(p.name)
    return gone


def read_jsonl(path, strict: bool = False) -> list[dict]:
    """The JSON lines of ``path``. A torn final line (killed mid-append) is skipped, or with ``strict``
    (validating a finished record) raises CorruptRecordError like any other unparsable line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorruptRecordError(f"{path}: not UTF-8 text ({err})") from err
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1 and not strict:  # torn final line: the run was killed mid-append
                break
            raise CorruptRecordError(f"{path}:{i + 1}: not valid JSON ({err})") from err
    if strict and text and not text.endswith("\n"):
        raise CorruptRecordError(f"{path}:{len(lines)}: last line is torn (no newline); rerun the run")
    return rows


def write_status(run_dir, state: str, reason: str | None = None, **extra) -> dict:
    if state not in STATES:
        raise ValueError(f"status state must be one of {STATES}, got {state!r}")
    old = read_status_safe(run_dir) or {}
    status = {
        **{k: v for k, v in old.items() if k not in ("state", "reason")},
        **extra,
        "state": state,
        "reason": reason,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(run_dir) / "status.json", status)
    return status


def read_status(run_dir) -> dict | None:
    return read_json(Path(run_dir) / "status.json")


def read_status_safe(run_dir) -> dict | None:
    try:
        return read_status(run_dir)
    except CorruptRecordError:
        return None


# libyaml's safe loader (same safe constructors, C parser): the launcher reads every run's spec.yaml each
# poll, and the pure-Python parser made that ~35 ms per run (4 s per poll for 120 runs, a whole core)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_spec(run_dir) -> dict | None:
    path = Path(run_dir) / "spec.yaml"
    if not path.exists():
        return None
    try:
        return yaml.load(path.read_text(), Loader=_SAFE_LOADER)
    except yaml.YAMLError as err:
        raise CorruptRecordError(f"{path}: not valid YAML ({err})") from err


def environment_info() -> dict:
    """What a reader needs to reproduce a number: commit, library versions, hardware."""
    import torch

    libs: dict[str, str | None] = {}
    for name in ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "pandas", "submitit", "moebench"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "git_commit": git_commit(),
        "libraries": libs,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "hostname": socket.gethostname(),
    }


def _cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo), which platform.processor() often leaves empty."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the moebench source tree (with '-dirty' when it has uncommitted changes outside
    results/); ``root``: another checkout (tests)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            # results/ is the output, not the code: a sample regenerated in place is not "dirty" code
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


EVAL_ITEMS_FILE = "eval_items.npz"


def write_eval_items(path, items: dict) -> None:
    """Per-eval-example arrays (1-D, equal length) as a compressed .npz, written atomically."""
    import io

    import numpy as np

    arrays = {k: np.asarray(v).reshape(-1) for k, v in items.items() if v is not None}
    sizes = {k: a.size for k, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"eval items must all have one entry per eval example; got sizes {sizes}")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds could be allow_pickle
    atomic_write_bytes(path, buf.getvalue())


def read_eval_items(path) -> dict | None:
    """The arrays of an eval_items.npz; None when absent; `CorruptRecordError` when unreadable (it is
    untrusted input: no pickles are loaded)."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # zipfile / ValueError / OSError: all mean "not a readable npz"
        raise CorruptRecordError(f"{path} is not a readable .npz file ({err}); rerun the run") from err


PROBE_TOP1_FILE = "probe_top1.npz"


def write_probe_top1(path, top1: dict) -> None:
    """The dispatched top-1 expert of every fixed probe token (-1 = unrouted) at the end of the run, per
    MoE layer in order: ``layer<i>`` int arrays plus ``names`` (the layers' module names), for the
    report's cross-seed agreement. Written atomically, no pickles."""
    import io

    import numpy as np

    names = list(top1)
    arrays = {f"layer{i}": np.asarray(top1[name]).astype(np.int32).reshape(-1) for i, name in enumerate(names)}
    buf = io.BytesIO()
    np.savez_compressed(buf, names=np.asarray(names, dtype=str), **arrays)  # type: ignore[arg-type]  # as above
    atomic_write_bytes(path, buf.getvalue())


def read_probe_top1(path) -> tuple[list[str], list] | None:
    """(layer names, [top-1 int array per layer]) from a probe_top1.npz; None when absent. It is untrusted
    input: opened without following a symbolic link, no pickles; anything malformed (not an npz, a
    non-integer or non-1-D array, an index below -1, a missing layer) raises `CorruptRecordError`."""
    import numpy as np

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except UnsafeRecordError as err:
        raise CorruptRecordError(str(err)) from err
    try:
        with os.fdopen(fd, "rb") as f, np.load(f, allow_pickle=False) as data:
            names = [str(n) for n in data["names"].reshape(-1)]
            layers = [data[f"layer{i}"] for i in range(len(names))]
    except Exception as err:  # zipfile / KeyError / ValueError / OSError: not the file we wrote
        raise CorruptRecordError(f"{path} is not a readable probe_top1.npz ({type(err).__name__}: {err})") from err
    for i, a in enumerate(layers):
        if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and int(a.min()) < -1):
            raise CorruptRecordError(
                f"{path}: layer{i} must be a 1-D integer array of expert indices >= -1, got "
                f"dtype {a.dtype}, shape {a.shape}"
            )
    return names, [a.astype(np.int64) for a in layers]
