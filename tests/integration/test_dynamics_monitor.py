"""``WeightDynamicsMonitor`` in Trainer runs: values against an independent computation, the interval in training
batches (two optimizers, gradient accumulation), warnings, state, no effect on the trajectory, the packaged CLI."""

from __future__ import annotations

import csv
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.user_project.project import MemoryLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, LightningModule, loggers, logging_step
from lightning_bnsgd.bn.dynamics import angular_update, equilibrium_angular_update
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor
from lightning_bnsgd.cli import cli_main, packaged_config

INVARIANT = ("net.0", "net.4")  # Conv-ReLU-BN (weight and bias together) and Conv(bias=False)-BN


def small_net(batch_norm: bool = True, dropout: float = 0.0) -> nn.Sequential:
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        norm(4),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


class Tiny(LightningModule):
    """Random 8x8 images in 3 classes, SGD with momentum and weight decay on every parameter."""

    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-4, nesterov: bool = True, **net: Any) -> None:
        super().__init__()
        self.net = small_net(**net)
        self.lr, self.weight_decay, self.nesterov = lr, weight_decay, nesterov

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, nesterov=self.nesterov, weight_decay=self.weight_decay
        )

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        return DataLoader(data, batch_size=8, shuffle=True, generator=g)


class Truth(Callback):
    """Independent record of every optimizer step: weights before and after, the LR, gradient norms."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.rows: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        modules = dict(pl_module.named_modules())
        self.before = {n: _vector(modules[n]) for n in self.names}
        self.grads = {n: float(modules[n].weight.grad.norm()) for n in self.names}
        self.group = dict(optimizer.param_groups[0])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        modules = dict(pl_module.named_modules())
        after = {n: _vector(modules[n]) for n in self.names}
        self.rows.append(
            {
                "step": logging_step(trainer),
                "angle": {n: float(angular_update(self.before[n], after[n])) for n in self.names},
                "norm": {n: float(after[n].norm()) for n in self.names},
                "grad": self.grads,
                "lr": self.group["lr"],
            }
        )


def _vector(module: nn.Module) -> Tensor:
    parts = [module.weight.detach().flatten()]
    if module.bias is not None:
        parts.append(module.bias.detach().flatten())
    return torch.cat(parts).clone()


def test_logged_values_match_an_independent_computation(make_trainer):
    logger, truth = MemoryLogger(), Truth(INVARIANT)
    monitor = WeightDynamicsMonitor(log_every_n_steps=3)
    trainer = make_trainer(max_epochs=2, logger=logger, callbacks=[monitor, truth])
    trainer.fit(Tiny())
    assert monitor.report is not None
    assert monitor.report.names == list(INVARIANT)
    assert monitor.report.groups[0].params == ("net.0.weight", "net.0.bias")
    assert monitor.report.groups[1].params == ("net.4.weight",)
    assert list(monitor.report.rejected) == ["net.10"]
    assert monitor.layer_names == ["net.0", "net.4", "net.10"]
    logged = logger.logged("dynamics/")
    assert [s for s, _ in logged] == [2, 5, 8, 11, 14]  # every 3rd of 16 batches, at self.log's step
    by_step = {r["step"]: r for r in truth.rows}
    for step, metrics in logged:
        row = by_step[step]
        for name in INVARIANT:
            assert metrics[f"dynamics/{name}/angular_update"] == pytest.approx(row["angle"][name], rel=1e-6)
            assert metrics[f"dynamics/{name}/weight_norm"] == pytest.approx(row["norm"][name], rel=1e-6)
            assert metrics[f"dynamics/{name}/effective_lr"] == pytest.approx(row["lr"] / row["norm"][name] ** 2)
            assert metrics[f"dynamics/{name}/grad_norm"] == pytest.approx(row["grad"][name], rel=1e-5)
            predicted = equilibrium_angular_update(row["lr"], 5e-4, 0.9, nesterov=True)
            assert metrics[f"dynamics/{name}/angular_update_eq"] == pytest.approx(predicted)
            assert metrics[f"dynamics/{name}/angular_update_ratio"] == pytest.approx(row["angle"][name] / predicted)
        assert "dynamics/net.10/grad_norm" in metrics
        assert "dynamics/net.10/angular_update" not in metrics
        ratio = metrics["dynamics/net.0/grad_norm"] / metrics["dynamics/net.10/grad_norm"]
        assert metrics["dynamics/summary/grad_norm_ratio"] == pytest.approx(ratio)


def test_default_interval_is_the_trainers_and_csv_logger_gets_it(make_trainer, tmp_path):
    monitor = WeightDynamicsMonitor()
    trainer = make_trainer(max_epochs=1, log_every_n_steps=4, logger=loggers.CSVLogger(tmp_path), callbacks=[monitor])
    trainer.fit(Tiny())
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "dynamics/net.4/angular_update" in text.splitlines()[0]
    assert monitor.state_dict()["batches"] == 8


class LoggingTiny(Tiny):
    """``Tiny`` that logs its loss with ``self.log``, as users' modules do."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_metrics_share_the_step_of_the_modules_own_self_log_metrics(make_trainer, tmp_path):
    trainer = make_trainer(
        max_epochs=2, log_every_n_steps=3, logger=loggers.CSVLogger(tmp_path), callbacks=[WeightDynamicsMonitor()]
    )
    trainer.fit(LoggingTiny())
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    own = [int(r["step"]) for r in rows if r["train_loss"]]
    dynamics = [int(r["step"]) for r in rows if r["dynamics/net.4/angular_update"]]
    assert own == [2, 5, 8, 11, 14]  # Lightning logs batches 3, 6, ... at the count of batches stepped before them
    assert dynamics == own


