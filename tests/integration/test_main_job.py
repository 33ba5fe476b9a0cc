"""The main job as a user of the installed package runs it: ``python -m lightning_bnsgd`` from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_main_job_from_the_installed_package(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_bnsgd", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path,  # outside the repository: the packaged config is found inside the package
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"^test accuracy: ([0-9.]+)$", done.stdout, flags=re.MULTILINE)
    assert len(found) == 1, done.stdout
    # A floor far above chance (0.1) and below every seed and thread count measured (benchmarks/main_job_spread.py),
    # never one machine's figure.
    assert float(found[0]) >= 0.95, done.stdout
    assert list((tmp_path / "runs" / "digits").glob("version_*/metrics.csv")), "the CSV log is written under cwd"
