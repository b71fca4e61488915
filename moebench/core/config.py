"""The one schema for run specs and grid files: a dataclass per config section whose fields carry
their type, bounds, choices and a short doc (MegaBlocks' ``Arguments``, lm-eval's ``TaskConfig``).

Why one table: the spec resolver (``moebench.training.spec``) and the grid validator
(``moebench.grids.schema``) both read these classes, so a key, a bound or a default can never be
accepted by one and refused by the other (``tests/test_config.py`` checks it). Each caller words the
error its own way (a spec names "spec field train.lr", a grid names its file and key path); the
check itself, what was expected and the closest known key, come from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

#: the constructor arguments the MoE layer fills in (from the model and ``moe.num_experts``): a grid's or a
#: caller's router args never set them (the layer, the grid validator and the options list all use this)
LAYER_FILLED_ARGS = ("d_model", "num_experts")


_NUMERIC_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take it; larger overflows inside torch
MAX_EXPERTS = 4096
# moebench.core.experts.ACTIVATIONS' names (this module stays torch-free; tests/test_config.py checks they agree)
EXPERT_ACTIVATIONS = ("gelu", "gelu-tanh", "relu", "silu", "quick-gelu", "swiglu", "geglu")
TRACKERS = ("tensorboard", "wandb")  # train.log_to: moebench.training.trackers writes to them
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a newline in an executor string is a new batch-script line


class ConfigError(ValueError):
    """One bad value or key: ``path`` (e.g. ``train.lr``), what was ``expected``, the value and a hint."""

    def __init__(self, path: str, expected: str, value: Any = None, hint: str = "", unknown: bool = False):
        self.path, self.expected, self.value, self.hint, self.unknown = path, expected, value, hint, unknown
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.unknown:
            return f"unknown key {self.value!r}{self.hint}"
        kind = "null" if self.value is None else type(self.value).__name__
        return f"expected {self.expected}, got {self.value!r} ({kind}){self.hint}"


def option(
    default,
    kind: str,
    *,
    minimum=None,
    maximum=None,
    strict: bool = False,
    strict_max: bool = False,
    nullable: bool = False,
    choices: tuple = (),
    doc: str = "",
    flat: bool = False,
    finite: bool = False,
    fix: str = "",
):
    """A config field: ``kind`` is int | float | bool | str | dict | blocks | choice | list (of distinct
    ``choices``) | indices (distinct integers >= 0); ``strict`` / ``strict_max`` make ``minimum`` / ``maximum`` exclusive; ``nullable``
    admits null; ``choices`` lists the admitted values; ``flat`` (dicts) admits only one level of plain
    string / number keys and values (they become shell lines); ``finite`` (numbers) refuses +-inf;
    ``fix`` is the advice appended to an error about the field."""
    meta = {
        "kind": kind,
        "minimum": minimum,
        "maximum": maximum,
        "strict": strict,
        "strict_max": strict_max,
        "nullable": nullable,
        "choices": tuple(choices),
        "doc": doc,
        "flat": flat,
        "finite": finite,
        "fix": fix,
    }
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The training budget and loop options every run of a grid shares."""

    steps: int = option(1000, "int", minimum=1, doc="optimiser steps")
    batch_size: int = option(64, "int", minimum=1, doc="samples per step")
    lr: float = option(1e-3, "float", minimum=0.0, strict=True, doc="peak AdamW learning rate")
    weight_decay: float = option(0.05, "float", minimum=0.0, doc="AdamW weight decay (not on norms / biases)")
    warmup_steps: int = option(50, "int", minimum=0, doc="linear warm-up steps, then cosine decay")
    eval_every: int = option(200, "int", minimum=0, doc="steps between evaluations; 0: only at the end")
    grad_clip: float = option(1.0, "float", minimum=0.0, nullable=True, doc="gradient norm clip; 0 or null: none")
    amp: Any = option(
        "auto", "choice", choices=("auto", True, False), doc="bf16 autocast: auto (CUDA only), true or false"
    )
    checkpoint_every: int = option(200, "int", minimum=0, doc="steps between checkpoints; 0: at evaluations")
    max_loss: float = option(
        1e6,
        "float",
        minimum=0.0,
        strict=True,
        nullable=True,
        doc="a loss above this (or NaN / inf) fails the run; null: only NaN / inf",
    )
    num_workers: int = option(0, "int", minimum=0, doc="DataLoader worker processes")
    eval_batch_size: int = option(None, "int", minimum=1, nullable=True, doc="null: batch_size")
    interventions: bool = option(
        False,
        "bool",
        doc="at the end, also evaluate with each expert dropped, each token's top-1 "
        "dropped, and at capacity factors 0.5/1/1.5/2 (E x layers + 5 evaluations)",
    )
    probe_size: int = option(
        64, "int", minimum=0, doc="eval samples whose top-1 experts are tracked for stability; 0: off"
    )
    probe_every: int = option(
        None,
        "int",
        minimum=0,
        nullable=True,
        doc="steps between routings of the probe samples (no eval set: cheap); null: "
        "steps // 10 (at least 1), so every run has >= 10 stability points; 0: only "
        "at evaluations",
    )
    keep_checkpoint: bool = option(False, "bool", doc="keep checkpoint.pt after the run is done")
    deterministic: Any = option(
        "auto", "choice", choices=("auto", True, False), doc="deterministic kernels: auto (CPU only), true or false"
    )
    compile: bool = option(False, "bool", doc="torch.compile the model for training (speed only: not in the run id)")
    log_to: list = option(
        [],
        "list",
        choices=TRACKERS,
        doc="also write metrics.jsonl's lines to tensorboard and / or wandb (offline); the run "
        "folder stays the record (not in the run id)",
    )
    eval_at_start: bool = option(
        False,
        "bool",
        doc="also evaluate at step 0 (every MoE run already does: the routing "
        "before any learning); for a dense run, its step-0 metrics",
    )


