"""``SGDWarmup``: SGD with the large-batch recipe of Goyal et al. (2017) as one config.

Linear (or square-root) LR scaling with the effective batch, per-step gradual warmup, a decay to
``min_lr``, and no weight decay on normalization parameters and biases. ``SGDWarmup(...).build(module)``
returns what Lightning's ``configure_optimizers`` returns; the pieces are public pure functions for users who
assemble their own optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.data import DataLoader

from lightning_bnsgd._validation import check_choice, is_int, is_number
from lightning_bnsgd.optim.schedule import (
    DECAY_SHAPES,
    WARMUP_SHAPES,
    DecayShape,
    WarmupLR,
    WarmupShape,
    check_gamma,
    check_milestones,
    check_warmup_start_factor,
)

ScaleRule = Literal["none", "linear", "sqrt"]
SCALE_RULES: tuple[str, ...] = get_args(ScaleRule)

#: Warmup length used when neither ``warmup_epochs`` nor ``warmup_steps`` is set.
DEFAULT_WARMUP_EPOCHS = 1.0

#: Module types whose parameters never get ``weight_decay`` (they get ``norm_weight_decay``).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    _BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
    _InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(module: nn.Module, weight_decay: float = 1e-4, norm_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into a weight-decay group and a no-decay group.

    The split goes by module type and parameter shape, never by name: the weights and biases of every
    normalization layer (BatchNorm*, SyncBatchNorm, InstanceNorm*, GroupNorm, LayerNorm, RMSNorm) and every
    parameter with at most one dimension (biases, scales) go to ``"no_decay"`` with ``norm_weight_decay``; all
    other parameters (conv and linear weights) go to ``"decay"`` with ``weight_decay``. Parameters with
    ``requires_grad=False`` are left out; a parameter shared by several modules appears once.

    Args:
        module: the model.
        weight_decay: weight decay of the ``"decay"`` group (>= 0).
        norm_weight_decay: weight decay of the ``"no_decay"`` group (>= 0).

    Returns:
        ``[{"params": [...], "weight_decay": ..., "name": "decay"}, {..., "name": "no_decay"}]`` for
        ``torch.optim`` (either list may be empty).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in param_groups(net, 5e-4)]
        [('decay', 2, 0.0005), ('no_decay', 4, 0.0)]
    """
    for name, value in (("weight_decay", weight_decay), ("norm_weight_decay", norm_weight_decay)):
        if not is_number(value) or value < 0:
            raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for sub in module.modules():
        is_norm = isinstance(sub, NORM_LAYERS)
        for param in sub.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (no_decay if is_norm or param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": float(norm_weight_decay), "name": "no_decay"},
    ]


