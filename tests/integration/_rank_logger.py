"""A logger for DDP tests: every rank's ``log_metrics`` calls, unfiltered, in a file per rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lightning_bnsgd._compat import loggers


class RankFileLogger(loggers.Logger):
    """Writes every ``log_metrics`` call of every rank (no rank-zero filter) to ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    @property
    def name(self) -> str:
        return "rankfile"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(Path(self.folder) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
