from __future__ import annotations

import filecmp
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_bnsgd import DigitsDataModule
from lightning_bnsgd._compat import LightningDataModule, LightningModule, namespace_name
from lightning_bnsgd.cli import cli_main, main, packaged_config

ROOT = Path(__file__).resolve().parents[2]


class OnlyNumClasses(LightningModule):
    """A user's model that takes one of the linked arguments."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(64, num_classes)


QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.accelerator=cpu",
]


def test_packaged_config_and_example_copy_are_identical():
    assert filecmp.cmp(packaged_config(), ROOT / "examples" / "digits.yaml", shallow=False)


def test_fit_then_test_from_packaged_yaml(tmp_path, capsys):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(packaged_config()),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *QUIET,
        ]
    )
    # linked from the data module into the model
    assert cli.model.hparams.input_size == cli.datamodule.input_size == 8
    assert cli.model.hparams.num_classes == 10
    assert cli.trainer.global_step == 5
    out = capsys.readouterr().out
    assert "test accuracy:" in out


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(packaged_config()), "--trainer.max_epochs=3", "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["trainer"]["max_epochs"] == 3
    assert config["model"]["class_path"].endswith("ConvNetClassifier")
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    cli = cli_main(
        ["fit", "--config", str(saved), "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    assert cli.config.fit.trainer.max_epochs == 3
    assert cli.model.hparams.padding == "same"
    assert cli.trainer.global_step == 1


def test_wrong_key_in_yaml_fails_with_jsonargparse_message(tmp_path, capsys):
    bad = yaml.safe_load(packaged_config().read_text())
    bad["model"]["init_args"]["chanels"] = [8, 16]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(path)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "chanels" in err


def test_user_classes_run_without_our_links(tmp_path):
    # a user's own LightningModule/DataModule (no in_channels/input_size/num_classes on either side)
    cli = cli_main(
        [
            "fit",
            "--model=tests.user_project.project.UserModel",
            "--model.init_args.warmup_steps=1",
            "--data=tests.user_project.project.UserDataModule",
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert type(cli.model).__name__ == "UserModel" and type(cli.datamodule).__name__ == "UserDataModule"
    assert cli.trainer.global_step == 1


def test_links_apply_only_where_both_sides_have_the_field(tmp_path):
    # our DigitsDataModule with a user model that takes only num_classes: that one is linked, nothing else
    cli = cli_main(
        [
            "--model=tests.integration.test_cli.OnlyNumClasses",
            "--data=lightning_bnsgd.DigitsDataModule",
            "--data.init_args.resize=12",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        run=False,
    )
    assert cli.model.hparams.num_classes == 10 and "input_size" not in cli.model.hparams
    cli = cli_main(
        ["--config", str(packaged_config()), "--data.init_args.resize=12", "--model.init_args.padding=same"],
        run=False,
    )
    assert cli.model.hparams.input_size == 12  # linked from the data module's resize


@pytest.mark.both_namespaces
def test_callbacks_by_lightning_pytorch_class_path(tmp_path):
    cli = cli_main(
        [
            "--config",
            str(packaged_config()),
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ],
        run=False,
    )
    assert namespace_name(cli.trainer) == "lightning.pytorch"  # the CLI's Trainer is BNSGDTrainer, a subclass
    assert any(type(cb).__module__.startswith("lightning.pytorch.callbacks") for cb in cli.trainer.callbacks)


USER_MODULE = '''
"""A user's model file, written like Lightning's ImageNet example (num_classes 1000, top-1/top-5 test metrics)."""
import torch
from torch import nn
from torch.nn import functional as F
from {namespace} import LightningModule


class MyModel(LightningModule):
    def __init__(self, num_classes: int = 1000, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        top5 = logits.topk(5, dim=1).indices
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc1", (top5[:, 0] == y).float().mean())
        self.log("test_acc5", (top5 == y[:, None]).any(dim=1).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's ``my_module_<n>.py`` in a fresh directory, the working directory, not on ``sys.path``."""
    namespace = LightningModule.__module__.split(".core")[0]
    name = f"my_module_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE.format(namespace=namespace))
    monkeypatch.chdir(tmp_path)
    here = {"", ".", str(tmp_path)}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here and Path(p or ".").resolve() != tmp_path])
    yield name
    sys.modules.pop(name, None)


def _user_args(name: str, tmp_path: Path) -> list[str]:
    return [
        "fit",
        f"--model={name}.MyModel",
        "--data=lightning_bnsgd.DigitsDataModule",
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]


def test_console_script_finds_a_user_module_in_the_working_directory(user_module, tmp_path, monkeypatch, capsys):
    """Issue 24 item 20: ``lightning-bnsgd fit --model my_module.MyModel`` works without ``PYTHONPATH=.``, as
    ``python -m`` does (the console script's ``sys.path`` starts with its ``bin/`` directory, not the cwd)."""
    monkeypatch.setattr(sys, "argv", ["lightning-bnsgd", *_user_args(user_module, tmp_path)])
    main()
    assert sys.modules[user_module].__file__ == str(tmp_path / f"{user_module}.py")
    assert "No module named" not in capsys.readouterr().err


