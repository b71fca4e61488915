"""Dense backbones from a model config: timm ViTs, open_clip CLIP, and a small 3D ViT for volumes.

One config dict per run (the grid's ``model`` section) so every task builds models the same way; MoE is
added afterwards by ``moebench.core.moefy``. Weights come from a local file (``pretrained: /path``) or, where
the machine has network, from the timm / open_clip hubs (``pretrained: true`` or a hub tag).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

FAMILIES = ("timm", "open_clip", "vit3d")
COMMON_KEYS = ("family", "name", "pretrained", "pretrained_strict")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


# --- checkpoints ------------------------------------------------------------------------------------------
def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(value)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from a local file: a bare state dict, or one under 'state_dict' / 'model'; a
    DataParallel 'module.' prefix is removed."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model 'pretrained' checkpoint {path!r} does not exist; give the path of a local weights file"
        )
    obj: Any
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"cannot read checkpoint {path!r} as tensors ({type(err).__name__}: {err}); save "
                f"a plain state dict instead: torch.save(model.state_dict(), path)"
            ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(
            f"checkpoint {path!r} holds no state dict (expected name -> tensor, possibly under 'state_dict' or 'model')"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load local weights. Strict: any missing, unexpected or mis-shaped key is an error listing them.
    Non-strict: load the keys whose names and shapes match, warn about the rest (e.g. a new head)."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        detail = (
            f"missing keys ({len(missing)}): {_short(missing)}; unexpected keys ({len(unexpected)}): "
            f"{_short(unexpected)}; shape mismatches ({len(mismatched)}): "
            + _short([f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched])
        )
        if strict:
            raise ValueError(
                f"checkpoint {path!r} does not match the {type(model).__name__} model: {detail}. "
                f"Check the model config (name, sizes), or set 'pretrained_strict: false' to load "
                f"only the matching keys"
            )
        warnings.warn(f"non-strict load of {path!r} skipped keys: {detail}", stacklevel=2)
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    return model


def _hub_error(what: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not get pretrained weights for {what} from the hub ({type(err).__name__}: {err}). If this "
        f"machine has no network: download the weights on a machine with network access and pass "
        f"'pretrained: /path/to/file' (a local state dict) in the model config."
    )


# --- families -----------------------------------------------------------------------------------------
def _split(cfg: dict) -> tuple[dict, dict]:
    return {k: cfg[k] for k in COMMON_KEYS if k in cfg}, {k: v for k, v in cfg.items() if k not in COMMON_KEYS}


def _timm(cfg: dict, pretrained) -> tuple[nn.Module, str | None]:
    """(model, local checkpoint to load): a string that looks like a path is local, else a hub tag."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    common, kwargs = _split(cfg)
    name = common.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "timm model config needs 'name': a timm model name (e.g. 'vit_tiny_patch16_224') or "
            "'vit-custom' with VisionTransformer kwargs (img_size, patch_size, embed_dim, depth, ...)"
        )
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if name == "vit-custom":
        if pretrained is True:
            raise ValueError("model 'vit-custom' has no hub weights; set 'pretrained' to a local checkpoint path")
        try:
            return VisionTransformer(**kwargs), pretrained
        except TypeError as err:
            raise TypeError(f"timm model config for 'vit-custom' has a key VisionTransformer rejects: {err}") from err
    hub = pretrained is True or (isinstance(pretrained, str) and not _is_path(pretrained))
    full = f"{name}.{pretrained}" if isinstance(pretrained, str) and hub else name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"unknown timm model {name!r}; similar names: {close}. Or use name 'vit-custom' with "
            f"VisionTransformer kwargs"
        )
    try:
        return timm.create_model(full, pretrained=hub, **kwargs), (None if hub else pretrained)
    except TypeError as err:
        raise TypeError(f"timm model config for {name!r} has a key timm rejects: {err}") from err
    except (OSError, ConnectionError) as err:
        raise _hub_error(f"timm model {full!r}", err) from err
    except RuntimeError as err:
        if hub and ("download" in str(err).lower() or "pretrained" in str(err).lower()):
            raise _hub_error(f"timm model {full!r}", err) from err
        raise