def effective_batch_size(per_device: int, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
    """Samples per optimizer step: per-device batch x processes (devices x nodes) x gradient accumulation.

    Examples:
        >>> effective_batch_size(64, world_size=2, accumulate_grad_batches=4)
        512
    """
    for name, value in (
        ("per_device", per_device),
        ("world_size", world_size),
        ("accumulate_grad_batches", accumulate_grad_batches),
    ):
        if not is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return per_device * world_size * accumulate_grad_batches


def lr_scale(effective_batch: int, reference_batch_size: int = 256, rule: str = "linear") -> float:
    """The LR multiplier of a scaling rule: ``effective / reference`` (linear), its square root, or 1.

    Examples:
        >>> lr_scale(1024), lr_scale(1024, rule="sqrt"), lr_scale(1024, rule="none")
        (4.0, 2.0, 1.0)
    """
    check_choice("scale_lr", rule, SCALE_RULES)
    if rule == "none":
        return 1.0
    ratio = effective_batch / reference_batch_size
    return ratio if rule == "linear" else math.sqrt(ratio)


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
            found.append(int(size))  # type: ignore[arg-type]

    apply_to_collection(loaders, DataLoader, _read)
    if len(set(found)) > 1:
        raise ValueError(
            f"The train dataloaders have different batch sizes {sorted(set(found))}; set SGDWarmup's "
            "`batch_size` to the per-device batch size that the LR scaling rule should use."
        )
    return found[0] if found else None


@dataclass(frozen=True)
class ResolvedSchedule:
    """An ``SGDWarmup`` made concrete for one run: base LR after scaling and every length in steps.

    Examples:
        >>> cfg = SGDWarmup(lr=0.1, warmup_epochs=2, scale_lr="linear")
        >>> r = cfg.resolve(total_steps=100, steps_per_epoch=10, batch_size=512)
        >>> r.lr, r.warmup_steps, r.total_steps
        (0.2, 20, 100)
    """

    lr: float
    min_lr: float
    effective_batch_size: int | None
    warmup_steps: int
    total_steps: int
    step_size: float
    milestones: list[int]

    def scheduler_kwargs(self, config: SGDWarmup) -> dict[str, Any]:
        """Keyword arguments of ``WarmupLR`` for this run."""
        return {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "warmup": config.warmup,
            "warmup_start_factor": config.warmup_start_factor,
            "decay": config.decay,
            "min_lr": self.min_lr,
            "power": config.power,
            "gamma": config.gamma,
            "step_size": self.step_size,
            "milestones": self.milestones,
        }


@dataclass
class SGDWarmup:
    """SGD with per-step warmup and decay, LR scaling with the batch, and no weight decay on norms and biases.

    A plain dataclass: LightningCLI writes it as a nested YAML block, ``dataclasses.asdict`` gives plain
    data and ``SGDWarmup(**asdict(cfg))`` rebuilds it. ``build(module)`` reads the rest (steps, batch,
    devices) from the module's Trainer when ``configure_optimizers`` runs.

    Args:
        lr: peak LR at ``reference_batch_size`` (with ``scale_lr="none"``: the peak LR as is).
        momentum: SGD momentum in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 weight decay of conv/linear weights.
        norm_weight_decay: weight decay of normalization weights/biases and of every bias or other 1-D
            parameter.
        warmup_epochs: warmup length in epochs (may be fractional). Give this or ``warmup_steps``, not both;
            with neither, warmup lasts ``DEFAULT_WARMUP_EPOCHS`` (1) epoch. 0 disables warmup.
        warmup_steps: warmup length in optimizer steps.
        warmup: warmup shape: ``"linear"``, ``"exponential"`` or ``"constant"``.
        warmup_start_factor: the first step runs at this fraction of the peak LR, in (0, 1].
        decay: shape after warmup: ``"cosine"``, ``"linear"``, ``"poly"``, ``"step"``, ``"multistep"``,
            ``"exponential"`` or ``"constant"``.
        min_lr: LR reached at the last step, in the units of ``lr`` (scaled with it), at most ``lr``.
        power: exponent of the ``"poly"`` decay.
        gamma: factor in (0, 1] of the ``"step"``, ``"multistep"`` and ``"exponential"`` decays.
        step_size: epochs between two multiplications by ``gamma`` (``"step"``, counted from the end of
            warmup), or the epochs over which the LR falls by ``gamma`` (``"exponential"``).
        milestones: ``"multistep"``: epochs (counted from the start of training, after warmup) at which the LR
            is multiplied by ``gamma``.
        scale_lr: ``"none"``, ``"linear"`` (``lr x effective batch / reference_batch_size``) or ``"sqrt"``.
        reference_batch_size: the batch size ``lr`` is meant for.
        batch_size: per-device batch size used for scaling (default: read from the train dataloader).
        total_steps: optimizer steps of the whole run (default: ``trainer.estimated_stepping_batches``).

    Raises:
        ValueError: for an invalid field (the message names it, its value and what is allowed).
        TypeError: for a field of the wrong type.

    Examples:
        >>> cfg = SGDWarmup(lr=0.4, warmup_steps=5, total_steps=50, scale_lr="none")
        >>> out = cfg.build(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        >>> round(out["optimizer"].param_groups[0]["lr"], 6), out["lr_scheduler"]["interval"]
        (0.04, 'step')
        >>> from dataclasses import asdict
        >>> SGDWarmup(**asdict(cfg)) == cfg
        True
    """

    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    norm_weight_decay: float = 0.0
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    warmup: WarmupShape = "linear"
    warmup_start_factor: float = 0.1
    decay: DecayShape = "cosine"
    min_lr: float = 0.0
    power: float = 2.0
    gamma: float = 0.1
    step_size: float = 1.0
    milestones: list[int] | None = None
    scale_lr: ScaleRule = "linear"
    reference_batch_size: int = 256
    batch_size: int | None = None
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"`lr` must be a number > 0, got {self.lr!r}.")
        if not is_number(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be a number in [0, 1), got {self.momentum!r}.")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"`nesterov` must be a bool, got {self.nesterov!r}.")
        if self.nesterov and self.momentum == 0:
            raise ValueError("`nesterov=True` needs `momentum` > 0, got momentum=0.")
        for name in ("weight_decay", "norm_weight_decay"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
        if self.warmup_epochs is not None and self.warmup_steps is not None:
            raise ValueError(
                f"Give `warmup_epochs` or `warmup_steps`, not both; got warmup_epochs={self.warmup_epochs!r} "
                f"and warmup_steps={self.warmup_steps!r}."
            )
        if self.warmup_epochs is not None and (not is_number(self.warmup_epochs) or self.warmup_epochs < 0):
            raise ValueError(f"`warmup_epochs` must be None or a number >= 0, got {self.warmup_epochs!r}.")
        if self.warmup_steps is not None and (not is_int(self.warmup_steps) or self.warmup_steps < 0):
            raise ValueError(f"`warmup_steps` must be None or an integer >= 0, got {self.warmup_steps!r}.")
        check_choice("warmup", self.warmup, WARMUP_SHAPES)
        check_warmup_start_factor(self.warmup_start_factor)
        check_choice("decay", self.decay, DECAY_SHAPES)
        if not is_number(self.min_lr) or not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"`min_lr` must be a number in [0, lr={self.lr}], got {self.min_lr!r}.")
        if not is_number(self.power) or self.power <= 0:
            raise ValueError(f"`power` must be a number > 0, got {self.power!r}.")
        check_gamma(self.gamma)
        if not is_number(self.step_size) or self.step_size <= 0:
            raise ValueError(f"`step_size` must be a number of epochs > 0, got {self.step_size!r}.")
        if self.milestones is not None:
            self.milestones = check_milestones(self.milestones)
        if self.decay == "multistep" and not self.milestones:
            raise ValueError(
                f"`milestones` must be a non-empty list of epochs for decay='multistep', got {self.milestones!r}."
            )
        if self.milestones and self.milestones[0] <= self.warmup_length_epochs(default=0.0):
            raise ValueError(
                f"`milestones` must all come after warmup (> warmup_epochs={self.warmup_length_epochs()}), "
                f"got {self.milestones!r}."
            )
        check_choice("scale_lr", self.scale_lr, SCALE_RULES)
        if not is_int(self.reference_batch_size) or self.reference_batch_size < 1:
            raise ValueError(f"`reference_batch_size` must be an integer >= 1, got {self.reference_batch_size!r}.")
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"`batch_size` must be None or an integer >= 1, got {self.batch_size!r}.")
        if self.total_steps is not None and (not is_int(self.total_steps) or self.total_steps < 1):
            raise ValueError(f"`total_steps` must be None or an integer >= 1, got {self.total_steps!r}.")
        if self.total_steps is not None and self.warmup_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(
                f"`warmup_steps` must not exceed `total_steps` ({self.total_steps}), got {self.warmup_steps!r}."
            )

    def warmup_length_epochs(self, default: float = DEFAULT_WARMUP_EPOCHS) -> float:
        """Warmup length in epochs when it is given in epochs (or by default); ``default`` otherwise.

        Examples:
            >>> SGDWarmup().warmup_length_epochs(), SGDWarmup(warmup_epochs=2.5).warmup_length_epochs()
            (1.0, 2.5)
        """
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        if self.warmup_steps is None:
            return DEFAULT_WARMUP_EPOCHS
        return default

    def _needs_epochs(self) -> bool:
        uses_step_size = self.decay in ("step", "exponential")
        return self.warmup_steps is None or uses_step_size or bool(self.milestones and self.decay == "multistep")

    def resolve(
        self,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        world_size: int = 1,
        accumulate_grad_batches: int = 1,
    ) -> ResolvedSchedule:
        """Make this config concrete for one run (pure: no Trainer needed).

        Args:
            total_steps: optimizer steps of the run (the field ``total_steps`` wins when set).
            steps_per_epoch: optimizer steps per epoch, to convert epoch-valued fields.
            batch_size: per-device batch size (the field ``batch_size`` wins when set).
            world_size: number of processes (devices x nodes).
            accumulate_grad_batches: batches per optimizer step.

        Raises:
            ValueError: when a needed length is unknown (the message says what to set) or warmup is longer
                than the run.

        Examples:
            >>> r = SGDWarmup(lr=0.1, scale_lr="linear", warmup_epochs=1).resolve(
            ...     total_steps=200, steps_per_epoch=20, batch_size=64, world_size=2,
            ...     accumulate_grad_batches=4,
            ... )
            >>> r.effective_batch_size, r.lr, r.warmup_steps
            (512, 0.2, 20)
        """
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None or not is_int(total) or total < 1:
            raise ValueError(
                f"SGDWarmup cannot tell the number of optimizer steps (got {total!r}): the run is infinite "
                "or its length unknown (e.g. an iterable dataset). Set the Trainer's `max_steps` or "
                "SGDWarmup's `total_steps`."
            )
        if self._needs_epochs() and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(
                f"SGDWarmup cannot convert epochs to steps (steps per epoch unknown, got "
                f"{steps_per_epoch!r}): set `warmup_steps` instead of `warmup_epochs` and use a decay "
                "without epoch-valued fields, or give the Trainer a sized train dataloader."
            )
        spe = int(steps_per_epoch) if steps_per_epoch else 0
        if self.warmup_steps is not None:
            warmup = int(self.warmup_steps)
            where = f"warmup_steps={warmup}"
        else:
            epochs = self.warmup_length_epochs()
            warmup = round(epochs * spe)
            where = f"warmup_epochs={epochs} ({warmup} steps at {spe} steps per epoch)"
        if warmup > total:
            raise ValueError(
                f"Warmup is longer than the run: {where} > total_steps={total}. Shorten the warmup or train longer."
            )
        bs = self.batch_size if self.batch_size is not None else batch_size
        effective: int | None = None
        if bs is not None:
            effective = effective_batch_size(int(bs), world_size, accumulate_grad_batches)
        if self.scale_lr != "none" and effective is None:
            raise ValueError(
                f"SGDWarmup(scale_lr={self.scale_lr!r}) needs the per-device batch size, but the module has "
                "no Trainer or its train dataloader does not tell it: set SGDWarmup's `batch_size`, or use "
                "scale_lr='none'."
            )
        scale = lr_scale(effective, self.reference_batch_size, self.scale_lr) if effective is not None else 1.0
        milestones = [round(m * spe) for m in self.milestones or []] if self.decay == "multistep" else []
        return ResolvedSchedule(
            lr=self.lr * scale,
            min_lr=self.min_lr * scale,
            effective_batch_size=effective,
            warmup_steps=warmup,
            total_steps=int(total),
            step_size=self.step_size * spe if self.decay in ("step", "exponential") else 1.0,
            milestones=milestones,
        )

    def build(self, module: nn.Module) -> dict[str, Any]:
        """Build the optimizer and per-step scheduler for ``module`` (call it in ``configure_optimizers``).

        Reads ``module.trainer`` when the module is attached to one: total steps from
        ``trainer.estimated_stepping_batches``, steps per epoch, the train dataloader's batch size, the world
        size and ``accumulate_grad_batches``. A module without a Trainer needs ``total_steps``,
        ``warmup_steps`` and (when scaling) ``batch_size``. Logs the effective LR once (rank zero).

        Returns:
            ``{"optimizer": torch.optim.SGD, "lr_scheduler": {"scheduler": WarmupLR, "interval": "step",
            "frequency": 1, "name": "lr-SGD"}}``.

        Raises:
            ValueError: when the module has no trainable parameter, or a run length / batch size is unknown.
        """
        groups = param_groups(module, self.weight_decay, self.norm_weight_decay)
        if not any(group["params"] for group in groups):
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters (requires_grad=True); SGDWarmup has "
                "nothing to optimize."
            )
        resolved = self.resolve(**_trainer_facts(_trainer_of(module)))
        optimizer = torch.optim.SGD(
            groups,
            lr=resolved.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )
        scheduler = WarmupLR(optimizer, **resolved.scheduler_kwargs(self))
        batch = resolved.effective_batch_size
        rank_zero_info(
            f"SGDWarmup: peak LR {resolved.lr:.6g} (lr={self.lr:g}, scale_lr={self.scale_lr!r}, "
            f"effective batch {batch if batch is not None else 'unknown'}, reference "
            f"{self.reference_batch_size}); warmup {resolved.warmup_steps} steps ({self.warmup}), "
            f"{self.decay} decay to {resolved.min_lr:.6g} at step {resolved.total_steps}."
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr-SGD"},
        }

    def lr_curve(
        self,
        total_steps: int,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
        world_size: int = 1,
        accumulate_grad_batches: int = 1,
    ) -> list[float]:
        """The peak-group LR of every optimizer step ``0 .. total_steps - 1`` (for plots and checks).

        Examples:
            >>> cfg = SGDWarmup(lr=1.0, warmup_steps=2, decay="linear", scale_lr="none")
            >>> [round(v, 3) for v in cfg.lr_curve(5)]
            [0.1, 0.55, 1.0, 0.667, 0.333]
        """
        resolved = self.resolve(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            world_size=world_size,
            accumulate_grad_batches=accumulate_grad_batches,
        )
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=resolved.lr)
        scheduler = WarmupLR(optimizer, **resolved.scheduler_kwargs(self))
        return [scheduler.factor(t) * resolved.lr for t in range(resolved.total_steps)]


