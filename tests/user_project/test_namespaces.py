"""Issue: the plugin must work with the user's Trainer whatever was imported first and whichever namespace
``lightning_bnsgd`` picked for its own LightningModule/DataModule classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_bnsgd import _compat

SCRIPT = Path(__file__).with_name("_import_order.py")


def _run(order: str, backend: str | None, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _compat.ENV_VAR}
    if backend is not None:
        env[_compat.ENV_VAR] = backend
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), order, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.both_namespaces
@pytest.mark.parametrize("order", ["first", "last"])
@pytest.mark.parametrize("backend", [None, "pytorch_lightning"])
def test_callbacks_follow_the_users_trainer(tmp_path: Path, order: str, backend: str | None) -> None:
    result = _run(order, backend, tmp_path)
    # with both packages installed and no override, our classes subclass lightning.pytorch in either order
    assert result["backend"] == (backend or "lightning")
    # statistics from normalized inputs (through on_after_batch_transfer), exact
    assert result["recalibrations"] == 1
    assert result["mean_error"] < 1e-4 and result["var_error"] < 1e-4, result
    assert result["swa_order_error"] is not None and "must come after StochasticWeightAveraging" in str(
        result["swa_order_error"]
    )
    assert result["histogram_warnings"] == [] and result["event_files"] >= 1, result
    assert result["cli_callbacks"] == ["BNRecalibration", "BNStatsMonitor", "WeightDynamicsMonitor"]
