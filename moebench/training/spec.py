"""The run spec: one `RunSpec` per run (written as ``spec.yaml``), its defaults, validation and id.

The grid produces `RunSpec`s, the launcher and the runner consume them. A `RunSpec` is resolved once,
when it is made (`RunSpec.from_dict`, through `resolve_spec`), so a spec spelled with or without its
defaults names the same run and gets the same `run_id` (computed once, then cached). Records on disk
stay plain dicts (``RunSpec.to_dict()``); `run_id` and `resolve_spec` take either.

Schema (all keys; missing ones take the defaults below)::

    grid: str            results/<grid>/<run_id>/ ; "single" for `moebench train`
    task: str            registered task name
    task_args: dict      Task(**task_args)
    model: dict          task.build_model(model, moe); {} = the task's default_model
    moe: null | {blocks, num_experts, router, router_args, d_hidden, capacity_factor, upcycle, mode,
                 patches_only, freeze_backbone, train_norms}  (moebench.core.config.MoEConfig)
                         null = the dense baseline
    label: str           display name ("ermoe-context", "dense"); default: the router name or "dense"
    seed: int
    train: {steps, batch_size, lr, weight_decay, warmup_steps, eval_every, grad_clip, amp,
            checkpoint_every, max_loss, num_workers, eval_batch_size, probe_size, keep_checkpoint,
            deterministic, compile}
    sweep: dict          axis -> value (informational)
    match: dict          what the grid matched (informational)
    versions: dict       {suite, task, router}: the result-affecting versions of the code that runs it
                         (filled in from moebench.version and the task's / router's ``version``), so
                         a fix that changes numbers changes the run id and reruns exactly those runs
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import yaml

from moebench.core.config import (
    ConfigError,
    MoEConfig,
    TrainConfig,
    check_keys,
    check_seed,
    defaults,
    resolve_section,
)

TOP_LEVEL = ("grid", "task", "task_args", "model", "moe", "label", "seed", "train", "sweep", "match", "versions")

DEFAULT_TRAIN: dict[str, Any] = defaults(TrainConfig)  # the tables live in moebench.core.config
DEFAULT_MOE: dict[str, Any] = defaults(MoEConfig)

DEFAULTS: dict[str, Any] = {
    "grid": "single",
    "task_args": {},
    "model": {},
    "moe": None,
    "seed": 0,
    "sweep": {},
    "match": {},
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class SpecError(ValueError):
    """A run spec that cannot run; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------------
# field checks


def _dict(value, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"spec field {field} must be a mapping (YAML dict), got {type(value).__name__} {value!r}")
    return copy.deepcopy(value)


def _name(value, field: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise SpecError(
            f"spec field {field} must be a non-empty name of letters, digits and . _ + = - "
            f"(it becomes part of a folder name), got {value!r}"
        )
    return value


def _unknown(keys, known, where: str) -> None:
    try:
        check_keys(dict.fromkeys(keys), known, "")
    except ConfigError as err:
        raise SpecError(f"unknown {where} key(s) {err.value!r}{err.hint}") from None


# ----------------------------------------------------------------------------------------------------
# resolution


def _spec_error(err: ConfigError, where: str) -> SpecError:
    """A `ConfigError` in the spec's own words: "spec field train.lr must be ..."."""
    if err.unknown:
        return SpecError(f"unknown {where} key(s) {err.value!r}{err.hint}")
    return SpecError(f"spec field {err.path} must be {err.expected}, got {err.value!r}")


def resolve_moe(moe) -> dict | None:
    if moe is None:
        return None
    if not isinstance(moe, dict):
        raise SpecError(f"spec field moe must be null (dense baseline) or a mapping, got {moe!r}")
    try:
        m = resolve_section(MoEConfig, copy.deepcopy(moe), "moe")
    except ConfigError as err:
        raise _spec_error(err, "moe") from None
    if not m["router"]:
        raise SpecError(f"spec field moe.router must be a router name (see `moebench routers`), got {m['router']!r}")
    if m["upcycle_drop"] is not None and m["upcycle"] != "drop":
        raise SpecError(
            f"spec field moe.upcycle_drop={m['upcycle_drop']!r} applies only with moe.upcycle: drop "
            f"(got upcycle: {m['upcycle']!r}); set moe.upcycle: drop or remove moe.upcycle_drop"
        )
    return m


def resolve_train(train) -> dict:
    train = _dict(train, "train")
    try:
        t = resolve_section(TrainConfig, train, "train")
    except ConfigError as err:
        raise _spec_error(err, "train") from None
    t["grad_clip"] = t["grad_clip"] if t["grad_clip"] is not None else 0.0
    t["eval_batch_size"] = t["eval_batch_size"] if t["eval_batch_size"] is not None else t["batch_size"]
    return t


def resolve_spec(spec: dict | RunSpec) -> dict:
    """A validated copy of ``spec`` with every default filled in (raises `SpecError` naming the field);
    a `RunSpec` is resolved already: its plain dict."""
    if isinstance(spec, RunSpec):
        return spec.to_dict()
    if not isinstance(spec, dict):
        raise SpecError(f"a run spec must be a mapping, got {type(spec).__name__}")
    _unknown(spec, TOP_LEVEL, "top-level spec")
    if "task" not in spec:
        raise SpecError("spec field task is required: the registered task name (see `moebench tasks`)")
    s = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(spec)}
    s["grid"] = _name(s["grid"], "grid")
    if not isinstance(s["task"], str) or not s["task"]:
        raise SpecError(f"spec field task must be a task name (see `moebench tasks`), got {s['task']!r}")
    s["task_args"] = _dict(s["task_args"], "task_args")
    s["model"] = _dict(s["model"], "model")
    s["moe"] = resolve_moe(s["moe"])
    if s.get("label") is None:
        s["label"] = "dense" if s["moe"] is None else s["moe"]["router"]
    s["label"] = _name(s["label"], "label")
    try:
        s["seed"] = check_seed(s["seed"], "seed")
    except ConfigError as err:
        raise _spec_error(err, "seed") from None
    s["train"] = resolve_train(s.get("train"))
    s["sweep"] = _dict(s["sweep"], "sweep")
    s["match"] = _dict(s["match"], "match")
    s["versions"] = resolve_versions(s.get("versions"), s["task"], None if s["moe"] is None else s["moe"]["router"])
    try:
        canonical_json(s)
    except (TypeError, ValueError) as err:
        raise SpecError(
            f"spec must contain only plain YAML values (str, number, bool, null, list, dict): {err}"
        ) from err
    return s