@dataclass
class MoEConfig:
    """Where the MoE layers go and how they are built (null ``moe`` in a spec: the dense baseline)."""

    blocks: Any = option("all", "blocks", doc="'all', 'last-N', 'every-N', an index or a list of indices")
    num_experts: int = option(8, "int", minimum=1, maximum=MAX_EXPERTS, doc="experts per MoE layer")
    router: str = option("softmax-topk", "str", doc="registered router name (see `moebench routers`)")
    router_args: dict = option({}, "dict", doc="the router's own options")
    d_hidden: int = option(None, "int", minimum=1, nullable=True, doc="expert hidden width; null: the dense MLP's")
    capacity_factor: float = option(
        None, "float", minimum=0.0, strict=True, nullable=True, doc="null: the router's default (dropless for most)"
    )
    upcycle: Any = option(
        False,
        "choice",
        choices=(False, True, "drop"),
        doc="true: copy the dense MLP into every expert; drop: Drop-Upcycling (copy, then "
        "re-draw a share upcycle_drop of each expert's hidden units from the dense "
        "weights' statistics); false: fresh experts",
    )
    upcycle_drop: float = option(
        None,
        "float",
        minimum=0.0,
        maximum=1.0,
        nullable=True,
        doc="with upcycle: drop, the share of each expert's hidden units re-drawn "
        "(Nakamura et al. 2025: 0.5); null: 0.5",
    )
    capacity_policy: str = option(
        "position",
        "choice",
        choices=("position", "priority"),
        doc="which pairs a full expert keeps: earlier tokens, or higher top gate "
        "score (V-MoE batch-prioritised routing)",
    )
    routing_unit: str = option(
        "token",
        "choice",
        choices=("token", "sequence"),
        doc="token: each token routed; sequence: one decision per example from its summed "
        "tokens (= summed gate logits for linear gates; Chen et al. 2022)",
    )
    activation: str = option(
        None,
        "choice",
        nullable=True,
        choices=EXPERT_ACTIVATIONS,
        doc="expert activation; swiglu / geglu: gated experts (Mixtral); null: the dense MLP's",
    )
    shared_experts: int = option(
        0,
        "int",
        minimum=0,
        maximum=MAX_EXPERTS,
        doc="always-on experts added to the routed output (DeepSeek-MoE, Qwen2-MoE)",
    )
    shared_expert_gate: bool = option(False, "bool", doc="scale the shared experts by sigmoid(x w) (Qwen2-MoE)")
    null_experts: int = option(
        0,
        "int",
        minimum=0,
        maximum=MAX_EXPERTS,
        doc="zero / copy / constant experts added to the router's pool (MoE++)",
    )
    mode: str = option(
        "replace",
        "choice",
        choices=("replace", "adapter"),
        doc="replace: MoE takes the MLP's place; adapter: x + alpha * MoE(x) after the block "
        "(bottleneck experts d -> d_hidden -> d, GELU, no bias; d_hidden null: d / 4)",
    )
    patches_only: bool = option(False, "bool", doc="adapter mode: CLS / register tokens bypass the MoE branch")
    freeze_backbone: bool = option(False, "bool", doc="train only the MoE layers (and adapter alphas) and the head")
    train_norms: bool = option(False, "bool", doc="with freeze_backbone: the LayerNorms train too")
    router_init_std: float = option(
        None,
        "float",
        minimum=0.0,
        strict=True,
        nullable=True,
        doc="draw the router's learned gate weights from N(0, std^2); null: each "
        "router's own init (README, 'Router initialisation')",
    )


