"""Trainer runs of ``BNStatsMonitor`` on CPU: logged keys and values, anomalies, misconfigurations, filters."""

from __future__ import annotations

import copy
import csv
import importlib
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.user_project.project import MemoryLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule, loggers
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.bn_monitor import STATS, BNAnomalyError, BNStatsMonitor
from lightning_bnsgd.data.digits import DigitsDataModule, load_digits_tensors
from lightning_bnsgd.models.cnn import BNConvNet

LAYERS = ("net.features.0.norm", "net.features.1.norm")
SINGLE_DEVICE_STATS = [s for s in STATS if not s.startswith("rank_diff")]


class TinyNet(LightningModule):
    """BNConvNet on 8x8 digits with plain SGD; ``freeze`` freezes the first BN layer at fit start.

    ``freeze="leaky"`` then calls ``self.train()`` at every epoch start (a common bug that unfreezes it);
    ``freeze="proper"`` does not.
    """

    def __init__(self, freeze: str | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = BNConvNet(input_size=8, padding="same", channels=(8, 16))
        self.freeze = freeze
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def on_fit_start(self) -> None:
        if self.freeze:
            bn = self.net.features[0].norm
            bn.eval()
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.freeze == "leaky":
            self.train()


def _digits(batch_size: int = 32) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size)


