"""Image classification data: the ImageNet ImageFolder layout (real format) and Fashion-MNIST (the
offline default, shipped by the Debian package ``dataset-fashion-mnist``)."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision.datasets import FashionMNIST, ImageFolder

from moebench.training.records import atomic_write

from .cache import cache_dir

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Mean / std of the Fashion-MNIST training pixels in [0, 1] (standard published values).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`"


class ClassificationTensorDataset(TensorDataset):
    """(images, labels) tensors plus the class names, so a task can label tokens by class."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        super().__init__(images, labels)
        self.images, self.labels, self.classes = images, labels, list(classes)


def imagefolder_datasets(root, transform_train=None, transform_eval=None) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) ``torchvision.datasets.ImageFolder`` for ``root/train/<class>/*`` and
    ``root/val/<class>/*`` (the ImageNet layout). Both splits must have the same class folders, or
    the label ids would silently mean different classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist; expected {root}/train/<class>/*.JPEG "
                                f"and {root}/val/<class>/*.JPEG (the ImageNet ImageFolder layout)")
    splits = {}
    for split, tf in (("train", transform_train), ("val", transform_eval)):
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(
                f"missing split folder {d}: expected {root}/{split}/<class>/<image> "
                f"(the ImageNet ImageFolder layout; for ImageNet's flat val/ folder, move each image "
                f"into a folder named after its class, e.g. with the valprep.sh script)")
        try:
            splits[split] = ImageFolder(str(d), transform=tf, loader=load_rgb)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"no images found under {d} ({e}); expected one sub-folder per class holding image files "
                f"with one of the extensions {_img_ext()}"
            ) from None
    if splits["train"].classes != splits["val"].classes:
        only_t = sorted(set(splits["train"].classes) - set(splits["val"].classes))
        only_v = sorted(set(splits["val"].classes) - set(splits["train"].classes))
        raise ValueError(f"train/ and val/ under {root} have different class folders: only in train {only_t[:10]}, "
                         f"only in val {only_v[:10]}; both splits need the same set of class folders")
    return splits["train"], splits["val"]


def load_rgb(path: str):
    """torchvision's loader, but a truncated or unreadable image names its file (PIL's 'image file is
    truncated' does not), so one bad file among a million can be found."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise OSError(f"cannot read image {path}: {e}; re-download it or remove it from the folder") from None


def _img_ext() -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return list(IMG_EXTENSIONS)


def _fashion_mnist_raw(root: Path, cache: Path) -> Path:
    """Decompress the four ``*.gz`` files into ``<cache>/FashionMNIST/raw/`` (the layout
    ``torchvision.datasets.FashionMNIST`` reads) once; returns the folder to pass as its root."""
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist; {_INSTALL_HINT}, "
                                f"or pass root= the folder holding train-images-idx3-ubyte.gz etc.")
    raw = cache / "FashionMNIST" / "raw"
    for name in _FMNIST_FILES:
        dst = raw / name
        if dst.exists():
            continue
        plain, gz = root / name, root / f"{name}.gz"
        if plain.exists():
            src_open = lambda plain=plain: open(plain, "rb")  # noqa: E731
        elif gz.exists():
            src_open = lambda gz=gz: gzip.open(gz, "rb")  # noqa: E731
        else:
            raise FileNotFoundError(f"Fashion-MNIST file {gz} is missing; {_INSTALL_HINT}, "
                                    f"or pass root= a folder holding all of {[f + '.gz' for f in _FMNIST_FILES]}")

        def write(f, src_open=src_open):
            with src_open() as s:
                shutil.copyfileobj(s, f)
        try:
            atomic_write(dst, write)
        except (OSError, EOFError) as e:
            raise OSError(f"cannot read Fashion-MNIST file {gz if gz.exists() else plain}: {e}; "
                          f"reinstall it with `apt-get install --reinstall dataset-fashion-mnist`") from None
    return cache


def load_fashion_mnist(root=FASHION_MNIST_ROOT, train: bool = True, cache: str | os.PathLike | None = None):
    """Raw Fashion-MNIST split through torchvision's reader: (uint8 images (N, 28, 28), labels (N,))."""
    base = _fashion_mnist_raw(Path(root), cache_dir(cache))
    try:
        ds = FashionMNIST(str(base), train=train, download=False)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"Fashion-MNIST files under {root} are not valid IDX files ({e}); "
                         f"reinstall with `apt-get install --reinstall dataset-fashion-mnist` and delete "
                         f"{base / 'FashionMNIST'}") from None
    return ds.data, ds.targets


def _subset(n_total: int, size: int | None, seed: int) -> torch.Tensor | None:
    if size is None or size >= n_total:
        if size is not None and size > n_total:
            raise ValueError(f"asked for {size} samples but the split has only {n_total}")
        return None
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def fashion_mnist_datasets(root=FASHION_MNIST_ROOT, train_size: int | None = None, eval_size: int | None = None,
                           seed: int = 0, cache: str | os.PathLike | None = None
                           ) -> tuple[ClassificationTensorDataset, ClassificationTensorDataset]:
    """(train, eval) Fashion-MNIST as tensor datasets: images float (N, 1, 28, 28) normalised with the
    training mean/std, labels long (N,). ``train_size`` / ``eval_size`` take a seeded random subset
    (same seed, same samples) of the 60k train / 10k test images; None keeps all."""
    out = []
    for train, size, s in ((True, train_size, seed), (False, eval_size, seed + 1)):
        images, labels = load_fashion_mnist(root, train=train, cache=cache)
        idx = _subset(len(labels), size, s)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        x = (images.float().div(255.0).sub(FASHION_MNIST_MEAN).div(FASHION_MNIST_STD)).unsqueeze(1)
        out.append(ClassificationTensorDataset(x, labels.long(), FASHION_MNIST_CLASSES))
    return out[0], out[1]