@dataclass
class ExecutorConfig:
    """Where a grid's jobs run (submitit)."""

    cluster: str = option(
        "auto",
        "choice",
        choices=("auto", "local", "slurm", "debug"),
        doc="auto: SLURM when the grid sets executor.partition and sbatch answers, else local subprocesses",
    )
    partition: str = option(None, "str", nullable=True, doc="SLURM partition")
    time_min: float = option(60, "float", minimum=0.0, strict=True, doc="SLURM time limit per job, minutes")
    cpus_per_task: int = option(1, "int", minimum=1, doc="CPU cores per job")
    gpus_per_node: int = option(0, "int", minimum=0, doc="GPUs per job (one task per GPU)")
    tasks_per_node: int = option(
        None,
        "int",
        minimum=1,
        nullable=True,
        doc="data-parallel processes per job (gloo on CPU, nccl on GPU); null: one per GPU, or 1 on CPU",
    )
    mem_gb: float = option(None, "float", minimum=0.0, strict=True, nullable=True, doc="memory per job")
    array_parallelism: int = option(64, "int", minimum=1, doc="SLURM array jobs at once")
    max_workers: int = option(None, "int", minimum=1, nullable=True, doc="local jobs at once; null: from the cores")
    runs_per_job: int = option(
        1,
        "int",
        minimum=1,
        doc="runs one job trains one after the other in one process (the imports paid once; time_min is per job)",
    )
    sbatch_extra: dict = option({}, "dict", flat=True, doc="extra sbatch options, e.g. {account: ..., qos: ...}")
    max_retries: int = option(
        2, "int", minimum=0, doc="times a job killed by a signal, OOM or node loss is resumed by a rerun"
    )


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def defaults(cls) -> dict[str, Any]:
    """The section's defaults as a plain dict (fresh copies of mutable ones)."""
    return dataclasses.asdict(cls())


def first_unknown(mapping, known) -> tuple[Any, str | None] | None:
    """The first key of ``mapping`` not in ``known`` and the closest known key (or None); None when
    every key is known. The one unknown-key check: run specs (`check_keys`) and grid files
    (``moebench.grids.schema``) word their errors from it."""
    known = list(known)
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            return key, (close[0] if close else None)
    return None


def check_keys(mapping: dict, known, path: str) -> None:
    """Raise `ConfigError` for the first key not in ``known``, naming the closest known key."""
    known = list(known)
    found = first_unknown(mapping, known)
    if found:
        key, close = found
        hint = f" (did you mean {close!r}?)" if close else ""
        where = f"{path}.{key}" if path else str(key)
        raise ConfigError(where, "", key, f"{hint}; known keys here: {', '.join(known)}", unknown=True)