class InputRecorder(Callback):
    """Independent of the monitor: records each BN layer's input and pre-forward buffers at every batch."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
            self.seen[name] = (args[0].detach().clone(), module.running_mean.clone(), module.running_var.clone())

        return hook


def test_csv_keys_at_logging_steps_and_values_match_buffers(tmp_path: Path, make_trainer: Any) -> None:
    recorder = InputRecorder()
    logger = loggers.CSVLogger(tmp_path, name="csv")
    model = TinyNet()
    trainer = make_trainer(
        limit_val_batches=0, callbacks=[recorder, BNStatsMonitor()], logger=logger, max_steps=6, log_every_n_steps=3
    )
    trainer.fit(model, _digits())
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bn_rows = {int(r["step"]): r for r in rows if any(v for k, v in r.items() if k.startswith("bn/"))}
    assert sorted(bn_rows) == [2, 5]  # default interval = log_every_n_steps; at `self.log`'s step of batches 3, 6
    for row in bn_rows.values():
        for layer in LAYERS:
            for stat in SINGLE_DEVICE_STATS:
                assert row[f"bn/{layer}/{stat}"] != "", (layer, stat)
        for key in ("gap_mean_max", "gap_var_max", "dead_frac", "nonfinite_count"):
            assert row[f"bn/summary/{key}"] != ""
    assert not any(k.startswith("bn/") and "rank_diff" in k for k in rows[0])

    # the last logging step is the last step: the buffers now are the ones that were summarized
    last = {k: float(v) for k, v in bn_rows[5].items() if k.startswith("bn/")}
    gap_maxes = []
    dead, channels = 0.0, 0
    for layer in LAYERS:
        bn = model.get_submodule(layer)
        rm, rv = bn.running_mean.double(), bn.running_var.double()
        w, b = bn.weight.detach().double(), bn.bias.detach().double()
        gain = w.abs() / torch.sqrt(rv + bn.eps)
        x, rm_before, rv_before = recorder.seen[layer]
        x = x.double().transpose(0, 1).reshape(bn.num_features, -1)
        gap_mean = (x.mean(1) - rm_before.double()).abs() / torch.sqrt(rv_before.double() + bn.eps)
        gap_var = torch.log((x.var(1) + bn.eps) / (rv_before.double() + bn.eps)).abs()
        expected = {
            "running_mean_mean": rm.mean(),
            "running_mean_absmean": rm.abs().mean(),
            "running_var_min": rv.min(),
            "running_var_mean": rv.mean(),
            "running_var_max": rv.max(),
            "weight_mean": w.mean(),
            "weight_std": w.std(unbiased=False),
            "bias_mean": b.mean(),
            "bias_std": b.std(unbiased=False),
            "dead_frac": (w.abs() < 1e-2).double().mean(),
            "gain_mean": gain.mean(),
            "gain_max": gain.max(),
            "nonfinite_count": torch.tensor(0.0),
            "gap_mean_mean": gap_mean.mean(),
            "gap_mean_max": gap_mean.max(),
            "gap_var_mean": gap_var.mean(),
            "gap_var_max": gap_var.max(),
            "samples_per_channel": torch.tensor(float(x.shape[1])),
        }
        assert set(expected) == set(SINGLE_DEVICE_STATS)
        for stat, value in expected.items():
            assert last[f"bn/{layer}/{stat}"] == pytest.approx(float(value), rel=1e-4, abs=1e-5), (layer, stat)
        gap_maxes.append((float(gap_mean.max()), float(gap_var.max())))
        dead += float((w.abs() < 1e-2).sum())
        channels += bn.num_features
    assert last["bn/summary/gap_mean_max"] == pytest.approx(max(g[0] for g in gap_maxes), rel=1e-4)
    assert last["bn/summary/gap_var_max"] == pytest.approx(max(g[1] for g in gap_maxes), rel=1e-4)
    assert last["bn/summary/dead_frac"] == pytest.approx(dead / channels)
    assert {k.split("/")[1] for k in last} == {*LAYERS, "summary"}


def _gap_after_one_step(make_trainer: Any, model: TinyNet, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    logger = MemoryLogger()
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    trainer = make_trainer(
        limit_val_batches=0, callbacks=[BNStatsMonitor(log_every_n_steps=1)], logger=logger, max_steps=1
    )
    trainer.fit(model, train_dataloaders=loader)
    ((step, metrics),) = logger.logged("bn/")
    assert step == 0  # where Lightning logs the first batch's `self.log` metrics
    return metrics


def test_gap_near_zero_after_recalibration_and_large_after_scaling(make_trainer: Any) -> None:
    x, y = load_digits_tensors()
    x = (x[:512] - x.mean()) / x.std()
    y = y[:512]
    model = TinyNet()
    # the whole data as one batch: the training step sees exactly what recalibration saw
    recalibrate_bn(model.net, [(x, y)])
    scaled = copy.deepcopy(model)
    metrics = _gap_after_one_step(make_trainer, model, (x, y))
    for layer in LAYERS:
        assert metrics[f"bn/{layer}/gap_mean_max"] < 1e-3, layer
        assert metrics[f"bn/{layer}/gap_var_max"] < 1e-3, layer
    assert metrics["bn/summary/gap_var_max"] < 1e-3

    with torch.no_grad():
        scaled.net.features[1].norm.running_var.mul_(10)
    metrics = _gap_after_one_step(make_trainer, scaled, (x, y))
    assert metrics["bn/net.features.1.norm/gap_var_max"] == pytest.approx(math.log(10), abs=1e-3)
    assert metrics["bn/net.features.1.norm/gap_var_mean"] == pytest.approx(math.log(10), abs=1e-3)
    assert metrics["bn/net.features.0.norm/gap_var_max"] < 1e-3
    assert metrics["bn/summary/gap_var_max"] == pytest.approx(math.log(10), abs=1e-3)


class InjectNaN(Callback):
    def __init__(self, layer: str) -> None:
        self.layer = layer

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            with torch.no_grad():
                pl_module.get_submodule(self.layer).running_var[0] = float("nan")


def test_nan_raise_names_layer_buffer_and_step(make_trainer: Any) -> None:
    monitor = BNStatsMonitor(log_every_n_steps=2, on_anomaly="raise")
    trainer = make_trainer(limit_val_batches=0, callbacks=[InjectNaN(LAYERS[1]), monitor], max_steps=4)
    with pytest.raises(BNAnomalyError, match=r"'net\.features\.1\.norm'.*running_var at step 1") as info:
        trainer.fit(TinyNet(), _digits())
    assert LAYERS[0] not in str(info.value)
    assert not monitor._handles  # hooks removed on the way out


def test_nan_warns_once_per_layer(make_trainer: Any) -> None:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(log_every_n_steps=1)
        trainer = make_trainer(
            limit_val_batches=0, callbacks=[InjectNaN(LAYERS[1]), monitor], logger=logger, max_steps=4
        )
        trainer.fit(TinyNet(), _digits())
    nan_warnings = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    assert len(nan_warnings) == 1  # four logging steps, one warning
    assert "'net.features.1.norm'" in nan_warnings[0] and "running_var" in nan_warnings[0]
    assert "at step 0" in nan_warnings[0]  # injected at the end of the first batch, before the monitor runs
    calls = logger.logged("bn/")
    assert [s for s, _ in calls] == [0, 1, 2, 3]
    assert all(m["bn/net.features.1.norm/nonfinite_count"] == 1.0 for _, m in calls)
    assert all(m["bn/net.features.0.norm/nonfinite_count"] == 0.0 for _, m in calls)
    assert math.isnan(calls[-1][1]["bn/net.features.1.norm/running_var_max"])
    # the once-per-layer memory is part of the callback state
    restored = BNStatsMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict()["warned"] == [["net.features.1.norm", "nonfinite_running_var"]]
    restored.load_state_dict({})
    assert restored.state_dict()["warned"] == []


def _frozen_warnings(make_trainer: Any, freeze: str) -> tuple[list[str], TinyNet, torch.Tensor]:
    model = TinyNet(freeze=freeze)
    before = model.net.features[0].norm.running_var.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            limit_val_batches=0, callbacks=[BNStatsMonitor(log_every_n_steps=2)], logger=MemoryLogger(), max_steps=4
        )
        trainer.fit(model, _digits())
    return [str(w.message) for w in caught if "was frozen (" in str(w.message)], model, before


def test_frozen_bn_that_still_updates_is_reported(make_trainer: Any) -> None:
    messages, model, before = _frozen_warnings(make_trainer, "leaky")
    assert not torch.equal(model.net.features[0].norm.running_var, before)  # it did update
    assert len(messages) == 1 and "'net.features.0.norm'" in messages[0] and "by step 1" in messages[0]


def test_truly_frozen_bn_is_not_reported(make_trainer: Any) -> None:
    messages, model, before = _frozen_warnings(make_trainer, "proper")
    assert torch.equal(model.net.features[0].norm.running_var, before)
    assert messages == []


def test_filters_and_stat_selection(make_trainer: Any) -> None:
    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=2, include="*.0.*", stats=["gap_var_max", "running_var_mean"])
    make_trainer(limit_val_batches=0, callbacks=[monitor], logger=logger, max_steps=2).fit(TinyNet(), _digits())
    ((_, metrics),) = logger.logged("bn/")
    per_layer = sorted(k for k in metrics if not k.startswith("bn/summary/"))
    assert per_layer == ["bn/net.features.0.norm/gap_var_max", "bn/net.features.0.norm/running_var_mean"]
    assert "bn/summary/gap_var_max" in metrics

    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=2, exclude=r"re:features\.0\.")
    make_trainer(limit_val_batches=0, callbacks=[monitor], logger=logger, max_steps=2).fit(TinyNet(), _digits())
    ((_, metrics),) = logger.logged("bn/")
    layers = {k.split("/")[1] for k in metrics} - {"summary"}
    assert layers == {"net.features.1.norm"}
    assert len(metrics) - 4 == len(SINGLE_DEVICE_STATS)  # all statistics of that layer, plus 4 summary keys


class HookProbe(Callback):
    """Placed after the monitor: counts forward pre-hooks on BN layers during and after each batch."""

    def __init__(self) -> None:
        self.during: list[tuple[int, int]] = []
        self.after: list[int] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        count = sum(len(m._forward_pre_hooks) for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d))
        self.during.append((trainer.global_step, count))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after.append(sum(len(m._forward_pre_hooks) for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)))


def test_hooks_only_during_logging_steps(make_trainer: Any) -> None:
    probe = HookProbe()
    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=3)
    make_trainer(limit_val_batches=0, callbacks=[monitor, probe], logger=logger, max_steps=7).fit(TinyNet(), _digits())
    hooked = [step for step, count in probe.during if count]
    assert hooked == [2, 5]  # the batches that become steps 3 and 6
    assert all(count == len(LAYERS) for step, count in probe.during if step in hooked)
    assert probe.after == [0] * 7
    assert [s for s, _ in logger.logged("bn/")] == [2, 5]


def test_argument_errors_name_the_class() -> None:
    """Every bad-argument case is in ``tests/integration/test_bad_input.py``; here: messages name the class."""
    with pytest.raises(ValueError, match=r"^BNStatsMonitor: `log_every_n_steps` must be None or an integer >= 1"):
        BNStatsMonitor(log_every_n_steps=0)
    with pytest.raises(TypeError, match=r"^BNStatsMonitor: `stats` must be a list"):
        BNStatsMonitor(stats="gap_var_max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^BNStatsMonitor: `exclude` has an invalid regular expression"):
        BNStatsMonitor(exclude=["ok", "re:[bad"])


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"max_dead_fraction": 1.5}, ">= 0.0 and < 1.0"),  # a fraction above 1.5 can never happen
        ({"max_dead_fraction": 1.0}, ">= 0.0 and < 1.0"),
        ({"min_running_var": 0.0}, "> 0.0"),  # a variance below 0 can never happen
        ({"dead_threshold": 0.0}, "> 0.0"),  # no |gamma| is below 0: every channel counts as alive
        ({"max_running_var": 0.0}, "> 0.0"),
    ],
)
def test_bounds_that_can_never_act_are_refused(kwargs: dict[str, float], allowed: str) -> None:
    """A bound no layer can ever cross would turn its check off without a word; None is the way to do that."""
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=rf"^BNStatsMonitor: `{name}` must be .*{allowed}, got {value!r}\.$"):
        BNStatsMonitor(**kwargs)


def test_bounds_inside_the_range_are_kept() -> None:
    monitor = BNStatsMonitor(max_dead_fraction=0.0, min_running_var=1e-12, dead_threshold=1e-6)
    assert (monitor.max_dead_fraction, monitor.min_running_var, monitor.dead_threshold) == (0.0, 1e-12, 1e-6)
    off = BNStatsMonitor(max_dead_fraction=None, min_running_var=None, max_running_var=None)
    assert (off.max_dead_fraction, off.min_running_var, off.max_running_var) == (None, None, None)


class NoBNModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_bn_and_trainer_without_logger_warn_once(make_trainer: Any) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MemoryLogger()
        make_trainer(
            limit_val_batches=0, callbacks=[BNStatsMonitor(log_every_n_steps=1)], logger=logger, max_steps=3
        ).fit(NoBNModule(), _digits())
        make_trainer(limit_val_batches=0, callbacks=[BNStatsMonitor(log_every_n_steps=1)], max_steps=3).fit(
            TinyNet(), _digits()
        )
    messages = [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)]
    assert len([m for m in messages if "no BatchNorm layer" in m]) == 1
    assert len([m for m in messages if "no logger" in m]) == 1
    assert len(messages) == 2
    assert logger.logged("bn/") == []


class OddBNModule(LightningModule):
    """BatchNorm1d layers with momentum=None, track_running_stats=False and a small batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 8),
            nn.BatchNorm1d(8, momentum=None),
            nn.BatchNorm1d(8, track_running_stats=False),
            nn.Linear(8, 10),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_misconfiguration_warnings(make_trainer: Any) -> None:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(log_every_n_steps=2, min_samples_per_channel=8)
        make_trainer(limit_val_batches=0, callbacks=[monitor], logger=logger, max_steps=4).fit(
            OddBNModule(), _digits(batch_size=4)
        )
    messages = [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)]
    assert any("track_running_stats=False" in m and "'net.2'" in m for m in messages)
    assert any("momentum=None" in m and "'net.1'" in m for m in messages)
    few = [m for m in messages if "min_samples_per_channel=8" in m]
    assert len(few) == 1 and "net.1 (4)" in few[0] and "net.2 (4)" in few[0]
    # the layer without running statistics logs only what it has
    _, metrics = logger.logged("bn/")[-1]
    assert "bn/net.2/weight_mean" in metrics and "bn/net.2/running_var_mean" not in metrics
    assert "bn/net.2/gap_var_max" not in metrics and "bn/net.1/gap_var_max" in metrics


