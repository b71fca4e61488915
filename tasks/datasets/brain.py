"""Brain-age data: T1-weighted volumes with ages, from a BIDS folder (real format) or a synthetic
cohort generated from the MNI152 template and tissue maps that nilearn ships (the offline default).

Everything lands on one grid: a cube of ``shape``^3 voxels around the MNI152 brain (``mni_grid``), so
the template's tissue labels (background / grey matter / white matter / CSF) line up with every
MNI-space volume and label each 3D patch for the specialisation metric (``patch_tissue_labels``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .cache import cached

TISSUE_NAMES = ["background", "grey matter", "white matter", "CSF"]
BRAIN_VERSION = "1"


class BrainAgeDataset(Dataset):
    """Items ``(volume float (1, S, S, S), age float scalar, tissue long (S, S, S))``; ``tissue`` holds
    indices into ``TISSUE_NAMES`` per voxel, -1 where unknown (native-space volumes).
    ``participant_ids`` names each item; ``skipped`` maps a participant / file to why it was left out."""

    def __init__(
        self,
        volumes: Tensor,
        ages: Tensor,
        tissue: Tensor,
        participant_ids: Sequence[str],
        skipped: dict[str, str] | None = None,
    ):
        if not (len(volumes) == len(ages) == len(tissue) == len(participant_ids)):
            raise ValueError("volumes, ages, tissue and participant_ids must have the same length")
        self.volumes, self.ages, self.tissue = volumes.float(), ages.float(), tissue
        self.participant_ids, self.skipped = list(participant_ids), dict(skipped or {})
        self.tissue_names = TISSUE_NAMES

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, i: int):
        return self.volumes[i], self.ages[i], self.tissue[i].long()

    def subset(self, idx: Sequence[int] | Tensor) -> BrainAgeDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return BrainAgeDataset(
            self.volumes[idx],
            self.ages[idx],
            self.tissue[idx],
            [self.participant_ids[i] for i in idx.tolist()],
            self.skipped,
        )


# ------------------------------------------------------------------------------------------------
# grid, template, labels
# ------------------------------------------------------------------------------------------------
@cache
def _mni_images():
    from nilearn import datasets

    return (
        datasets.load_mni152_gm_template(resolution=2),
        datasets.load_mni152_wm_template(resolution=2),
        datasets.load_mni152_brain_mask(resolution=2),
    )


def mni_grid(shape: int, margin_mm: float = 4.0) -> np.ndarray:
    """4x4 RAS affine of a ``shape``^3 grid covering the MNI152 brain mask's bounding box, padded to a
    cube (isotropic voxels, so patches are cubes in millimetres too)."""
    mask = _mni_images()[2]
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0)
    corners = np.stack([ijk.min(0), ijk.max(0)]).astype(float)
    xyz = corners @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    lo, hi = xyz.min(0), xyz.max(0)
    side = float((hi - lo).max()) + 2 * margin_mm
    vox = side / shape
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = (lo + hi) / 2 - side / 2 + vox / 2
    return affine


def _resample(img, affine: np.ndarray, shape: int, interpolation: str = "continuous") -> np.ndarray:
    from nilearn.image import resample_img

    out = resample_img(
        img,
        target_affine=affine,
        target_shape=(shape,) * 3,
        interpolation=interpolation,
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(out.get_fdata(), dtype=np.float32)


def _half_grid(affine: np.ndarray) -> np.ndarray:
    """Affine of the grid with twice the voxels per axis whose 2x2x2 blocks average onto ``affine``."""
    fine = affine.copy()
    fine[:3, :3] /= 2
    fine[:3, 3] -= np.diag(affine)[:3] / 4
    return fine


@lru_cache(maxsize=4)
def mni_tissue_maps(shape: int) -> np.ndarray:
    """Probabilities (4, 2S, 2S, 2S) of [background, GM, WM, CSF] on the working grid (twice ``shape``)
    of ``mni_grid(shape)``; CSF is the brain mask minus GM and WM (nilearn ships no CSF map)."""
    gm_img, wm_img, mask_img = _mni_images()
    fine = _half_grid(mni_grid(shape))
    gm, wm = (np.clip(_resample(im, fine, 2 * shape), 0, 1) for im in (gm_img, wm_img))
    with warnings.catch_warnings():  # linear on the binary mask is wanted: it gives partial-volume fractions
        warnings.filterwarnings("ignore", message="Resampling binary images")
        brain = np.clip(_resample(mask_img, fine, 2 * shape, "linear"), 0, 1)
    gm, wm = gm * brain, wm * brain
    total = gm + wm
    over = total > brain
    gm[over], wm[over] = (gm[over] / total[over] * brain[over]), (wm[over] / total[over] * brain[over])
    csf = np.clip(brain - gm - wm, 0, 1)
    return np.stack([1 - brain, gm, wm, csf]).astype(np.float32)


def _pool(x: np.ndarray | Tensor) -> Tensor:
    """2x2x2 block mean (the fine working grid onto the output grid), over the last three axes."""
    t = torch.as_tensor(x, dtype=torch.float32)
    lead = t.shape[:-3]
    return F.avg_pool3d(t.reshape(-1, 1, *t.shape[-3:]), 2).reshape(*lead, *(s // 2 for s in t.shape[-3:]))


def _labels(maps: Tensor, mask: Tensor) -> Tensor:
    """Background outside the brain mask, else the most probable of GM / WM / CSF (maps (..., 3, D, H, W))."""
    tissue = maps.movedim(-4, -1).argmax(-1) + 1  # channel last: a fast contiguous argmax
    return torch.where(mask, tissue, 0).to(torch.int8)


def template_tissue_labels(shape: int = 32) -> Tensor:
    """Per-voxel tissue label (index into ``TISSUE_NAMES``) of the MNI152 maps on ``mni_grid(shape)``:
    background outside the brain (brain probability <= 0.5), else argmax of GM / WM / CSF. int8 (S, S, S)."""
    maps = _pool(mni_tissue_maps(shape))
    return _labels(maps[1:], maps[0] < 0.5)


def patch_tissue_labels(tissue_volume: Tensor, patch_size: int) -> Tensor:
    """Majority tissue label of each cubic patch, patches in a 3D ViT's row-major (d, h, w) order
    (Conv3d patch embedding then flatten). -1 voxels (unknown) count as a label of their own, so a patch
    of unknown tissue stays -1; ties go to the lower label. (D, H, W) -> (P,), (B, D, H, W) -> (B, P)."""
    t = torch.as_tensor(tissue_volume).long()
    squeeze = t.dim() == 3
    if t.dim() not in (3, 4):
        raise ValueError(f"tissue volume must be (D, H, W) or (B, D, H, W), got shape {tuple(t.shape)}")
    t = t.view(-1, *t.shape[-3:])
    B, D, H, W = t.shape
    p = patch_size
    if D % p or H % p or W % p:
        raise ValueError(f"patch size {p} does not divide the volume shape {(D, H, W)}")
    if t.min() < -1 or t.max() >= len(TISSUE_NAMES):
        raise ValueError(f"tissue labels must be in -1..{len(TISSUE_NAMES) - 1}")
    blocks = t.view(B, D // p, p, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, p**3)
    counts = F.one_hot(blocks + 1, len(TISSUE_NAMES) + 1).sum(2)  # (B, P, 5): unknown, bg, gm, wm, csf
    out = counts.argmax(-1) - 1
    return out[0] if squeeze else out


def normalise_intensity(vol: np.ndarray | Tensor, mask=None) -> Tensor:
    """Scale so the 99th percentile of foreground voxels (``mask``, default: voxels > 0) is 1; negatives
    (interpolation undershoot) become 0. Robust to scanner gain and to a few bright outliers."""
    v = torch.as_tensor(vol, dtype=torch.float32).clamp_min(0)
    fg = v[mask] if mask is not None else v[v > 0]
    if fg.numel() == 0:
        raise ValueError("volume has no foreground voxel (all values <= 0)")
    return v / torch.quantile(fg[:: max(1, fg.numel() // 100000)], 0.99).clamp_min(1e-8)


# ------------------------------------------------------------------------------------------------
# real format: BIDS
# ------------------------------------------------------------------------------------------------
def read_participants(path: Path):
    """participants.tsv -> pandas DataFrame with participant_id (``sub-`` prefixed) and numeric age."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a BIDS dataset needs participants.tsv at its root with "
            f"tab-separated columns participant_id and age"
        )
    try:
        df = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
    except Exception as e:  # noqa: BLE001 - pandas raises several parser errors
        raise ValueError(f"cannot parse {path} as a tab-separated table: {e}") from None
    missing = [c for c in ("participant_id", "age") if c not in df.columns]
    if missing:
        hint = (
            " (the file has a single column: is it comma- rather than tab-separated?)" if len(df.columns) == 1 else ""
        )
        raise ValueError(
            f"{path} lacks column(s) {missing}; columns present: {list(df.columns)}{hint}. "
            f"Add them (participant_id like sub-01, age in years)"
        )
    df = df[["participant_id", "age"]].copy()
    df["participant_id"] = [p if str(p).startswith("sub-") else f"sub-{p}" for p in df["participant_id"]]
    dup = df["participant_id"][df["participant_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path} lists participant(s) {dup[:5]} more than once")
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    return df


def _find_t1w(root: Path, pid: str) -> list[Path]:
    return sorted((root / pid).glob("anat/*_T1w.nii*")) + sorted((root / pid).glob("ses-*/anat/*_T1w.nii*"))


def load_t1w(path: Path, affine: np.ndarray | None, shape: int) -> np.ndarray:
    """Read a T1w NIfTI with nibabel and resample it (nilearn) onto ``affine`` (an MNI grid), or, with
    ``affine`` None, onto a cube around its own foreground in RAS orientation (native space).
    Smooths to the target voxel size first, so downsampling does not alias."""
    import nibabel as nib
    from nilearn.image import smooth_img

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(), dtype=np.float32)  # type: ignore[attr-defined]  # nibabel: a NIfTI image
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a bad file
        raise ValueError(
            f"cannot read NIfTI file {path}: {type(e).__name__}: {e}. Re-download or re-export "
            f"the file, or remove it from the dataset"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D T1w volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data)
    img = nib.Nifti1Image(data, img.affine)  # type: ignore[attr-defined]  # as above
    if affine is None:
        img = nib.as_closest_canonical(img)
        d = np.asarray(img.dataobj)
        fg = np.argwhere(d > 0.1 * np.percentile(d[d > 0], 99)) if (d > 0).any() else None
        if fg is None or len(fg) == 0:
            raise ValueError(f"{path}: the volume is empty (no positive voxel)")
        corners = np.stack([fg.min(0), fg.max(0)]).astype(float)
        xyz = corners @ img.affine[:3, :3].T + img.affine[:3, 3]
        lo, hi = xyz.min(0), xyz.max(0)
        side = float((hi - lo).max()) + 4.0
        affine = np.diag([side / shape] * 3 + [1.0])
        affine[:3, 3] = (lo + hi) / 2 - side / 2 + side / shape / 2
    target_vox = float(abs(affine[0, 0]))
    src_vox = float(np.mean(img.header.get_zooms()[:3]))
    if target_vox > 1.5 * src_vox:
        img = smooth_img(img, fwhm=np.sqrt(max(target_vox**2 - src_vox**2, 0.0)))
    return _resample(img, affine, shape)


