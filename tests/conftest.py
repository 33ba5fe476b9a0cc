"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_bnsgd._compat import BACKEND, Trainer


def pytest_sessionstart(session):
    """With ``BNSGD_EXPECT_BACKEND`` set (CI does), refuse to run on another Lightning namespace."""
    expected = os.environ.get("BNSGD_EXPECT_BACKEND")
    if expected and expected != BACKEND:
        raise pytest.UsageError(
            f"BNSGD_EXPECT_BACKEND={expected!r} but lightning_bnsgd selected {BACKEND!r}: the environment is not "
            "the one this run is meant to test."
        )


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def quiet_trainer_kwargs(tmp_path):
    """Keyword arguments for a small, silent CPU Trainer writing under ``tmp_path``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
    }


@pytest.fixture
def make_trainer(quiet_trainer_kwargs):
    """Factory for a quiet CPU Trainer; keyword arguments override the defaults."""

    def factory(**kwargs):
        return Trainer(**{**quiet_trainer_kwargs, **kwargs})

    return factory


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where none is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