def _dataclass_cfg(cls, value, key: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"open_clip model config {key!r} must be a dict of {cls.__name__} fields, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"open_clip model config {key!r} has unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


def _open_clip(cfg: dict, pretrained) -> tuple[nn.Module, str | None]:
    import open_clip

    common, kwargs = _split(cfg)
    name = common.get("name")
    custom = name in (None, "custom", "clip-custom")
    if custom:
        return _custom_clip(kwargs, pretrained), pretrained
    if "vision_cfg" in kwargs or "text_cfg" in kwargs:
        raise ValueError(
            f"open_clip model config gives both name {name!r} and vision_cfg/text_cfg: use a named "
            f"model, or name 'custom' with embed_dim, vision_cfg and text_cfg"
        )
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ValueError(
            f"unknown open_clip model {name!r}; close names: {close} (open_clip.list_models() lists "
            f"all), or name 'custom' with embed_dim, vision_cfg and text_cfg"
        )
    tag = None
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise ValueError(f"open_clip model {name!r} has no hub weights; set 'pretrained' to a local path")
        tag = "openai" if "openai" in tags else tags[0]
    elif isinstance(pretrained, str) and not _is_path(pretrained):
        tag = pretrained
    try:
        model = open_clip.create_model(name, pretrained=tag, **kwargs)
    except TypeError as err:
        raise TypeError(f"open_clip model config has a key open_clip.create_model rejects: {err}") from err
    except (OSError, ConnectionError, RuntimeError) as err:
        if tag is None:
            raise
        raise _hub_error(f"open_clip model {name!r} tag {tag!r}", err) from err
    return model, (None if tag else pretrained)


def _custom_clip(kwargs: dict, pretrained) -> nn.Module:
    """open_clip.CLIP from embed_dim, vision_cfg and text_cfg (checked: known fields, at least one head)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in kwargs]
    if missing:
        raise ValueError(
            f"custom open_clip model config lacks {missing}: give 'embed_dim', 'vision_cfg' and "
            f"'text_cfg', or 'name' of an open_clip model (e.g. 'ViT-B-32')"
        )
    if pretrained is True:
        raise ValueError("a custom open_clip model has no hub weights; set 'pretrained' to a local checkpoint path")
    vision = _dataclass_cfg(CLIPVisionCfg, kwargs.pop("vision_cfg"), "vision_cfg")
    text = _dataclass_cfg(CLIPTextCfg, kwargs.pop("text_cfg"), "text_cfg")
    for tower, c in (("vision_cfg", vision), ("text_cfg", text)):
        hw = getattr(c, "head_width", None)
        heads = c.width // hw if hw else getattr(c, "heads", 1)
        if heads < 1:
            raise ValueError(
                f"open_clip {tower}: width {c.width} < head_width {hw} gives 0 heads; set "
                f"head_width to a divisor of width"
            )
    try:
        return open_clip.CLIP(kwargs.pop("embed_dim"), vision, text, **kwargs)
    except TypeError as err:
        raise TypeError(f"open_clip model config has a key open_clip.CLIP rejects: {err}") from err


# --- 3D ViT -------------------------------------------------------------------------------------------
def _triple(value, key: str) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"vit3d {key} must be a positive int or three positive ints (D, H, W), got {value!r}")
    return tuple(value)


def _vit3d_sizes(
    img_size, patch_size, global_pool: str, embed_dim: int, depth: int, num_heads: int, in_chans: int, num_outputs: int
) -> tuple[tuple, tuple]:
    """ViT3D's arguments checked; the volume and patch sizes as (D, H, W)."""
    if global_pool not in ("token", "avg"):
        raise ValueError(
            f"vit3d global_pool must be 'token' (cls token) or 'avg' (mean of patch tokens), got {global_pool!r}"
        )
    sizes, patches = _triple(img_size, "img_size"), _triple(patch_size, "patch_size")
    for d, (s, p) in enumerate(zip(sizes, patches)):
        if s % p:
            raise ValueError(
                f"vit3d img_size {sizes} is not divisible by patch_size {patches} "
                f"(axis {d}); choose a patch size that divides the volume"
            )
    for key, v in (
        ("embed_dim", embed_dim),
        ("depth", depth),
        ("num_heads", num_heads),
        ("in_chans", in_chans),
        ("num_outputs", num_outputs),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"vit3d {key} must be a positive integer, got {v!r}")
    if embed_dim % num_heads:
        raise ValueError(f"vit3d embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    return sizes, patches


class ViT3D(nn.Module):
    """ViT on volumes (B, C, D, H, W): Conv3d patches, cls token, learned positions, timm ``Block`` s
    (so moefy sees ``model.blocks`` like a timm ViT), a linear head on the cls token."""

    def __init__(
        self,
        img_size,
        patch_size,
        embed_dim: int,
        depth: int,
        num_heads: int,
        in_chans: int = 1,
        mlp_ratio: float = 4.0,
        num_outputs: int = 1,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
    ):
        super().__init__()
        self.img_size, self.patch_size = _vit3d_sizes(
            img_size, patch_size, global_pool, embed_dim, depth, num_heads, in_chans, num_outputs
        )
        self.global_pool = global_pool
        from timm.models.vision_transformer import Block

        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]  # timm takes any callable
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_outputs)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x: Tensor) -> Tensor:
        """Token features (B, 1 + patches, d) after the final norm; token 0 is the cls token."""
        if x.dim() != 5 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"vit3d expects input (B, {self.in_chans}, {', '.join(map(str, self.img_size))}), got {tuple(x.shape)}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.forward_features(x)
        return self.head(tokens[:, 1:].mean(1) if self.global_pool == "avg" else tokens[:, 0])


