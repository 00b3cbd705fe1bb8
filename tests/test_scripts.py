"""The device scripts (benchmarks/*.sh) run on a lent GPU, minutes at a time: a syntax error there costs a call.
``bash -n`` parses each one here."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))


def test_the_device_scripts_are_found():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"gpu_check.sh", "gpu_restorer.sh", "gpu_restorer_prep.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_device_script_parses(path):
    done = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
