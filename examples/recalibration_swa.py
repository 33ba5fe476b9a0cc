"""Stochastic Weight Averaging + exact BatchNorm recalibration on the digits data (a few epochs on a CPU).

Lightning's ``StochasticWeightAveraging`` averages the weights, then refreshes BatchNorm with an extra pass
that weights every batch equally and misses the between-batch variance. ``BNRecalibration``, listed AFTER it,
recomputes the statistics exactly for the averaged weights, before each validation and at the end of
training.

    python examples/recalibration_swa.py --epochs 6
"""

from __future__ import annotations

import argparse

try:  # either Lightning namespace works: import yours before lightning_bnsgd, which then follows it
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from lightning_bnsgd import BNRecalibration, ConvNetClassifier, DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--swa-epoch-start", type=float, default=0.5, help="epoch (or fraction) where SWA starts")
    parser.add_argument("--num-samples", type=int, default=2048, help="samples per recalibration")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=data.input_size, padding="same")
    callbacks = [
        pl.callbacks.StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=args.swa_epoch_start),
        BNRecalibration(num_samples=args.num_samples, verbose=True),  # after SWA: runs on the averaged weights
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    print(f"SWA + BNRecalibration: test accuracy {result['test/acc']:.4f}")


if __name__ == "__main__":
    main()
