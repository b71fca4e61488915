"""Image-text retrieval data: COCO captions and Flickr30K / COCO Karpathy-split JSON (real formats),
and compositional Fashion-MNIST canvases (the offline default).

Every dataset holds one entry per *image* with all of its captions, so evaluation can score R@K with
the real ground truth (one image, many correct texts; one text, one correct image): ``all_texts()``
gives the flat caption list and ``text_to_image``. Training items pick one caption at random
(``torch``'s RNG, so the trainer's seed fixes the choice). Image transforms and the tokenizer are
passed in (the task adapter uses open_clip's ``get_tokenizer`` / transforms for real data); without a
tokenizer, texts stay strings."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .cache import cached
from .classification import FASHION_MNIST_MEAN, FASHION_MNIST_ROOT, FASHION_MNIST_STD, load_fashion_mnist

Tokenizer = Callable[[Sequence[str]], Tensor]  # open_clip convention: list of texts -> (n, L) ids


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
class ImageTextDataset(Dataset):
    """Base: one item per image, ``(image, text, index)``.

    ``text`` is one caption (random when ``sample_caption``, else the first), tokenized to a LongTensor
    (L,) when a tokenizer is set, else the string. ``index`` is the image's position, which R@K needs.
    ``transform`` / ``tokenizer`` are plain attributes: the task adapter may set them after building."""

    def __init__(
        self, captions: list[list[str]], transform=None, tokenizer: Tokenizer | None = None, sample_caption: bool = True
    ):
        if any(len(c) == 0 for c in captions):
            raise ValueError("every image needs at least one caption")
        self.captions = [list(c) for c in captions]
        self.transform, self.tokenizer, self.sample_caption = transform, tokenizer, sample_caption

    def __len__(self) -> int:
        return len(self.captions)

    def load_image(self, i: int):
        raise NotImplementedError

    def _text(self, caption: str):
        return self.tokenizer([caption])[0] if self.tokenizer is not None else caption

    def __getitem__(self, i: int):
        img = self.load_image(i)
        if self.transform is not None:
            img = self.transform(img)
        caps = self.captions[i]
        j = int(torch.randint(len(caps), ())) if self.sample_caption and len(caps) > 1 else 0
        return img, self._text(caps[j]), i

    # -- ground truth for R@K -------------------------------------------------------------------
    @property
    def text_to_image(self) -> Tensor:
        """LongTensor (num_texts,): the image index each caption of ``all_texts()`` belongs to."""
        return torch.tensor([i for i, c in enumerate(self.captions) for _ in c], dtype=torch.long)

    def all_texts(self) -> list[str]:
        """Every caption of every image, image by image (aligned with ``text_to_image``)."""
        return [t for c in self.captions for t in c]

    def tokenized_texts(self) -> Tensor:
        """``all_texts()`` through the tokenizer: LongTensor (num_texts, L)."""
        if self.tokenizer is None:
            raise ValueError(
                "no tokenizer set on this dataset; set dataset.tokenizer (e.g. open_clip.get_tokenizer(name))"
            )
        return self.tokenizer(self.all_texts())


class FileImageTextDataset(ImageTextDataset):
    """Images read from files with PIL (RGB); ``transform`` turns the PIL image into a tensor."""

    def __init__(self, image_paths: list[Path], captions: list[list[str]], **kw):
        if len(image_paths) != len(captions):
            raise ValueError(f"{len(image_paths)} images but {len(captions)} caption lists")
        super().__init__(captions, **kw)
        self.image_paths = [Path(p) for p in image_paths]

    def load_image(self, i: int):
        from PIL import Image, UnidentifiedImageError

        p = self.image_paths[i]
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise OSError(f"cannot read image {p}: {e}; re-download or remove it from the annotation file") from None


class CanvasTextDataset(ImageTextDataset):
    """Compositional canvases: items ``(image (1, S, S) float, text, index, cells (g, g) long)``;
    ``cells`` holds the Fashion-MNIST class id of the item in each grid cell, -1 for an empty cell."""

    def __init__(self, canvases: Tensor, cells: Tensor, captions: list[list[str]], **kw):
        super().__init__(captions, **kw)
        self.canvases, self.cells = canvases, cells.long()
        self.grid = int(cells.shape[-1])
        self.canvas_size = int(canvases.shape[-1])

    def load_image(self, i: int) -> Tensor:
        x = self.canvases[i].float().div(255.0)
        return x.sub(FASHION_MNIST_MEAN).div(FASHION_MNIST_STD).unsqueeze(0)

    def __getitem__(self, i: int):
        img, text, idx = super().__getitem__(i)
        return img, text, idx, self.cells[i]


# ------------------------------------------------------------------------------------------------
# real formats
# ------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def _require(obj, keys: Sequence[str], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}: {where} lacks key(s) {missing} (has {sorted(obj)[:10]})")


def _check_files(paths: list[Path], source: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing, e.g. {[str(p) for p in missing[:3]]}; "
            f"check the image folder argument (it must hold the files named in the annotation file)"
        )


def read_coco_captions(
    annotation_file, image_dir, max_captions: int | None = None
) -> tuple[list[Path], list[list[str]]]:
    """Parse a COCO captions file (``captions_train2017.json`` / ``captions_val2017.json``:
    ``images[]`` with id, file_name; ``annotations[]`` with image_id, caption) into image paths and
    per-image caption lists (annotation order; at most ``max_captions``). Images without captions are
    dropped with a warning; an annotation naming an unknown image id is an error."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = _read_json(path, "COCO captions")
    _require(data, ["images", "annotations"], "top level", path)
    by_id: dict = {}
    order = []
    for k, im in enumerate(data["images"]):
        _require(im, ["id", "file_name"], f"images[{k}]", path)
        by_id[im["id"]] = (im["file_name"], [])
        order.append(im["id"])
    for k, ann in enumerate(data["annotations"]):
        _require(ann, ["image_id", "caption"], f"annotations[{k}]", path)
        if ann["image_id"] not in by_id:
            raise ValueError(
                f"{path}: annotations[{k}] refers to image_id {ann['image_id']!r}, which is not in images[]"
            )
        by_id[ann["image_id"]][1].append(str(ann["caption"]).strip())
    empty = [i for i in order if not by_id[i][1]]
    if empty:
        warnings.warn(
            f"{path}: {len(empty)} image(s) have no caption and are skipped, e.g. ids {empty[:5]}", stacklevel=2
        )
    keep = [i for i in order if by_id[i][1]]
    if not keep:
        raise ValueError(f"{path}: no image has a caption")
    paths = [image_dir / by_id[i][0] for i in keep]
    _check_files(paths, path)
    return paths, [by_id[i][1][:max_captions] for i in keep]


