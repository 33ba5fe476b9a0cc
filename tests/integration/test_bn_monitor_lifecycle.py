"""``BNStatsMonitor`` over a run's life: several monitors in one Trainer, checkpoints written by older versions or
by something else, resumed with ``Trainer.fit(ckpt_path=...)`` as a user does."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.user_project.project import L, MemoryLogger, UserDataModule, UserModel, quiet_trainer

from lightning_bnsgd import BNStatsMonitor

STEM = ("net.bn1", "net.layer1.0.bn1", "net.layer1.0.bn2")
STAGE2 = ("net.layer2.0.bn1", "net.layer2.0.bn2", "net.layer2.0.downsample.1")


class FrozenStemModel(UserModel):
    """The user's model with the stem's BatchNorm parameters frozen by ``requires_grad_(False)`` only (so its
    statistics still move: the monitor that watches it warns once, the one watching stage 2 never)."""

    def on_fit_start(self) -> None:
        self.net.bn1.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def _fit(tmp_path: Path, callbacks: list[Any], ckpt_path: Path | None = None, **kwargs: Any) -> tuple[Any, list[str]]:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, **{"max_epochs": 3, **kwargs})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FrozenStemModel(), datamodule=UserDataModule(), ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)]


def _monitors() -> tuple[BNStatsMonitor, BNStatsMonitor]:
    return BNStatsMonitor(include=["net.bn1", "net.layer1.*"], log_every_n_steps=2), BNStatsMonitor(
        include="net.layer2.*", log_every_n_steps=3, log_prefix="bn_stage2"
    )


def _steps(logger: MemoryLogger, layer: str, prefix: str = "bn") -> list[int]:
    return [s for s, _ in logger.logged(f"{prefix}/{layer}/")]


def test_two_monitors_in_one_trainer_are_each_checkpointed_and_restored(tmp_path: Path) -> None:
    stem, stage2 = _monitors()
    logger = MemoryLogger()
    trainer, messages = _fit(tmp_path / "a", [stem, stage2], logger=logger, max_steps=6)
    assert stem.state_key != stage2.state_key
    assert [m for m in messages if "was frozen" in m and "'net.bn1'" in m]  # the stem's monitor warned
    assert _steps(logger, "net.bn1") == [1, 3, 5] and _steps(logger, "net.layer2.0.bn1", "bn_stage2") == [2, 5]
    assert _steps(logger, "summary") == [1, 3, 5] and _steps(logger, "summary", "bn_stage2") == [2, 5]
    assert not any(k.startswith(("bn/net.layer2", "bn_stage2/")) for _, m in logger.logged("bn/") for k in m)
    ckpt = tmp_path / "six.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert saved[stem.state_key]["warned"] == [["net.bn1", "frozen"]]
    assert saved[stage2.state_key]["warned"] == []

    stem2, stage2_2 = _monitors()
    resumed_logger = MemoryLogger()
    _, messages = _fit(tmp_path / "b", [stem2, stage2_2], ckpt, logger=resumed_logger, max_steps=12)
    assert not [m for m in messages if "was frozen" in m]  # remembered by the stem's monitor, from its own state
    assert stem2.state_dict()["warned"] == [["net.bn1", "frozen"]]
    assert stage2_2.state_dict()["warned"] == []
    assert _steps(resumed_logger, "net.bn1") == [7, 9, 11]
    assert _steps(resumed_logger, "net.layer2.0.bn1", "bn_stage2") == [8, 11]


def test_two_monitors_with_their_own_prefixes_log_their_own_summaries_at_the_same_step(tmp_path: Path) -> None:
    """Two monitors of different layers at the same steps: each whole-model summary is its own monitor's (the worst of
    its own layers), under its own names, at the same step; nothing is logged twice under one name at one step."""
    stem = BNStatsMonitor(include=["net.bn1", "net.layer1.*"], log_every_n_steps=2, log_prefix="bn_stem")
    stage2 = BNStatsMonitor(include="net.layer2.*", log_every_n_steps=2, log_prefix="bn_stage2")
    logger = L.loggers.CSVLogger(tmp_path, name="csv")
    _fit(tmp_path / "fit", [stem, stage2], logger=logger, max_steps=6)
    by_step: dict[int, dict[str, float]] = {}  # each `log_metrics` call is one row of metrics.csv
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = by_step.setdefault(int(row.pop("step")), {})
            for name, value in row.items():
                if value:
                    assert name not in step, f"{name} logged twice at one step"
                    step[name] = float(value)
    steps = {s: m for s, m in by_step.items() if any(name.startswith("bn_stem/") for name in m)}
    assert sorted(steps) == [1, 3, 5]
    for metrics in steps.values():
        assert not any(name.startswith("bn/") for name in metrics)  # neither monitor uses the default names
        for prefix, layers in (("bn_stem", STEM), ("bn_stage2", STAGE2)):
            mine = {name.split("/")[1] for name in metrics if name.startswith(f"{prefix}/")}
            assert mine == {*layers, "summary"}  # its own layers and its own summary
            for stat in ("gap_mean_max", "gap_var_max"):
                worst = max(metrics[f"{prefix}/{layer}/{stat}"] for layer in layers)
                assert math.isclose(metrics[f"{prefix}/summary/{stat}"], worst, rel_tol=1e-6), (prefix, stat)


def test_two_monitors_that_differ_only_by_prefix_are_each_checkpointed_and_restored(tmp_path: Path) -> None:
    def monitors() -> list[BNStatsMonitor]:
        return [BNStatsMonitor(log_every_n_steps=2), BNStatsMonitor(log_every_n_steps=2, log_prefix="bn_copy")]

    first = monitors()
    assert first[0].state_key != first[1].state_key  # Lightning refused one Trainer with both before
    trainer, messages = _fit(tmp_path / "a", first, logger=MemoryLogger(), max_steps=6)
    assert len([m for m in messages if "was frozen" in m]) == 2  # one warning per monitor
    ckpt = tmp_path / "six.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {k for k in saved if str(k).startswith("BNStatsMonitor")} == {m.state_key for m in first}

    again, logger = monitors(), MemoryLogger()
    _, messages = _fit(tmp_path / "b", again, ckpt, logger=logger, max_steps=10)
    assert not [m for m in messages if "was frozen" in m]  # each remembered its warning, from its own state
    assert [m.state_dict() for m in again] == [{**m.state_dict(), "batches_stepped": 10} for m in first]
    assert _steps(logger, "summary") == _steps(logger, "summary", "bn_copy") == [7, 9]


def test_two_monitors_of_the_issue_s_example_work_the_second_under_its_own_prefix(tmp_path: Path) -> None:
    """``BNStatsMonitor(include=A)`` and ``BNStatsMonitor(include=B)``, both with the default prefix: the second logs
    under ``bn_2/`` and says so, so the two summaries never overwrite each other."""
    stem, stage2 = BNStatsMonitor(include="net.layer1.*"), BNStatsMonitor(include="net.layer2.*")
    logger = MemoryLogger()
    _, messages = _fit(tmp_path, [stem, stage2], logger=logger, max_steps=4, log_every_n_steps=2)
    renamed = [m for m in messages if "logs under `bn_2/`" in m]
    assert len(renamed) == 1 and stage2.state_key in renamed[0]
    steps = {s for s, _ in logger.logged("bn/summary/")}
    assert steps and steps == {s for s, _ in logger.logged("bn_2/summary/")}  # both summaries, same steps
    names = {k for _, m in logger.calls for k in m}
    assert not {k for k in names if k.startswith("bn/net.layer2")}  # each monitor's layers under its own prefix
    assert not {k for k in names if k.startswith("bn_2/net.layer1")}
    assert {k for k in names if k.startswith("bn_2/net.layer2")}
    assert stem.state_key != stage2.state_key


def test_log_prefix_is_checked_in_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"BNStatsMonitor: `log_prefix` must be a non-empty string, got ''"):
        BNStatsMonitor(log_prefix="")
    with pytest.raises(TypeError, match=r"BNStatsMonitor: `log_prefix` must be a non-empty string, got None"):
        BNStatsMonitor(log_prefix=None)  # type: ignore[arg-type]


def test_checkpoint_saved_under_the_old_key_still_loads(tmp_path: Path) -> None:
    """Before monitors had their own ``state_key`` every monitor was saved under ``"BNStatsMonitor"``."""
    trainer, _ = _fit(tmp_path / "a", [BNStatsMonitor(log_every_n_steps=2)], max_steps=6)
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    (state,) = checkpoint["callbacks"].values()
    checkpoint["callbacks"] = {"BNStatsMonitor": state}
    torch.save(checkpoint, ckpt)

    monitor, logger = BNStatsMonitor(log_every_n_steps=2), MemoryLogger()
    _, messages = _fit(tmp_path / "b", [monitor], ckpt, logger=logger, max_steps=10)
    assert not [m for m in messages if "was frozen" in m]  # the old state's memory of the warning was restored
    assert monitor.state_dict()["warned"] == [["net.bn1", "frozen"]]
    assert [s for s, _ in logger.logged("bn/")] == [7, 9]


@pytest.mark.parametrize(
    ("state", "key"),
    [
        ({"warned": [["net.bn1"]], "batches_stepped": 6}, "warned"),  # was: "not enough values to unpack"
        ({"warned": 5, "batches_stepped": 6}, "warned"),  # was: "'int' object is not iterable"
        ({"warned": [], "batches_stepped": -100}, "batches_stepped"),  # was accepted: monitored other batches
        ({"warned": [], "batches_stepped": "six"}, "batches_stepped"),  # was: "invalid literal for int()"
        ({"warned": [], "batches_stepped": 6.5}, "batches_stepped"),  # was accepted as 6
        ("a foreign state", None),  # was: "'str' object has no attribute 'get'"
        ({"warned": [], "batches_stepped": 1000}, "1000 training batches"),  # well-formed, but not this run's
    ],
)
def test_corrupted_or_foreign_state_is_named_and_replaced(tmp_path: Path, state: Any, key: str | None) -> None:
    """A state that is not the monitor's own is named in a warning (the callback and the key) and replaced by a
    fresh one: the resumed run monitors and logs the same batches as a resume from an intact checkpoint."""
    monitor = BNStatsMonitor(log_every_n_steps=2)
    trainer, _ = _fit(tmp_path / "a", [monitor], max_steps=6)
    ckpt = tmp_path / "bad.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["callbacks"][monitor.state_key] = state
    torch.save(checkpoint, ckpt)

    resumed, logger = BNStatsMonitor(log_every_n_steps=2), MemoryLogger()
    _, messages = _fit(tmp_path / "b", [resumed], ckpt, logger=logger, max_steps=10)
    named = [m for m in messages if m.startswith("BNStatsMonitor: the checkpoint's") and repr(resumed.state_key) in m]
    assert len(named) == 1, messages
    assert (f"`{key}`" if key in ("warned", "batches_stepped") else key or "state of") in named[0]
    assert [s for s, _ in logger.logged("bn/")] == [7, 9]  # Lightning's count: batches 8 and 10
    assert resumed.state_dict()["batches_stepped"] == 10
