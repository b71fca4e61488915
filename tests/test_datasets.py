"""Data readers and offline generators: real formats built here as tiny fixtures, plus the offline
defaults (Fashion-MNIST, compositional canvases, synthetic brain cohort)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from real_format_fixtures import make_bids, make_coco, make_karpathy, make_png

from moebench.tasks.datasets import (
    FASHION_MNIST_CLASSES,
    TISSUE_NAMES,
    WordTokenizer,
    bids_brain_age_dataset,
    bids_brain_age_datasets,
    brain,
    cache,
    caption_for,
    classification,
    coco_retrieval_datasets,
    compositional_datasets,
    fashion_mnist_datasets,
    imagefolder_datasets,
    karpathy_retrieval_datasets,
    patch_cell_labels,
    patch_tissue_labels,
    read_coco_captions,
    retrieval,
    synthetic_brain_cohort,
)

HAVE_FMNIST = Path(classification.FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """One cache folder for the whole module (so Fashion-MNIST is decompressed once), never ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "moebench-cache"
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    return root


def test_cache_builds_once_keys_by_params_and_leaves_no_temp_files(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3), "names": ["a", "b"]}

    a = cache.cached("thing", {"n": 3}, build, "1", root=tmp_path)
    b = cache.cached("thing", {"n": 3}, build, "1", root=tmp_path)
    assert len(calls) == 1 and torch.equal(a["x"], b["x"]) and b["names"] == ["a", "b"]
    cache.cached("thing", {"n": 4}, build, "1", root=tmp_path)
    cache.cached("thing", {"n": 3}, build, "2", root=tmp_path)
    assert len(calls) == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt"] * 3  # no .tmp left behind
    # a corrupt entry is rebuilt, not fatal
    entry = tmp_path / f"thing-{cache.cache_key({'n': 3}, '1')}.pt"
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        cache.cached("thing", {"n": 3}, build, "1", root=tmp_path)
    assert len(calls) == 4


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOEBENCH_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "moebench"


# ------------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------------
def test_imagefolder_loads_and_validates(tmp_path):
    for split in ("train", "val"):
        for cls, colour in (("cat", "red"), ("dog", "blue")):
            for i in range(2):
                make_png(tmp_path / split / cls / f"{i}.png", colour)
    import torchvision.transforms as T

    tr, va = imagefolder_datasets(tmp_path, T.ToTensor(), T.ToTensor())
    assert tr.classes == va.classes == ["cat", "dog"] and len(tr) == len(va) == 4
    x, y = tr[3]
    assert x.shape == (3, 6, 8) and y == 1 and x[2].mean() > 0.9  # blue dog

    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagefolder_datasets(tmp_path / "nope")
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(FileNotFoundError, match=r"missing split folder .*val"):
        imagefolder_datasets(tmp_path)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found under .*val"):
        imagefolder_datasets(tmp_path)
    make_png(tmp_path / "val" / "cat" / "0.png", "red")
    with pytest.raises(ValueError, match=r"only in train \['dog'\]"):
        imagefolder_datasets(tmp_path)


@needs_fmnist
def test_fashion_mnist_shapes_normalisation_and_seeded_subsets():
    tr, ev = fashion_mnist_datasets(train_size=500, eval_size=100, seed=3)
    assert tr.images.shape == (500, 1, 28, 28) and tr.images.dtype == torch.float32
    assert ev.images.shape == (100, 1, 28, 28) and tr.labels.dtype == torch.long
    assert tr.classes == FASHION_MNIST_CLASSES and len(tr.classes) == 10
    assert abs(tr.images.mean().item()) < 0.15 and 0.8 < tr.images.std().item() < 1.2  # normalised
    again, _ = fashion_mnist_datasets(train_size=500, eval_size=100, seed=3)
    other, _ = fashion_mnist_datasets(train_size=500, eval_size=100, seed=4)
    assert torch.equal(tr.images, again.images) and not torch.equal(tr.images, other.images)
    assert set(tr.labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="only 10000"):
        fashion_mnist_datasets(eval_size=20000)


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_datasets(root=tmp_path / "absent", cache=tmp_path / "c")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0" * 16))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz is missing.*apt-get install"):
        fashion_mnist_datasets(root=tmp_path / "partial", cache=tmp_path / "c")