def test_test_after_fit_prints_every_test_metric(user_module, tmp_path, capsys):
    """Issue 24 item 20: ``--test_after_fit=true`` shows Lightning's table of every test metric (here
    ``test_acc1``, ``test_acc5``, ``test_loss``: no ``*acc`` name) and the accuracy line for ``test_acc1``."""
    sys.path.insert(0, str(tmp_path))
    cli = cli_main([*_user_args(user_module, tmp_path), "--test_after_fit=true"])
    metrics = cli.trainer.callback_metrics
    out = capsys.readouterr().out
    for name in ("test_acc1", "test_acc5", "test_loss"):
        assert name in out, out
    assert f"test accuracy: {float(metrics['test_acc1']):.4f}" in out


def test_print_config_shows_the_linked_values_the_run_uses(user_module, tmp_path, capsys):
    """Issue 24 item 20: ``--print_config`` shows ``num_classes: 10`` linked from the data module (the model's
    default is 1000), and the printed config runs with the same values."""
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        cli_main([*_user_args(user_module, tmp_path), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["init_args"]["num_classes"] == 10
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    cli = cli_main(["fit", "--config", str(saved)])
    assert cli.model.hparams.num_classes == 10
    with pytest.raises(SystemExit):  # the packaged config: input_size follows the data module's resize
        cli_main(["fit", "--config", str(packaged_config()), "--data.init_args.resize=12", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["input_size"] == 12


class NeedsRoot(LightningDataModule):
    """A user's data module with a required argument (no default)."""

    num_classes = 7

    def __init__(self, root: str) -> None:
        super().__init__()
        if not isinstance(root, str):
            raise TypeError(f"root must be a path, got {root!r}")
        self.root = root


def test_print_config_still_prints_a_template_whose_data_module_cannot_be_built(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(
            [
                "fit",
                "--model=tests.integration.test_cli.OnlyNumClasses",
                f"--data={__name__}.NeedsRoot",
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["root"] is None  # the template, as jsonargparse prints it
    cli = cli_main(
        ["--model=tests.integration.test_cli.OnlyNumClasses", f"--data={__name__}.NeedsRoot", "--data.root=x"],
        run=False,
    )
    assert cli.model.hparams.num_classes == 7


def test_linking_calls_no_deprecated_jsonargparse_api():
    """The data module built to read its linked attributes goes through jsonargparse's current API: no
    DeprecationWarning from our own code (LightningCLI's calls are its own)."""
    import warnings

    from jsonargparse import Namespace

    from lightning_bnsgd.cli import link_data_into_model

    config = Namespace(
        model=Namespace(class_path="lightning_bnsgd.ConvNetClassifier", init_args=Namespace()),
        data=Namespace(class_path="lightning_bnsgd.DigitsDataModule", init_args=Namespace(batch_size=8)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linked = link_data_into_model(config)
    assert linked == ["in_channels", "input_size", "num_classes"]
    assert config.model.init_args.num_classes == 10
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not [m for m in deprecations if "jsonargparse" in m or "instantiate" in m], deprecations


class CountedDigits(DigitsDataModule):
    """A user's data module whose ``__init__`` has a side effect (a download, a print): counted here."""

    builds = 0

    def __init__(self, batch_size: int = 64) -> None:
        type(self).builds += 1
        super().__init__(batch_size=batch_size)


@pytest.mark.parametrize("run", [True, False], ids=["fit", "run=False"])
def test_the_cli_builds_the_data_module_once(tmp_path, monkeypatch, run):
    """The data module the model's arguments are linked from is the one the run uses, built once (it was built
    three times in a fit: to link, to dump the saved hyperparameters, and by LightningCLI), and the run's saved
    ``config.yaml``, the model's hyperparameters and the data module's are those of a run that built it three
    times."""
    monkeypatch.setattr(CountedDigits, "builds", 0)
    args = [
        "--config",
        str(packaged_config()),
        f"--data={__name__}.CountedDigits",
        "--data.init_args.batch_size=32",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *QUIET,
        "--trainer.enable_checkpointing=true",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", *args] if run else args, run=run)
    assert CountedDigits.builds == 1
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and "lightning_bnsgd" in w.filename]
    assert not ours, [str(w.message) for w in ours]
    assert cli.datamodule.batch_size == 32 and cli.model.hparams.num_classes == 10
    assert cli.model.hparams["_class_path"] == "lightning_bnsgd.ConvNetClassifier"
    if not run:
        return
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["num_classes"] == 10 and saved["model"]["init_args"]["input_size"] == 8
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["hyper_parameters"]["num_classes"] == 10
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 32
    assert checkpoint["datamodule_hyper_parameters"]["_class_path"].endswith("CountedDigits")
