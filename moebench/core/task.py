"""The task adapter contract: what the one training loop (`moebench.training.train`) needs from a task.

A task turns its options into datasets (real public format, or the small offline default), a model
(dense, or MoE through `moebench.core.moefy`), a loss and an evaluation with a named headline metric.
It also labels tokens for the specialisation metric (class / tissue / ...)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Preset:
    """A task's named size: the spec sections it fills in (anything a grid or --set gives wins)."""

    task_args: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)  # MoE placement defaults (blocks, num_experts, ...)
    train: dict = field(default_factory=dict)


class Task:
    """Subclass, set the class attributes, register with ``@register_task("name")``.

    ``__init__(**options)`` takes the grid's ``task_args``; an unknown option must raise a
    ``TypeError`` naming it and the known ones (``check_options`` does that)."""

    headline: str = ""  # key of evaluate()'s dict that leaderboards rank by
    version: int = 1  # bump when a change alters this class's numbers: its runs get new ids
    higher_is_better: bool = True
    label_kind: str = "class"  # what token_labels() means: class | tissue | item | ...
    default_model: dict = {}  # model config used when the grid gives none
    # Equivalence margin δ on the headline (same units) and why: the report's TOST calls two routers
    # equivalent when the data rule out any difference beyond ±δ. None: no equivalence test.
    margin: float | None = None
    margin_reason: str = ""

    def __init__(self, **options: Any):
        self.options = options

    # -- sizes ---------------------------------------------------------------------------------------
    # size -> Preset: the offline default at that size ("tiny" for tests, "quick" for the quick grid).
    # ``moebench train --size`` and a grid's ``preset:`` read it.
    presets: dict[str, Preset] = {}

    @classmethod
    def preset(cls, size: str) -> Preset:
        """A deep copy of a named size; an unknown size names the known ones."""
        if size not in cls.presets:
            name = getattr(cls, "registry_name", cls.__name__)
            known = sorted(cls.presets) or "none (give task_args / model / train yourself)"
            raise ValueError(f"task {name!r} has no size {size!r}; sizes: {known}")
        preset = cls.presets[size]
        if not isinstance(preset, Preset):
            raise TypeError(
                f"{cls.__name__}.presets[{size!r}] must be a moebench.core.task.Preset, got {type(preset).__name__}"
            )
        return copy.deepcopy(preset)

    # -- data --------------------------------------------------------------------------------------
    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, eval) datasets; built once and cached on disk where building is slow."""
        raise NotImplementedError

    def collate_fn(self):
        """A DataLoader collate function, or None for the default."""
        return None

    # -- model -------------------------------------------------------------------------------------
    def build_model(self, model: dict, moe: dict | None) -> nn.Module:
        """The task's model from the run spec's ``model`` section; ``moe`` None means the dense
        baseline, otherwise it holds moefy's arguments (blocks, num_experts, router, router_args,
        d_hidden, capacity_factor, upcycle)."""
        raise NotImplementedError

    # -- steps -------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch) -> Any:
        """Model outputs for a batch already on the model's device."""
        raise NotImplementedError

    def loss(self, outputs, batch) -> Tensor:
        """Scalar task loss; the trainer adds the MoE layers' auxiliary losses."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, Any]:
        """Task metrics over the eval loader (name -> float); must contain ``self.headline``.

        It should also return ``"items"``: per-eval-example outputs as 1-D arrays of equal length,
        one entry per eval item, in eval-set order, among them ``"headline"``, whose mean is exactly the
        headline metric (e.g. 1/0 correct for accuracy, the absolute error for a MAE), plus any raw
        outputs worth keeping (``correct``, ``abs_error``, ``rank``). The trainer writes them to the
        run's ``eval_items.npz``; the report's paired bootstrap over eval examples reads them."""
        raise NotImplementedError

    def batch_size(self, batch) -> int:
        """Samples in a batch (for throughput)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])

    # -- specialisation ----------------------------------------------------------------------------
    label_names: list[str] = []

    def token_labels(self, batch, layer_name: str, tokens_per_sample: int) -> Tensor | None:
        """Integer label (index into ``label_names``) of every token the MoE layer ``layer_name`` saw
        for this batch, shape (batch, tokens_per_sample), -1 where a token has no label; None when
        this layer's tokens carry no label."""
        return None

    # -- helpers -----------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict, known: dict) -> dict:
        """Merge ``options`` over defaults ``known``; an unknown key is an error naming the known ones."""
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"task {getattr(cls, 'registry_name', cls.__name__)!r} got unknown option(s) {unknown}; "
                f"known options: {sorted(known)}"
            )
        return {**known, **options}
