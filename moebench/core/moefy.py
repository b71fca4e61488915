"""moefy: replace the MLPs of chosen transformer blocks by MoE layers, in place.

Supports timm ViTs (``blocks[i].mlp`` with fc1/fc2), open_clip CLIP (both towers' ``resblocks[i].mlp``
with c_fc/c_proj) and moebench's 3D ViT. Block forwards are never rewritten: the MoE layer takes the
MLP's place and whatever else it needs arrives through forward hooks (the attention output for routers
that declare ``needs_context``, token ids for the text tower), so any block that calls ``self.mlp(x)``
keeps working. Hooks are small callable objects holding the layer, so ``copy.deepcopy`` and pickling
carry them over to the copy's own layers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moebench.core.adapter import ADAPTER_ACTIVATION, MODES, AdapterHook, AdapterMoE, build_adapter_layer, prefix_tokens
from moebench.core.adapter import freeze_backbone as freeze_backbone_fn
from moebench.core.config import MoEConfig, defaults
from moebench.core.drop_upcycle import drop_generator, drop_upcycle
from moebench.core.experts import ACTIVATIONS
from moebench.core.layer import MoELayer

log = logging.getLogger(__name__)

BLOCK_FORMS = (
    "a list of block indices (0-based; negative counts from the end), 'all', 'last-N', 'first-N', "
    "or 'every-N' (blocks N-1, 2N-1, ...; 'every-2' is V-MoE's every-other placement 1, 3, 5, ...)"
)
TOWERS = ("both", "visual", "text")


class BlockRef(NamedTuple):
    """One transformer block: qualified name, the block, the attribute holding its MLP, its attention."""

    name: str
    block: nn.Module
    mlp_attr: str
    attn: nn.Module


_MOE_DEFAULTS = defaults(MoEConfig)  # the spec's defaults: moefy(model) == a spec's moe section left empty


class MoefyResult(list[str]):
    """Names of the replaced modules (each now a MoELayer); ``notes`` says where the result is not an
    exact upcycle of the dense model (fresh init, approximated activation, dropped MLP norm)."""

    notes: list[str]

    def __init__(self, names=(), notes=()):
        super().__init__(names)
        self.notes: list[str] = list(notes)


# --- block selection ----------------------------------------------------------------------------------
def select_blocks(spec, num_blocks: int, where: str = "model") -> list[int]:
    """Resolve a ``blocks`` spec to sorted block indices for a stack of ``num_blocks`` blocks."""

    def bad(why: str) -> ValueError:
        return ValueError(
            f"bad moe 'blocks' value {spec!r} for {where} with {num_blocks} blocks: {why}. "
            f"Accepted forms: {BLOCK_FORMS}"
        )

    if isinstance(spec, str):
        return _named_blocks(spec, num_blocks, bad)
    if isinstance(spec, (list, tuple)):
        return _listed_blocks(spec, num_blocks, bad)
    raise bad(f"a {type(spec).__name__} is not accepted")


def _named_blocks(spec: str, num_blocks: int, bad: Callable[[str], ValueError]) -> list[int]:
    """'all', 'last-N', 'first-N' or 'every-N'."""
    s = spec.strip().lower()
    if s == "all":
        return list(range(num_blocks))
    m = re.fullmatch(r"(last|first|every)-(\d+)", s)
    if not m:
        raise bad("unknown form")
    kind, n = m.group(1), int(m.group(2))
    if n < 1:
        raise bad("N must be >= 1")
    if kind == "every":
        out = [i for i in range(num_blocks) if i % n == n - 1]
        if not out:
            raise bad(f"no block is selected (every-{n} needs at least {n} blocks)")
        return out
    if n > num_blocks:
        raise bad(f"{kind}-{n} asks for more blocks than there are")
    return list(range(num_blocks - n, num_blocks)) if kind == "last" else list(range(n))


def _listed_blocks(spec: list | tuple, num_blocks: int, bad: Callable[[str], ValueError]) -> list[int]:
    """A list of block indices (negative counts from the end)."""
    if not spec:
        raise bad("the list is empty (for a dense model leave the moe section out instead)")
    picked: set[int] = set()
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, int):
            raise bad(f"{i!r} is not an integer index")
        if not -num_blocks <= i < num_blocks:
            raise bad(f"index {i} is out of range")
        picked.add(i % num_blocks)
    return sorted(picked)


# --- finding blocks -----------------------------------------------------------------------------------
class _Stack(NamedTuple):
    tower: str  # "visual" | "text" | "model" (a single-stack model)
    prefix: str  # qualified name of the block list
    blocks: nn.ModuleList | nn.Sequential  # the block list
    batch_first: bool  # False: blocks see (L, B, d) (open_clip with batch_first=False)
    token_embedding: nn.Module | None  # text tower: where token ids enter


def _get(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _stack(model, tower, path, token_embedding=None) -> _Stack | None:
    blocks = _get(model, path)
    if blocks is None or not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return None
    parent = _get(model, path.rsplit(".", 1)[0]) if "." in path else model
    return _Stack(tower, path, blocks, bool(getattr(parent, "batch_first", True)), token_embedding)


def _find_stacks(model: nn.Module) -> list[_Stack]:
    stacks: list[_Stack] = []
    if isinstance(getattr(model, "visual", None), nn.Module):  # open_clip CLIP / CustomTextCLIP
        for path in ("visual.transformer.resblocks", "visual.trunk.blocks", "visual.blocks"):
            if (s := _stack(model, "visual", path)) is not None:
                stacks.append(s)
                break
        for path, emb in (
            ("transformer.resblocks", "token_embedding"),
            ("text.transformer.resblocks", "text.token_embedding"),
        ):
            if (s := _stack(model, "text", path, _get(model, emb))) is not None:
                stacks.append(s)
                break
    else:
        for path in ("blocks", "resblocks", "transformer.resblocks", "trunk.blocks"):
            if (s := _stack(model, "model", path)) is not None:
                stacks.append(s)
                break
    if not stacks:
        raise ValueError(
            f"moefy found no transformer blocks in {type(model).__name__}: it supports timm ViTs "
            f"(model.blocks), open_clip CLIP (model.visual.transformer.resblocks, model.transformer.resblocks) "
            f"and moebench's vit3d (model.blocks)"
        )
    return stacks


def _select_stacks(model: nn.Module, tower: str) -> list[_Stack]:
    if tower not in TOWERS:
        raise ValueError(f"moefy tower must be one of {TOWERS}, got {tower!r}")
    stacks = _find_stacks(model)
    if tower == "both":
        return stacks
    if stacks[0].tower == "model":
        raise ValueError(
            f"moefy tower={tower!r} only applies to two-tower (CLIP) models; {type(model).__name__} has a "
            f"single block stack: leave tower at 'both'"
        )
    chosen = [s for s in stacks if s.tower == tower]
    if not chosen:
        raise ValueError(f"moefy found no {tower} tower in {type(model).__name__}; it has {[s.tower for s in stacks]}")
    return chosen


def _attention(block: nn.Module, name: str) -> nn.Module:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.Module):
        raise ValueError(f"block {name} ({type(block).__name__}) has no 'attn' module for the context hook")
    return attn


def find_blocks(model: nn.Module, tower: str = "both") -> list[BlockRef]:
    """Every transformer block moefy can act on, in order (visual tower before text for CLIP)."""
    out = []
    for s in _select_stacks(model, tower):
        for i, block in enumerate(s.blocks):
            name = f"{s.prefix}.{i}"
            if not isinstance(getattr(block, "mlp", None), nn.Module):
                raise ValueError(f"block {name} ({type(block).__name__}) has no 'mlp' module to replace")
            out.append(BlockRef(name, block, "mlp", _attention(block, name)))
    return out


# --- reading the dense MLP ----------------------------------------------------------------------------
class _Dense(NamedTuple):
    fc1: nn.Linear
    fc2: nn.Linear
    act: nn.Module | None
    extras: list[str]  # parts the experts cannot reproduce (hidden norm, dropout)


def _dense_mlp(mlp: nn.Module, name: str) -> _Dense:
    if isinstance(mlp, MoELayer):
        raise ValueError(f"{name} is already a MoELayer: moefy a model only once")
    if hasattr(mlp, "fc1_g") or hasattr(mlp, "w12"):
        raise ValueError(
            f"{name} is a gated MLP ({type(mlp).__name__}, SwiGLU-style); moefy supports "
            f"two-layer MLPs only (fc1 -> act -> fc2)"
        )
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # timm Mlp
        fc1, fc2, act = mlp.fc1, mlp.fc2, getattr(mlp, "act", None)
    elif hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # open_clip
        fc1, fc2 = mlp.c_fc, mlp.c_proj
        act = getattr(mlp, "gelu", None)
    else:
        raise ValueError(
            f"{name} ({type(mlp).__name__}) is not a recognised MLP: expected fc1/fc2 (timm) or c_fc/c_proj (open_clip)"
        )
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError(f"{name}: MLP projections must be nn.Linear, got {type(fc1).__name__}/{type(fc2).__name__}")
    if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
        raise ValueError(
            f"{name}: MLP shapes fc1 {fc1.in_features}->{fc1.out_features}, fc2 "
            f"{fc2.in_features}->{fc2.out_features} are not a d->h->d MLP (gated MLPs are not "
            f"supported)"
        )
    extras = []
    for child_name, child in mlp.named_children():
        if child is fc1 or child is fc2 or child is act:
            continue
        if isinstance(child, nn.Dropout):
            if child.p > 0:
                extras.append(f"MLP dropout p={child.p} ({child_name})")
        elif not isinstance(child, nn.Identity):
            extras.append(f"MLP {child_name} ({type(child).__name__})")
    return _Dense(fc1, fc2, act, extras)


def detect_activation(act: nn.Module | None) -> tuple[str, str | None]:
    """Name of the experts' activation matching a dense MLP's, plus a note when it is only approximate."""
    if act is None:
        raise ValueError(f"moefy could not find the MLP's activation; pass activation= one of {sorted(ACTIVATIONS)}")
    kind = type(act).__name__
    if kind == "GELU":
        return ("gelu-tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"), None
    if kind in ("GELUTanh", "GELUTanhApprox"):
        return "gelu-tanh", None
    if kind == "QuickGELU":
        if "quick-gelu" in ACTIVATIONS:
            return "quick-gelu", None
        return "gelu", (
            "the dense MLP uses QuickGELU (x*sigmoid(1.702x)), which the experts lack; they use "
            "exact GELU, so upcycled outputs differ slightly"
        )
    if kind == "ReLU":
        return "relu", None
    if kind in ("SiLU", "Swish"):
        return "silu", None
    raise ValueError(
        f"moefy cannot map the MLP activation {kind} to an expert activation; pass activation= "
        f"one of {sorted(ACTIVATIONS)}"
    )


# --- hooks --------------------------------------------------------------------------------------------
class _ContextHook:
    """Forward hook on a block's attention: its output becomes the MoE layer's ``pending_context``."""

    def __init__(self, layer: MoELayer, seq_first: bool):
        self.layer, self.seq_first = layer, seq_first

    def __call__(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output  # nn.MultiheadAttention: (out, w)
        self.layer.pending_context = out.transpose(0, 1) if self.seq_first else out


class _SeqFirstIn:
    """Pre-hook: (L, B, d) -> (B, L, d), so MoELayer's positions (seq on dim -2) stay right."""

    def __call__(self, module, args, kwargs):
        if kwargs.get("context") is not None:
            kwargs = {**kwargs, "context": kwargs["context"].transpose(0, 1)}
        return (args[0].transpose(0, 1), *args[1:]), kwargs