VIT3D_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_outputs",
    "qkv_bias",
    "drop_path_rate",
    "global_pool",
)


def _vit3d(cfg: dict, pretrained) -> tuple[nn.Module, str | None]:
    _, kwargs = _split(cfg)
    unknown = sorted(set(kwargs) - set(VIT3D_KEYS))
    if unknown:
        raise ValueError(f"vit3d model config has unknown key(s) {unknown}; known: {list(VIT3D_KEYS)}")
    missing = [k for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads") if k not in kwargs]
    if missing:
        raise ValueError(
            f"vit3d model config lacks {missing} (also accepted: in_chans=1, mlp_ratio=4, "
            f"num_outputs=1, qkv_bias, drop_path_rate)"
        )
    if pretrained is True:
        raise ValueError("vit3d has no hub weights; set 'pretrained' to a local checkpoint path")
    return ViT3D(**kwargs), pretrained


_BUILDERS = {"timm": _timm, "open_clip": _open_clip, "vit3d": _vit3d}


def build_model(cfg: dict) -> nn.Module:
    """The dense model a config describes, with local or hub weights when ``pretrained`` is set."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model config must be a dict with a 'family' key, got {cfg!r}")
    family = cfg.get("family")
    if family not in _BUILDERS:
        raise ValueError(f"model config 'family' must be one of {list(FAMILIES)}, got {family!r}")
    pretrained = cfg.get("pretrained")
    if pretrained is False:
        pretrained = None
    if pretrained is not None and not isinstance(pretrained, (bool, str, os.PathLike)):
        raise ValueError(
            f"model config 'pretrained' must be a local checkpoint path, true (hub weights) or a hub "
            f"tag, got {pretrained!r}"
        )
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    strict = cfg.get("pretrained_strict", True)
    if not isinstance(strict, bool):
        raise ValueError(f"model config 'pretrained_strict' must be true or false, got {strict!r}")
    model, local = _BUILDERS[family](cfg, pretrained)
    if local is not None:
        load_checkpoint(model, local, strict=strict)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
