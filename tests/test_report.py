"""The report against hand-made run records with known numbers: means, sample std (ddof=1), ranks,
paired differences and their t intervals computed by hand here; failed / missing / corrupt runs
shown as such; every plot written; best values bold."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from moebench.cli import main
from moebench.report.build import ReportError, build_report, load_records, write_report
from moebench.report.stats import paired_difference, t_cdf, t_quantile
from moebench.training.records import append_jsonl, atomic_write_json, atomic_write_yaml, write_status

T975_DF2 = 4.302652729911275  # Student t 97.5% quantile, 2 degrees of freedom (statistical tables)
E = 4  # experts per MoE layer in the fake records

# headline values per (task, router) over seeds 0, 1, 2
CLS = {"softmax-topk": [0.60, 0.62, 0.64], "ermoe-context": [0.65, 0.66, 0.70], "dense": [0.55, 0.58, 0.58]}
AGE = {"softmax-topk": [4.7, 4.9, 5.1], "ermoe-context": [4.8, 5.0, 5.3], "dense": [5.5, 5.6, 5.7]}
LOAD_CV = {"softmax-topk": 0.40, "ermoe-context": 0.10}


def write_run(
    grid_dir,
    run_id,
    task,
    label,
    seed,
    value=None,
    *,
    higher=True,
    state="done",
    reason=None,
    load_cv=None,
    layers=2,
    evals=3,
    labels=("grey", "white", "csf"),
):
    """One run record folder in the layout the runner writes (spec, status, metrics.jsonl, final.json)."""
    run = grid_dir / run_id
    moe = None if label == "dense" else {"router": label.split("-")[0], "num_experts": E}
    atomic_write_yaml(
        run / "spec.yaml", {"grid": grid_dir.name, "task": task, "label": label, "seed": seed, "sweep": {}, "moe": moe}
    )
    write_status(run, state, reason)
    if state != "done":
        return run
    rng = np.random.default_rng(seed)
    cv = (LOAD_CV.get(label, 0.25) if load_cv is None else load_cv) + 0.01 * seed
    mean = {
        "load_cv": cv,
        "max_mean": 1 + 2 * cv,
        "norm_entropy": 1 - cv / 4,
        "dead_experts": 0.0,
        "drop_rate": 0.0,
        "switch_rate": 0.05 + 0.01 * seed,
        "mutual_info": 0.2 + cv,
    }
    per_layer = []
    if moe:
        for i in range(layers):
            counts = (100 * (1 + cv * np.linspace(1, -1, E))).round().astype(int).tolist()
            lbe = rng.integers(0, 50, size=(len(labels), E)).tolist()
            per_layer.append(
                {
                    "layer": f"blocks.{2 * i + 1}",
                    **mean,
                    "counts": counts,
                    "label_by_expert": lbe,
                    "labels": list(labels),
                }
            )
        for step in range(evals):
            append_jsonl(
                run / "metrics.jsonl",
                {
                    "step": 100 * (step + 1),
                    "train_loss": 1.0 / (step + 1),
                    "lr": 1e-3,
                    "metrics": {"top1": value},
                    "routing": {"mean": {**mean, "switch_rate": 0.3 / (step + 1)}},
                },
            )
    atomic_write_json(
        run / "final.json",
        {
            "run_id": run_id,
            "grid": grid_dir.name,
            "task": task,
            "router": (moe or {}).get("router", "dense"),
            "label": label,
            "seed": seed,
            "sweep": {},
            "headline": {"name": "top1" if higher else "mae", "value": value, "higher_is_better": higher},
            "metrics": {},
            "routing": {"mean": mean if moe else {}, "per_layer": per_layer},
            "cost": {
                "params_total": 4e6 if moe else 1e6,
                "params_active": 1e6,
                "flops_per_token": 2.0e6,
                "wall_time_s": 10.0,
                "tokens_per_s": 5000.0 + seed,
                "peak_memory_mb": 100.0,
            },
        },
    )
    return run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two tasks x three routers x three seeds, all done."""
    grid = tmp_path_factory.mktemp("results") / "g"
    for task, table, higher in (("cls", CLS, True), ("brain-age", AGE, False)):
        for label, values in table.items():
            for seed, v in enumerate(values):
                write_run(grid, f"{task}-{label}-{seed}", task, label, seed, v, higher=higher)
    return grid


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    return write_report(results, tmp_path_factory.mktemp("report"), plots=False)


