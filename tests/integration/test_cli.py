from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import yaml

from lightning_bnsgd.cli import cli_main, packaged_config

ROOT = Path(__file__).resolve().parents[2]
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
