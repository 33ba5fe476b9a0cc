"""Test accuracy of the packaged digits job on one process versus two DDP processes (CPU, gloo), over several seeds.

The tests only check what is deterministic about a DDP run (identical BatchNorm buffers on every rank, the LR scaled
for the effective batch, logging from rank zero, accuracy far above chance). Whether two processes reach the same
accuracy as one is a property of the recipe, not of one seed: two processes see the data in a different order, with
twice the effective batch and twice the LR (linear scaling rule), so single runs differ by a point or two either way.
This script runs both settings for each seed, one after the other, and prints each pair and the mean +- std of the
accuracies and of the difference. It asserts nothing.

    python benchmarks/ddp_accuracy.py              # seeds 0..4
    python benchmarks/ddp_accuracy.py --seeds 3    # seeds 0..2
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning_bnsgd.cli import packaged_config


def run_job(seed: int, devices: int, root: Path) -> float:
    """Run the packaged job with ``seed`` on ``devices`` CPU processes; return its test accuracy."""
    out = root / f"seed{seed}_dev{devices}"
    cmd = [
        sys.executable,
        "-m",
        "lightning_bnsgd.cli",
        "fit",
        "--config",
        str(packaged_config()),
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(re.findall(r"test accuracy: ([0-9.]+)", proc.stdout)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1)")
    args = parser.parse_args()
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            one.append(run_job(seed, 1, Path(tmp)))
            two.append(run_job(seed, 2, Path(tmp)))
            print(f"seed {seed}: 1 process {one[-1]:.4f}   2 processes {two[-1]:.4f}   diff {two[-1] - one[-1]:+.4f}")
    diffs = [b - a for a, b in zip(one, two, strict=True)]

    def summary(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} +- {spread:.4f}"

    print(f"1 process:   {summary(one)}")
    print(f"2 processes: {summary(two)}")
    print(f"difference (2 - 1): {summary(diffs)} over {len(diffs)} seeds")


if __name__ == "__main__":
    main()
