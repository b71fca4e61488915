"""CIFAR-10 / CIFAR-100 in torchvision's on-disk format: small fixture files written in that format,
read through the classification task; a tampered pickle is refused without running its code."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers.real_format_fixtures import make_cifar

from moebench.core.registry import TASKS
from moebench.tasks.datasets import cifar_datasets
from moebench.tasks.datasets.classification import CIFAR_MEAN, CIFAR_STD, load_cifar, read_cifar_batch


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reads_every_batch_in_order_with_labels_and_class_names(tmp_path, kind):
    make_cifar(tmp_path, kind, per_batch=6, n_test=5)
    images, labels, classes = load_cifar(tmp_path, kind, train=True)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == list(range(30))  # batch 1 .. 5, in file order
    n = 10 if kind == "cifar10" else 100
    assert labels.tolist() == [i % n for i in range(30)]
    assert len(classes) == n and classes[3] == ("class3" if kind == "cifar10" else "fine3")
    test_images, test_labels, _ = load_cifar(tmp_path, kind, train=False)
    assert test_images[:, 0, 0, 0].tolist() == list(range(30, 35)) and test_labels.tolist() == [
        i % n for i in range(30, 35)
    ]


def test_cifar_rows_are_channel_planes_normalised_and_resized(tmp_path):
    folder = make_cifar(tmp_path, "cifar10", per_batch=2, n_test=2)
    raw = read_cifar_batch(folder / "data_batch_1")["data"][1]
    tr, ev = cifar_datasets(folder, "cifar10")  # root may be the batches folder itself
    x, y = tr[1]
    planes = raw.reshape(3, 32, 32).astype(np.float32) / 255.0
    want = (torch.from_numpy(planes) - torch.tensor(CIFAR_MEAN["cifar10"]).view(3, 1, 1)) / torch.tensor(
        CIFAR_STD["cifar10"]
    ).view(3, 1, 1)
    assert torch.allclose(x, want) and int(y) == 1 and len(ev) == 2
    big, _ = cifar_datasets(tmp_path, "cifar10", img_size=64)
    assert big[1][0].shape == (3, 64, 64)
    sub, _ = cifar_datasets(tmp_path, "cifar10", train_size=4, seed=3)
    again, _ = cifar_datasets(tmp_path, "cifar10", train_size=4, seed=3)
    assert len(sub) == 4 and torch.equal(sub.images, again.images)


def test_cifar_errors_name_the_folder_and_the_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*torchvision"):
        load_cifar(tmp_path, "cifar10", train=True)
    folder = make_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        load_cifar(tmp_path, "cifar10", train=True)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"uint8 array \(N, 3072\)"):
        load_cifar(tmp_path, "cifar10", train=True)
    with pytest.raises(ValueError, match="needs task_args.root"):
        TASKS.get("classification")(data="cifar10").datasets()
    with pytest.raises(ValueError, match="root is only read for data cifar10"):
        TASKS.get("classification")(root=str(tmp_path))


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_tampered_cifar_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar(tmp_path, "cifar10")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Payload(), "labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.exec"):
        load_cifar(tmp_path, "cifar10", train=False)
    assert not (tmp_path / "PWNED").exists()


def test_classification_task_trains_on_cifar100_fixture(tmp_path):
    make_cifar(tmp_path, "cifar100", per_batch=8, n_test=6)
    task = TASKS.get("classification")(data="cifar100", root=str(tmp_path))
    assert task.num_classes == 100
    model = task.build_model(
        {
            "family": "timm",
            "name": "vit-custom",
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "global_pool": "avg",
            "class_token": False,
        },
        {"blocks": "last-1", "num_experts": 2},
    )
    train, ev = task.datasets()
    assert task.label_names[7] == "fine7"
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    logits = task.forward(model, batch)
    assert logits.shape == (8, 100)
    task.loss(logits, batch).backward()
    loader = torch.utils.data.DataLoader(ev, batch_size=4)
    metrics = task.evaluate(model, loader, torch.device("cpu"))
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["top1"] * 6 == round(metrics["top1"] * 6)
