"""Trainer runs of ``BNStatsMonitor`` on CPU: logged keys and values, anomalies, misconfigurations, filters."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule, Trainer, loggers
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


class MemoryLogger(loggers.Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((int(step if step is not None else -1), dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def bn_calls(self) -> list[tuple[int, dict[str, float]]]:
        return [(s, m) for s, m in self.calls if any(k.startswith("bn/") for k in m)]


def _trainer(tmp_path: Path, callbacks: list[Any], logger: Any = False, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_steps", 4)
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        **kwargs,
    )


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


def test_csv_keys_at_logging_steps_and_values_match_buffers(tmp_path: Path) -> None:
    recorder = InputRecorder()
    logger = loggers.CSVLogger(tmp_path, name="csv")
    model = TinyNet()
    trainer = _trainer(tmp_path, [recorder, BNStatsMonitor()], logger=logger, max_steps=6, log_every_n_steps=3)
    trainer.fit(model, _digits())
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bn_rows = {int(r["step"]): r for r in rows if any(v for k, v in r.items() if k.startswith("bn/"))}
    assert sorted(bn_rows) == [3, 6]  # default interval = log_every_n_steps
    for row in bn_rows.values():
        for layer in LAYERS:
            for stat in SINGLE_DEVICE_STATS:
                assert row[f"bn/{layer}/{stat}"] != "", (layer, stat)
        for key in ("gap_mean_max", "gap_var_max", "dead_frac", "nonfinite_count"):
            assert row[f"bn/summary/{key}"] != ""
    assert not any(k.startswith("bn/") and "rank_diff" in k for k in rows[0])

    # the last logging step is the last step: the buffers now are the ones that were summarized
    last = {k: float(v) for k, v in bn_rows[6].items() if k.startswith("bn/")}
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


def _gap_after_one_step(tmp_path: Path, model: TinyNet, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    logger = MemoryLogger()
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    trainer = _trainer(tmp_path, [BNStatsMonitor(logging_interval=1)], logger=logger, max_steps=1)
    trainer.fit(model, train_dataloaders=loader)
    ((step, metrics),) = logger.bn_calls()
    assert step == 1
    return metrics


def test_gap_near_zero_after_recalibration_and_large_after_scaling(tmp_path: Path) -> None:
    x, y = load_digits_tensors()
    x = (x[:512] - x.mean()) / x.std()
    y = y[:512]
    model = TinyNet()
    # the whole data as one batch: the training step sees exactly what recalibration saw
    recalibrate_bn(model.net, [(x, y)])
    scaled = copy.deepcopy(model)
    metrics = _gap_after_one_step(tmp_path, model, (x, y))
    for layer in LAYERS:
        assert metrics[f"bn/{layer}/gap_mean_max"] < 1e-3, layer
        assert metrics[f"bn/{layer}/gap_var_max"] < 1e-3, layer
    assert metrics["bn/summary/gap_var_max"] < 1e-3

    with torch.no_grad():
        scaled.net.features[1].norm.running_var.mul_(10)
    metrics = _gap_after_one_step(tmp_path, scaled, (x, y))
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


def test_nan_raise_names_layer_buffer_and_step(tmp_path: Path) -> None:
    monitor = BNStatsMonitor(logging_interval=2, on_anomaly="raise")
    trainer = _trainer(tmp_path, [InjectNaN(LAYERS[1]), monitor], max_steps=4)
    with pytest.raises(BNAnomalyError, match=r"'net\.features\.1\.norm'.*running_var at step 2") as info:
        trainer.fit(TinyNet(), _digits())
    assert LAYERS[0] not in str(info.value)
    assert not monitor._handles  # hooks removed on the way out


def test_nan_warns_once_per_layer(tmp_path: Path) -> None:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(logging_interval=1)
        trainer = _trainer(tmp_path, [InjectNaN(LAYERS[1]), monitor], logger, max_steps=4)
        trainer.fit(TinyNet(), _digits())
    nan_warnings = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    assert len(nan_warnings) == 1  # four logging steps, one warning
    assert "'net.features.1.norm'" in nan_warnings[0] and "running_var" in nan_warnings[0]
    assert "at step 1" in nan_warnings[0]  # injected at the end of the first batch, before the monitor runs
    calls = logger.bn_calls()
    assert [s for s, _ in calls] == [1, 2, 3, 4]
    assert all(m["bn/net.features.1.norm/nonfinite_count"] == 1.0 for _, m in calls)
    assert all(m["bn/net.features.0.norm/nonfinite_count"] == 0.0 for _, m in calls)
    assert math.isnan(calls[-1][1]["bn/net.features.1.norm/running_var_max"])
    # the once-per-layer memory is part of the callback state
    restored = BNStatsMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict()["warned"] == [["net.features.1.norm", "nonfinite_running_var"]]
    restored.load_state_dict({})
    assert restored.state_dict()["warned"] == []


def _frozen_warnings(tmp_path: Path, freeze: str) -> tuple[list[str], TinyNet, torch.Tensor]:
    model = TinyNet(freeze=freeze)
    before = model.net.features[0].norm.running_var.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [BNStatsMonitor(logging_interval=2)], MemoryLogger(), max_steps=4)
        trainer.fit(model, _digits())
    return [str(w.message) for w in caught if "meant to be frozen" in str(w.message)], model, before


def test_frozen_bn_that_still_updates_is_reported(tmp_path: Path) -> None:
    messages, model, before = _frozen_warnings(tmp_path, "leaky")
    assert not torch.equal(model.net.features[0].norm.running_var, before)  # it did update
    assert len(messages) == 1 and "'net.features.0.norm'" in messages[0] and "step 2" in messages[0]


def test_truly_frozen_bn_is_not_reported(tmp_path: Path) -> None:
    messages, model, before = _frozen_warnings(tmp_path, "proper")
    assert torch.equal(model.net.features[0].norm.running_var, before)
    assert messages == []


def test_filters_and_stat_selection(tmp_path: Path) -> None:
    logger = MemoryLogger()
    monitor = BNStatsMonitor(logging_interval=2, include="*.0.*", stats=["gap_var_max", "running_var_mean"])
    _trainer(tmp_path, [monitor], logger, max_steps=2).fit(TinyNet(), _digits())
    ((_, metrics),) = logger.bn_calls()
    per_layer = sorted(k for k in metrics if not k.startswith("bn/summary/"))
    assert per_layer == ["bn/net.features.0.norm/gap_var_max", "bn/net.features.0.norm/running_var_mean"]
    assert "bn/summary/gap_var_max" in metrics

    logger = MemoryLogger()
    monitor = BNStatsMonitor(logging_interval=2, exclude=r"re:features\.0\.")
    _trainer(tmp_path, [monitor], logger, max_steps=2).fit(TinyNet(), _digits())
    ((_, metrics),) = logger.bn_calls()
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


def test_hooks_only_during_logging_steps(tmp_path: Path) -> None:
    probe = HookProbe()
    logger = MemoryLogger()
    _trainer(tmp_path, [BNStatsMonitor(logging_interval=3), probe], logger, max_steps=7).fit(TinyNet(), _digits())
    hooked = [step for step, count in probe.during if count]
    assert hooked == [2, 5]  # the batches that become steps 3 and 6
    assert all(count == len(LAYERS) for step, count in probe.during if step in hooked)
    assert probe.after == [0] * 7
    assert [s for s, _ in logger.bn_calls()] == [3, 6]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"logging_interval": 0}, "logging_interval"),
        ({"logging_interval": 2.5}, "logging_interval"),
        ({"stats": ["gap_var_max", "nope"]}, "stats"),
        ({"stats": "gap_var_max"}, "stats"),
        ({"include": "re:(unclosed"}, "include"),
        ({"exclude": ["ok", "re:[bad"]}, "exclude"),
        ({"dead_threshold": -0.1}, "dead_threshold"),
        ({"min_running_var": -1.0}, "min_running_var"),
        ({"max_running_var": float("nan")}, "max_running_var"),
        ({"max_dead_fraction": -0.5}, "max_dead_fraction"),
        ({"min_running_var": 1.0, "max_running_var": 0.5}, "min_running_var"),
        ({"on_anomaly": "explode"}, "on_anomaly"),
        ({"min_samples_per_channel": -1}, "min_samples_per_channel"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        BNStatsMonitor(**kwargs)


class NoBNModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_bn_and_trainer_without_logger_warn_once(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MemoryLogger()
        _trainer(tmp_path, [BNStatsMonitor(logging_interval=1)], logger, max_steps=3).fit(NoBNModule(), _digits())
        _trainer(tmp_path, [BNStatsMonitor(logging_interval=1)], False, max_steps=3).fit(TinyNet(), _digits())
    messages = [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)]
    assert len([m for m in messages if "no BatchNorm layer" in m]) == 1
    assert len([m for m in messages if "no logger" in m]) == 1
    assert len(messages) == 2
    assert logger.bn_calls() == []


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


def test_misconfiguration_warnings(tmp_path: Path) -> None:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(logging_interval=2, min_samples_per_channel=8)
        _trainer(tmp_path, [monitor], logger, max_steps=4).fit(OddBNModule(), _digits(batch_size=4))
    messages = [str(w.message) for w in caught if "BNStatsMonitor" in str(w.message)]
    assert any("track_running_stats=False" in m and "'net.2'" in m for m in messages)
    assert any("momentum=None" in m and "'net.1'" in m for m in messages)
    few = [m for m in messages if "min_samples_per_channel=8" in m]
    assert len(few) == 1 and "net.1 (4)" in few[0] and "net.2 (4)" in few[0]
    # the layer without running statistics logs only what it has
    _, metrics = logger.bn_calls()[-1]
    assert "bn/net.2/weight_mean" in metrics and "bn/net.2/running_var_mean" not in metrics
    assert "bn/net.2/gap_var_max" not in metrics and "bn/net.1/gap_var_max" in metrics


def test_histograms_through_tensorboard_only(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = loggers.TensorBoardLogger(tmp_path, name="tb")
    csv_logger = loggers.CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = BNStatsMonitor(logging_interval=2, log_histograms=True)
        _trainer(tmp_path, [monitor], [tb, csv_logger], max_steps=4).fit(TinyNet(), _digits())
    skipped = [str(w.message) for w in caught if "log_histograms" in str(w.message)]
    assert len(skipped) == 1 and "CSVLogger" in skipped[0]
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    for layer in LAYERS:
        for name in ("running_mean", "running_var", "weight"):
            assert f"bn/{layer}/{name}" in tags
    assert [e.step for e in events.Histograms("bn/net.features.0.norm/running_var")] == [2, 4]
    assert "bn/summary/gap_var_max" in events.Tags()["scalars"]