def _choose_participants(root: Path, df) -> tuple[list[tuple[str, float, Path]], dict[str, str]]:
    """(participant, age, first T1w image) of everyone with both; the others with the reason, warned."""
    skipped: dict[str, str] = {}
    chosen: list[tuple[str, float, Path]] = []
    for pid, age in zip(df["participant_id"], df["age"]):
        files = _find_t1w(root, pid)
        if not files:
            skipped[pid] = f"no T1w image under {root / pid}/anat/ (expected {pid}_T1w.nii.gz)"
        elif not np.isfinite(age):
            skipped[pid] = "age missing or not a number in participants.tsv"
        else:
            chosen.append((pid, float(age), files[0]))
    listed = set(df["participant_id"])
    for d in sorted(root.glob("sub-*")):
        if d.is_dir() and d.name not in listed and _find_t1w(root, d.name):
            skipped[d.name] = "has a T1w image but no row in participants.tsv"
    if skipped:
        warnings.warn(
            f"{root}: {len(skipped)} participant(s) left out: "
            + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]),
            stacklevel=3,
        )
    return chosen, skipped


def bids_brain_age_dataset(
    root, shape: int = 32, space: str = "mni", cache: str | os.PathLike | None = None, use_cache: bool = True
) -> BrainAgeDataset:
    """All participants of a BIDS folder with an age and a T1w image: ``participants.tsv``
    (participant_id, age) and ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` (first in sorted order when there
    are several). Volumes are resampled to ``shape``^3 and intensity-normalised.

    ``space="mni"`` (default; for MNI-registered images, the usual brain-age preprocessing) resamples
    onto ``mni_grid(shape)`` and attaches the template's tissue labels; ``space="native"`` resamples a
    cube around each image's own foreground and gives tissue -1 (unknown). Participants without an
    image or without a numeric age, and images of unlisted subjects, are left out with a warning and
    listed in ``dataset.skipped``. Resampled volumes are cached, keyed by the files' sizes and times."""
    root = Path(root)
    if space not in ("mni", "native"):
        raise ValueError(f"space must be 'mni' or 'native', got {space!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"BIDS root {root} does not exist")
    chosen, skipped = _choose_participants(root, read_participants(root / "participants.tsv"))
    if not chosen:
        raise ValueError(f"{root}: no participant has both an age and a T1w image ({len(skipped)} left out)")

    files = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for _, _, f in chosen]
    tsv = root / "participants.tsv"
    params = dict(
        root=str(root.resolve()),
        shape=shape,
        space=space,
        files=files,
        participants=(tsv.stat().st_size, tsv.stat().st_mtime_ns),
    )

    def build() -> dict:
        affine = mni_grid(shape) if space == "mni" else None
        vols = [normalise_intensity(load_t1w(f, affine, shape)).half() for _, _, f in chosen]
        return {"volumes": torch.stack(vols).unsqueeze(1)}

    data = cached("bids", params, build, BRAIN_VERSION, root=cache, enabled=use_cache)
    n = len(chosen)
    tissue = (
        template_tissue_labels(shape).expand(n, -1, -1, -1).clone()
        if space == "mni"
        else torch.full((n, shape, shape, shape), -1, dtype=torch.int8)
    )
    return BrainAgeDataset(
        data["volumes"], torch.tensor([a for _, a, _ in chosen]), tissue, [p for p, _, _ in chosen], skipped
    )


