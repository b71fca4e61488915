"""`moebench train` on each real task's offline default (tiny size), end to end through the CLI:
a record with the task's headline, routing statistics, specialisation labels and cost."""

import json
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.tasks.datasets import cache

pytestmark = pytest.mark.slow
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path_factory.getbasetemp() / "moebench-cache"))


@pytest.mark.parametrize(
    "task, router, headline, labels",
    [
        ("classification", "ermoe", "top1", 10),
        ("retrieval", "switch", "mean_r1", 11),
        ("brain-age", "ermoe-context-check", "mae", 4),
    ],
)
def test_train_cli_writes_a_complete_record(tmp_path, task, router, headline, labels):
    if task != "brain-age" and not HAVE_FMNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    args = ["train", "--task", task, "--size", "tiny", "--results", str(tmp_path)]
    if router == "ermoe-context-check":  # a router that needs the attention context, through moefy's hook
        args += ["--router", "ermoe", "--router-args", "{score: context}"]
    else:
        args += ["--router", router]
    assert main(args) == 0
    (final_path,) = Path(tmp_path, "single").glob("*/final.json")
    final = json.loads(final_path.read_text())
    assert final["headline"]["name"] == headline and final["metrics"][headline] == final["headline"]["value"]
    layers = final["routing"]["per_layer"]
    assert len(layers) >= 2 and all(sum(layer["counts"]) > 0 for layer in layers)
    labelled = [layer for layer in layers if layer.get("label_by_expert")]
    assert labelled and all(len(layer["labels"]) == labels for layer in labelled)
    assert final["cost"]["flops_per_token"] > 0 and final["cost"]["params_total"] > final["cost"]["params_active"]
    assert final["env"]["libraries"]["torch"]
    import numpy as np

    with np.load(final_path.parent / "eval_items.npz") as items:  # per-example outputs, mean = headline
        assert items["headline"].mean() == pytest.approx(final["headline"]["value"], rel=1e-5, abs=1e-6)
    status = json.loads((final_path.parent / "status.json").read_text())
    assert status["state"] == "done"
