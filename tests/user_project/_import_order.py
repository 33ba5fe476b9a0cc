"""Run a user's ``lightning.pytorch`` project with the plugin imported before or after Lightning (in a fresh process,
so the import order is real) and print what the callbacks did, as JSON, on the last line.

Usage: ``python _import_order.py first|last <tmp dir>``. The test sets ``LIGHTNING_BNSGD_BACKEND`` or not.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main(order: str, tmp: Path) -> None:
    """Import in the given order, run the checks, print the JSON line."""
    if order == "first":
        import lightning_bnsgd  # noqa: F401  (the plugin before any Lightning import)
    import lightning.pytorch as L
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.user_project.project import (
        UserDataModule,
        UserModel,
        exact_first_bn_statistics,
        quiet_trainer,
        recalibration_forward,
    )

    from lightning_bnsgd import BNRecalibration, BNStatsMonitor, _compat

    result: dict[str, object] = {"backend": _compat.BACKEND, "lightning_imported_first": order == "last"}

    # 1. recalibration goes through the DataModule's on_after_batch_transfer (normalized inputs)
    torch.manual_seed(0)
    model, dm = UserModel(), UserDataModule()
    recal = BNRecalibration(num_samples=None, forward_fn=recalibration_forward, at_train_end=False)
    quiet_trainer(tmp / "recal", callbacks=[recal], limit_val_batches=1).fit(model, datamodule=dm)
    mean, var = exact_first_bn_statistics(model, dm)
    bn1 = model.net.bn1
    result["recalibrations"] = recal.recalibrations
    result["mean_error"] = float((bn1.running_mean.double() - mean).abs().max())
    result["var_error"] = float((bn1.running_var.double() - var).abs().max())

    # 2. the ordering check against Lightning's SWA fires
    try:
        swa = L.callbacks.StochasticWeightAveraging(swa_lrs=0.01)
        quiet_trainer(tmp / "swa", callbacks=[BNRecalibration(forward_fn=recalibration_forward), swa]).fit(
            UserModel(), datamodule=UserDataModule()
        )
        result["swa_order_error"] = None
    except ValueError as err:
        result["swa_order_error"] = str(err)

    # 3. TensorBoard histograms through lightning.pytorch's TensorBoardLogger
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = L.loggers.TensorBoardLogger(str(tmp / "tb"), name="run")
        monitor = BNStatsMonitor(log_every_n_steps=1, log_histograms=True)
        quiet_trainer(tmp / "tb", callbacks=[monitor], logger=logger, limit_train_batches=2, limit_val_batches=0).fit(
            UserModel(), datamodule=UserDataModule()
        )
    result["histogram_warnings"] = [str(w.message) for w in caught if "histogram" in str(w.message)]
    result["event_files"] = len(list((tmp / "tb").rglob("events.out.tfevents.*")))

    # 4. the user's own lightning.pytorch LightningCLI accepts our callbacks by class path
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        UserModel,
        UserDataModule,
        run=False,
        args=[
            "--trainer.callbacks+=lightning_bnsgd.BNRecalibration",
            "--trainer.callbacks+=lightning_bnsgd.BNStatsMonitor",
            "--trainer.callbacks+=lightning_bnsgd.WeightDynamicsMonitor",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp / 'cli'}",
        ],
        save_config_callback=None,
    )
    ours = ("BNRecalibration", "BNStatsMonitor", "WeightDynamicsMonitor")
    result["cli_callbacks"] = sorted(type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__name__ in ours)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
