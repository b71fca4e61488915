"""The report's control verdicts for ground-truth tasks (moebench.report.structure)."""
from moebench.report.structure import _controls


def test_controls_pass_when_they_come_out_as_they_must():
    text = _controls({"oracle": 0.99, "random": 0.01, "collapse": 0.0},
                     {"oracle": (1.0, 1.0, 1.0), "collapse": (0.5, 0.45, 0.55), "dense": (0.8, 0.7, 0.9)})
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
