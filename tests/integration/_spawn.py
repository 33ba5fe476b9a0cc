"""Helpers for tests that start their own process group with ``torch.multiprocessing.spawn`` (gloo on CPU)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    """A TCP port free on this machine now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(worker: Callable[[int, int, str], None], out: Path, world: int) -> list[Any]:
    """Run ``worker(rank, port, out)`` in ``world`` processes; each saves its results to ``out/rank<r>.pt``."""
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def outcome(model: nn.Module, call: Callable[[], Any]) -> dict[str, Any]:
    """What ``call()`` raised (type, message, notes; empty when nothing) and whether ``model``'s state is unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        call()
    except Exception as err:
        error = {"type": type(err).__name__, "message": str(err), "notes": list(getattr(err, "__notes__", []))}
    else:
        error = {}
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return {"error": error, "unchanged": unchanged}