def read_karpathy_split(
    split_file, image_dir, splits: Sequence[str], max_captions: int | None = None
) -> tuple[list[Path], list[list[str]]]:
    """Parse a Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``: ``images[]``
    with filename, split, sentences[].raw; COCO's also has filepath, e.g. val2014) and keep the
    images whose split is in ``splits`` (train / val / test / restval)."""
    path, image_dir = Path(split_file), Path(image_dir)
    data = _read_json(path, "Karpathy split")
    _require(data, ["images"], "top level", path)
    paths, caps, seen = [], [], set()
    for k, im in enumerate(data["images"]):
        _require(im, ["filename", "split", "sentences"], f"images[{k}]", path)
        seen.add(im["split"])
        if im["split"] not in splits:
            continue
        sents = []
        for j, s in enumerate(im["sentences"]):
            _require(s, ["raw"], f"images[{k}].sentences[{j}]", path)
            sents.append(str(s["raw"]).strip())
        if not sents:
            raise ValueError(f"{path}: images[{k}] ({im['filename']}) has no sentences")
        paths.append(image_dir / im.get("filepath", "") / im["filename"])
        caps.append(sents[:max_captions])
    if not paths:
        raise ValueError(f"{path}: no image has split in {list(splits)}; splits present: {sorted(seen)}")
    _check_files(paths, path)
    return paths, caps


