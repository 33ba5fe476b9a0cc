"""What a user can expect of the main job on any machine: test accuracy over seeds and torch thread counts, and wall
time with the machine idle and under load.

The job (`python -m lightning_bnsgd`, the packaged digits config) is run once per (seed, threads, load) cell, one
cell after the other, in a fresh process each, with ``--torch_threads`` (and ``OMP_NUM_THREADS``) set to the thread
count. "Loaded" runs start ``--load`` busy processes (pure Python loops, one per core by default) beside the job,
which is what a shared CI machine or a laptop doing something else looks like. The script prints one row per run
and a summary: accuracy mean, min and max per thread count (the spread the docs quote), and the median wall time
per (threads, load). It asserts nothing; times are of this machine only.

    python benchmarks/main_job.py                      # seeds 0..2, threads 1 and 2, idle and loaded
    python benchmarks/main_job.py --seeds 5 --threads 1 2 4 --load 0
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    while not stop.is_set():  # type: ignore[attr-defined]
        sum(i * i for i in range(10_000))


def run_job(seed: int, threads: int, root: Path) -> tuple[float, float]:
    """Run the main job with ``seed`` on ``threads`` torch threads; return (test accuracy, wall seconds)."""
    out = root / f"seed{seed}_t{threads}_{time.monotonic_ns()}"
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "lightning_bnsgd",
        f"--seed_everything={seed}",
        f"--torch_threads={threads}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env, check=True)
    wall = time.perf_counter() - start
    return float(re.findall(r"^test accuracy: ([0-9.]+)$", proc.stdout, flags=re.MULTILINE)[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument(
        "--load", type=int, default=os.cpu_count() or 2, help="busy processes for the loaded runs (0: idle only)"
    )
    args = parser.parse_args()
    loads = [0, args.load] if args.load > 0 else [0]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores; python {sys.version.split()[0]}")
    rows: list[tuple[int, int, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for load in loads:
                stop = mp.Event()
                burners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
                for p in burners:
                    p.start()
                try:
                    for threads in args.threads:
                        acc, wall = run_job(seed, threads, Path(tmp))
                        rows.append((seed, threads, load, acc, wall))
                        print(
                            f"seed {seed}  threads {threads}  load {load}: test accuracy {acc:.4f}  wall {wall:5.1f} s"
                        )
                finally:
                    stop.set()
                    for p in burners:
                        p.join()
    print("\naccuracy over seeds (idle and loaded runs together: the load does not change the result)")
    for threads in args.threads:
        accs = [r[3] for r in rows if r[1] == threads]
        print(
            f"  threads {threads}: mean {statistics.mean(accs):.4f}  min {min(accs):.4f}  max {max(accs):.4f}"
            f"  ({len(accs)} runs)"
        )
    print("\nmedian wall time (s)")
    for threads in args.threads:
        cells = []
        for load in loads:
            walls = [r[4] for r in rows if r[1] == threads and r[2] == load]
            cells.append(f"{'idle' if load == 0 else f'{load} busy processes'} {statistics.median(walls):5.1f}")
        print(f"  threads {threads}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
