"""What ``SGDWarmup.build`` reads from the module's Trainer (run length, steps per epoch, batch, world size).

They are read through public attributes. Also here: why ``SGDWarmup.build`` cannot read them when the module has no
Trainer or the Trainer no train data.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import DataLoader

from lightning_bnsgd._compat import load_train_data
from lightning_bnsgd._validation import is_int, is_number


def per_device_batch_size(loaders: Any) -> int | None:
    """The batch size of the ``DataLoader``(s) in ``loaders`` (a loader or any collection of them).

    Returns ``None`` when no loader tells its batch size; raises when several loaders disagree.

    Examples:
        >>> per_device_batch_size({"a": DataLoader(range(10), batch_size=4)})
        4
    """
    found: list[int] = []

    def _read(loader: DataLoader) -> None:
        size = loader.batch_size
        if size is None and loader.batch_sampler is not None:
            size = getattr(loader.batch_sampler, "batch_size", None)
        if is_int(size):
            found.append(int(size))

    apply_to_collection(loaders, DataLoader, _read)
    if len(set(found)) > 1:
        raise ValueError(
            f"The train dataloaders have different batch sizes {sorted(set(found))}; set SGDWarmup's "
            "`batch_size` to the per-device batch size that the LR scaling rule should use."
        )
    return found[0] if found else None


def trainer_of(module: nn.Module) -> Any:
    """The Trainer ``module`` is attached to, or ``None`` (plain or detached module)."""
    try:
        return getattr(module, "trainer", None)
    except RuntimeError:  # a LightningModule not attached to a Trainer
        return None


def no_trainer_cause(module: nn.Module) -> str:
    """Why ``module`` has no Trainer to read the run's length and batch from, and what to do."""
    name = type(module).__name__
    if hasattr(type(module), "trainer") and hasattr(module, "configure_optimizers"):
        return (
            f"SGDWarmup.build: the LightningModule {name} is not attached to a Trainer (build runs in "
            "configure_optimizers, which the Trainer calls), so the run's length and batch size are unknown; "
            "outside a Trainer give `total_steps`, `warmup_steps` and `lr` (or `batch_size`)."
        )
    return (
        f"SGDWarmup.build: {name} is a plain torch.nn.Module, which has no Trainer to read the run's length and "
        "batch size from. In configure_optimizers pass the LightningModule first and the part to optimize second: "
        "`SGDWarmup(...).build(self, self.generator)`. A plain module needs `total_steps`, `warmup_steps` and `lr` "
        "(or `batch_size`)."
    )


def no_data_cause(module: nn.Module) -> str:
    """Why the Trainer ``module`` is attached to cannot tell the run's length and batch, and what to do."""
    return (
        f"SGDWarmup.build: the Trainer of {type(module).__name__} has no train data (build was called outside "
        "`trainer.fit`, which connects the data and calls configure_optimizers), so the run's length and batch size "
        "are unknown; there, give `total_steps`, `warmup_steps` and `lr` (or `batch_size`)."
    )


def has_train_data(trainer: Any) -> bool:
    """Whether ``trainer`` can tell its train data.

    It can when it is fitting (``trainer.fit`` connected the data), or when a train dataloader is loaded. A module
    attached to a Trainer by hand (as Lightning's own optimizer tests do) has none.
    """
    return trainer.train_dataloader is not None or trainer.state.fn == "fit"


def fit_step_of(module: nn.Module) -> Any:
    """A function giving the fit's optimizer step count (``trainer.global_step``); ``None`` without a Trainer.

    The function gives that count while it equals the scheduler's step count (one optimizer, automatic optimization),
    else ``None``. ``WarmupLR`` reads it when a resumed fit restored the optimizer's state but not the scheduler's.
    """
    if trainer_of(module) is None:
        return None
    ref = weakref.ref(module)

    def step() -> int | None:
        owner = ref()
        trainer = trainer_of(owner) if owner is not None else None
        if trainer is None or getattr(owner, "automatic_optimization", False) is not True:
            return None
        return int(trainer.global_step) if len(trainer.optimizers) == 1 else None

    return step


def trainer_facts(trainer: Any) -> dict[str, Any]:
    """What ``SGDWarmup.resolve`` needs, read from a Trainer through its public attributes."""
    if trainer is None:
        return {}
    if not has_train_data(trainer):
        return {
            "world_size": int(trainer.world_size),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "debug_run": bool(getattr(trainer, "fast_dev_run", False)),
        }
    total = trainer.estimated_stepping_batches  # loads the train dataloader when max_epochs is finite
    if trainer.train_dataloader is None:  # max_steps-only runs: Lightning did not load the data yet
        load_train_data(trainer)
    accumulate = int(trainer.accumulate_grad_batches)
    batches = trainer.num_training_batches
    steps_per_epoch = math.ceil(batches / accumulate) if is_number(batches) and batches > 0 else None
    return {
        "total_steps": int(total) if is_number(total) else None,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": per_device_batch_size(trainer.train_dataloader),
        "world_size": int(trainer.world_size),
        "accumulate_grad_batches": accumulate,
        "debug_run": bool(getattr(trainer, "fast_dev_run", False)),
    }
