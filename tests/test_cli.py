"""The ``nanoseg`` command line."""

import re
import subprocess
import sys

import pytest

from nanoseg.__main__ import main


def test_demo_reports_what_it_found(capsys):
    assert main(["demo", "--shape", "12", "128", "128", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    found = int(re.search(r"Found (\d+) particles", out).group(1))
    truth = int(re.search(r"Phantom: .* (\d+) particles", out).group(1))
    hit = re.search(r"overlapped by a detection: (\d+) of (\d+)", out)
    dice = float(re.search(r"Voxel Dice against the ground truth: (\d\.\d+)", out).group(1))
    assert truth == int(hit.group(2)) > 0
    assert found > 0 and int(hit.group(1)) <= truth
    # The demo phantom is one the method handles: most particles are found.
    assert int(hit.group(1)) >= truth // 2 and dice > 0.3


def test_help_and_usage_errors():
    completed = subprocess.run([sys.executable, "-m", "nanoseg", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "demo" in completed.stdout
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