def coco_retrieval_datasets(
    root, transform_train=None, transform_eval=None, tokenizer: Tokenizer | None = None, year: int = 2017
) -> tuple[FileImageTextDataset, FileImageTextDataset]:
    """(train, eval) from the COCO layout ``root/annotations/captions_{train,val}<year>.json`` with
    images in ``root/train<year>/`` and ``root/val<year>/``; eval keeps every caption of each image."""
    root = Path(root)
    out = []
    for split, tf, train in (("train", transform_train, True), ("val", transform_eval, False)):
        paths, caps = read_coco_captions(root / "annotations" / f"captions_{split}{year}.json", root / f"{split}{year}")
        out.append(FileImageTextDataset(paths, caps, transform=tf, tokenizer=tokenizer, sample_caption=train))
    return out[0], out[1]


def karpathy_retrieval_datasets(
    split_file,
    image_dir,
    transform_train=None,
    transform_eval=None,
    tokenizer: Tokenizer | None = None,
    train_splits=("train", "restval"),
    eval_split: str = "test",
    max_captions: int | None = 5,
) -> tuple[FileImageTextDataset, FileImageTextDataset]:
    """(train, eval) from a Karpathy-split JSON (Flickr30K or COCO); eval keeps ``max_captions``
    (the usual 5) captions per image, the standard 1k/5k test protocol."""
    tr = read_karpathy_split(split_file, image_dir, train_splits)
    ev = read_karpathy_split(split_file, image_dir, [eval_split], max_captions=max_captions)
    return (
        FileImageTextDataset(*tr, transform=transform_train, tokenizer=tokenizer, sample_caption=True),
        FileImageTextDataset(*ev, transform=transform_eval, tokenizer=tokenizer, sample_caption=False),
    )


# ------------------------------------------------------------------------------------------------
# offline default: compositional Fashion-MNIST canvases
# ------------------------------------------------------------------------------------------------
ITEM_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
POSITION_NAMES = {
    2: ["top left", "top right", "bottom left", "bottom right"],
    3: [
        "top left",
        "top middle",
        "top right",
        "middle left",
        "centre",
        "middle right",
        "bottom left",
        "bottom middle",
        "bottom right",
    ],
}
CELL = 28
COMPOSITIONAL_VERSION = "1"


def _phrase(cls: int, cell: int, grid: int) -> str:
    name = ITEM_NAMES[cls]
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} at {POSITION_NAMES[grid][cell]}"


def caption_for(cells: Sequence[int] | Tensor, order: Sequence[int] | None = None) -> str:
    """Caption of a canvas from its flat (row-major) cell labels (-1 empty), items listed in ``order``
    (indices of occupied cells; default row-major), e.g. "a sneaker at top left and a bag at bottom right"."""
    flat = [int(c) for c in (cells.flatten().tolist() if isinstance(cells, Tensor) else np.ravel(cells))]
    grid = math.isqrt(len(flat))
    if grid * grid != len(flat) or grid not in POSITION_NAMES:
        raise ValueError(f"cells must describe a 2x2 or 3x3 grid, got {len(flat)} cells")
    occupied = [k for k, c in enumerate(flat) if c >= 0]
    order = occupied if order is None else list(order)
    if sorted(order) != occupied:
        raise ValueError(f"order {order} must list each occupied cell {occupied} once")
    return " and ".join(_phrase(flat[k], k, grid) for k in order)