class _SeqFirstOut:
    def __call__(self, module, args, output):
        return output.transpose(0, 1)


class _TokenIds:
    """Forward hook on the text token embedding: remembers the ids of the current text batch."""

    def __init__(self):
        self.ids: Tensor | None = None

    def __call__(self, module, args, output):
        self.ids = args[0] if args and isinstance(args[0], Tensor) else None


class _InjectTokenIds:
    """Pre-hook on a text MoE layer: passes the remembered ids as ``token_ids`` when they line up."""

    def __init__(self, source: _TokenIds):
        self.source = source

    def __call__(self, module, args, kwargs):
        ids = self.source.ids
        if ids is None or kwargs.get("token_ids") is not None or not args:
            return None
        if tuple(ids.shape) != tuple(args[0].shape[:-1]):  # e.g. an appended cls token: no ids to give
            return None
        return args, {**kwargs, "token_ids": ids}


class _WeightDtype:
    """Stands in for open_clip's ``block.get_weight_dtype`` (it reads ``mlp.c_fc``, gone after moefy)."""

    def __init__(self, layer: MoELayer):
        self.layer = layer

    def __call__(self) -> torch.dtype:
        return (
            self.layer.experts.w1.dtype
            if hasattr(self.layer.experts, "w1")
            else next(self.layer.experts.parameters()).dtype
        )