def test_t_quantile_and_paired_interval_match_hand_values():
    assert t_quantile(0.975, 2) == pytest.approx(T975_DF2, rel=1e-9)
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736174705, rel=1e-9)
    assert t_quantile(0.025, 9) == pytest.approx(-2.2621571627409915, rel=1e-9)
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    res = paired_difference(CLS["ermoe-context"], CLS["softmax-topk"])  # diffs 0.05, 0.04, 0.06
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert (res.n, res.mean, res.sd) == (3, pytest.approx(0.05), pytest.approx(0.01))
    assert (res.ci_low, res.ci_high) == (pytest.approx(0.05 - half), pytest.approx(0.05 + half))
    one = paired_difference([1.0], [0.5])
    assert one.n == 1 and math.isnan(one.ci_low)


def test_load_records_one_row_per_run_with_stats(results):
    runs = load_records(results)
    assert len(runs) == 18 and set(runs["state"]) == {"done"}
    row = runs[(runs["task"] == "cls") & (runs["label"] == "ermoe-context") & (runs["seed"] == 1)].iloc[0]
    assert row["headline_value"] == pytest.approx(0.66)
    assert row["load_cv"] == pytest.approx(0.11)
    assert row["flops_per_token"] == 2.0e6 and row["higher_is_better"]


def test_leaderboard_means_std_ddof1_and_order(results):
    lb = build_report(results).leaderboard
    cls = lb[lb["bench"] == "cls"].set_index("label")
    assert list(cls.index) == ["ermoe-context", "softmax-topk", "dense"]  # best first, higher is better
    assert cls.loc["ermoe-context", "headline_mean"] == pytest.approx(0.67)
    assert cls.loc["ermoe-context", "headline_std"] == pytest.approx(math.sqrt(7e-4))  # ddof=1, not ddof=0
    assert cls.loc["softmax-topk", "headline_std"] == pytest.approx(0.02)
    assert cls.loc["softmax-topk", "load_cv"] == pytest.approx(0.41)  # mean of 0.40, 0.41, 0.42
    assert cls["complete"].all() and (cls["n_done"] == 3).all()
    age = lb[lb["bench"] == "brain-age"]
    assert list(age["label"]) == ["softmax-topk", "ermoe-context", "dense"]  # lower MAE first


def test_average_rank_respects_direction(results):
    ranks = build_report(results).ranks.set_index("label")
    assert ranks.loc["ermoe-context", "rank:cls"] == 1 and ranks.loc["ermoe-context", "rank:brain-age"] == 2
    assert ranks.loc["softmax-topk", "avg_rank"] == pytest.approx(1.5)
    assert ranks.loc["ermoe-context", "avg_rank"] == pytest.approx(1.5)
    assert ranks.loc["dense", "avg_rank"] == pytest.approx(3.0)


def test_paired_comparison_against_softmax_topk(results):
    paired = build_report(results).paired.set_index(["bench", "label"])
    cls = paired.loc[("cls", "ermoe-context")]
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert cls["diff_mean"] == pytest.approx(0.05)
    assert (cls["ci_low"], cls["ci_high"]) == (pytest.approx(0.05 - half), pytest.approx(0.05 + half))
    assert cls["verdict"] == "better"
    age = paired.loc[("brain-age", "ermoe-context")]  # diffs 0.1, 0.1, 0.2 (MAE, lower better)
    sd = np.std([0.1, 0.1, 0.2], ddof=1)
    assert age["ci_low"] == pytest.approx(0.4 / 3 - T975_DF2 * sd / math.sqrt(3))
    assert age["verdict"] == "n.s."
    assert paired.loc[("brain-age", "dense"), "verdict"] == "worse"  # higher MAE with CI above 0
    assert ("cls", "softmax-topk") not in paired.index