# ------------------------------------------------------------------------------------------------
# retrieval: real formats
# ------------------------------------------------------------------------------------------------


def test_coco_captions_keep_all_captions_and_ground_truth(tmp_path):
    make_coco(tmp_path, "train")
    make_coco(tmp_path, "val")
    tok = WordTokenizer(["image", "caption", "0", "1"], context_length=8)
    import torchvision.transforms as T

    tr, ev = coco_retrieval_datasets(tmp_path, T.ToTensor(), T.ToTensor(), tokenizer=tok)
    assert len(ev) == 4 and [len(c) for c in ev.captions] == [6, 5, 5, 5]
    assert ev.captions[1][0] == "image 1 caption 0"  # stripped, in order
    assert ev.text_to_image.tolist() == [0] * 6 + [1] * 5 + [2] * 5 + [3] * 5
    assert len(ev.all_texts()) == 21 and ev.tokenized_texts().shape == (21, 8)
    img, text, idx = ev[2]
    assert img.shape == (3, 6, 8) and text.shape == (8,) and idx == 2
    assert text.tolist()[:2] == [tok.SOT, tok.index["image"]]
    assert tr.sample_caption and not ev.sample_caption  # train draws a caption, eval is fixed
    # without tokenizer / transform: raw caption string and PIL image
    paths, caps = read_coco_captions(tmp_path / "annotations" / "captions_val2017.json", tmp_path / "val2017")
    assert paths[3].name == "000000000003.jpg" and caps[3][4] == "image 3 caption 4"