# --- moefy --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoefyOptions:
    """moefy's keyword arguments as one object (MegaBlocks' ``Arguments`` passed whole): the steps of
    ``moefy`` take it instead of a dozen positional parameters. Fields and defaults are moefy's."""

    blocks: object = _MOE_DEFAULTS["blocks"]
    num_experts: int = _MOE_DEFAULTS["num_experts"]
    router: str = _MOE_DEFAULTS["router"]
    router_args: dict | None = None
    d_hidden: int | None = _MOE_DEFAULTS["d_hidden"]
    capacity_factor: float | None = _MOE_DEFAULTS["capacity_factor"]
    upcycle: bool | str = _MOE_DEFAULTS["upcycle"]
    upcycle_drop: float | None = _MOE_DEFAULTS["upcycle_drop"]
    activation: str | None = None
    tower: str = "both"
    shared_experts: int = _MOE_DEFAULTS["shared_experts"]
    shared_expert_gate: bool = _MOE_DEFAULTS["shared_expert_gate"]
    null_experts: int = _MOE_DEFAULTS["null_experts"]
    capacity_policy: str = _MOE_DEFAULTS["capacity_policy"]
    routing_unit: str = _MOE_DEFAULTS["routing_unit"]
    mode: str = _MOE_DEFAULTS["mode"]
    patches_only: bool = _MOE_DEFAULTS["patches_only"]
    freeze_backbone: bool = _MOE_DEFAULTS["freeze_backbone"]
    train_norms: bool = _MOE_DEFAULTS["train_norms"]
    router_init_std: float | None = _MOE_DEFAULTS["router_init_std"]

    def layer_options(self) -> dict:
        """The MoELayer keyword arguments that replace and adapter mode share."""
        return {
            "shared_experts": self.shared_experts,
            "shared_expert_gate": self.shared_expert_gate,
            "null_experts": self.null_experts,
            "capacity_policy": self.capacity_policy,
            "router_init_std": self.router_init_std,
        }