def test_markdown_and_latex_bold_the_best(report):
    md = (report / "leaderboard.md").read_text()
    # mean [95% t interval over 3 seeds]: 0.670 ± 4.303 * 0.0265 / sqrt(3); every interval overlaps the
    # best's, so all share rank group 1 and nothing is singled out in bold
    assert "| ermoe-context | 3/3 | 0.670 [0.604, 0.736] | 1 |" in md
    assert "| softmax-topk | 3/3 | 0.620 [0.570, 0.670] | 1 |" in md
    assert md.count("**0.110**") == 2  # lowest load CV (ermoe), both tasks
    assert "**0.0**" not in md  # dead experts equal everywhere: no bold
    tex = (report / "leaderboard.tex").read_text()
    assert r"\textbf{+0.0500}" in tex and r"\toprule" in tex  # cls ermoe-context beats the baseline
    assert "cls & dense & $-$0.0500" in tex  # a real minus sign, escaped names
    assert r"\begin{table*}" in tex  # the wide leaderboard spans the page


def test_every_plot_written_and_embedded(tmp_path):
    grid = tmp_path / "g"
    for label in ("softmax-topk", "ermoe-context", "dense"):
        for seed, v in enumerate(AGE[label][:2]):
            write_run(grid, f"{label}{seed}", "brain-age", label, seed, v, higher=False, layers=1)
    out = write_report(grid, tmp_path / "rep", formats=("html",))
    plots = out / "plots"
    for kind in (
        "headline",
        "tradeoff",
        "pareto_flops",
        "pareto_params",
        "stability",
        "per_layer",
        "load",
        "specialisation",
    ):
        for ext in ("png", "pdf"):
            files = list(plots.glob(f"{kind}_brain-age*.{ext}"))
            assert files and all(f.stat().st_size > 1000 for f in files), (kind, ext)
    assert len(list(plots.glob("specialisation_*.png"))) == 1  # one small-multiples figure per task
    for png in plots.glob("*.png"):  # one paper column (3.5 in at 200 dpi); small multiples the page width (7 in)
        wide = png.name.startswith(("stability", "specialisation", "per_layer"))
        assert struct.unpack(">I", png.read_bytes()[16:20])[0] == (1400 if wide else 700), png.name
    page = (out / "report.html").read_text()
    assert len(list(plots.glob("profile_*.png"))) == 1  # the performance profile across tasks
    assert page.count("data:image/png;base64,") == len(list(plots.glob("*.png"))) == 9


def test_csv_files_hold_the_numbers(report):
    import pandas as pd

    lb = pd.read_csv(report / "leaderboard.csv")
    row = lb[(lb["bench"] == "cls") & (lb["label"] == "dense")].iloc[0]
    assert row["headline_mean"] == pytest.approx(0.57) and row["n_done"] == 3
    assert len(pd.read_csv(report / "runs.csv")) == 18
    assert set(pd.read_csv(report / "paired.csv")["verdict"]) == {"better", "worse", "n.s."}
    assert pd.read_csv(report / "ranks.csv")["avg_rank"].min() == pytest.approx(1.5)


