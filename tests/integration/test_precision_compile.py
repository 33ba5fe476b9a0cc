"""Mixed precision, torch.compile and channels_last with both callbacks."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.user_project.project import L, MemoryLogger, UserDataModule, UserModel, quiet_trainer

from lightning_bnsgd._compat import loggers
from lightning_bnsgd.bn.inspect import GAP_STATS
from lightning_bnsgd.bn.recalibrate import recalibrate_bn
from lightning_bnsgd.callbacks.bn_monitor import BNStatsMonitor
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup


def _metrics(log_dir) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _bn_metric_values(rows: list[dict[str, str]]) -> list[float]:
    return [float(v) for row in rows for k, v in row.items() if k.startswith("bn/") and v not in ("", None)]


def test_bf16_mixed_fit_recalibration_and_monitoring(tmp_path, make_trainer):
    model = ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(warmup_steps=5))
    logger = loggers.CSVLogger(tmp_path, name="bf16")
    trainer = make_trainer(
        precision="bf16-mixed",
        max_epochs=2,
        limit_val_batches=2,
        logger=logger,
        log_every_n_steps=5,
        callbacks=[BNRecalibration(num_samples=512), BNStatsMonitor()],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
            if name.endswith("running_var"):
                assert bool((buf >= 0).all()), name
    values = _bn_metric_values(_metrics(Path(logger.log_dir)))
    assert values and all(v == v for v in values), "monitor logged nothing or NaN under bf16-mixed"
    (result,) = trainer.test(model, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    assert result["test/acc"] > 0.8


@pytest.mark.timeout(300)
def test_compile_and_channels_last_match_eager_statistics(tmp_path, make_trainer):
    torch.manual_seed(0)
    model = ConvNetClassifier(
        input_size=8,
        padding="same",
        compile=True,
        compile_backend="aot_eager",
        channels_last=True,
        optimizer=SGDWarmup(warmup_steps=5),
    )
    logger = loggers.CSVLogger(tmp_path, name="compiled")
    recal = BNRecalibration(num_samples=None, before_validation=False, at_train_end=True)
    dm = DigitsDataModule(batch_size=64)
    trainer = make_trainer(
        max_epochs=1,
        limit_val_batches=1,
        logger=logger,
        log_every_n_steps=4,
        callbacks=[recal, BNStatsMonitor()],
    )
    trainer.fit(model, datamodule=dm)
    # The monitor's hooks fired although the training steps run compiled.
    rows = _metrics(Path(logger.log_dir))
    gap_keys = {k for row in rows for k, v in row.items() if "gap_mean_mean" in k and v}
    assert gap_keys, "no batch-vs-running gap was logged for the compiled model"
    # Recalibrated statistics equal an eager recalibration of the same weights over the same data.
    eager = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
    eager.train()
    recalibrate_bn(eager, ((x, y) for x, y in dm.train_dataloader()))
    compiled_bufs = dict(model.net.named_buffers())
    for name, buf in eager.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(compiled_bufs[name], buf, rtol=1e-4, atol=1e-5, msg=name)


class CompiledNetModel(UserModel):
    """The user's model with its network compiled the usual way, ``self.net = torch.compile(self.net)``: its
    ``named_modules()`` gain ``_orig_mod`` (``net._orig_mod.bn1``), and its forwards run compiled."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend=backend)


def _fit_user_model(tmp_path: Path, model: UserModel, *callbacks: Any) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = quiet_trainer(tmp_path, callbacks=list(callbacks), logger=logger, limit_val_batches=0)
    trainer.fit(model, datamodule=UserDataModule(train_size=96))  # 6 batches of 16
    return logger


def _compiled_fit(tmp_path: Path, every: int | None) -> tuple[list[int], MemoryLogger]:
    """A fit of the compiled model (with a monitor when ``every`` is set), and the node count of every graph that
    dynamo handed to the backend during it."""
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch.compiler.reset()
    L.seed_everything(0, verbose=False)
    monitors = [BNStatsMonitor(log_every_n_steps=every)] if every else []
    return graphs, _fit_user_model(tmp_path, CompiledNetModel(backend), *monitors)


@pytest.mark.parametrize("every", [1, 2])
def test_compiled_network_logs_every_statistic_under_the_users_names(tmp_path: Path, every: int) -> None:
    """Under ``torch.compile`` the monitor logs exactly what it logs for the eager model (same names, no
    ``_orig_mod``; every layer's batch statistics; the same values), and dynamo never traces its hooks: every graph
    compiled during the monitored fit is one the model compiles without the monitor, so the hooks cause no graph
    break and no recompile (each recompile would hand the backend another graph)."""
    L.seed_everything(0, verbose=False)
    eager = _fit_user_model(tmp_path / "eager", UserModel(), BNStatsMonitor(log_every_n_steps=every)).logged("bn/")
    baseline, _ = _compiled_fit(tmp_path / "baseline", None)
    graphs, logger = _compiled_fit(tmp_path / "compiled", every)
    compiled = logger.logged("bn/")

    assert [s for s, _ in compiled] == [s for s, _ in eager] == list(range(every - 1, 6, every))
    for (_, got), (_, want) in zip(compiled, eager, strict=True):
        assert sorted(got) == sorted(want)  # the user's names, every statistic of every layer
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any("_orig_mod" in key for _, metrics in compiled for key in metrics)
    for layer in ("net.bn1", "net.layer1.0.bn2", "net.layer2.0.downsample.1"):
        assert all(f"bn/{layer}/{stat}" in m for _, m in compiled for stat in ("samples_per_channel", *GAP_STATS))

    assert baseline, "the compiled model compiled nothing"
    assert set(graphs) <= set(baseline) and len(graphs) <= len(baseline), (graphs, baseline)
    if every > 1:  # the steps between monitored ones still run compiled
        assert graphs == baseline


def test_two_monitors_hand_compiled_code_back_compiled(tmp_path: Path) -> None:
    """Two monitors that monitor the same batches run it eagerly together and end in either order: after each
    batch, and after the fit, compiled code runs compiled again (no stance is left behind)."""
    graphs, _ = _compiled_fit(tmp_path / "one", 2)
    torch.compiler.reset()
    L.seed_everything(0, verbose=False)
    both: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        both.append(len(gm.graph.nodes))
        return gm.forward

    monitors = [
        BNStatsMonitor(log_every_n_steps=2, include="net.layer1.*", log_prefix="bn_layer1"),
        BNStatsMonitor(log_every_n_steps=2),
    ]
    _fit_user_model(tmp_path / "two", CompiledNetModel(backend), *monitors)
    assert both == graphs  # the same compiled graphs as with one monitor: the unmonitored steps ran compiled

    later: list[int] = []
    compiled = torch.compile(lambda x: x * 2 + 1, backend=lambda gm, _: later.append(1) or gm.forward)
    compiled(torch.ones(3))
    assert later == [1]  # code compiled after the fit is compiled, not forced to run eagerly
