"""``BNFoldExport`` in a user's ``lightning.pytorch`` project: dict batches normalized in a transfer hook, a
torchvision-layout ResNet; the exported ``net`` loads with torch alone and gives the trained network's outputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_bnsgd import BNFoldExport, BNRecalibration

from .project import (
    PIXEL_MEAN,
    PIXEL_STD,
    ShapesDataset,
    UserDataModule,
    UserModel,
    quiet_trainer,
    recalibration_forward,
)

LOAD = textwrap.dedent(
    """
    import sys
    import torch
    program = torch.export.load(sys.argv[1]).module()
    x = torch.load(sys.argv[2])
    torch.save(program(x), sys.argv[3])
    assert not any(name.split(".")[0] == "lightning_bnsgd" for name in sys.modules)
    """
)


def test_dict_batches_with_a_user_forward(tmp_path: Path) -> None:
    export = BNFoldExport(dirpath=tmp_path, filename="resnet", module_name="net", forward_fn=recalibration_forward)
    recal = BNRecalibration(num_samples=None, forward_fn=recalibration_forward)
    model = UserModel()
    quiet_trainer(tmp_path, callbacks=[export, recal], max_epochs=2, limit_val_batches=1).fit(
        model, datamodule=UserDataModule()
    )
    result = export.last_export
    assert result is not None and result.path == tmp_path / "resnet.pt2"
    assert result.export.fold is not None and result.export.fold.kept == {}  # conv -> BatchNorm everywhere
    assert len(result.export.fold.folded) == 6
    assert result.fresh_process_diff is not None
    # what the network sees: pixels standardized by the data module's on_after_batch_transfer
    x = (ShapesDataset(7, seed=3).images - PIXEL_MEAN) / PIXEL_STD
    torch.save(x, tmp_path / "x.pt")
    command = [sys.executable, "-c", LOAD, str(result.path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = model.net.eval()(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-4)


def test_dict_batches_without_a_forward_fail_at_the_first_training_batch(tmp_path: Path) -> None:
    trainer = quiet_trainer(tmp_path, callbacks=[BNFoldExport(dirpath=tmp_path, module_name="net")], max_epochs=2)
    with pytest.raises(TypeError, match=r"BNFoldExport: .*default forward cannot feed it \(it is a dict.*forward_fn="):
        trainer.fit(UserModel(), datamodule=UserDataModule())
    assert trainer.global_step == 0
    assert not list(tmp_path.glob("*.pt2"))
