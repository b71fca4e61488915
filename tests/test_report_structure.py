"""The report's control verdicts for ground-truth tasks (moebench.report.structure)."""

import pandas as pd

from moebench.report.structure import _controls


def _vs_dense(**verdicts):
    return pd.DataFrame({"label": list(verdicts), "verdict": list(verdicts.values())})


GOOD_NMI = {"oracle": 0.99, "random": 0.01, "collapse": 0.0}


def test_controls_pass_when_they_come_out_as_they_must():
    text = _controls(
        GOOD_NMI,
        {"oracle": (1.0, 1.0, 1.0), "collapse": (0.8, 0.75, 0.85), "dense": (0.8, 0.7, 0.9)},
        _vs_dense(oracle="better", collapse="n.s."),
    )
    assert text.startswith("controls came out as they must"), text
    assert "collapse not better than FLOP-matched dense" in text and "collapse is below the oracle" in text


def test_a_failed_nmi_control_is_said_plainly():
    text = _controls({"oracle": 0.7, "random": 0.2, "collapse": 0.3}, {"oracle": (0.9, 0.8, 1.0)})
    assert "did NOT come out as they must" in text and "oracle NMI 0.700" in text and "random NMI 0.200" in text
    assert "collapse NMI 0.300" in text and "not to be trusted" in text


def test_collapse_better_than_dense_fails():
    text = _controls(
        GOOD_NMI, {"collapse": (0.9, 0.88, 0.92), "dense": (0.8, 0.79, 0.81)}, _vs_dense(collapse="better")
    )
    assert "did NOT" in text and "collapse is BETTER than FLOP-matched dense" in text


def test_collapse_not_below_an_oracle_that_beats_dense_fails():
    scores = {"oracle": (0.9, 0.88, 0.92), "collapse": (0.95, 0.9, 1.0), "dense": (0.8, 0.79, 0.81)}
    text = _controls(GOOD_NMI, scores, _vs_dense(oracle="better", collapse="n.s."))
    assert "did NOT" in text and "collapse is NOT below it" in text
    # the rule applies only where the oracle beats dense
    text = _controls(GOOD_NMI, scores, _vs_dense(oracle="n.s.", collapse="n.s."))
    assert "did NOT" not in text and "below the oracle" not in text
    # lower-is-better headlines: "below" means a larger value
    text = _controls(
        GOOD_NMI, {"oracle": (0.1, 0.1, 0.1), "collapse": (0.5, 0.4, 0.6)}, _vs_dense(oracle="better"), False
    )
    assert "collapse is below the oracle" in text and "did NOT" not in text


def test_collapse_rank_and_routers_below_it_are_information_not_failure():
    text = _controls(
        GOOD_NMI,
        {"collapse": (0.85, 0.84, 0.86), "dense": (0.86, 0.85, 0.87), "hash": (0.80, 0.79, 0.81)},
        _vs_dense(collapse="n.s.", hash="worse"),
    )
    assert "did NOT" not in text and "collapse ranks 2 of 3" in text and "below it: hash 0.800" in text
    assert "a quarter of the data" in text


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
