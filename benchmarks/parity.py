"""Training throughput of ``ConvNetClassifier`` under a Lightning Trainer versus a hand-written PyTorch loop.

Both sides train the same ``BNConvNet`` on the same digits DataLoader with the same SGD settings for the same
number of epochs. Throughput is timed over the training epochs after the first (steady state: the Trainer's
one-off set-up and the first epoch's allocations are left out on both sides). Runs are interleaved (raw,
Lightning, raw, Lightning, ...) and the script prints the median of the per-pair ratios
``raw_time / lightning_time`` (1.0 = parity, target >= 0.95). It asserts nothing.

    python benchmarks/parity.py            # 28x28 inputs (the classic model), 5 pairs
    python benchmarks/parity.py --quick    # fewer pairs and epochs
    python benchmarks/parity.py --resize 0 # native 8x8 inputs (tiny steps: per-step overhead dominates)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_bnsgd._compat import Callback, Trainer
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier
from lightning_bnsgd.optim import SGDWarmup


def _model(dm: DigitsDataModule, epochs: int) -> ConvNetClassifier:
    padding = "valid" if dm.input_size >= 28 else "same"
    # The same recipe on both sides: SGD over the same two param groups, the same per-step schedule.
    total = epochs * len(dm.train_dataloader())
    optimizer = SGDWarmup(lr=0.05, warmup_steps=5, total_steps=total)
    return ConvNetClassifier(input_size=dm.input_size, padding=padding, optimizer=optimizer)


def run_raw(dm: DigitsDataModule, epochs: int) -> float:
    """Hand-written loop: forward, loss, backward, optimizer and LR step, plus running accuracy (as logged)."""
    model = _model(dm, epochs)
    net = model.net
    built = model.optimizer_config.build(net)
    opt, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    loader = dm.train_dataloader()
    start = 0.0
    for epoch in range(epochs):
        if epoch == 1:
            start = time.perf_counter()
        net.train()
        correct = total = 0
        for x, y in loader:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
    return time.perf_counter() - start


class _EpochTimer(Callback):
    """Wall time from the start of the second training epoch to the end of training."""

    def __init__(self) -> None:
        self.start = 0.0
        self.elapsed = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if trainer.current_epoch == 1:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.elapsed = time.perf_counter() - self.start


def run_lightning(dm: DigitsDataModule, epochs: int) -> float:
    model = _model(dm, epochs)
    timer = _EpochTimer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    return timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is not timed")
    parser.add_argument("--resize", type=int, default=28, help="image size (0 = native 8x8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the least noisy here)")
    parser.add_argument("--quick", action="store_true", help="3 pairs of 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.epochs = 3, 3
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=args.batch_size, resize=args.resize or None)
    dm.setup("fit")
    run_raw(dm, 1)  # warm up both paths once
    run_lightning(dm, 1)
    ratios, raw_times, pl_times = [], [], []
    for i in range(args.pairs):
        raw = run_raw(dm, args.epochs)
        lit = run_lightning(dm, args.epochs)
        raw_times.append(raw)
        pl_times.append(lit)
        ratios.append(raw / lit)
        print(f"pair {i}: raw {raw:.3f}s  lightning {lit:.3f}s  ratio {raw / lit:.3f}")
    steps = (args.epochs - 1) * len(dm.train_dataloader())
    print(
        f"input {dm.input_size}x{dm.input_size}, batch {args.batch_size}, {steps} timed steps per run, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"median raw {statistics.median(raw_times):.3f}s, median lightning {statistics.median(pl_times):.3f}s")
    print(f"throughput ratio lightning/raw (median of pairs): {statistics.median(ratios):.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