def expected(f: dataclasses.Field) -> str:
    """What a field admits, in words (used in every error about it)."""
    m = f.metadata
    kind = m["kind"]
    if kind in ("int", "float"):
        text = _expected_number(m)
    elif kind == "choice":
        text = "one of " + ", ".join("true" if c is True else "false" if c is False else str(c) for c in m["choices"])
    elif kind == "list":
        text = "a list of distinct values from " + ", ".join(map(str, m["choices"]))
    else:
        text = _EXPECTED[kind]
    return text + (" or null" if m["nullable"] else "")


_EXPECTED = {
    "blocks": "'all', 'last-N', 'every-N', a block index or a list of block indices",
    "dict": "a mapping",
    "bool": "true or false",
    "str": "a string",
    "indices": "a list of distinct integers >= 0",
}


def _expected_number(m) -> str:
    text = "an integer" if m["kind"] == "int" else "a finite number" if m.get("finite") else "a number"
    lo, hi = m["minimum"], m["maximum"]
    if lo is not None:
        text += f" {'>' if m['strict'] else '>='} {_num(lo)}"
    if hi is not None:
        text += f" {'and ' if lo is not None else ''}{'<' if m.get('strict_max') else '<='} {_num(hi)}"
    return text


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


class _Bad(Exception):
    """Raised by a ``_coerce_<kind>`` step: the value does not fit; `coerce` words the error."""


def coerce(f: dataclasses.Field, value, path: str):
    """``value`` checked against field ``f`` and normalised (YAML 1.1's "3e-4" strings -> numbers,
    integral floats -> ints); raises `ConfigError` naming ``path`` (and the field's ``fix``, if any)."""
    m = f.metadata
    try:
        if value is None:
            if m["nullable"]:
                return None
            raise _Bad
        return _COERCE[m["kind"]](m, value, path)
    except _Bad:
        fix = m.get("fix")
        raise ConfigError(path, expected(f), value, f"; {fix}" if fix else "") from None


def _coerce_number(m, value, path: str):
    if isinstance(value, bool):
        raise _Bad
    if isinstance(value, str):
        if not _NUMERIC_TEXT.fullmatch(value.strip()):
            raise _Bad
        value = float(value)
    if not isinstance(value, (int, float)) or value != value:  # NaN
        raise _Bad
    if m.get("finite") and value in (float("inf"), float("-inf")):
        raise _Bad
    if m["kind"] == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise _Bad
            value = int(value)
    else:
        value = float(value)
    lo, hi = m["minimum"], m["maximum"]
    if lo is not None and (value <= lo if m["strict"] else value < lo):
        raise _Bad
    if hi is not None and (value >= hi if m.get("strict_max") else value > hi):
        raise _Bad
    return value


def _coerce_bool(m, value, path: str):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    raise _Bad


def _coerce_choice(m, value, path: str):
    if isinstance(value, str) and value.lower() in ("true", "false") and True in m["choices"]:
        value = value.lower() == "true"
    if any(
        value is c or (not isinstance(c, bool) and not isinstance(value, bool) and value == c) for c in m["choices"]
    ):
        return value
    raise _Bad


def _coerce_list(m, value, path: str):
    if (
        not isinstance(value, list)
        or len(set(map(str, value))) != len(value)
        or any(not isinstance(v, str) or v not in m["choices"] for v in value)
    ):
        raise _Bad
    return list(value)


def _coerce_indices(m, value, path: str):
    if (
        not isinstance(value, (list, tuple))
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)
        or len(set(value)) != len(value)
    ):
        raise _Bad
    return list(value)


def _coerce_str(m, value, path: str):
    if isinstance(value, str) and value:
        return _no_control(value, path)
    raise _Bad


def _coerce_dict(m, value, path: str):
    if not isinstance(value, dict):
        raise _Bad
    if m.get("flat"):
        for k, v in value.items():
            where = f"{path}.{k}"
            if not isinstance(k, str) or not k:
                raise ConfigError(where, "a non-empty string key", k)
            _no_control(k, where)
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(where, "a string or a number", v)
            _no_control(str(v), where)
    return dict(value)