def code_versions(task: str, router: str | None) -> dict:
    """The versions that decide a run's numbers: the suite's, the task class's and the router class's
    ``version`` (1 unless the class bumps it). An unregistered name has no version (None)."""
    from moebench.core.registry import ROUTERS, TASKS
    from moebench.version import __version__

    def version_of(registry, name):
        if name is None or name not in registry:
            return None
        return getattr(registry.get(name), "version", 1)

    return {"suite": __version__, "task": version_of(TASKS, task), "router": version_of(ROUTERS, router)}


def resolve_versions(value, task: str, router: str | None) -> dict:
    """A spec read back from a record keeps the versions it ran with; a new spec gets the current ones."""
    if value is None:
        return code_versions(task, router)
    if not isinstance(value, dict) or set(value) != {"suite", "task", "router"}:
        raise SpecError(
            f"spec field versions must be a mapping with keys suite, task, router (the code versions a "
            f"record ran with), got {value!r}; leave it out to use the current versions"
        )
    return copy.deepcopy(value)


# Keys added after 0.1.0: left out of the run id while at their default, so every earlier run keeps its id.
ID_OPTIONAL: dict[str, dict[str, Any]] = {
    "moe": {
        "activation": None,
        "shared_experts": 0,
        "shared_expert_gate": False,
        "null_experts": 0,
        "capacity_policy": "position",
        "router_init_std": None,
        "routing_unit": "token",
    },
    "train": {"interventions": False, "eval_at_start": False},
}

# Train options that change how fast a run goes or where it is also logged, not what it computes (like the device, which is not
# in the spec either): a grid can switch them on and still find its finished and checkpointed runs.
SPEED_ONLY_TRAIN_KEYS = ("compile", "log_to")