def moefy(  # noqa: PLR0913  # the public keyword signature: a spec's moe section, spelled out
    model: nn.Module,
    blocks=_MOE_DEFAULTS["blocks"],
    num_experts: int = _MOE_DEFAULTS["num_experts"],
    router: str = _MOE_DEFAULTS["router"],
    router_args: dict | None = None,
    d_hidden: int | None = _MOE_DEFAULTS["d_hidden"],
    capacity_factor: float | None = _MOE_DEFAULTS["capacity_factor"],
    upcycle: bool | str = _MOE_DEFAULTS["upcycle"],
    upcycle_drop: float | None = _MOE_DEFAULTS["upcycle_drop"],
    activation: str | None = None,
    tower: str = "both",
    shared_experts: int = _MOE_DEFAULTS["shared_experts"],
    shared_expert_gate: bool = _MOE_DEFAULTS["shared_expert_gate"],
    null_experts: int = _MOE_DEFAULTS["null_experts"],
    capacity_policy: str = _MOE_DEFAULTS["capacity_policy"],
    routing_unit: str = _MOE_DEFAULTS["routing_unit"],
    mode: str = _MOE_DEFAULTS["mode"],
    patches_only: bool = _MOE_DEFAULTS["patches_only"],
    freeze_backbone: bool = _MOE_DEFAULTS["freeze_backbone"],
    train_norms: bool = _MOE_DEFAULTS["train_norms"],
    router_init_std: float | None = _MOE_DEFAULTS["router_init_std"],
) -> MoefyResult:
    """Replace the MLPs of the chosen blocks (``blocks`` applied per tower) by MoELayers, in place.

    Returns the replaced modules' names (``model.get_submodule(name)`` is the MoELayer) with ``.notes``.
    ``d_hidden`` None keeps the dense MLP width; ``upcycle`` copies the dense MLP into every expert
    (only possible at the dense width; otherwise experts start fresh and a note says so); ``"drop"``
    then re-draws a share ``upcycle_drop`` (None: 0.5) of each expert's hidden units
    (Drop-Upcycling, ``moebench.core.drop_upcycle``).
    ``mode="adapter"`` keeps the MLPs and adds a residual MoE branch after each chosen block instead
    (``moebench.core.adapter``; the names returned are then ``<block>.moe_adapter.moe``);
    ``freeze_backbone`` leaves only the MoE layers and the head trainable."""
    args = {k: v for k, v in locals().items() if k != "model"}  # every keyword argument, by its name
    return _moefy(model, MoefyOptions(**args))