def _namespace_net(namespace: ModuleType) -> Any:
    """A TinyNet-like LightningModule of the given Lightning namespace."""

    class Net(namespace.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = BNConvNet(input_size=8, padding="same", channels=(8, 16))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Net()


@pytest.mark.both_namespaces
def test_histograms_through_tensorboard_of_each_namespace_in_one_process(tmp_path: Path) -> None:
    """A ``pytorch_lightning`` and a ``lightning.pytorch`` Trainer, one after the other: each TensorBoardLogger gets
    its histograms, whichever namespace ``lightning_bnsgd`` selected for its own classes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset((x[:256] - x.mean()) / x.std(), y[:256]), batch_size=32)
    for name in ("pytorch_lightning", "lightning.pytorch"):
        namespace = importlib.import_module(name)
        tb = namespace.loggers.TensorBoardLogger(tmp_path / name, name="tb")
        csv_logger = namespace.loggers.CSVLogger(tmp_path / name, name="csv")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = namespace.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=4,
                logger=[tb, csv_logger],
                callbacks=[BNStatsMonitor(log_every_n_steps=2, log_histograms=True)],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=tmp_path / name,
            )
            trainer.fit(_namespace_net(namespace), train_dataloaders=loader)
        skipped = [str(w.message) for w in caught if "log_histograms" in str(w.message)]
        assert len(skipped) == 1 and "but ['CSVLogger'] cannot" in skipped[0], (name, skipped)
        events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
        events.Reload()
        tags = set(events.Tags()["histograms"])
        assert {f"bn/{layer}/{t}" for layer in LAYERS for t in ("running_mean", "running_var", "weight")} <= tags
        assert [e.step for e in events.Histograms("bn/net.features.0.norm/running_var")] == [1, 3], name
        assert "bn/summary/gap_var_max" in events.Tags()["scalars"]


class AccumulationProbe(Callback):
    """Records at which batches the model's parameters changed (an optimizer step happened)."""

    def __init__(self) -> None:
        self.stepped: list[int] = []
        self._before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = pl_module.net.head.weight.detach().clone()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not torch.equal(self._before, pl_module.net.head.weight):
            self.stepped.append(batch_idx)


def test_gradient_accumulation_monitors_the_batch_that_steps(make_trainer: Any) -> None:
    """With ``accumulate_grad_batches=3`` the monitored batches are the last micro-batch of every second window,
    including the short window that ends the epoch, and values are logged at the count of earlier steps (where
    Lightning logs the same batch's ``self.log`` metrics)."""
    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset((x[:224] - x.mean()) / x.std(), y[:224]), batch_size=32)  # 7 batches
    logger, probe = MemoryLogger(), AccumulationProbe()
    hooks = HookProbe()
    monitor = BNStatsMonitor(log_every_n_steps=2)
    trainer = make_trainer(callbacks=[probe, monitor, hooks], logger=logger, max_epochs=2, accumulate_grad_batches=3)
    trainer.fit(TinyNet(), train_dataloaders=loader)
    assert probe.stepped == [2, 5, 6] * 2  # windows 0-2, 3-5, and the short one (6) at the epoch's end
    hooked = [i for i, (_, count) in enumerate(hooks.during) if count]
    assert hooked == [5, 7 + 2, 7 + 6]  # steps 2, 4 and 6: batch 5, then batches 2 and 6 of the second epoch
    assert [s for s, _ in logger.logged("bn/")] == [1, 3, 5]
    assert trainer.global_step == 6