def test_failed_and_missing_runs_flag_the_group(tmp_path):
    grid = tmp_path / "g"
    expected = []
    for label, values in (("softmax-topk", CLS["softmax-topk"]), ("ermoe-context", CLS["ermoe-context"])):
        for seed, v in enumerate(values):
            rid = f"{label}-{seed}"
            expected.append({"run_id": rid, "label": label, "task": "cls", "seed": seed, "sweep": {}})
            if label == "softmax-topk" and seed == 2:
                write_run(grid, rid, "cls", label, seed, state="failed", reason="NaN loss at step 40")
            elif not (label == "ermoe-context" and seed == 1):  # seed 1 of ermoe never ran
                write_run(grid, rid, "cls", label, seed, v)
    atomic_write_json(grid / "expected.json", expected)
    rep = build_report(grid)
    runs = rep.rs.runs.set_index("run_id")
    assert runs.loc["ermoe-context-1", "state"] == "missing"
    assert runs.loc["softmax-topk-2", "state"] == "failed"
    lb = rep.leaderboard.set_index("label")
    assert not lb["complete"].any()
    assert lb.loc["softmax-topk", "headline_mean"] == pytest.approx(0.61)  # the two seeds that finished
    assert (lb.loc["softmax-topk", "n_done"], lb.loc["softmax-topk", "n_expected"]) == (2, 3)
    out = write_report(grid, tmp_path / "rep", formats=("md",), plots=False)
    md = (out / "leaderboard.md").read_text()
    assert "2/3 [1]" in md and "2/3 [2]" in md
    assert "seed 2 failed: NaN loss at step 40" in md
    assert "seed 1 missing" in md
    assert "| cls | ermoe-context |  | 1 | missing |" in md  # the runs-without-a-result table


def test_missing_seed_detected_without_expected_json(tmp_path):
    grid = tmp_path / "g"
    for seed in range(3):
        write_run(grid, f"a{seed}", "cls", "softmax-topk", seed, 0.6)
    for seed in range(2):
        write_run(grid, f"b{seed}", "cls", "ermoe-context", seed, 0.7)
    lb = build_report(grid).leaderboard.set_index("label")
    assert not lb.loc["ermoe-context", "complete"] and lb.loc["ermoe-context", "n_expected"] == 3
    assert "seed 2 has no run" in lb.loc["ermoe-context", "problems"]
    assert lb.loc["softmax-topk", "complete"]


def test_corrupt_final_json_is_reported_not_fatal(tmp_path):
    grid = tmp_path / "g"
    for seed in range(2):
        write_run(grid, f"ok{seed}", "cls", "softmax-topk", seed, 0.6)
        write_run(grid, f"e{seed}", "cls", "ermoe-context", seed, 0.7)
    (grid / "e1" / "final.json").write_text('{"run_id": "e1", "headline": {')
    (grid / "x").mkdir()
    (grid / "x" / "spec.yaml").write_text("task: [cls")  # torn spec, no status, no final
    out = write_report(grid, tmp_path / "rep", formats=("md", "html"), plots=False)
    runs = load_records(grid).set_index("run_id")
    assert runs.loc["e1", "state"] == "corrupt"
    assert runs.loc["x", "state"] == "corrupt" and "spec.yaml: not valid YAML" in runs.loc["x", "reason"]
    md = (out / "leaderboard.md").read_text()
    assert "## Problems with records" in md and "final.json: not valid JSON" in md
    assert "seed 1 corrupt" in md
    assert "final.json: not valid JSON" in (out / "report.html").read_text()


def test_sweep_points_are_separate_groups_and_pairs(tmp_path):
    grid = tmp_path / "g"
    for k, gain in ((1, 0.0), (2, 0.05)):
        for seed in range(2):
            for label, base in (("softmax-topk", 0.6), ("ermoe-context", 0.62)):
                run = write_run(grid, f"{label}-k{k}-{seed}", "cls", label, seed, base + gain + seed / 100)
                for name in ("final.json",):
                    rec = json.loads((run / name).read_text())
                    rec["sweep"] = {"top_k": k}
                    atomic_write_json(run / name, rec)
    rep = build_report(grid)
    lb = rep.leaderboard.set_index(["label", "variant"])
    assert lb.loc[("ermoe-context", "top_k=2"), "headline_mean"] == pytest.approx(0.675)
    pairs = rep.paired.set_index("variant")
    assert pairs.loc["top_k=1", "diff_mean"] == pytest.approx(0.02)
    assert pairs.loc["top_k=1", "n_pairs"] == 2
    assert rep.bench_tables[0][1][0].columns[:3] == ["Router", "Sweep", "Seeds"]


