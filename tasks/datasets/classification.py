"""Image classification data: the ImageNet ImageFolder layout (real format), CIFAR-10 / CIFAR-100 in
torchvision's on-disk format (pickled batches, read with a restricted unpickler), and Fashion-MNIST (the
offline default, shipped by the Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, TensorDataset

from moebench.training.records import atomic_write

from .cache import cache_dir

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

# torchvision is imported where it is used: importing it loads torch._dynamo (~5 s on one CPU), and the
# task registry imports this module for every run, whatever its task

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Mean / std of the Fashion-MNIST training pixels in [0, 1] (standard published values).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FMNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
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
        raise FileNotFoundError(
            f"image folder root {root} does not exist; expected {root}/train/<class>/*.JPEG "
            f"and {root}/val/<class>/*.JPEG (the ImageNet ImageFolder layout)"
        )
    from torchvision.datasets import ImageFolder

    splits = {}
    for split, tf in (("train", transform_train), ("val", transform_eval)):
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(
                f"missing split folder {d}: expected {root}/{split}/<class>/<image> "
                f"(the ImageNet ImageFolder layout; for ImageNet's flat val/ folder, move each image "
                f"into a folder named after its class, e.g. with the valprep.sh script)"
            )
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
        raise ValueError(
            f"train/ and val/ under {root} have different class folders: only in train {only_t[:10]}, "
            f"only in val {only_v[:10]}; both splits need the same set of class folders"
        )
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
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist; {_INSTALL_HINT}, "
            f"or pass root= the folder holding train-images-idx3-ubyte.gz etc."
        )
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
            raise FileNotFoundError(
                f"Fashion-MNIST file {gz} is missing; {_INSTALL_HINT}, "
                f"or pass root= a folder holding all of {[f + '.gz' for f in _FMNIST_FILES]}"
            )

        def write(f, src_open=src_open):
            with src_open() as s:
                shutil.copyfileobj(s, f)

        try:
            atomic_write(dst, write)
        except (OSError, EOFError) as e:
            raise OSError(
                f"cannot read Fashion-MNIST file {gz if gz.exists() else plain}: {e}; "
                f"reinstall it with `apt-get install --reinstall dataset-fashion-mnist`"
            ) from None
    return cache


def load_fashion_mnist(root=FASHION_MNIST_ROOT, train: bool = True, cache: str | os.PathLike | None = None):
    """Raw Fashion-MNIST split through torchvision's reader: (uint8 images (N, 28, 28), labels (N,))."""
    from torchvision.datasets import FashionMNIST

    base = _fashion_mnist_raw(Path(root), cache_dir(cache))
    try:
        ds = FashionMNIST(str(base), train=train, download=False)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(
            f"Fashion-MNIST files under {root} are not valid IDX files ({e}); "
            f"reinstall with `apt-get install --reinstall dataset-fashion-mnist` and delete "
            f"{base / 'FashionMNIST'}"
        ) from None
    return ds.data, ds.targets