def _trainer_of(module: nn.Module) -> Any:
    """The Trainer ``module`` is attached to, or ``None`` (plain or detached module)."""
    try:
        return getattr(module, "trainer", None)
    except RuntimeError:  # a LightningModule not attached to a Trainer
        return None


def _trainer_facts(trainer: Any) -> dict[str, Any]:
    """What ``SGDWarmup.resolve`` needs, read from a Trainer through its public attributes."""
    if trainer is None:
        return {}
    total = trainer.estimated_stepping_batches  # loads the train dataloader when max_epochs is finite
    if trainer.train_dataloader is None:  # max_steps-only runs: Lightning did not load the data yet
        trainer.fit_loop.setup_data()
    accumulate = int(trainer.accumulate_grad_batches)
    batches = trainer.num_training_batches
    steps_per_epoch = math.ceil(batches / accumulate) if is_number(batches) and batches > 0 else None
    return {
        "total_steps": int(total) if is_number(total) else None,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": per_device_batch_size(trainer.train_dataloader),
        "world_size": int(trainer.world_size),
        "accumulate_grad_batches": accumulate,
    }


__all__ = [
    "DEFAULT_WARMUP_EPOCHS",
    "NORM_LAYERS",
    "SCALE_RULES",
    "ResolvedSchedule",
    "SGDWarmup",
    "effective_batch_size",
    "lr_scale",
    "param_groups",
    "per_device_batch_size",
]
