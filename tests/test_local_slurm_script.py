"""scripts/local-slurm.sh takes start / stop [--force] / status; a wrong word changes nothing.
(Starting and stopping a real cluster is left to the `slurm` tests' machine: stopping one here could
stop another user's cluster.)"""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bogus"], "unknown command 'bogus' (start, stop [--force] or status)"),
        (["stop", "--now"], "stop takes only --force, got '--now'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_happens(argv, message):
    out = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert message in out.stderr
    assert "stop [--force]" in out.stderr  # the usage is printed


def test_help_lists_the_three_commands():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert [line.split()[1] for line in out.stderr.splitlines()] == ["[start]", "stop", "status"]