class WordTokenizer:
    """Word-level tokenizer for the closed caption grammar of the compositional default.

    Chosen over open_clip's SimpleTokenizer because that one has a 49,408-token BPE vocabulary, whose
    embedding table alone would dwarf a CPU-sized text tower, while this grammar has ~25 words.
    Ids follow open_clip's conventions so its text transformer works unchanged (``vocab_size``,
    ``context_length``): 0 pad, 1 start, last id end-of-text (the largest id, as open_clip's argmax
    pooling expects), 2 unknown word. ``__call__(texts) -> LongTensor (n, context_length)``."""

    PAD, SOT, UNK = 0, 1, 2

    def __init__(self, words: Sequence[str], context_length: int):
        self.words = sorted(set(words))
        self.index = {w: i + 3 for i, w in enumerate(self.words)}
        self.EOT = len(self.words) + 3
        self.vocab_size = self.EOT + 1
        self.context_length = context_length

    @classmethod
    def for_grammar(cls, grid: int, max_items: int) -> WordTokenizer:
        words = {"a", "an", "at", "and"}
        for t in ITEM_NAMES + POSITION_NAMES[grid]:
            words.update(t.split())
        longest_item = max(len(n.split()) for n in ITEM_NAMES)
        longest_pos = max(len(p.split()) for p in POSITION_NAMES[grid])
        n = max_items * (2 + longest_item + longest_pos) + (max_items - 1) + 2
        return cls(sorted(words), context_length=int(math.ceil(n / 8) * 8))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.UNK) for w in re.findall(r"[a-z\-]+", text.lower())]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        L = context_length or self.context_length
        out = torch.full((len(texts), L), self.PAD, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [self.SOT] + self.encode(t)[: L - 2] + [self.EOT]
            out[r, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Tensor) -> str:
        inv = {i: w for w, i in self.index.items()}
        return " ".join(inv[int(i)] for i in ids if int(i) in inv)


def _generate_canvases(
    images: Tensor,
    labels: Tensor,
    n: int,
    grid: int,
    min_items: int,
    max_items: int,
    captions_per_image: int,
    unique: bool,
    rng: np.random.Generator,
) -> dict:
    cells_total = grid * grid
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(len(ITEM_NAMES))]
    if unique:
        n_configs = sum(math.comb(cells_total, k) * len(ITEM_NAMES) ** k for k in range(min_items, max_items + 1))
        if n > n_configs // 2:
            raise ValueError(
                f"{n} distinct canvases requested but a {grid}x{grid} grid with {min_items}-{max_items} "
                f"items has only {n_configs} configurations; lower n_eval or use canvas=84"
            )
    cells = np.full((n, cells_total), -1, dtype=np.int8)
    put_canvas, put_cell, put_src = [], [], []
    captions, seen = [], set()
    i = 0
    while i < n:
        k = int(rng.integers(min_items, max_items + 1))
        where = np.sort(rng.choice(cells_total, size=k, replace=False))
        classes = rng.integers(0, len(ITEM_NAMES), size=k)
        flat = [-1] * cells_total
        for w, c in zip(where, classes):
            flat[w] = int(c)
        if unique:
            key = tuple(flat)
            if key in seen:
                continue
            seen.add(key)
        for w, c in zip(where, classes):
            put_canvas.append(i)
            put_cell.append(int(w))
            put_src.append(by_class[c][rng.integers(len(by_class[c]))])
        cells[i] = flat
        occupied = [int(w) for w in where]
        orders = [occupied] + [list(p) for p in itertools.permutations(occupied) if list(p) != occupied]
        first, rest = orders[0], orders[1:]
        pick: np.ndarray | list[int]
        pick = rng.choice(len(rest), size=captions_per_image - 1, replace=False) if captions_per_image > 1 else []
        captions.append([caption_for(flat, first)] + [caption_for(flat, rest[j]) for j in pick])
        i += 1
    # paint all items at once: view the canvases as (n, row, y, col, x) and scatter the 28x28 items
    canvases = np.zeros((n, grid, CELL, grid, CELL), dtype=np.uint8)
    rows, cols = np.divmod(np.asarray(put_cell, dtype=np.int64), grid)
    canvases[np.asarray(put_canvas), rows, :, cols, :] = images.numpy()[np.asarray(put_src)]
    return {
        "canvases": torch.from_numpy(canvases.reshape(n, grid * CELL, grid * CELL)),
        "cells": torch.from_numpy(cells.reshape(n, grid, grid)),
        "captions": captions,
    }


