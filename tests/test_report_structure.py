"""The report's control verdicts for ground-truth tasks (moebench.report.structure)."""

from moebench.report.structure import _controls


def test_controls_pass_when_they_come_out_as_they_must():
    text = _controls(
        {"oracle": 0.99, "random": 0.01, "collapse": 0.0},
        {"oracle": (1.0, 1.0, 1.0), "collapse": (0.5, 0.45, 0.55), "dense": (0.8, 0.7, 0.9)},
    )
    assert text.startswith("controls came out as they must") and "collapse last" in text


def test_a_failed_control_is_said_plainly():
    text = _controls({"oracle": 0.7, "random": 0.2}, {"oracle": (0.9, 0.8, 1.0)})
    assert "did NOT come out as they must" in text and "oracle NMI 0.700" in text and "random NMI 0.200" in text
    assert "not to be trusted" in text
    far = _controls({"collapse": 0.0}, {"collapse": (0.9, 0.88, 0.92), "switch": (0.5, 0.4, 0.6)})
    assert "collapse is NOT last" in far and "did NOT" in far


def test_collapse_tied_with_the_last_within_noise_is_reported_as_a_tie():
    text = _controls({"collapse": 0.0}, {"collapse": (0.851, 0.840, 0.862), "switch": (0.850, 0.84, 0.86)})
    assert "NOT strictly last" in text and "tied with the last" in text and "did NOT" not in text


def test_the_section_is_only_for_tasks_with_ground_truth(tmp_path):
    """Every task's runs carry the expert-label NMI; only a task that records per-role recovery (it knows
    each token's true group) gets a structure-recovery table."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from moebench.report.structure import structure_section

    rows = []
    for task, roles in (("classification", {}), ("structure", {"centre": {"nmi": 0.9}})):
        for seed in (0, 1):
            run = tmp_path / f"{task}-{seed}"
            run.mkdir()
            (run / "final.json").write_text(json.dumps({"routing": {"recovery_by_role": roles}}))
            rows.append(
                {
                    "state": "done",
                    "run_dir": str(run),
                    "bench": task,
                    "variant": "",
                    "label": "switch",
                    "nmi": 0.5 + 0.01 * seed,
                    "headline_name": "score",
                    "headline_value": 0.8 + 0.01 * seed,
                }
            )
    tables, lines = structure_section(SimpleNamespace(runs=pd.DataFrame(rows)), pd.DataFrame({"label": ["switch"]}), {})
    assert [t.title for t in tables] == ["Structure recovery: structure"] and len(lines) == 1
    assert tables[0].rows[0][-3:][1].startswith("0.900")  # the centre role's NMI is read from the record
