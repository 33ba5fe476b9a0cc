"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_bnsgd._compat import BACKEND, NAMESPACES, Callback, Trainer

#: tests/vision (fold_batchnorm on torchvision's and timm's models) needs torchvision and timm, whose wheels need
#: another torch than the main environments' (docs/contributing.md): collected only with BNSGD_VISION=1, as in CI's
#: third environment, where a failure to import them is an error. Every run's header says which.
VISION = os.environ.get("BNSGD_VISION") == "1"
collect_ignore = [] if VISION else ["vision"]


def pytest_report_header(config):
    if VISION:
        return "tests/vision: collected (BNSGD_VISION=1: torchvision and timm must import)"
    return (
        "tests/vision: NOT collected (torchvision/timm models; they run with BNSGD_VISION=1 in an environment with "
        "the vision extra: CI's third environment)"
    )


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


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _fresh_distributed_environment():
    """Each test sees the process's own distributed environment variables: Lightning's ``ddp_spawn`` writes
    ``MASTER_PORT`` into the parent process and never removes it, so without this every later multi-process test
    would reuse the first one's port (and fail when it is not free yet)."""
    saved = {key: os.environ.get(key) for key in _DIST_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


class CleanDistributedExit(Callback):
    """Ends a multi-process fit with a barrier and ``destroy_process_group`` in each worker.

    Without it, a spawned worker whose fit ran a collective of its own (our monitors' cross-rank all-reduce) aborted
    now and then at exit ("terminate called without an active exception", SIGABRT, seen in about 1 run in 7 with a
    plain ``torch.distributed.all_reduce`` in a callback; never with this teardown in 14 runs): the gloo process group
    was torn down by Lightning's ``atexit`` handler while the other rank still used the connection. A property of
    torch's gloo backend under ``ddp_spawn``, not of the code under test.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            trainer.strategy.barrier("tests-clean-exit")
            torch.distributed.destroy_process_group()


@pytest.fixture
def make_trainer(quiet_trainer_kwargs):
    """Factory for a quiet CPU Trainer; keyword arguments override the defaults. Multi-process Trainers get
    `CleanDistributedExit`."""

    def factory(**kwargs):
        devices = kwargs.get("devices", 1)
        if isinstance(devices, int) and devices > 1:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), CleanDistributedExit()]
        return Trainer(**{**quiet_trainer_kwargs, **kwargs})

    return factory


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it deselects
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where none is present. Tests marked
    ``both_namespaces`` fail (never skip) where only one Lightning namespace is installed: deselect them there with
    ``-m "not both_namespaces"``, as CI does in its pytorch-lightning-only environment."""
    needs_both = [item.nodeid for item in items if "both_namespaces" in item.keywords]
    if len(NAMESPACES) < 2 and needs_both:
        raise pytest.UsageError(
            f"{len(needs_both)} selected test(s) need both pytorch_lightning and lightning installed, but only "
            f"{NAMESPACES[0].__name__} is: install both (the test extra does) or pass -m 'not both_namespaces'."
        )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