def _moefy(model: nn.Module, opts: MoefyOptions) -> MoefyResult:
    """``moefy`` with its options as one object: check them, then replace (or add adapters)."""
    if opts.mode not in MODES:
        raise ValueError(f"moefy mode must be one of {MODES}, got {opts.mode!r}")
    if opts.mode == "adapter" and opts.routing_unit != "token":
        raise ValueError("moefy routing_unit='sequence' applies to mode='replace' only; set routing_unit: token")
    if opts.mode == "adapter":
        return _moefy_adapter(model, opts)
    _check_replace_options(opts)
    # Plan and build everything first, so a bad argument leaves the model untouched.
    notes: dict[str, list[str]] = {}
    built = []
    for s, i, block, name, mlp, dense in _plan_replace(model, opts):
        layer, layer_notes = _build_layer(dense, name, opts)
        for note in layer_notes:
            notes.setdefault(note, []).append(f"{name}.mlp")
        _place_like(layer, dense, mlp)
        built.append((s, i, block, name, layer))
    names = MoefyResult()
    for s, i, block, name, layer in built:
        _install(s, i, block, name, layer)
        names.append(f"{name}.mlp")
    for note, places in notes.items():
        shown = ", ".join(places[:4]) + (f" and {len(places) - 4} more" if len(places) > 4 else "")
        names.notes.append(f"{note} ({shown})")
    for note in names.notes:
        log.warning("moefy: %s", note)
    if opts.freeze_backbone:
        _freeze(model, opts.train_norms)
    return names


def _check_replace_options(opts: MoefyOptions) -> None:
    """The options replace mode refuses (before anything is built)."""
    d_hidden, upcycle, upcycle_drop, activation = opts.d_hidden, opts.upcycle, opts.upcycle_drop, opts.activation
    if opts.patches_only:
        raise ValueError(
            "moefy patches_only=True applies to mode='adapter' only (a replaced MLP must process "
            "every token); set mode: adapter or patches_only: false"
        )
    if d_hidden is not None and (isinstance(d_hidden, bool) or not isinstance(d_hidden, int) or d_hidden < 1):
        raise ValueError(f"moefy d_hidden must be a positive integer or None (the dense MLP width), got {d_hidden!r}")
    if not isinstance(upcycle, bool) and upcycle != "drop":
        raise ValueError(f"moefy upcycle must be true, false or 'drop' (Drop-Upcycling), got {upcycle!r}")
    if upcycle_drop is not None and upcycle != "drop":
        raise ValueError(
            f"moefy upcycle_drop={upcycle_drop!r} applies only with upcycle='drop' (got "
            f"upcycle={upcycle!r}); set moe.upcycle: drop or remove moe.upcycle_drop"
        )
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"moefy activation must be None (detect from the MLP) or one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )


def _plan_replace(model: nn.Module, opts: MoefyOptions) -> list:
    """(stack, index, block, name, mlp, dense view) of every block to replace; refuses a block without an MLP."""
    plan = []
    for s in _select_stacks(model, opts.tower):
        where = f"the {s.tower} tower" if s.tower != "model" else type(model).__name__
        for i in select_blocks(opts.blocks, len(s.blocks), where=where):
            block, name = s.blocks[i], f"{s.prefix}.{i}"
            mlp = getattr(block, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise ValueError(f"block {name} ({type(block).__name__}) has no 'mlp' module to replace")
            plan.append((s, i, block, name, mlp, _dense_mlp(mlp, f"{name}.mlp")))
    return plan


def _build_layer(dense: _Dense, name: str, opts: MoefyOptions) -> tuple[MoELayer, list[str]]:
    """The MoELayer taking ``dense``'s place (upcycled when asked and possible), with its notes."""
    width, d_model = dense.fc1.out_features, dense.fc1.in_features
    hidden = width if opts.d_hidden is None else opts.d_hidden
    layer_notes = []
    if opts.activation is None:
        act_name, act_note = detect_activation(dense.act)
        if act_note:
            layer_notes.append(act_note)
    else:
        act_name = opts.activation
    layer = MoELayer(
        d_model,
        hidden,
        opts.num_experts,
        router=opts.router,
        router_args=opts.router_args,
        capacity_factor=opts.capacity_factor,
        activation=act_name,
        routing_unit=opts.routing_unit,
        **opts.layer_options(),
    )
    if opts.upcycle:
        layer_notes += _upcycle(layer, dense, name, act_name, hidden, opts)
    return layer, layer_notes


def _upcycle(layer: MoELayer, dense: _Dense, name: str, act_name: str, hidden: int, opts: MoefyOptions) -> list[str]:
    """Copy the dense MLP into the experts (or Drop-Upcycle it); the notes where it cannot be exact."""
    width, activation = dense.fc1.out_features, opts.activation
    if getattr(layer.experts, "gated", False):
        return [
            f"upcycle skipped: {act_name} experts are gated and the dense MLP is not, so experts start from fresh init"
        ]
    if hidden != width:
        return [
            f"upcycle skipped: d_hidden={hidden} differs from the dense MLP width {width}, "
            f"so experts start from fresh init"
        ]
    if not hasattr(layer.experts, "load_dense"):
        return [f"upcycle skipped: {type(layer.experts).__name__} has no load_dense, so experts start from fresh init"]
    if opts.upcycle == "drop":
        _drop_upcycle(layer, dense, 0.5 if opts.upcycle_drop is None else opts.upcycle_drop, name)
        return []
    layer.experts.load_dense(*_dense_weights(dense))
    notes = []
    if activation is not None and dense.act is not None and activation != detect_activation(dense.act)[0]:
        notes.append(f"upcycled experts use activation {activation!r}, not the dense MLP's {type(dense.act).__name__}")
    return notes + [f"upcycled experts omit the {extra}" for extra in dense.extras]


def _place_like(layer: MoELayer, dense: _Dense, mlp: nn.Module) -> None:
    """The layer on the dense MLP's device, its experts in its dtype, in its train/eval mode."""
    device, dtype = dense.fc1.weight.device, dense.fc1.weight.dtype
    layer.to(device)
    if dtype != torch.float32 and dtype.is_floating_point:
        layer.experts.to(dtype)  # the router stays float32: it computes in float32 by contract
    layer.train(mlp.training)


def _install(s: _Stack, i: int, block: nn.Module, name: str, layer: MoELayer) -> None:
    """Put ``layer`` in the block's MLP slot and hook in what it needs (layout, context, token ids)."""
    block.mlp = layer
    layer.tower, layer.block_index = s.tower, i  # type: ignore[assignment]  # for adapters: which tower / block a layer sits in
    if not s.batch_first:
        layer.register_forward_pre_hook(_SeqFirstIn(), with_kwargs=True)
        layer.register_forward_hook(_SeqFirstOut())
    if layer.router.needs_context:
        _attention(block, name).register_forward_hook(_ContextHook(layer, seq_first=not s.batch_first))
    if s.token_embedding is not None:
        source = getattr(s.token_embedding, "_moefy_token_ids", None)
        if source is None:
            source = _TokenIds()
            s.token_embedding.register_forward_hook(source)
            s.token_embedding._moefy_token_ids = source  # type: ignore[assignment]
        layer.register_forward_pre_hook(_InjectTokenIds(source), with_kwargs=True)
    if callable(getattr(block, "get_weight_dtype", None)):
        block.get_weight_dtype = _WeightDtype(layer)  # type: ignore[assignment]


def _dense_weights(dense: _Dense) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The dense MLP's fc1 / fc2 weights and biases, float32, nn.Linear layout (out, in)."""
    return (
        dense.fc1.weight.detach().float(),
        None if dense.fc1.bias is None else dense.fc1.bias.detach().float(),
        dense.fc2.weight.detach().float(),
        None if dense.fc2.bias is None else dense.fc2.bias.detach().float(),
    )


def _drop_upcycle(layer: MoELayer, dense: _Dense, ratio: float, name: str) -> None:
    """Drop-Upcycling: every expert the dense MLP with its own share ``ratio`` of hidden units re-drawn."""
    if not hasattr(layer.experts, "load_experts"):
        raise ValueError(
            f"moe.upcycle: drop needs experts with per-expert loading; {type(layer.experts).__name__} "
            f"(in {name}) has no load_experts: use moe.upcycle: true"
        )
    fc1_w, fc1_b, fc2_w, fc2_b = _dense_weights(dense)
    h, d = fc1_w.shape
    b1 = fc1_b if fc1_b is not None else fc1_w.new_zeros(h)
    b2 = fc2_b if fc2_b is not None else fc2_w.new_zeros(d)
    (w1, b1e, w2, b2e), _ = drop_upcycle(fc1_w.t(), b1, fc2_w.t(), b2, layer.num_experts, ratio, drop_generator(name))
    layer.experts.check_dense_shapes(fc1_w, fc2_w)
    layer.experts.load_experts(w1, b1e, w2, b2e)


def _moefy_adapter(model: nn.Module, opts: MoefyOptions) -> MoefyResult:
    """Adapter mode: a residual MoE branch (``moe_adapter``) after each chosen block, hooked in."""
    if opts.upcycle:
        raise ValueError(
            "moefy upcycle=True needs mode='replace': an adapter branch has no dense MLP to copy "
            "(it starts fresh; with alpha = 1 and a frozen backbone that is EMoE's setting)"
        )
    if opts.activation is not None and opts.activation != ADAPTER_ACTIVATION:
        raise ValueError(
            f"adapter experts use {ADAPTER_ACTIVATION!r} (EMoE's bottleneck); got activation={opts.activation!r}"
        )
    plan = []
    for s in _select_stacks(model, opts.tower):
        where = f"the {s.tower} tower" if s.tower != "model" else type(model).__name__
        prefix = prefix_tokens(model, s.tower) if opts.patches_only else 0
        for i in select_blocks(opts.blocks, len(s.blocks), where=where):
            block, name = s.blocks[i], f"{s.prefix}.{i}"
            if hasattr(block, "moe_adapter"):
                raise ValueError(f"{name} already has a moe_adapter: moefy a model only once")
            d_model = _block_width(block, name)
            layer = build_adapter_layer(
                d_model,
                opts.d_hidden,
                opts.num_experts,
                opts.router,
                opts.router_args,
                opts.capacity_factor,
                **opts.layer_options(),
            )
            plan.append((s, i, block, name, AdapterMoE(layer, prefix, seq_first=not s.batch_first)))
    names = MoefyResult()
    for s, i, block, name, adapter in plan:
        ref = next(iter(block.parameters()), None)
        if ref is not None:
            adapter.to(ref.device)
        adapter.train(block.training)
        block.moe_adapter = adapter
        layer = adapter.moe
        layer.tower, layer.block_index = s.tower, i  # type: ignore[assignment]
        block.register_forward_hook(AdapterHook(adapter))
        if layer.router.needs_context:
            _attention(block, name).register_forward_hook(_ContextHook(layer, seq_first=False))
        names.append(f"{name}.moe_adapter.moe")
    if opts.freeze_backbone:
        _freeze(model, opts.train_norms)
    return names


def _block_width(block: nn.Module, name: str) -> int:
    mlp = getattr(block, "mlp", None)
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "c_fc", None)
    if isinstance(fc1, nn.Linear):
        return fc1.in_features
    if isinstance(mlp, MoELayer):
        return mlp.d_model
    raise ValueError(f"block {name} ({type(block).__name__}): cannot tell its width (no mlp.fc1 / mlp.c_fc)")


def _freeze(model: nn.Module, train_norms: bool) -> None:
    trainable = freeze_backbone_fn(model, train_norms)
    log.info("moefy: frozen backbone, %d parameters train", trainable)