def test_coco_captions_work_with_open_clip_tokenizer(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    make_coco(tmp_path, "val")
    paths, caps = read_coco_captions(tmp_path / "annotations" / "captions_val2017.json", tmp_path / "val2017")
    ds = retrieval.FileImageTextDataset(paths, caps, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    assert ds.tokenized_texts().shape == (21, 77)


def test_coco_validation_errors(tmp_path):
    ann = make_coco(tmp_path, "val")
    data = json.loads(ann.read_text())
    bad = dict(data, annotations=[{"image_id": 100, "text": "x"}])
    ann.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotations\[0\] lacks key\(s\) \['caption'\]"):
        read_coco_captions(ann, tmp_path / "val2017")
    ann.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"top level lacks key\(s\) \['images'\]"):
        read_coco_captions(ann, tmp_path / "val2017")
    ann.write_text(json.dumps(dict(data, annotations=data["annotations"] + [{"image_id": 7, "caption": "c"}])))
    with pytest.raises(ValueError, match="image_id 7"):
        read_coco_captions(ann, tmp_path / "val2017")
    ann.write_text(json.dumps(data))
    (tmp_path / "val2017" / "000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 4 images .* missing.*000000000002.jpg"):
        read_coco_captions(ann, tmp_path / "val2017")
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco_captions(ann, tmp_path / "val2017")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_coco_captions(tmp_path / "none.json", tmp_path)


def test_karpathy_split_selects_splits_and_keeps_five_captions(tmp_path):
    path = make_karpathy(tmp_path)
    tr, ev = karpathy_retrieval_datasets(path, tmp_path / "flickr30k-images")
    assert [p.name for p in tr.image_paths] == ["1000.jpg", "1001.jpg", "1005.jpg"]  # train + restval
    assert [p.name for p in ev.image_paths] == ["1003.jpg", "1004.jpg"]
    assert all(len(c) == 5 for c in ev.captions) and ev.captions[1][2] == "photo 4 sentence 2"
    assert ev.text_to_image.tolist() == [0] * 5 + [1] * 5
    img, text, idx = ev[1]
    assert isinstance(img, Image.Image) and text == "photo 4 sentence 0" and idx == 1


def test_karpathy_validation_errors(tmp_path):
    path = make_karpathy(tmp_path)
    data = json.loads(path.read_text())
    del data["images"][2]["split"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[2\] lacks key\(s\) \['split'\]"):
        karpathy_retrieval_datasets(path, tmp_path / "flickr30k-images")
    path = make_karpathy(tmp_path)
    with pytest.raises(ValueError, match=r"no image has split in \['dev'\]; splits present: \['restval', 'test'"):
        karpathy_retrieval_datasets(path, tmp_path / "flickr30k-images", eval_split="dev")
    with pytest.raises(FileNotFoundError, match="images listed in .* are missing"):
        karpathy_retrieval_datasets(path, tmp_path / "wrong-folder")
    (tmp_path / "flickr30k-images" / "1003.jpg").write_bytes(b"not an image")
    _, ev = karpathy_retrieval_datasets(path, tmp_path / "flickr30k-images")
    with pytest.raises(OSError, match="cannot read image .*1003.jpg"):
        ev[0]


# ------------------------------------------------------------------------------------------------
# retrieval: compositional canvases
# ------------------------------------------------------------------------------------------------
def test_captions_need_position_and_identity():
    a = caption_for([7, -1, -1, 8])  # sneaker top left, bag bottom right
    b = caption_for([-1, 7, 8, -1])  # same items, other cells
    c = caption_for([8, -1, -1, 7])  # same cells, items swapped
    assert a == "a sneaker at top left and a bag at bottom right"
    assert len({a, b, c}) == 3
    assert caption_for([9, -1, -1, 0], order=[3, 0]) == "a t-shirt at bottom right and an ankle boot at top left"
    assert "centre" in caption_for([-1] * 4 + [3] + [-1] * 4)
    with pytest.raises(ValueError, match="2x2 or 3x3"):
        caption_for([1, 2, 3])


def test_word_tokenizer_matches_open_clip_conventions():
    tok = WordTokenizer.for_grammar(grid=2, max_items=4)
    longest = caption_for([9, 9, 9, 9])
    ids = tok([longest, "a bag at top left", "a zebra at top left"])
    assert ids.shape == (3, tok.context_length) and tok.context_length >= len(longest.split()) + 2
    assert (ids.argmax(-1) == (ids != 0).sum(-1) - 1).all()  # EOT is the largest id, at the end
    assert tok.decode(ids[0]) == longest
    assert ids[2, 2] == tok.UNK and ids[1, -1] == tok.PAD


@needs_fmnist
def test_compositional_canvases(tmp_path):
    tr, ev = compositional_datasets(n_train=60, n_eval=40, seed=1, cache=tmp_path)
    assert len(tr) == 60 and len(ev) == 40 and tr.grid == 2 and tr.canvas_size == 56
    img, text, idx, cells = tr[5]
    assert img.shape == (1, 56, 56) and cells.shape == (2, 2) and text.shape == (tr.tokenizer.context_length,)
    # ink exactly in the occupied cells, 2-4 items, captions describe the cells in any order
    ink = tr.canvases.view(-1, 2, 28, 2, 28).sum((2, 4)) > 0
    assert torch.equal(ink, tr.cells >= 0)
    n_items = (ev.cells >= 0).sum((1, 2))
    assert n_items.min() >= 2 and n_items.max() <= 4
    for k in range(len(ev)):
        assert len(ev.captions[k]) == 2 and ev.captions[k][0] == caption_for(ev.cells[k])
        assert sorted(ev.captions[k][0].split(" and ")) == sorted(ev.captions[k][1].split(" and "))
    # eval canvases are distinct configurations, so each caption has exactly one correct image
    assert len({tuple(c.flatten().tolist()) for c in ev.cells}) == len(ev)
    assert ev.text_to_image.tolist() == [i // 2 for i in range(80)]
    # item pixels come from the train split for train canvases, the test split for eval canvases
    train_imgs, _ = classification.load_fashion_mnist(train=True)
    test_imgs, _ = classification.load_fashion_mnist(train=False)
    train_set = {bytes(x.numpy()) for x in train_imgs}
    test_set = {bytes(x.numpy()) for x in test_imgs}
    for ds, own in ((tr, train_set), (ev, test_set)):
        for k in range(10):
            for r in range(2):
                for q in range(2):
                    if ds.cells[k, r, q] >= 0:
                        assert bytes(ds.canvases[k, 28 * r : 28 * r + 28, 28 * q : 28 * q + 28].numpy()) in own
    # seeded and cached
    again_tr, _ = compositional_datasets(n_train=60, n_eval=40, seed=1, cache=tmp_path)
    assert torch.equal(again_tr.canvases, tr.canvases) and again_tr.captions == tr.captions
    assert len(list(tmp_path.glob("compositional-*.pt"))) == 1
    with pytest.raises(ValueError, match="56 .* or 84"):
        compositional_datasets(canvas=60)


@needs_fmnist
def test_compositional_eval_configurations_are_unique_even_when_collisions_are_likely():
    # 2 items on a 2x2 grid: only 600 configurations, so 250 random draws would repeat ~50 of them
    _, ev = compositional_datasets(n_train=10, n_eval=250, min_items=2, max_items=2, use_cache=False)
    assert len(set(c for caps in ev.captions for c in caps)) == 500
    assert len({tuple(c.flatten().tolist()) for c in ev.cells}) == 250
    with pytest.raises(ValueError, match="only 600 configurations"):
        compositional_datasets(n_train=10, n_eval=400, min_items=2, max_items=2, use_cache=False)


def test_patch_cell_labels_follow_vit_order():
    cells = torch.tensor([[3, -1], [-1, 8]])
    out = patch_cell_labels(cells, canvas=56, patch_size=14)
    assert out.tolist() == [3, 3, -1, -1, 3, 3, -1, -1, -1, -1, 8, 8, -1, -1, 8, 8]
    assert patch_cell_labels(cells[None].repeat(2, 1, 1), 56, 28).tolist() == [[3, -1, -1, 8]] * 2
    with pytest.raises(ValueError, match="does not divide"):
        patch_cell_labels(cells, 56, 10)


# ------------------------------------------------------------------------------------------------
# brain age: BIDS
# ------------------------------------------------------------------------------------------------


def test_bids_reads_resamples_and_normalises(tmp_path):
    root = make_bids(tmp_path / "bids")
    ds = bids_brain_age_dataset(root, shape=16, cache=tmp_path / "c")
    assert len(ds) == 3 and ds.participant_ids == ["sub-01", "sub-02", "sub-03"]
    assert ds.ages.tolist() == [25.0, 60.0, 80.0]
    vol, age, tissue = ds[1]
    assert vol.shape == (1, 16, 16, 16) and vol.dtype == torch.float32 and tissue.shape == (16, 16, 16)
    # scanner gain (x1, x2, x3 across subjects) is normalised away
    assert torch.allclose(ds.volumes[0], ds.volumes[2], atol=0.02)
    assert 0.95 < torch.quantile(vol[vol > 0], 0.99) < 1.05 and vol.min() >= 0
    assert set(tissue.unique().tolist()) == {0, 1, 2, 3}  # MNI template labels
    # the cache is keyed by the files: replacing an image is picked up, not served stale
    f = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.flip(img.get_fdata(), 0).copy() * (np.arange(24)[:, None, None] < 12), img.affine), f)
    assert not torch.equal(bids_brain_age_dataset(root, shape=16, cache=tmp_path / "c").volumes[0], ds.volumes[0])
    tr, ev = bids_brain_age_datasets(root, shape=16, eval_fraction=0.34, cache=tmp_path / "c")
    assert len(tr) == 2 and len(ev) == 1 and set(tr.participant_ids + ev.participant_ids) == set(ds.participant_ids)
    native = bids_brain_age_dataset(root, shape=16, space="native", cache=tmp_path / "c")
    assert native.volumes.shape == (3, 1, 16, 16, 16) and (native.tissue == -1).all()


def test_bids_reports_participants_without_image_or_age(tmp_path):
    root = make_bids(tmp_path / "bids", ages=("25", "n/a", "80"), with_image=(True, True, False))
    extra = root / "sub-09" / "anat"
    extra.mkdir(parents=True)
    (extra / "sub-09_T1w.nii.gz").write_bytes((root / "sub-01/anat/sub-01_T1w.nii.gz").read_bytes())
    with pytest.warns(UserWarning, match="3 participant\\(s\\) left out"):
        ds = bids_brain_age_dataset(root, shape=16, use_cache=False)
    assert ds.participant_ids == ["sub-01"]
    assert "no T1w image" in ds.skipped["sub-03"] and "age" in ds.skipped["sub-02"]
    assert "no row in participants.tsv" in ds.skipped["sub-09"]


def test_bids_validation_errors(tmp_path):
    root = make_bids(tmp_path / "bids")
    (root / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['age'\]; columns present: \['participant_id', 'sex'\]"):
        bids_brain_age_dataset(root, shape=16, use_cache=False)
    (root / "participants.tsv").write_text("participant_id,age\nsub-01,30\n")
    with pytest.raises(ValueError, match="comma- rather than tab-separated"):
        bids_brain_age_dataset(root, shape=16, use_cache=False)
    (root / "participants.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="participants.tsv not found.*participant_id and age"):
        bids_brain_age_dataset(root, shape=16, use_cache=False)

    root = make_bids(tmp_path / "bids2")
    bad = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated download
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*sub-02_T1w\.nii\.gz"):
        bids_brain_age_dataset(root, shape=16, use_cache=False)
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*sub-02_T1w\.nii\.gz"):
        bids_brain_age_dataset(root, shape=16, use_cache=False)


# ------------------------------------------------------------------------------------------------
# brain age: synthetic cohort and tissue labels
# ------------------------------------------------------------------------------------------------
def test_synthetic_cohort_is_seeded_and_ages():
    a = synthetic_brain_cohort(24, shape=16, seed=5)
    b = synthetic_brain_cohort(24, shape=16, seed=5)
    c = synthetic_brain_cohort(24, shape=16, seed=6)
    assert torch.equal(a["volumes"], b["volumes"]) and torch.equal(a["ages"], b["ages"])
    assert not torch.equal(a["volumes"], c["volumes"])
    assert a["volumes"].shape == (24, 1, 16, 16, 16) and a["tissue"].shape == (24, 16, 16, 16)
    ages = a["ages"].numpy()
    assert ages.min() >= 20 and ages.max() <= 90 and ages.std() > 10
    frac = [(a["tissue"] == k).float().mean((1, 2, 3)).numpy() for k in range(4)]
    assert np.corrcoef(frac[1], ages)[0, 1] < -0.6, "grey matter must shrink with age"
    assert np.corrcoef(frac[3], ages)[0, 1] > 0.6, "CSF must grow with age"
    # subjects differ beyond age (individual anatomy, scanner): same-age twins would not be identical
    assert (a["volumes"][0] - a["volumes"][1]).abs().mean() > 0.01
    v = a["volumes"].float()
    assert torch.isfinite(v).all() and v.min() >= 0 and (v[a["tissue"][:, None] == 0] == 0).all()


def test_synthetic_datasets_are_cached(tmp_path):
    tr, ev = brain.synthetic_brain_age_datasets(n_train=6, n_eval=3, shape=16, seed=0, cache=tmp_path)
    assert len(tr) == 6 and len(ev) == 3 and not torch.equal(tr.ages[:3], ev.ages)
    vol, age, tissue = tr[0]
    assert vol.shape == (1, 16, 16, 16) and age.ndim == 0 and tissue.dtype == torch.long
    assert len(list(tmp_path.glob("brain-synthetic-*.pt"))) == 1
    again, _ = brain.synthetic_brain_age_datasets(n_train=6, n_eval=3, shape=16, seed=0, cache=tmp_path)
    assert torch.equal(again.volumes, tr.volumes)


def test_patch_tissue_labels_majority_in_vit_order():
    vol = torch.zeros(4, 4, 4, dtype=torch.long)  # 2x2x2 patches of size 2
    vol[:2, :2, 2:] = 1  # patch (0, 0, 1): all grey matter
    vol[2:, :2, :2] = 2
    vol[2, 0, 0] = 3  # patch (1, 0, 0): 7 WM + 1 CSF -> WM
    vol[2:, 2:, 2:] = 3
    vol[2:, 2:, 2] = 1  # patch (1, 1, 1): 4 CSF / 4 GM tie -> GM
    vol[:2, 2:, :2] = -1
    vol[0, 2, 0] = 2  # patch (0, 1, 0): 7 unknown + 1 WM -> unknown
    out = patch_tissue_labels(vol, 2)
    assert out.tolist() == [0, 1, -1, 0, 2, 0, 0, 1]
    assert patch_tissue_labels(vol[None].repeat(3, 1, 1, 1), 2).shape == (3, 8)
    assert patch_tissue_labels(vol, 4).tolist() == [0]
    assert TISSUE_NAMES == ["background", "grey matter", "white matter", "CSF"]
    with pytest.raises(ValueError, match="does not divide"):
        patch_tissue_labels(vol, 3)


def test_template_tissue_labels_cover_all_tissues():
    lab = brain.template_tissue_labels(16)
    counts = torch.bincount(lab.flatten().long(), minlength=4)
    assert lab.shape == (16, 16, 16) and (counts > 0).all()
    assert counts[1] > counts[3] and counts[2] > counts[3]  # more GM and WM than CSF
