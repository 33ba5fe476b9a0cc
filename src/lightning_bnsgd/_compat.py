"""The one module that imports Lightning.

Lightning ships under two import names: ``pytorch_lightning`` (the standalone package, our declared dependency)
and ``lightning.pytorch`` (inside the unified ``lightning`` package). A Trainer of one namespace rejects a
LightningModule or LightningDataModule of the other, so every Lightning class this package subclasses comes from
here, and this module picks the namespace once, at import time:

1. the environment variable ``LIGHTNING_BNSGD_BACKEND`` (``"pytorch_lightning"`` or ``"lightning"``), if set;
2. else the namespace the user already imported (if both are imported, ``pytorch_lightning``);
3. else ``pytorch_lightning`` if it is installed, else ``lightning``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from types import ModuleType

ENV_VAR = "LIGHTNING_BNSGD_BACKEND"
_MODULES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_backend(
    env: Mapping[str, str] | None = None,
    imported: Mapping[str, object] | None = None,
    installed: Mapping[str, bool] | None = None,
) -> str:
    """Return the Lightning namespace to use: ``"pytorch_lightning"`` or ``"lightning"``.

    Args:
        env: environment to read ``LIGHTNING_BNSGD_BACKEND`` from (default ``os.environ``).
        imported: modules already imported (default ``sys.modules``).
        installed: which of the two distributions are importable (default: looked up).

    Examples:
        >>> select_backend(env={"LIGHTNING_BNSGD_BACKEND": "lightning"}, imported={}, installed={})
        'lightning'
        >>> select_backend(env={}, imported={"lightning.pytorch": object()}, installed={})
        'lightning'
        >>> select_backend(env={}, imported={}, installed={"pytorch_lightning": False, "lightning": True})
        'lightning'
    """
    env = os.environ if env is None else env
    imported = sys.modules if imported is None else imported
    choice = env.get(ENV_VAR, "").strip()
    if choice:
        if choice not in _MODULES:
            raise ValueError(
                f"{ENV_VAR}={choice!r} is not a Lightning namespace; allowed: 'pytorch_lightning' or 'lightning'."
            )
        return choice
    has_pl = "pytorch_lightning" in imported
    has_l = "lightning.pytorch" in imported
    if has_pl or has_l:
        return "pytorch_lightning" if has_pl else "lightning"
    if installed is None:
        installed = {
            "pytorch_lightning": _installed("pytorch_lightning"),
            "lightning": _installed("lightning"),
        }
    if installed.get("pytorch_lightning", False) or not installed.get("lightning", False):
        return "pytorch_lightning"
    return "lightning"


BACKEND: str = select_backend()
pl: ModuleType = importlib.import_module(_MODULES[BACKEND])

Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
loggers: ModuleType = importlib.import_module(f"{_MODULES[BACKEND]}.loggers")
_cli: ModuleType = importlib.import_module(f"{_MODULES[BACKEND]}.cli")
LightningCLI = _cli.LightningCLI
LightningArgumentParser = _cli.LightningArgumentParser
SaveConfigCallback = _cli.SaveConfigCallback
_strategies: ModuleType = importlib.import_module(f"{_MODULES[BACKEND]}.strategies")
ParallelStrategy = _strategies.ParallelStrategy

__all__ = [
    "BACKEND",
    "ENV_VAR",
    "Callback",
    "LightningArgumentParser",
    "LightningCLI",
    "LightningDataModule",
    "LightningModule",
    "ParallelStrategy",
    "SaveConfigCallback",
    "Trainer",
    "loggers",
    "pl",
    "select_backend",
]
