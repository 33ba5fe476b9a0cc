"""EMA weight averaging + exact BatchNorm recalibration on the digits data (a few epochs on a CPU).

Lightning's ``WeightAveraging`` (here with an exponential moving average of the weights) also averages the
BatchNorm buffers, which then belong to none of the averaged weights. ``BNRecalibration``, listed AFTER it,
recomputes them exactly for the averaged weights: it runs after the callback swapped them in before each
validation, and after it copied them into the model at the end of training.

    python examples/recalibration_weight_averaging.py --epochs 5
"""

from __future__ import annotations

import argparse

from torch.optim.swa_utils import get_ema_multi_avg_fn

try:  # either Lightning namespace works: import yours before lightning_bnsgd, which then follows it
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from lightning_bnsgd import BNRecalibration, ConvNetClassifier, DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay per optimizer step")
    parser.add_argument("--num-samples", type=int, default=2048, help="samples per recalibration")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = ConvNetClassifier(input_size=data.input_size, padding="same")
    callbacks = [
        pl.callbacks.WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(args.decay)),
        BNRecalibration(num_samples=args.num_samples, verbose=True),  # after WeightAveraging: averaged weights
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
    print(f"EMA weights + BNRecalibration: test accuracy {result['test/acc']:.4f}")


if __name__ == "__main__":
    main()