def test_resume_keeps_the_step_count_and_zero_interval_turns_off(tmp_path: Path, make_trainer: Any) -> None:
    """The count of stepping batches is part of the checkpoint; ``Trainer(log_every_n_steps=0)`` switches off."""
    first, second = MemoryLogger(), MemoryLogger()
    ckpt = tmp_path / "three.ckpt"
    trainer = make_trainer(
        limit_val_batches=0, callbacks=[BNStatsMonitor(log_every_n_steps=2)], logger=first, max_steps=3
    )
    trainer.fit(TinyNet(), _digits())
    trainer.save_checkpoint(ckpt)
    monitor = BNStatsMonitor(log_every_n_steps=2)
    resumed = make_trainer(limit_val_batches=0, callbacks=[monitor], logger=second, max_steps=6)
    resumed.fit(TinyNet(), _digits(), ckpt_path=ckpt)
    assert [s for s, _ in first.logged("bn/")] == [1]
    assert [s for s, _ in second.logged("bn/")] == [3, 5]
    assert monitor.state_dict()["batches_stepped"] == 6

    off = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(
            limit_val_batches=0, callbacks=[BNStatsMonitor()], logger=off, max_steps=3, log_every_n_steps=0
        ).fit(TinyNet(), _digits())
    assert off.logged("bn/") == []
    assert any("`log_every_n_steps=0` turns logging off" in str(w.message) for w in caught)
