"""Tiny fixtures in the real public formats (ImageFolder, COCO captions, Karpathy split, BIDS),
built inside a test's tmp folder and shared by the dataset and task tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def make_png(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


def make_coco(root: Path, split: str, n: int = 4) -> Path:
    images = [{"id": 100 + i, "file_name": f"{i:012d}.jpg", "height": 6, "width": 8} for i in range(n)]
    anns, k = [], 0
    for i in range(n):
        for j in range(6 if i == 0 else 5):  # COCO has 5-7 captions per image
            anns.append({"id": k, "image_id": 100 + i, "caption": f" image {i} caption {j} "})
            k += 1
    for im in images:
        make_png(root / f"{split}2017" / im["file_name"], (10 * int(im["id"]) % 255, 0, 0))
    path = root / "annotations" / f"captions_{split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def make_karpathy(root: Path) -> Path:
    images = []
    for i, split in enumerate(["train", "train", "val", "test", "test", "restval"]):
        name = f"{1000 + i}.jpg"
        make_png(root / "flickr30k-images" / name, (0, 40 * i, 0))
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": [{"raw": f"photo {i} sentence {j}", "tokens": []} for j in range(5)],
            }
        )
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def make_bids(root: Path, ages=("25", "60", "80"), with_image=(True, True, True)) -> Path:
    """3 participants with 24^3 T1w volumes at 8 mm covering MNI space (a bright ball, darker core)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id\tage\tsex"] + [f"sub-{i + 1:02d}\t{a}\tF" for i, a in enumerate(ages)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = -96.0
    ijk = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1)
    r = np.linalg.norm((ijk - 12) * 8.0, axis=-1)
    for i, has in enumerate(with_image):
        if not has:
            continue
        vol = np.where(r < 70, 100.0 * (i + 1), 0.0) - np.where(r < 20, 50.0 * (i + 1), 0.0)
        anat = root / f"sub-{i + 1:02d}" / "anat"
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), anat / f"sub-{i + 1:02d}_T1w.nii.gz")
    return root


def make_cifar(root: Path, kind: str = "cifar10", per_batch: int = 6, n_test: int = 5) -> Path:
    """A small CIFAR folder in torchvision's on-disk format: pickled dicts of a uint8 'data' array
    (N, 3072) and a label list, like the real files (5 training batches + test for CIFAR-10, train +
    test for CIFAR-100, and the meta file with the class names). Pixel (0, 0) of the red channel
    holds the image's index so tests can tell images apart."""
    import pickle

    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    n_classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(0)
    index = 0

    def batch(n: int) -> dict:
        nonlocal index
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(index, index + n) % 256
        index += n
        labels = [int(i) % n_classes for i in range(index - n, index)]
        key = "labels" if kind == "cifar10" else "fine_labels"
        out = {"batch_label": "fixture", "data": data, key: labels, "filenames": [f"{i}.png" for i in range(n)]}
        if kind == "cifar100":
            out["coarse_labels"] = [x % 20 for x in labels]
        return out

    def dump(name: str, obj) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if kind == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", batch(per_batch))
        dump("test_batch", batch(n_test))
        dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    else:
        dump("train", batch(5 * per_batch))
        dump("test", batch(n_test))
        dump(
            "meta",
            {
                "fine_label_names": [f"fine{i}" for i in range(100)],
                "coarse_label_names": [f"coarse{i}" for i in range(20)],
            },
        )
    return folder
