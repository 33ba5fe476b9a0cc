"""Bad input matrix: every public constructor and the CLI reject invalid values with a message that names the
argument and says what is allowed, before anything is written to the log directory."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import yaml
from torch import nn

from lightning_bnsgd import (
    BNConvNet,
    BNRecalibration,
    BNStatsMonitor,
    ConvNetClassifier,
    DigitsDataModule,
    SGDWarmup,
    WarmupLR,
    recalibrate_bn,
)
from lightning_bnsgd.cli import cli_main, packaged_config


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def _recal(**kwargs):
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    return recalibrate_bn(net, [torch.randn(4, 3)], **kwargs)


ALLOWED = ("must", "one of", "allowed", "expected", "only", "needs", "not both", "Use ", "Patterns starting")

# (factory, kwargs, argument named in the message)
CASES = [
    # BNConvNet
    (BNConvNet, {"in_channels": 0}, "in_channels"),
    (BNConvNet, {"in_channels": "1"}, "in_channels"),
    (BNConvNet, {"num_classes": 0}, "num_classes"),
    (BNConvNet, {"input_size": -8}, "input_size"),
    (BNConvNet, {"channels": "32,64"}, "channels"),
    (BNConvNet, {"channels": [32, -1]}, "channels[1]"),
    (BNConvNet, {"kernel_size": 0}, "kernel_size"),
    (BNConvNet, {"padding": "full"}, "padding"),
    (BNConvNet, {"norm_position": "before"}, "norm_position"),
    (BNConvNet, {"dropout": -0.1}, "dropout"),
    (BNConvNet, {"dropout": "high"}, "dropout"),
    (BNConvNet, {"block_dropout": 1.5}, "block_dropout"),
    (BNConvNet, {"batch_norm": "yes"}, "batch_norm"),
    (BNConvNet, {"input_size": 4, "channels": [8, 8, 8]}, "padding"),
    # ConvNetClassifier
    (ConvNetClassifier, {"net": "resnet"}, "net"),
    (ConvNetClassifier, {"optimizer": "sgd"}, "optimizer"),
    (ConvNetClassifier, {"padding": "circular"}, "padding"),
    # DigitsDataModule
    (DigitsDataModule, {"batch_size": 0}, "batch_size"),
    (DigitsDataModule, {"batch_size": 1.5}, "batch_size"),
    (DigitsDataModule, {"num_workers": -2}, "num_workers"),
    (DigitsDataModule, {"val_fraction": 0}, "val_fraction"),
    (DigitsDataModule, {"test_fraction": 1}, "test_fraction"),
    (DigitsDataModule, {"val_fraction": 0.6, "test_fraction": 0.4}, "val_fraction"),
    (DigitsDataModule, {"resize": -28}, "resize"),
    (DigitsDataModule, {"label_noise": 1.0}, "label_noise"),
    # SGDWarmup
    (SGDWarmup, {"lr": 0.0}, "lr"),
    (SGDWarmup, {"lr": -0.1}, "lr"),
    (SGDWarmup, {"momentum": 1.0}, "momentum"),
    (SGDWarmup, {"momentum": -0.5}, "momentum"),
    (SGDWarmup, {"nesterov": True, "momentum": 0.0}, "nesterov"),
    (SGDWarmup, {"weight_decay": -1e-4}, "weight_decay"),
    (SGDWarmup, {"norm_weight_decay": -1.0}, "norm_weight_decay"),
    (SGDWarmup, {"warmup_steps": 5, "warmup_epochs": 1}, "warmup_steps"),
    (SGDWarmup, {"warmup_start_factor": 0.0}, "warmup_start_factor"),
    (SGDWarmup, {"warmup_start_factor": 1.5}, "warmup_start_factor"),
    (SGDWarmup, {"warmup": "quadratic"}, "warmup"),
    (SGDWarmup, {"decay": "cosine_restarts"}, "decay"),
    (SGDWarmup, {"min_lr": 1.0, "lr": 0.1}, "min_lr"),
    (SGDWarmup, {"decay": "multistep", "milestones": [5, 3]}, "milestones"),
    (SGDWarmup, {"decay": "multistep", "milestones": [0, 3]}, "milestones"),
    (SGDWarmup, {"gamma": 0.0}, "gamma"),
    (SGDWarmup, {"gamma": 1.5}, "gamma"),
    (SGDWarmup, {"scale_lr": "cubic"}, "scale_lr"),
    (SGDWarmup, {"reference_batch_size": 0}, "reference_batch_size"),
    (SGDWarmup, {"warmup_steps": 10, "total_steps": 5}, "warmup_steps"),
    # WarmupLR
    (partial(WarmupLR, _sgd()), {"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
    (partial(WarmupLR, _sgd()), {"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
    (partial(WarmupLR, _sgd()), {"warmup_steps": 1, "total_steps": 0}, "total_steps"),
    (partial(WarmupLR, _sgd()), {"warmup_steps": 1, "total_steps": 10, "decay": "sigmoid"}, "decay"),
    (partial(WarmupLR, "not an optimizer"), {"warmup_steps": 1, "total_steps": 10}, "optimizer"),
    # BNRecalibration
    (BNRecalibration, {"num_samples": 0}, "num_samples"),
    (BNRecalibration, {"every_n_epochs": 0}, "every_n_epochs"),
    (BNRecalibration, {"mode": "exact"}, "mode"),
    (BNRecalibration, {"dropout": "off"}, "dropout"),
    (BNRecalibration, {"forward_fn": 3}, "forward_fn"),
    # BNStatsMonitor
    (BNStatsMonitor, {"logging_interval": 0}, "logging_interval"),
    (BNStatsMonitor, {"stats": ["running_median"]}, "stats"),
    (BNStatsMonitor, {"include": "re:(unclosed"}, "include"),
    (BNStatsMonitor, {"dead_threshold": -1.0}, "dead_threshold"),
    (BNStatsMonitor, {"on_anomaly": "panic"}, "on_anomaly"),
    # recalibrate_bn
    (_recal, {"mode": "eval"}, "mode"),
    (_recal, {"num_samples": 0}, "num_samples"),
    (_recal, {"dropout": "keep"}, "dropout"),
]


def _case_id(case) -> str:
    factory, kwargs, _ = case
    name = getattr(factory, "__name__", None) or getattr(getattr(factory, "func", None), "__name__", "factory")
    return f"{name}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}"


def test_the_matrix_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_invalid_value_is_rejected_with_a_clear_message(case):
    factory, kwargs, argument = case
    with pytest.raises((ValueError, TypeError)) as info:
        factory(**kwargs)
    message = str(info.value)
    assert argument in message, message
    assert any(word in message for word in ALLOWED), message


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--model.init_args.padding=circular"], "padding"),
        (["--data.init_args.batch_size=0"], "batch_size"),
        (["--data.init_args.val_fraction=1.5"], "val_fraction"),
        (["--model.init_args.optimizer.lr=-1"], "lr"),
        (["--model.init_args.optimizer.decay=sawtooth"], "decay"),
        (["--trainer.max_epochs=many"], "max_epochs"),
        (
            ["--trainer.callbacks+=lightning_bnsgd.BNStatsMonitor", "--trainer.callbacks.on_anomaly=panic"],
            "on_anomaly",
        ),
    ],
)
def test_cli_rejects_bad_values_before_writing_logs(tmp_path, capsys, overrides, expected):
    logs = tmp_path / "logs"
    args = [
        "fit",
        "--config",
        str(packaged_config()),
        f"--trainer.default_root_dir={logs}",
        f"--trainer.logger.init_args.save_dir={logs}",
        *QUIET,
        *overrides,
    ]
    with pytest.raises((SystemExit, ValueError, TypeError)) as info:
        cli_main(args)
    text = capsys.readouterr().err + str(info.value)
    assert expected in text, text[-2000:]
    assert not logs.exists() or not any(logs.rglob("*")), sorted(logs.rglob("*"))


def test_cli_yaml_typo_and_missing_config(tmp_path, capsys):
    config = yaml.safe_load(packaged_config().read_text())
    config["data"]["init_args"]["batch_sise"] = 32
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(bad)])
    assert "batch_sise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err