class TwoOptimizers(Tiny):
    """Manual optimization with one optimizer per conv layer (and the head in the second): global_step advances
    twice per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        first.step()
        second.step()

    def configure_optimizers(self) -> Any:
        head = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD(head, lr=0.05, momentum=0.5, weight_decay=1e-3),
        ]


def test_interval_counts_training_batches_with_two_optimizers(make_trainer):
    logger = MemoryLogger()
    trainer = make_trainer(max_epochs=1, logger=logger, callbacks=[WeightDynamicsMonitor(log_every_n_steps=3)])
    trainer.fit(TwoOptimizers())
    logged = logger.logged("dynamics/")
    assert [s for s, _ in logged] == [2, 5]  # batches 3 and 6 of 8 (global_step is twice the batch count)
    metrics = logged[0][1]
    assert metrics["dynamics/net.0/angular_update_eq"] == pytest.approx(equilibrium_angular_update(0.1, 5e-4, 0.9))
    assert metrics["dynamics/net.4/angular_update_eq"] == pytest.approx(equilibrium_angular_update(0.05, 1e-3, 0.5))


def test_with_gradient_accumulation_the_third_stepping_batch_is_monitored(make_trainer):
    logger = MemoryLogger()
    monitor = WeightDynamicsMonitor(log_every_n_steps=3)
    trainer = make_trainer(max_epochs=1, logger=logger, accumulate_grad_batches=2, callbacks=[monitor])
    trainer.fit(Tiny())
    # steps are counted as Lightning counts them for its own logging: batches 2, 4, 6, 8 step; the third of them
    # (batch 6) is monitored, at the step of its self.log metrics (the number of batches that stepped before it)
    assert trainer.global_step == 4
    assert [s for s, _ in logger.logged("dynamics/")] == [2]
    assert all(m["dynamics/net.4/angular_update"] > 0 for _, m in logger.logged("dynamics/"))


def _fit_warnings(make_trainer: Any, model: LightningModule, monitor: WeightDynamicsMonitor, **kwargs: Any) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[monitor], **{"logger": MemoryLogger(), **kwargs}).fit(model)
    return "\n".join(str(w.message) for w in caught if "WeightDynamicsMonitor" in str(w.message))


def test_warns_when_without_weight_decay_the_norm_grows_and_the_effective_lr_decays(make_trainer):
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, max_norm_growth=1.5)
    text = _fit_warnings(make_trainer, Tiny(lr=1.0, weight_decay=0.0, nesterov=False), monitor, max_epochs=3)
    assert "no weight decay" in text
    assert text.count("no weight decay") == len(monitor.state_dict()["warned"])  # once per layer


def test_warns_when_lr_times_weight_decay_makes_the_weight_rotate_by_noise(make_trainer):
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, patience=3)
    text = _fit_warnings(make_trainer, Tiny(lr=1.0, weight_decay=1.0, nesterov=False), monitor, max_epochs=1)
    assert "'net.0' rotates" in text and "lr x weight_decay is too high" in text


def test_warns_when_the_lr_is_too_high_for_the_norm(make_trainer):
    monitor = WeightDynamicsMonitor(log_every_n_steps=1, patience=2, max_angular_update=0.1)
    text = _fit_warnings(make_trainer, Tiny(lr=0.5, weight_decay=1e-4), monitor, max_epochs=1)
    assert "'net.0' rotates" in text and "is small for this LR" in text
    assert text.count("rotates") == len(monitor.state_dict()["warned"])


def test_no_warning_on_a_healthy_run(make_trainer):
    assert _fit_warnings(make_trainer, Tiny(), WeightDynamicsMonitor(log_every_n_steps=1), max_epochs=2) == ""


def test_model_without_batchnorm_warns_and_still_logs_the_gradient_flow(make_trainer):
    logger = MemoryLogger()
    monitor = WeightDynamicsMonitor(log_every_n_steps=2)
    with pytest.warns(UserWarning, match="found no scale-invariant weight"):
        make_trainer(max_epochs=1, logger=logger, callbacks=[monitor]).fit(Tiny(batch_norm=False))
    metrics = logger.logged("dynamics/")[0][1]
    assert set(metrics) == {
        "dynamics/net.0/grad_norm",
        "dynamics/net.4/grad_norm",
        "dynamics/net.10/grad_norm",
        "dynamics/summary/grad_norm_ratio",
    }


def test_include_exclude_and_no_grad_flow(make_trainer):
    logger = MemoryLogger()
    monitor = WeightDynamicsMonitor(log_every_n_steps=2, exclude="net.0", log_grad_flow=False)
    make_trainer(max_epochs=1, logger=logger, callbacks=[monitor]).fit(Tiny())
    keys = set(logger.logged("dynamics/")[0][1])
    assert {k.split("/")[1] for k in keys} == {"net.4"}


def test_no_logger_warns(make_trainer):
    with pytest.warns(UserWarning, match="no logger"):
        make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[WeightDynamicsMonitor()]).fit(Tiny())


def test_trajectory_is_unchanged_by_the_monitor(make_trainer):
    def fit(callbacks: list[Any]) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = Tiny(dropout=0.5)
        make_trainer(max_epochs=2, logger=MemoryLogger(), callbacks=callbacks).fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = fit([])
    monitored = fit([WeightDynamicsMonitor(log_every_n_steps=1)])
    for key, value in plain.items():
        assert torch.equal(value, monitored[key]), key


def test_state_dict_round_trip():
    monitor = WeightDynamicsMonitor()
    monitor.load_state_dict(
        {"warned": [["net.0", "no_decay"]], "batches": 7, "streaks": {"net.4": 2}, "first_inv_norm2": {"net.0": 0.5}}
    )
    state = monitor.state_dict()
    assert state == {
        "warned": [["net.0", "no_decay"]],
        "batches": 7,
        "streaks": {"net.4": 2},
        "first_inv_norm2": {"net.0": 0.5},
    }
    WeightDynamicsMonitor().load_state_dict({})  # old checkpoints: defaults


def test_resumed_run_keeps_the_batch_count(make_trainer, tmp_path):
    logger = MemoryLogger()
    trainer = make_trainer(
        max_epochs=1, logger=logger, callbacks=[WeightDynamicsMonitor(log_every_n_steps=3)], enable_checkpointing=True
    )
    trainer.fit(Tiny())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    logger2, monitor2 = MemoryLogger(), WeightDynamicsMonitor(log_every_n_steps=3)
    make_trainer(max_epochs=2, logger=logger2, callbacks=[monitor2]).fit(Tiny(), ckpt_path=str(ckpt))
    # batches 9, 12 and 15 of the whole run (logged at steps 8, 11, 14), as without the interruption
    assert [s for s, _ in logger2.logged("dynamics/")] == [8, 11, 14]
    assert monitor2.state_dict()["batches"] == 16


def test_two_monitors_of_different_layers_are_checkpointed_and_restored_each_as_its_own(make_trainer, tmp_path):
    def monitors() -> list[WeightDynamicsMonitor]:
        return [
            WeightDynamicsMonitor(log_every_n_steps=3, include="net.0"),
            WeightDynamicsMonitor(log_every_n_steps=3, include="net.4", log_prefix="dynamics_net4"),
        ]

    first = monitors()
    logger = MemoryLogger()
    trainer = make_trainer(max_epochs=1, logger=logger, callbacks=list(first), enable_checkpointing=True)
    trainer.fit(Tiny(weight_decay=0.0))  # without weight decay each monitor records its layer's first norm
    assert [m.report.names for m in first if m.report] == [["net.0"], ["net.4"]]
    names = {"/".join(k.split("/")[:2]) for _, m in logger.logged("dynamics") for k in m}
    assert names == {"dynamics/net.0", "dynamics_net4/net.4"}
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    assert states[first[0].state_key]["first_inv_norm2"].keys() == {"net.0"}
    assert states[first[1].state_key]["first_inv_norm2"].keys() == {"net.4"}
    again = monitors()
    make_trainer(max_epochs=1, logger=MemoryLogger(), callbacks=list(again)).fit(Tiny(weight_decay=0.0), ckpt_path=ckpt)
    for old, new in zip(first, again, strict=True):  # max_epochs=1 reached: restored, nothing trained
        assert new.state_dict() == old.state_dict()


def _metrics_by_step(path: Any) -> dict[int, dict[str, float]]:
    """``metrics.csv`` merged by step (each ``log_metrics`` call is a row); a name logged twice at one step fails."""
    by_step: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = by_step.setdefault(int(row.pop("step")), {})
            for name, value in row.items():
                if value:
                    assert name not in step, f"{name} logged twice at one step"
                    step[name] = float(value)
    return by_step


def test_two_monitors_with_their_own_prefixes_log_their_own_summaries_at_the_same_step(make_trainer, tmp_path):
    """Each monitor's ``grad_norm_ratio`` is its own first layer's over its own last layer's, under its own name,
    at the same step as the other's; nothing is logged twice under one name at one step."""
    front = WeightDynamicsMonitor(log_every_n_steps=3, include=["net.0", "net.4"], log_prefix="dyn_front")
    back = WeightDynamicsMonitor(log_every_n_steps=3, include=["net.4", "net.10"], log_prefix="dyn_back")
    trainer = make_trainer(max_epochs=1, logger=loggers.CSVLogger(tmp_path), callbacks=[front, back])
    trainer.fit(Tiny())
    by_step = _metrics_by_step(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    steps = {s: m for s, m in by_step.items() if "dyn_front/summary/grad_norm_ratio" in m}
    assert sorted(steps) == [2, 5]  # every 3rd of 8 batches
    for metrics in steps.values():
        assert not any(name.startswith("dynamics/") for name in metrics)  # neither uses the default names
        assert {n.split("/")[1] for n in metrics if n.startswith("dyn_front/")} == {"net.0", "net.4", "summary"}
        assert {n.split("/")[1] for n in metrics if n.startswith("dyn_back/")} == {"net.4", "net.10", "summary"}
        front_ratio = metrics["dyn_front/net.0/grad_norm"] / metrics["dyn_front/net.4/grad_norm"]
        back_ratio = metrics["dyn_back/net.4/grad_norm"] / metrics["dyn_back/net.10/grad_norm"]
        assert metrics["dyn_front/summary/grad_norm_ratio"] == pytest.approx(front_ratio)
        assert metrics["dyn_back/summary/grad_norm_ratio"] == pytest.approx(back_ratio)
        assert metrics["dyn_front/net.4/grad_norm"] == metrics["dyn_back/net.4/grad_norm"]  # one layer, one step


def test_two_monitors_that_differ_only_by_prefix_are_each_checkpointed_and_restored(make_trainer, tmp_path):
    def monitors() -> list[WeightDynamicsMonitor]:
        return [WeightDynamicsMonitor(log_every_n_steps=3), WeightDynamicsMonitor(log_every_n_steps=3, log_prefix="d2")]

    first = monitors()
    assert first[0].state_key != first[1].state_key  # Lightning refused one Trainer with both before
    trainer = make_trainer(max_epochs=1, logger=MemoryLogger(), callbacks=list(first), enable_checkpointing=True)
    trainer.fit(Tiny(weight_decay=0.0))
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {k for k in states if str(k).startswith("WeightDynamicsMonitor")} == {m.state_key for m in first}
    again, logger = monitors(), MemoryLogger()
    make_trainer(max_epochs=2, logger=logger, callbacks=list(again)).fit(Tiny(weight_decay=0.0), ckpt_path=str(ckpt))
    for prefix in ("dynamics/", "d2/"):  # batches 9, 12 and 15 of the whole run: each batch count was restored
        assert [s for s, _ in logger.logged(prefix)] == [8, 11, 14]
    for old, new in zip(first, again, strict=True):
        assert new.state_dict()["first_inv_norm2"] == old.state_dict()["first_inv_norm2"]  # restored, not re-recorded
        assert new.state_dict()["batches"] == 16


def test_two_monitors_with_the_same_prefix_each_log_their_own_ratio(make_trainer):
    """The second monitor asking for ``dynamics`` logs under ``dynamics_2/`` and says so: the two
    ``grad_norm_ratio`` values never share a name."""
    front = WeightDynamicsMonitor(log_every_n_steps=3, include=["net.0", "net.4"])
    back = WeightDynamicsMonitor(log_every_n_steps=3, include=["net.10"])
    logger = MemoryLogger()
    trainer = make_trainer(max_epochs=1, logger=logger, callbacks=[front, back])
    with pytest.warns(UserWarning, match=r"logs under `dynamics_2/`") as caught:
        trainer.fit(Tiny())
    assert len([w for w in caught if "dynamics_2/" in str(w.message)]) == 1  # said once
    names = {k for _, m in logger.calls for k in m}
    assert {n.split("/")[1] for n in names if n.startswith("dynamics/")} == {"net.0", "net.4", "summary"}
    assert {n.split("/")[1] for n in names if n.startswith("dynamics_2/")} == {"net.10"}


def test_log_prefix_is_checked_in_the_constructor():
    with pytest.raises(ValueError, match=r"WeightDynamicsMonitor: `log_prefix` must be a non-empty string, got ''"):
        WeightDynamicsMonitor(log_prefix="")
    with pytest.raises(TypeError, match=r"WeightDynamicsMonitor: `log_prefix` must be a non-empty string, got 3"):
        WeightDynamicsMonitor(log_prefix=3)  # type: ignore[arg-type]


def test_a_checkpoint_with_the_state_under_the_old_key_still_loads(make_trainer, tmp_path):
    monitor = WeightDynamicsMonitor(log_every_n_steps=3)
    trainer = make_trainer(max_epochs=1, logger=MemoryLogger(), callbacks=[monitor], enable_checkpointing=True)
    trainer.fit(Tiny())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if str(k).startswith("WeightDynamicsMonitor")]
    checkpoint["callbacks"]["WeightDynamicsMonitor"] = checkpoint["callbacks"].pop(key)  # as 0.x versions saved it
    torch.save(checkpoint, ckpt)
    logger2, monitor2 = MemoryLogger(), WeightDynamicsMonitor(log_every_n_steps=3)
    make_trainer(max_epochs=2, logger=logger2, callbacks=[monitor2]).fit(Tiny(), ckpt_path=str(ckpt))
    assert [s for s, _ in logger2.logged("dynamics/")] == [8, 11, 14]  # the batch count was restored
    assert monitor2.state_dict()["batches"] == 16


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({"batches": -100}, ValueError, r"`batches` must be an integer >= 0, got -100"),
        ({"batches": "7"}, TypeError, r"`batches` must be an integer >= 0, got '7'"),
        ({"streaks": {"net.0": -7}}, ValueError, r"`streaks\['net.0'\]` must be an integer >= 0, got -7"),
        ({"streaks": [1, 2]}, TypeError, r"`streaks` must be a dict from layer names to numbers, got \[1, 2\]"),
        ({"first_inv_norm2": {"net.0": -1.0}}, ValueError, r"`first_inv_norm2\['net.0'\]` must be a finite number"),
        ({"first_inv_norm2": {"net.0": "x"}}, TypeError, r"`first_inv_norm2\['net.0'\]` must be a finite number"),
        ({"warned": [["net.0"]]}, ValueError, r"`warned` must be a list of \[layer name, kind\] pairs"),
        ([1, 2], TypeError, r"the state must be a dict, got list"),
    ],
)
def test_a_corrupted_state_names_the_monitor_and_the_key(state, error, match):
    monitor = WeightDynamicsMonitor()
    before = monitor.state_dict()
    with pytest.raises(error, match=r"WeightDynamicsMonitor \(checkpoint state .*\): " + match):
        monitor.load_state_dict(state)
    assert monitor.state_dict() == before  # nothing half-loaded


def test_a_foreign_state_warns_about_the_keys_it_ignores():
    monitor = WeightDynamicsMonitor()
    match = r"WeightDynamicsMonitor .*ignoring key\(s\) this monitor does not save: best_model_path, monitor"
    with pytest.warns(UserWarning, match=match):
        monitor.load_state_dict({"monitor": "val_loss", "best_model_path": "x.ckpt", "batches": 3})
    assert monitor.state_dict()["batches"] == 3


def test_packaged_digits_config_with_the_monitor(tmp_path):
    config = yaml.safe_load(packaged_config().read_text())  # the packaged job has the monitor, every 25 batches
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("WeightDynamicsMonitor")]
    entry["init_args"]["log_every_n_steps"] = 3
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, WeightDynamicsMonitor))
    assert monitor.report is not None
    assert monitor.report.names == ["net.features.0.conv", "net.features.1.conv"]
    header = next((tmp_path / "digits").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "dynamics/net.features.1.conv/angular_update_ratio" in header
    assert monitor.state_dict()["batches"] == 6
