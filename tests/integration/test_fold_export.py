"""``BNFoldExport`` in ``Trainer.fit`` and ``lightning-bnsgd export`` on a checkpoint: the program is written after
the last recalibration, loads in a fresh process with torch alone and gives the trained model's eval outputs; the
trained model is not changed; one file from rank zero under DDP, and no hang when the export fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from lightning_bnsgd import BNFoldExport, BNRecalibration
from lightning_bnsgd._compat import Callback, loggers
from lightning_bnsgd.bn.fold import ATOL, RTOL
from lightning_bnsgd.cli import cli_main, packaged_config
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

SMALL_RUN = {"max_epochs": 1, "limit_train_batches": 3, "num_sanity_val_steps": 0}

# Loads the program with torch alone and compares it with the outputs the test computed from the trained model.
FRESH = textwrap.dedent(
    """
    import sys
    import torch
    program = torch.export.load(sys.argv[1]).module()
    x, expected = torch.load(sys.argv[2])
    with torch.no_grad():
        out = program(x)
    assert not any(name.split(".")[0] == "lightning_bnsgd" for name in sys.modules), "the package was imported"
    rtol, atol = float(sys.argv[3]), float(sys.argv[4])
    bound = rtol * expected.abs() + atol * float(expected.abs().max().clamp(min=1.0))
    assert bool(((out - expected).abs() <= bound).all()), float((out - expected).abs().max())
    print(float((out - expected).abs().max()))
    """
)


def fresh_difference(program: Path, x: torch.Tensor, expected: torch.Tensor, tmp_path: Path) -> float:
    """Load ``program`` in a new process that imports torch alone; its largest difference to ``expected``."""
    data = tmp_path / "io.pt"
    torch.save((x, expected), data)
    command = [sys.executable, "-c", FRESH, str(program), str(data), repr(RTOL), repr(ATOL)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


def _model(**kwargs: Any) -> ConvNetClassifier:
    return ConvNetClassifier(input_size=8, kernel_size=2, channels=(8, 8), **kwargs)  # valid padding: folds fully


def _test_images(n: int = 5) -> torch.Tensor:
    dm = DigitsDataModule()
    dm.setup("test")
    return torch.cat([b[0] for b in dm.test_dataloader()])[:n]


@torch.no_grad()
def _eval(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.eval()(x)


class _Snapshot(Callback):
    """The model's state and modes at ``on_fit_end``, taken before the export (listed before it)."""

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.modes = {name: m.training for name, m in pl_module.named_modules()}


def test_fit_exports_after_the_last_recalibration_and_leaves_the_model_unchanged(tmp_path: Path, make_trainer):
    snapshot = _Snapshot()
    export = BNFoldExport(dirpath=tmp_path / "out", module_name="net")
    recal = BNRecalibration(num_samples=None)
    # the export listed first, no validation: the only recalibration is BNRecalibration's `on_train_end`
    trainer = make_trainer(callbacks=[snapshot, export, recal], limit_val_batches=0, **SMALL_RUN)
    model = _model()
    trainer.fit(model, datamodule=DigitsDataModule())
    assert recal.recalibrations == 1
    result = export.last_export
    assert result is not None and result.path == tmp_path / "out" / "folded.pt2" and result.path.is_file()
    assert result.inputs_from == "the first batch"
    assert result.export.fold is not None and len(result.export.fold.folded) == 2
    assert result.fresh_process_diff is not None and result.fresh_process_diff < 1e-4
    # the trained model: bitwise the state it had before the export, in the same modes
    assert snapshot.state.keys() == model.state_dict().keys()
    assert all(torch.equal(snapshot.state[k], v) for k, v in model.state_dict().items())
    assert snapshot.modes == {name: m.training for name, m in model.named_modules()}
    # the file gives the final (recalibrated) model's eval outputs, on a batch size the example did not have
    x = _test_images(5)
    assert fresh_difference(result.path, x, _eval(model.net, x), tmp_path) < 1e-4


def test_whole_module_from_example_input_array_into_the_loggers_folder(tmp_path: Path, make_trainer, capsys):
    model = _model()
    model.example_input_array = torch.randn(1, 1, 8, 8)  # a batch of one: traced as two, the batch stays dynamic
    export = BNFoldExport(filename="digits")
    logger = loggers.CSVLogger(tmp_path, name="run")
    trainer = make_trainer(callbacks=[BNRecalibration(), export], logger=logger, limit_val_batches=1, **SMALL_RUN)
    trainer.fit(model, datamodule=DigitsDataModule())
    result = export.last_export
    assert result is not None and result.inputs_from == "example_input_array"
    assert result.path == Path(logger.log_dir) / "digits.pt2" and result.path.is_file()
    assert f"BNFoldExport: wrote {result.path} (2 of 2 BatchNorm layer(s) folded" in capsys.readouterr().out
    x = _test_images(3)
    assert fresh_difference(result.path, x, _eval(model, x), tmp_path) < 1e-4


