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
from lightning_bnsgd.bn.dynamics import equilibrium_angular_update, find_scale_invariant
from lightning_bnsgd.callbacks.dynamics_monitor import WeightDynamicsMonitor
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
    (BNConvNet, {"input_size": 2.5}, "input_size"),
    (BNConvNet, {"channels": []}, "channels"),
    (BNConvNet, {"dropout": 1.0}, "dropout"),
    (BNConvNet, {"batch_norm": 1}, "batch_norm"),
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
    (DigitsDataModule, {"val_fraction": 1.2}, "val_fraction"),
    (DigitsDataModule, {"val_fraction": "0.1"}, "val_fraction"),
    (DigitsDataModule, {"seed": -1}, "seed"),
    (DigitsDataModule, {"normalize": "yes"}, "normalize"),
    # SGDWarmup
    (SGDWarmup, {"lr": 0.0}, "lr"),
    (SGDWarmup, {"lr": -0.1}, "lr"),
    (SGDWarmup, {"momentum": 1.0}, "momentum"),
    (SGDWarmup, {"momentum": -0.5}, "momentum"),
    (SGDWarmup, {"nesterov": "yes"}, "nesterov"),
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
    (SGDWarmup, {"lr_base_scale": "cubic"}, "lr_base_scale"),
    (SGDWarmup, {"lr_base_size": 0}, "lr_base_size"),
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
    (BNRecalibration, {"num_samples": 1}, "num_samples"),
    (BNRecalibration, {"num_samples": 64.0}, "num_samples"),
    (BNRecalibration, {"at_train_end": "yes"}, "at_train_end"),
    (BNRecalibration, {"log_prefix": ""}, "log_prefix"),
    (BNRecalibration, {"dataloader": [1, 2]}, "dataloader"),
    # BNStatsMonitor
    (BNStatsMonitor, {"log_every_n_steps": 0}, "log_every_n_steps"),
    (BNStatsMonitor, {"log_every_n_steps": 2.5}, "log_every_n_steps"),
    (BNStatsMonitor, {"stats": ["running_median"]}, "stats"),
    (BNStatsMonitor, {"stats": "gap_var_max"}, "stats"),
    (BNStatsMonitor, {"include": "re:(unclosed"}, "include"),
    (BNStatsMonitor, {"include": 3}, "include"),
    (BNStatsMonitor, {"exclude": ["ok", "re:[bad"]}, "exclude"),
    (BNStatsMonitor, {"exclude": [""]}, "exclude"),
    (BNStatsMonitor, {"dead_threshold": -1.0}, "dead_threshold"),
    (BNStatsMonitor, {"min_running_var": -1.0}, "min_running_var"),
    (BNStatsMonitor, {"max_running_var": float("nan")}, "max_running_var"),
    (BNStatsMonitor, {"min_running_var": 1.0, "max_running_var": 0.5}, "min_running_var"),
    (BNStatsMonitor, {"max_dead_fraction": -0.5}, "max_dead_fraction"),
    (BNStatsMonitor, {"on_anomaly": "panic"}, "on_anomaly"),
    (BNStatsMonitor, {"min_samples_per_channel": -1}, "min_samples_per_channel"),
    (BNStatsMonitor, {"log_histograms": "yes"}, "log_histograms"),
    # WeightDynamicsMonitor, find_scale_invariant, equilibrium_angular_update
    (WeightDynamicsMonitor, {"log_every_n_steps": 0}, "log_every_n_steps"),
    (WeightDynamicsMonitor, {"log_every_n_steps": 2.5}, "log_every_n_steps"),
    (WeightDynamicsMonitor, {"include": "re:(unclosed"}, "include"),
    (WeightDynamicsMonitor, {"log_grad_flow": "yes"}, "log_grad_flow"),
    (WeightDynamicsMonitor, {"rtol": 0.0}, "rtol"),
    (WeightDynamicsMonitor, {"max_angular_update": -0.1}, "max_angular_update"),
    (WeightDynamicsMonitor, {"max_norm_growth": 1.0}, "max_norm_growth"),
    (WeightDynamicsMonitor, {"patience": 0}, "patience"),
    (partial(find_scale_invariant, nn.Linear(2, 2), torch.zeros(2, 2)), {"factor": 1.0}, "factor"),
    (partial(equilibrium_angular_update, 0.1, 5e-4), {"momentum": 1.5}, "momentum"),
    # recalibrate_bn
    (_recal, {"mode": "eval"}, "mode"),
    (_recal, {"num_samples": 0}, "num_samples"),
    (_recal, {"num_samples": 1}, "num_samples"),
    (_recal, {"num_batches": 0}, "num_batches"),
    (_recal, {"nonfinite": "ignore"}, "nonfinite"),
    (_recal, {"forward_fn": "model"}, "forward_fn"),
    (_recal, {"dropout": "keep"}, "dropout"),
]


#: The cases whose value has the wrong type: they raise TypeError; every other case has a value of the right type
#: that is not allowed and raises ValueError (one exception type per kind of mistake).
TYPE_ERRORS = {
    "BNConvNet-in_channels='1'",
    "BNConvNet-channels='32,64'",
    "BNConvNet-dropout='high'",
    "BNConvNet-batch_norm='yes'",
    "BNConvNet-input_size=2.5",
    "BNConvNet-batch_norm=1",
    "ConvNetClassifier-net='resnet'",
    "ConvNetClassifier-optimizer='sgd'",
    "DigitsDataModule-batch_size=1.5",
    "DigitsDataModule-val_fraction='0.1'",
    "DigitsDataModule-normalize='yes'",
    "SGDWarmup-nesterov='yes'",
    "WarmupLR-warmup_steps=1-total_steps=10",
    "BNRecalibration-forward_fn=3",
    "BNRecalibration-num_samples=64.0",
    "BNRecalibration-at_train_end='yes'",
    "BNRecalibration-dataloader=[1, 2]",
    "BNStatsMonitor-log_every_n_steps=2.5",
    "BNStatsMonitor-stats='gap_var_max'",
    "BNStatsMonitor-include=3",
    "BNStatsMonitor-log_histograms='yes'",
    "WeightDynamicsMonitor-log_every_n_steps=2.5",
    "WeightDynamicsMonitor-log_grad_flow='yes'",
    "_recal-forward_fn='model'",
}


def _case_id(case) -> str:
    factory, kwargs, _ = case
    name = getattr(factory, "__name__", None) or getattr(getattr(factory, "func", None), "__name__", "factory")
    return f"{name}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}"


def test_every_type_error_case_is_in_the_matrix():
    assert {_case_id(c) for c in CASES} >= TYPE_ERRORS


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_invalid_value_is_rejected_with_a_clear_message(case):
    factory, kwargs, argument = case
    expected = TypeError if _case_id(case) in TYPE_ERRORS else ValueError
    with pytest.raises((ValueError, TypeError)) as info:
        factory(**kwargs)
    assert type(info.value) is expected, (type(info.value).__name__, str(info.value))
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