def test_parent_folder_with_two_grids_keeps_same_task_apart(tmp_path):
    for grid in ("quick", "full"):
        for seed in range(2):
            write_run(tmp_path / grid, f"{grid}{seed}", "cls", "softmax-topk", seed, 0.5 if grid == "quick" else 0.8)
    lb = build_report(tmp_path).leaderboard.set_index("bench")
    assert lb.loc["cls [quick]", "headline_mean"] == pytest.approx(0.5)
    assert lb.loc["cls [full]", "headline_mean"] == pytest.approx(0.8)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run records" in capsys.readouterr().err
    with pytest.raises(ReportError, match="unknown report format"):
        write_report(tmp_path, formats=("md", "docx"))


def test_cli_writes_requested_formats(tmp_path, capsys):
    grid = tmp_path / "g"
    for seed in range(2):
        write_run(grid, f"s{seed}", "cls", "softmax-topk", seed, 0.6 + seed / 100, layers=1, evals=2)
    assert main(["report", str(grid), "--out", str(tmp_path / "o"), "--format", "csv,tex"]) == 0
    assert (tmp_path / "o" / "leaderboard.tex").exists() and (tmp_path / "o" / "leaderboard.csv").exists()
    assert not (tmp_path / "o" / "report.html").exists() and not (tmp_path / "o" / "plots").exists()
    assert "leaderboard.tex" in capsys.readouterr().out
    assert json.loads(json.dumps(load_records(grid)["seed"].tolist())) == [0, 1]


def test_a_data_sweep_gets_one_figure_per_data_value_in_its_task_section(tmp_path):
    """The structure track sweeps its generator (task_args.data): its plots are one figure per generator
    (as its rank tables are), placed in the task's own section, legends naming routers only."""
    from moebench.report.plots import Plotter

    grid = tmp_path / "g"
    for data in ("clusters", "subspaces"):
        for seed in range(2):
            for label, base in (("softmax-topk", 0.6), ("dense", 0.5)):
                run = write_run(grid, f"{label}-{data}-{seed}", "structure", label, seed, base + seed / 100)
                rec = json.loads((run / "final.json").read_text())
                rec["sweep"] = {"task_args.data": data}
                atomic_write_json(run / "final.json", rec)
    rep = build_report(grid)
    assert set(rep.leaderboard["variant"]) == {"task_args.data=clusters", "task_args.data=subspaces"}
    plots = [p for p in Plotter(rep.rs, rep.leaderboard, tmp_path / "plots").all() if p.kind == "headline"]
    assert sorted(p.png.name for p in plots) == ["headline_structure_clusters.png", "headline_structure_subspaces.png"]
    assert {p.bench for p in plots} == {"structure"}  # the html places them in the task's section
    assert all("task_args" not in p.caption for p in plots)


def test_a_data_sweep_is_ranked_within_each_data_value_never_across(tmp_path):
    """Generators of the structure track have their own headline scales (accuracy, R²): the average-rank
    table ranks routers within each generator, as separate tasks."""
    from moebench.report.tables import rank_frame

    grid = tmp_path / "g"
    for data, scale in (("clusters", 0.9), ("latent-regression", 0.1)):
        for seed in range(2):
            for label, gain in (("softmax-topk", 0.0), ("switch", 0.05)):
                run = write_run(grid, f"{label}-{data}-{seed}", "structure", label, seed, scale + gain + seed / 100)
                rec = json.loads((run / "final.json").read_text())
                rec["sweep"] = {"task_args.data": data}
                atomic_write_json(run / "final.json", rec)
    ranks = rank_frame(build_report(grid).leaderboard).set_index("label")
    assert sorted(c for c in ranks.columns if c.startswith("rank:")) == [
        "rank:structure: clusters",
        "rank:structure: latent-regression",
    ]
    assert ranks.loc["switch", "avg_rank"] == 1.0 and ranks.loc["softmax-topk", "avg_rank"] == 2.0
    assert (ranks["n_tasks"] == 2).all()