def _coerce_blocks(m, value, path: str):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if (
        isinstance(value, str)
        or is_int
        or (isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in value))
    ):
        return value
    raise _Bad


_COERCE = {
    "int": _coerce_number,
    "float": _coerce_number,
    "bool": _coerce_bool,
    "choice": _coerce_choice,
    "list": _coerce_list,
    "indices": _coerce_indices,
    "str": _coerce_str,
    "dict": _coerce_dict,
    "blocks": _coerce_blocks,
}


def _no_control(text: str, path: str) -> str:
    """``text`` unless it holds a newline or another control character (refused: executor strings are
    written into SLURM batch scripts, where a newline starts a new command)."""
    bad = _CONTROL.search(text)
    if bad:
        raise ConfigError(
            path, f"a string without newlines or control characters (found {bad.group()!r})", text, "; remove it"
        )
    return text


def check_section(cls, mapping: dict, path: str) -> dict:
    """The given keys of one section, checked and normalised (no defaults added)."""
    if not isinstance(mapping, dict):
        raise ConfigError(path, "a mapping", mapping)
    known = fields_of(cls)
    check_keys(mapping, known, path)
    return {k: coerce(known[k], v, f"{path}.{k}" if path else k) for k, v in mapping.items()}


class OptionError(ConfigError):
    """A bad option of a named component (a router), worded like a grid file's errors: ``<owner>:
    <path>: expected ..., got ... (<type>)[; fix]`` (a grid says ``<file>: routers[2].args.top_k: ...``)."""

    def __init__(self, owner: str, err: ConfigError):
        self.owner = owner
        super().__init__(err.path, err.expected, err.value, err.hint, err.unknown)

    def __str__(self) -> str:
        return f"{self.owner}: {self.path}: {self.describe()}"


def check_options(declared: dict[str, dataclasses.Field], values: dict, path: str) -> dict:
    """The declared options among ``values`` (a router's args), each checked against its declaration
    (`option`) and normalised; keys not declared are left out (the caller decides about them). Raises
    `ConfigError` naming ``path.<option>``. The grid validator and `Router`'s constructors both call it."""
    return {k: coerce(declared[k], v, f"{path}.{k}" if path else k) for k, v in values.items() if k in declared}


def describe_options(declared: dict[str, dataclasses.Field]) -> list[tuple[str, str, str, str]]:
    """(name, default, what it admits, doc) per declared option, for ``moebench routers --options``."""
    rows = []
    for name, f in declared.items():
        factory: Any = f.default_factory
        default = f.default if factory is dataclasses.MISSING else factory()
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((name, shown, expected(f), f.metadata.get("doc", "")))
    return rows


def resolve_section(cls, mapping: dict | None, path: str) -> dict:
    """Defaults, overridden by ``mapping``'s checked values."""
    return {**defaults(cls), **check_section(cls, mapping or {}, path)}


def check_seed(value, path: str) -> int:
    """A run seed: an integer in [0, 2**32 - 1]."""
    f = dataclasses.field(
        metadata={"kind": "int", "minimum": 0, "maximum": MAX_SEED, "strict": False, "nullable": False, "choices": ()}
    )
    return coerce(f, value, path)


PRETRAIN_DOC = (
    "a grid's `pretrain:` section: the dense model of the same architecture trained first, once per "
    "seed, that every run of the block starts from; any train key (steps required) overriding the "
    "block's train section; null: no pretraining"
)


def check_pretrain(mapping, path: str) -> dict | None:
    """A ``pretrain:`` section checked against `TrainConfig` (the pretraining run is an ordinary dense
    run with its own budget), ``steps`` required; None stays None (no pretraining)."""
    if mapping is None:
        return None
    if not isinstance(mapping, dict):
        raise ConfigError(path, "a mapping of train keys with at least `steps` (or null: no pretraining)", mapping)
    out = check_section(TrainConfig, mapping, path)
    if "steps" not in out:
        raise ConfigError(
            f"{path}.steps", "an integer >= 1 (the dense pretraining budget)", None, "; e.g. pretrain: {steps: 300}"
        )
    return out