def split_dataset(
    ds: BrainAgeDataset, eval_fraction: float = 0.2, seed: int = 0
) -> tuple[BrainAgeDataset, BrainAgeDataset]:
    """Seeded random (train, eval) split by participant."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise ValueError(f"{len(ds)} participant(s) are too few to split into train and eval")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[n_eval:].sort().values), ds.subset(perm[:n_eval].sort().values)


def bids_brain_age_datasets(
    root,
    shape: int = 32,
    space: str = "mni",
    eval_fraction: float = 0.2,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
) -> tuple[BrainAgeDataset, BrainAgeDataset]:
    """(train, eval) of ``bids_brain_age_dataset`` split by participant (``split_dataset``)."""
    return split_dataset(bids_brain_age_dataset(root, shape, space, cache), eval_fraction, seed)


# ------------------------------------------------------------------------------------------------
# offline default: synthetic cohort
# ------------------------------------------------------------------------------------------------
def _cross() -> np.ndarray:
    from scipy.ndimage import generate_binary_structure

    return generate_binary_structure(3, 1)


@lru_cache(maxsize=4)
def _atrophy_components(shape: int) -> dict[str, Tensor]:
    """Age-independent pieces of the atrophy model, morphology on the fine grid then pooled to ``shape``."""
    from scipy.ndimage import grey_dilation, grey_erosion

    _, gm, wm, csf = mni_tissue_maps(shape)
    brain = gm + wm + csf
    fp = _cross()
    gm1 = grey_erosion(gm, footprint=fp)
    csf1 = np.minimum(grey_dilation(csf, footprint=fp), brain)
    csf2 = np.minimum(grey_dilation(csf1, footprint=fp), brain)
    share = gm / np.maximum(gm + wm, 1e-6)
    return {
        k: _pool(v)
        for k, v in dict(
            gm=gm, wm=wm, csf=csf, d_gm=gm - gm1, d_csf1=csf1 - csf, d_csf2=csf2 - csf1, gm_share=share
        ).items()
    }


def synthetic_brain_cohort(
    n: int, shape: int = 32, age_range: tuple[float, float] = (20.0, 90.0), seed: int = 0
) -> dict[str, Tensor]:
    """Generate ``n`` synthetic T1 volumes with ages; returns volumes float16 (n, 1, S, S, S), ages
    float32 (n,), tissue int8 (n, S, S, S). Same seed, same cohort.

    Model, per subject (all random draws from ``numpy.random.default_rng(seed)`` / a seeded torch
    generator):
      * age ~ Uniform(age_range); atrophy level t = (age - 20) / 70 + N(0, 0.04) (individual variation,
        about 3 years), clipped to [0, 1.05].
      * grey-matter thinning: GM loses 0.4 * t of the part a one-voxel erosion of the MNI GM map removes
        (fine grid, ~3 mm voxels at S=32); the lost GM becomes CSF.
      * CSF / ventricle and sulcal enlargement: CSF grows towards its one-, then two-voxel grey dilation
        (weight 0.6 * min(2t, 1) and 0.6 * max(2t - 1, 0)), taking tissue from GM and WM in proportion.
      * grey/white contrast falls with age: intensity = GM * (0.58 + 0.10 t) + WM * (0.88 - 0.04 t) +
        CSF * 0.18, each mean jittered by N(0, 0.01).
      * individual anatomy: random affine (scale 1 +- 4 % per axis, rotation +- 4 deg, shift +- 1 voxel)
        plus a smooth random displacement (5^3 control grid, SD 1 voxel, trilinear).
      * scanner: multiplicative bias field exp(smooth field, SD 0.1), Rician noise (SD 0.02); skull-
        stripped (zero outside the warped brain), intensity normalised (``normalise_intensity``).
    Tissue labels come from each subject's own warped, atrophied maps: background outside the brain mask
    (the zero voxels of the volume), else the most probable of GM / WM / CSF."""
    c = _atrophy_components(shape)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    lo, hi = age_range
    ages = rng.uniform(lo, hi, size=n)
    t = np.clip((ages - 20.0) / 70.0 + rng.normal(0, 0.04, size=n), 0, 1.05)
    S = shape
    out_v = torch.empty(n, 1, S, S, S, dtype=torch.float16)
    out_t = torch.empty(n, S, S, S, dtype=torch.int8)
    for start in range(0, n, 64):
        sl = slice(start, min(start + 64, n))
        b = sl.stop - sl.start
        tt = torch.tensor(t[sl], dtype=torch.float32).view(b, 1, 1, 1)
        grid = _random_warp(rng, gen, b, S)  # individual anatomy
        maps = F.grid_sample(_atrophied_maps(c, tt), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        img, mask = _scanner_image(maps, tt, rng, gen)
        # per-subject 99th percentile of the brain voxels (as normalise_intensity, batched)
        p99 = torch.nanquantile(img.masked_fill(~mask, float("nan")).view(b, -1), 0.99, dim=1)
        out_v[sl, 0] = (img / p99.view(b, 1, 1, 1)).half()
        out_t[sl] = _labels(maps, mask)
    return {"volumes": out_v, "ages": torch.tensor(ages, dtype=torch.float32), "tissue": out_t}


def _atrophied_maps(c: dict[str, Tensor], tt: Tensor) -> Tensor:
    """GM / WM / CSF maps (b, 3, S, S, S) after grey-matter thinning and CSF growth at atrophy ``tt``."""
    s = 2 * tt
    gm_loss = 0.4 * tt * c["d_gm"]
    gain = 0.6 * (s.clamp(max=1) * c["d_csf1"] + (s - 1).clamp(min=0) * c["d_csf2"])
    gm = (c["gm"] - gm_loss - gain * c["gm_share"]).clamp_min(0)
    wm = (c["wm"] - gain * (1 - c["gm_share"])).clamp_min(0)
    csf = c["csf"] + gm_loss + gain
    return torch.stack([gm, wm, csf], 1)


def _random_warp(rng: np.random.Generator, gen: torch.Generator, b: int, S: int) -> Tensor:
    """Per subject a random affine plus a smooth displacement, as a grid in grid_sample's normalised
    coordinates (b, S, S, S, 3)."""
    theta = torch.zeros(b, 3, 4)
    for k in range(b):
        ang = np.deg2rad(rng.uniform(-4, 4, size=3))
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        rot = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        theta[k, :, :3] = torch.tensor(rot / rng.uniform(0.96, 1.04, size=3), dtype=torch.float32)
        theta[k, :, 3] = torch.tensor(rng.uniform(-1, 1, size=3) * 2 / S, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 3, S, S, S], align_corners=True)
    disp = torch.randn(b, 3, 5, 5, 5, generator=gen) * (2.0 / S)
    return grid + F.interpolate(disp, size=(S, S, S), mode="trilinear", align_corners=True).permute(0, 2, 3, 4, 1)


def _scanner_image(maps: Tensor, tt: Tensor, rng: np.random.Generator, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The T1 intensity of the warped maps with jittered tissue means, bias field and Rician noise,
    skull-stripped; and the brain mask."""
    b, S = maps.shape[0], maps.shape[-1]
    gm, wm, csf = maps[:, 0], maps[:, 1], maps[:, 2]
    mu = torch.tensor(rng.normal(0, 0.01, size=(b, 3)), dtype=torch.float32).view(b, 3, 1, 1, 1)
    t5 = tt.view(b, 1, 1, 1)
    img = gm * (0.58 + 0.10 * t5 + mu[:, 0]) + wm * (0.88 - 0.04 * t5 + mu[:, 1]) + csf * (0.18 + mu[:, 2])
    bias = F.interpolate(
        torch.randn(b, 1, 3, 3, 3, generator=gen) * 0.1, size=(S, S, S), mode="trilinear", align_corners=True
    )[:, 0].exp()
    img = img * bias
    img = torch.sqrt(
        (img + 0.02 * torch.randn(img.shape, generator=gen)) ** 2 + (0.02 * torch.randn(img.shape, generator=gen)) ** 2
    )
    mask = maps.sum(1) > 0.5
    return img * mask, mask


def synthetic_brain_age_datasets(
    n_train: int = 400,
    n_eval: int = 100,
    shape: int = 32,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[BrainAgeDataset, BrainAgeDataset]:
    """(train, eval) synthetic cohorts (``synthetic_brain_cohort``; independent subjects, eval drawn with
    seed + 1), cached after the first build."""
    if shape % 2 or shape < 8:
        raise ValueError(f"shape must be an even number >= 8, got {shape}")
    params = dict(n_train=n_train, n_eval=n_eval, shape=shape, seed=seed)

    def build() -> dict:
        return {
            "train": synthetic_brain_cohort(n_train, shape, seed=seed),
            "eval": synthetic_brain_cohort(n_eval, shape, seed=seed + 1),
        }

    data = cached("brain-synthetic", params, build, BRAIN_VERSION, root=cache, enabled=use_cache)
    return tuple(  # type: ignore[return-value]  # (train, eval)
        BrainAgeDataset(d["volumes"], d["ages"], d["tissue"], [f"synth-{split}-{i:04d}" for i in range(len(d["ages"]))])
        for split, d in (("train", data["train"]), ("eval", data["eval"]))
    )