def canonical_json(spec: dict) -> str:
    """Sorted-key, whitespace-free JSON of ``spec`` without ``grid`` and the speed-only train options
    (the part that affects results)."""
    body = {k: v for k, v in spec.items() if k != "grid"}
    for section, optional in ID_OPTIONAL.items():
        if isinstance(body.get(section), dict):
            body[section] = {
                k: v
                for k, v in body[section].items()
                if not (k in optional and v == optional[k] and type(v) is type(optional[k]))
            }
    if isinstance(body.get("train"), dict):
        body["train"] = {k: v for k, v in body["train"].items() if k not in SPEED_ONLY_TRAIN_KEYS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _run_id_of(s: dict) -> str:
    digest = hashlib.sha256(canonical_json(s).encode("utf-8")).hexdigest()[:10]
    return f"{s['label']}-s{s['seed']}-{digest}"


def run_id(spec: dict | RunSpec) -> str:
    """``{label}-s{seed}-{hash}``: hash = first 10 hex digits of sha256 of the canonical JSON of the
    resolved spec minus ``grid`` (so the same run in two grids has the same id). A `RunSpec`'s is cached."""
    if isinstance(spec, RunSpec):
        return spec.run_id
    return _run_id_of(resolve_spec(spec))


# ----------------------------------------------------------------------------------------------------
# the typed spec


def _freeze(value: Any) -> Any:
    """A read-only deep view: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """`_freeze` undone: plain dicts and lists (what YAML and JSON hold), a fresh copy."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True, eq=True)
class RunSpec(Mapping[str, Any]):
    """One run, resolved once: every field validated and defaulted (`resolve_spec`) when it is made,
    frozen (the sections are read-only views), its `run_id` computed once and cached. Passed whole from
    the grid's expansion through the launcher and the job to the runner.

    ``RunSpec(task=..., ...)`` and ``RunSpec.from_dict(d)`` both validate (`SpecError` names the field);
    ``to_dict()`` is the plain dict written to ``spec.yaml`` (and hashed into the run id). It also reads
    like that dict (``spec["moe"]`` is a fresh plain copy of the section), for the code that reads specs
    from records."""

    task: str
    grid: str = "single"
    task_args: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    moe: Mapping[str, Any] | None = None
    label: str | None = None  # resolved: the router name, or "dense"
    seed: int = 0
    train: Mapping[str, Any] | None = None  # resolved: every train option
    sweep: Mapping[str, Any] = field(default_factory=dict)
    match: Mapping[str, Any] | None = None  # resolved: a mapping
    versions: Mapping[str, Any] | None = None  # resolved: {suite, task, router}

    def __post_init__(self) -> None:
        raw = {f.name: _thaw(getattr(self, f.name)) for f in fields(self)}
        resolved = resolve_spec({k: v for k, v in raw.items() if v is not None or k == "moe"})
        for key in TOP_LEVEL:
            object.__setattr__(self, key, _freeze(resolved[key]))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> RunSpec:
        """The `RunSpec` of a spec dict (from YAML, a record or a grid); raises `SpecError` naming the
        field for an unknown key or a bad value."""
        if isinstance(spec, RunSpec):
            return spec
        if not isinstance(spec, Mapping):
            return cls(**resolve_spec(spec))  # raises: not a mapping
        _unknown(spec, TOP_LEVEL, "top-level spec")
        if "task" not in spec:
            return cls(**resolve_spec(dict(spec)))  # raises: the task is required
        return cls(**spec)  # resolved once, in __post_init__

    def to_dict(self) -> dict[str, Any]:
        """The plain, resolved dict (a fresh copy): what ``spec.yaml`` holds and the run id hashes."""
        return {key: _thaw(getattr(self, key)) for key in TOP_LEVEL}

    @functools.cached_property
    def run_id(self) -> str:
        """``{label}-s{seed}-{hash}`` (see the module function `run_id`), computed once."""
        return _run_id_of(self.to_dict())

    @property
    def router(self) -> str | None:
        """The router's registered name; None for the dense baseline."""
        return None if self.moe is None else self.moe["router"]

    # the Mapping interface: a RunSpec reads like its dict
    def __getitem__(self, key: str) -> Any:
        if key not in TOP_LEVEL:
            raise KeyError(key)
        return _thaw(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(TOP_LEVEL)

    def __len__(self) -> int:
        return len(TOP_LEVEL)

    def __hash__(self) -> int:
        return hash(self.run_id)

    def __reduce__(self):  # pickled for submitit's jobs: as the plain dict, resolved again on arrival
        return (_runspec_from_dict, (self.to_dict(),))


def _runspec_from_dict(spec: dict) -> RunSpec:
    """Unpickling: the fields as they were resolved (a pickle is trusted input: it runs code anyway)."""
    out = object.__new__(RunSpec)
    for key in TOP_LEVEL:
        object.__setattr__(out, key, _freeze(spec[key]))
    return out


# ----------------------------------------------------------------------------------------------------
# overrides (`moebench train --set key.path=value`)


def parse_value(text: str):
    """A YAML value, with numbers YAML 1.1 leaves as strings ("3e-4") read as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"cannot parse value {text!r} as YAML: {problem}") from err
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value) else value
        except ValueError:
            return value
    return value


def apply_override(spec: dict, assignment: str) -> dict:
    """Set ``key.path=value`` in ``spec`` in place (value parsed as YAML) and return it."""
    if "=" not in assignment:
        raise SpecError(f"override {assignment!r} must look like key.path=value, e.g. train.lr=3e-4")
    path, text = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not keys or any(not k for k in keys):
        raise SpecError(f"override {assignment!r}: empty key in {path!r}")
    if keys[0] not in TOP_LEVEL:
        import difflib

        close = difflib.get_close_matches(keys[0], TOP_LEVEL, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(
            f"override {assignment!r}: unknown top-level key {keys[0]!r}{hint}; known: {', '.join(TOP_LEVEL)}"
        )
    node = spec
    for i, k in enumerate(keys[:-1]):
        if node.get(k) is None:
            if k == "moe" and i == 0:
                raise SpecError(
                    f"override {assignment!r}: moe is null (the dense baseline); pick a router "
                    f"(--router NAME) before setting moe options"
                )
            node[k] = {}
        if not isinstance(node[k], dict):
            raise SpecError(f"override {assignment!r}: {'.'.join(keys[: i + 1])} is {node[k]!r}, not a mapping")
        node = node[k]
    try:
        node[keys[-1]] = parse_value(text)
    except SpecError as err:
        raise SpecError(f"override {path.strip()}: {err}; give a plain value, e.g. {path.strip()}=3e-4") from None
    return spec
