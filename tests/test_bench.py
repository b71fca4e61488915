"""The benchmarks' bookkeeping: memory of a step, the model benchmark's rows and ratios, layer presets.
(Timings themselves are machine-dependent: only their arithmetic is asserted.)"""

from __future__ import annotations

import pytest
import torch

from moebench.bench import model as model_bench
from moebench.bench.memory import step_memory
from moebench.cli import main


def test_saved_memory_counts_activations_once_and_leaves_parameters_out():
    lin = torch.nn.Linear(64, 64)

    def step(batch):
        x = torch.randn(batch, 64)
        h = lin(x)
        (h * h).sum().backward()  # saves x (for the weight grad) and h (twice, one storage)

    small = step_memory(lambda: step(100), torch.device("cpu"), lin.parameters())
    large = step_memory(lambda: step(200), torch.device("cpu"), lin.parameters())
    assert small["peak_mb"] is None  # no allocator peak on a CPU
    assert small["saved_mb"] * 2**20 == pytest.approx(2 * 100 * 64 * 4)  # x and h, float32, no weight
    assert large["saved_mb"] == pytest.approx(2 * small["saved_mb"])


TINY = model_bench.ModelConfig(
    {
        "family": "timm",
        "name": "vit-custom",
        "img_size": 16,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 1000,
    },
    {"blocks": "last-1", "num_experts": 4},
    "image",
    16,
)


def test_model_bench_row_is_consistent(monkeypatch):
    monkeypatch.setitem(model_bench.CONFIGS, "tiny", TINY)
    row = model_bench.bench_model("tiny", batch_size=4, repeats=1, warmup=0)
    assert row["tokens_per_sample"] == 5  # 2 x 2 patches + the cls token
    for side in ("dense", "moe"):
        assert row[f"{side}_samples_per_s"] == pytest.approx(4 / (row[f"{side}_ms"] / 1e3), rel=1e-2)
        assert row[f"{side}_saved_mb"] > 0
    assert row["moe_tokens_per_s"] == pytest.approx(row["moe_samples_per_s"] * 5, rel=1e-2)
    assert row["time_ratio"] == pytest.approx(row["moe_ms"] / row["dense_ms"], rel=1e-2)
    assert row["saved_mem_ratio"] == pytest.approx(row["moe_saved_mb"] / row["dense_saved_mb"], rel=5e-2)
    assert "tiny" in model_bench.format_rows([row])


def test_model_bench_reports_skipped_configs_and_rejects_unknown(capsys):
    assert model_bench.bench_model("vit-b16-adapters")["skipped"]
    with pytest.raises(ValueError, match="unknown bench model config 'vit-l'.*vit-s16"):
        model_bench.bench_model("vit-l")
    assert main(["bench", "model", "--configs", "vit-l"]) == 2
    assert "unknown config 'vit-l'" in capsys.readouterr().out


def test_layer_preset_sets_realistic_sizes(monkeypatch, capsys):
    seen = {}

    def fake_bench_layer(routers, num_experts, ks, tokens, d_model, d_hidden, dtype, device, repeats, peers):
        seen.update(tokens=tokens, d_model=d_model, d_hidden=d_hidden, dtype=dtype)
        return [
            {
                c: 0
                for c in (
                    "router",
                    "E",
                    "k",
                    "T",
                    "d",
                    "d_hidden",
                    "dtype",
                    "ms",
                    "ratio",
                    "ratio_to",
                    "saved_mb",
                    "saved_ratio",
                    "peak_mb",
                    "peak_ratio",
                )
            }
        ]

    import moebench.bench.layer as layer_bench

    monkeypatch.setattr(layer_bench, "bench_layer", fake_bench_layer)
    assert main(["bench", "layer", "--preset", "vit-b"]) == 0
    assert seen == {"tokens": 32768, "d_model": 768, "d_hidden": 3072, "dtype": torch.float32}