def _subset(n_total: int, size: int | None, seed: int) -> torch.Tensor | None:
    if size is None or size >= n_total:
        if size is not None and size > n_total:
            raise ValueError(f"asked for {size} samples but the split has only {n_total}")
        return None
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def fashion_mnist_datasets(
    root=FASHION_MNIST_ROOT,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
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


# -- CIFAR-10 / CIFAR-100 (torchvision's on-disk format) --------------------------------------------------
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# Per-channel mean / std of the CIFAR training pixels in [0, 1] (the usual published values).
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_HINT = (
    "torchvision's download format: torchvision.datasets.CIFAR10(root, download=True) on a machine "
    "with network, then copy the folder"
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, which are dicts of numpy arrays, lists and strings, and nothing else.

    Why restricted: a pickle can run any code while loading, and a data folder is untrusted input. The
    only globals a CIFAR batch needs are numpy's array reconstruction; anything else is refused, so a
    tampered file fails with an error instead of executing."""

    # _codecs.encode only turns a str into bytes: Python 3 pickles (protocol 2) spell array bytes that way
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, lists and strings"
        )


def read_cifar_batch(path) -> dict:
    """One pickled CIFAR file as a dict with str keys (Python 2 pickles: bytes decoded as latin-1)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, tampered or not a pickle at all
        raise ValueError(
            f"CIFAR file {path} is not a valid CIFAR batch ({type(e).__name__}: {e}); expected {_CIFAR_HINT}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_folder(root, kind: str) -> Path:
    """The folder holding the batches: ``root/cifar-10-batches-py`` (or ``cifar-100-python``), or
    ``root`` itself when it is that folder."""
    if kind not in CIFAR_FOLDERS:
        raise ValueError(f"CIFAR kind must be one of {sorted(CIFAR_FOLDERS)}, got {kind!r}")
    if root is None:
        raise ValueError(f"{kind} needs task_args.root: the folder holding {CIFAR_FOLDERS[kind]}/ ({_CIFAR_HINT})")
    root = Path(root).expanduser()
    folder = root if root.name == CIFAR_FOLDERS[kind] else root / CIFAR_FOLDERS[kind]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{kind} folder {folder} does not exist; task_args.root must hold {CIFAR_FOLDERS[kind]}/ ({_CIFAR_HINT})"
        )
    return folder


def load_cifar(root, kind: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One CIFAR split: (uint8 images (N, 3, 32, 32), labels long (N,), class names)."""
    import numpy as np

    folder = cifar_folder(root, kind)
    train_files, test_files, meta_file, label_key, names_key = CIFAR_FILES[kind]
    meta = read_cifar_batch(folder / meta_file) if (folder / meta_file).is_file() else {}
    classes = [str(c) for c in meta.get(names_key, [])] or [str(i) for i in range(CIFAR_NUM_CLASSES[kind])]
    images, labels = [], []
    for name in train_files if train else test_files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{kind} file {path} is missing; {folder} must hold "
                f"{train_files + test_files + [meta_file]} ({_CIFAR_HINT})"
            )
        batch = read_cifar_batch(path)
        data, lab = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(
                f"{path}: 'data' must be a uint8 array (N, 3072), got "
                f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
            )
        lab = np.asarray(lab if lab is not None else [], dtype=np.int64)
        if lab.shape != (data.shape[0],) or (lab.size and (lab.min() < 0 or lab.max() >= len(classes))):
            raise ValueError(f"{path}: '{label_key}' must hold {data.shape[0]} labels in [0, {len(classes)})")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return torch.cat(images), torch.cat(labels), classes


class CifarDataset(Dataset):
    """CIFAR images kept as uint8 (a 50k split is 150 MB, not 600 MB of floats), normalised and, when
    ``img_size`` is not 32, resized bilinearly per item (a pretrained ViT-B/16 wants 224 px)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], mean, std, img_size: int = 32):
        self.images, self.labels, self.classes, self.img_size = images, labels, list(classes), int(img_size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].float().div(255.0) - self.mean) / self.std
        if self.img_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(
                x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )[0]
        return x, self.labels[i]


def cifar_datasets(
    root,
    kind: str = "cifar10",
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    img_size: int = 32,
) -> tuple[CifarDataset, CifarDataset]:
    """(train, test) CIFAR-10 / CIFAR-100 from torchvision's on-disk format; ``train_size`` /
    ``eval_size`` take seeded random subsets (as for Fashion-MNIST)."""
    out = []
    for train, size, s in ((True, train_size, seed), (False, eval_size, seed + 1)):
        images, labels, classes = load_cifar(root, kind, train)
        idx = _subset(len(labels), size, s)
        if idx is not None:
            images, labels = images[idx], labels[idx]
        out.append(CifarDataset(images, labels, classes, CIFAR_MEAN[kind], CIFAR_STD[kind], img_size))
    return out[0], out[1]