def test_example_input_for_a_submodule_and_no_fresh_check(tmp_path: Path, make_trainer):
    export = BNFoldExport(
        dirpath=tmp_path,
        module_name="net.head",
        example_input=torch.randn(4, 8),  # the head reads (N, 8): 8x8 -> 7 -> 3 -> 2 -> 1
        check_in_fresh_process=False,
        fold=False,
    )
    trainer = make_trainer(callbacks=[export], limit_val_batches=0, **SMALL_RUN)
    model = _model()
    trainer.fit(model, datamodule=DigitsDataModule())
    result = export.last_export
    assert result is not None and result.fresh_process_diff is None and result.export.fold is None
    x = torch.randn(6, 8)
    assert fresh_difference(result.path, x, _eval(model.net.head, x), tmp_path) < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dirpath": 3}, TypeError, r"BNFoldExport: `dirpath` must be None or a path, got 3"),
        ({"filename": ""}, ValueError, r"BNFoldExport: `filename` must be a non-empty string"),
        ({"filename": "a/b"}, ValueError, r"`filename` is a file name without folders \(use `dirpath`\)"),
        ({"module_name": ""}, ValueError, r"`module_name` must be a non-empty string"),
        ({"example_input": [torch.zeros(2)]}, TypeError, r"`example_input` must be None, a tensor or a tuple"),
        ({"forward_fn": lambda batch: None}, TypeError, r"`forward_fn` is called as `forward_fn\(module, batch\)`"),
        ({"fold": "yes"}, TypeError, r"BNFoldExport: `fold` must be a bool, got 'yes'"),
        ({"check_in_fresh_process": 1}, TypeError, r"`check_in_fresh_process` must be a bool, got 1"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type[Exception], match: str):
    with pytest.raises(error, match=match):
        BNFoldExport(**kwargs)


def test_an_unknown_module_name_fails_at_setup(tmp_path: Path, make_trainer):
    trainer = make_trainer(callbacks=[BNFoldExport(dirpath=tmp_path, module_name="nett")], **SMALL_RUN)
    with pytest.raises(ValueError, match=r"`module_name='nett'` is not a submodule of the ConvNetClassifier.*'net'"):
        trainer.fit(_model(), datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert not list(tmp_path.glob("*.pt2"))


def test_two_instances_have_distinct_state_keys():
    assert BNFoldExport().state_key != BNFoldExport(module_name="net").state_key


# ------------------------------------------------------------------------------------------------------ DDP


def _boom(module: torch.nn.Module, batch: Any) -> None:
    raise RuntimeError("boom in the user's forward")


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_spawn_writes_one_file_from_rank_zero(tmp_path: Path, make_trainer):
    out = tmp_path / "out"
    export = BNFoldExport(dirpath=out, module_name="net")
    trainer = make_trainer(
        callbacks=[BNRecalibration(), export],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        limit_val_batches=1,
        **SMALL_RUN,
    )
    model = _model()
    trainer.fit(model, datamodule=DigitsDataModule())
    assert sorted(p.name for p in out.iterdir()) == ["folded.pt2"]
    assert export.last_export is None  # set in the spawned processes' copies of the callback, not in this one
    # ddp_spawn hands rank zero's weights and buffers back to this process: the file gives their outputs
    x = _test_images(5)
    assert fresh_difference(out / "folded.pt2", x, _eval(model.net, x), tmp_path) < 1e-4


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_spawn_a_failed_export_raises_on_every_rank_without_a_hang(tmp_path: Path, make_trainer):
    export = BNFoldExport(dirpath=tmp_path / "out", forward_fn=_boom)
    trainer = make_trainer(
        callbacks=[export], accelerator="cpu", devices=2, strategy="ddp_spawn", limit_val_batches=0, **SMALL_RUN
    )
    # torch's spawn re-raises the error of whichever process it sees fail first: rank 0's own error (noted with its
    # rank) or rank 1's RankFailure naming rank 0's; either way both ranks raised and neither hung
    own = r"boom in the user's forward.*raised on rank 0 of 2"
    other = r"RankFailure: BNFoldExport: rank 0 of 2 failed.*rank 0 raised RuntimeError: boom in the user's forward"
    with pytest.raises(ProcessRaisedException, match=rf"(?s)({own}|{other})"):
        trainer.fit(_model(), datamodule=DigitsDataModule())
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ CLI

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--test_after_fit=false"]


def test_cli_export_of_a_checkpoint_with_recalibration(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(packaged_config())
    cli_main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *QUIET,
        ]
    )
    run = tmp_path / "digits" / "version_0"
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    capsys.readouterr()
    cli = cli_main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--recalibrate", "true"])
    printed = capsys.readouterr().out
    program = ckpt.with_suffix(".pt2")  # the default: next to the checkpoint
    assert program.is_file()
    assert f"lightning-bnsgd export: loaded {ckpt}" in printed
    assert "lightning-bnsgd export: recalibrated 2 BatchNorm layer(s) on 1257 training samples" in printed
    assert f"lightning-bnsgd export: wrote {program} (" in printed and "in a fresh process with torch alone" in printed
    # the checkpoint's weights were loaded into the config's model (then recalibrated)
    saved = torch.load(ckpt, map_location="cpu")["state_dict"]
    weights = {k: v for k, v in cli.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(saved[k], v) for k, v in weights.items())
    x = _test_images(5)
    assert fresh_difference(program, x, _eval(cli.model, x), tmp_path) < 1e-4


def test_cli_export_of_an_unknown_submodule_fails_before_reading_the_checkpoint(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["export", "--config", str(packaged_config()), "--ckpt_path", "missing.ckpt", "--module_name", "nett"]
    with pytest.raises(ValueError, match=r"export_checkpoint: `module_name='nett'` is not a submodule"):
        cli_main([*args, *QUIET])