def _canvas_grid(canvas: int, min_items: int, max_items: int, captions_per_image: int) -> int:
    """The grid side (2 or 3 cells) of a ``canvas`` px canvas, refusing item and caption counts it cannot hold."""
    if canvas % CELL or canvas // CELL not in POSITION_NAMES:
        raise ValueError(f"canvas must be 56 (2x2 grid) or 84 (3x3 grid) pixels, got {canvas}")
    grid = canvas // CELL
    if not 1 <= min_items <= max_items <= grid * grid:
        raise ValueError(f"need 1 <= min_items <= max_items <= {grid * grid}, got {min_items}, {max_items}")
    if not 1 <= captions_per_image <= math.factorial(min_items):
        raise ValueError(
            f"captions_per_image must be in 1..{math.factorial(min_items)} "
            f"(distinct item orders of a {min_items}-item canvas), got {captions_per_image}"
        )
    return grid


def compositional_datasets(
    n_train: int = 10000,
    n_eval: int = 1000,
    canvas: int = 56,
    min_items: int = 2,
    max_items: int = 4,
    captions_per_image: int = 2,
    seed: int = 0,
    root=FASHION_MNIST_ROOT,
    transform=None,
    tokenizer: Tokenizer | None | str = "word",
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[CanvasTextDataset, CanvasTextDataset]:
    """(train, eval) compositional retrieval canvases built from real Fashion-MNIST items.

    A canvas of ``canvas`` px (56: 2x2 grid, 84: 3x3 grid of 28 px cells) holds ``min_items``..``max_items``
    items in random cells; its captions name every item with its position ("a sneaker at top left and
    a bag at bottom right"), so matching needs identity *and* position: the same items elsewhere give
    another caption. Each canvas has ``captions_per_image`` captions (the row-major listing first, then
    other item orders). Train items come from the Fashion-MNIST train split, eval items from the test
    split; eval canvases are all distinct configurations, so every caption has exactly one correct
    image. ``tokenizer="word"`` uses a ``WordTokenizer`` for the grammar (``dataset.tokenizer``), None
    keeps strings. Built once per parameter set and cached (see ``cache.cached``)."""
    grid = _canvas_grid(canvas, min_items, max_items, captions_per_image)
    params = dict(
        n_train=n_train,
        n_eval=n_eval,
        canvas=canvas,
        min_items=min_items,
        max_items=max_items,
        captions_per_image=captions_per_image,
        seed=seed,
        root=str(root),
    )

    def build() -> dict:
        rng = np.random.default_rng(seed)
        out = {}
        for split, n, train in (("train", n_train, True), ("eval", n_eval, False)):
            images, labels = load_fashion_mnist(root, train=train, cache=cache)
            out[split] = _generate_canvases(
                images, labels, n, grid, min_items, max_items, captions_per_image, unique=not train, rng=rng
            )
        return out

    data = cached("compositional", params, build, COMPOSITIONAL_VERSION, root=cache, enabled=use_cache)
    if tokenizer == "word":
        tokenizer = WordTokenizer.for_grammar(grid, max_items)
    return tuple(  # type: ignore[return-value]  # (train, eval)
        CanvasTextDataset(
            d["canvases"],
            d["cells"],
            d["captions"],
            transform=transform,
            tokenizer=tokenizer,
            sample_caption=(s == "train"),
        )
        for s, d in (("train", data["train"]), ("eval", data["eval"]))
    )


def patch_cell_labels(cells: Tensor, canvas: int, patch_size: int) -> Tensor:
    """Label of each image patch (ViT row-major order) by the grid cell under its centre: the item's
    class id, -1 for an empty cell. ``cells`` (g, g) or (B, g, g) -> LongTensor (P,) or (B, P)."""
    if canvas % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the canvas size {canvas}")
    squeeze = cells.dim() == 2
    cells = cells.long().view(-1, *cells.shape[-2:])
    g, n = cells.shape[-1], canvas // patch_size
    centre = (torch.arange(n) * patch_size + patch_size // 2) * g // canvas
    out = cells[:, centre][:, :, centre].reshape(cells.shape[0], n * n)
    return out[0] if squeeze else out
