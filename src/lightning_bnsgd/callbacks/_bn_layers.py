"""The layers ``BNStatsMonitor`` watches: what a monitored step's hooks captured, and the watch on frozen layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_bnsgd.callbacks._warn_once import WarnOnce

#: ``torch.compiler.set_stance`` (torch >= 2.6): runs compiled code eagerly while its stance is "force_eager".
SET_STANCE: Any = getattr(torch.compiler, "set_stance", None)
_eager_holders: set[int] = set()  # the monitors that run compiled code eagerly now (the stance is per process)
_eager_stance: Any = None  # the "force_eager" stance set for them; closing it restores the one before


@dataclass
class Capture:
    """What the forward pre-hook of one layer saw during a monitored training step."""

    samples: int = 0
    batch_stats: bool = False  # the forward normalized with the batch's statistics (train mode or no buffers)
    mean: Tensor | None = None
    var: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None


def freeze_marks(module: _BatchNorm) -> frozenset[str]:
    """How ``module`` is frozen now.

    ``"eval"`` (eval mode), ``"params"`` (affine parameters without gradients), ``"no_track"``
    (``track_running_stats=False``, as Lightning's ``BaseFinetuning.freeze_module`` sets it).
    """
    marks = set()
    if not module.training:
        marks.add("eval")
    params = [p for p in (module.weight, module.bias) if isinstance(p, Tensor)]
    if params and not any(p.requires_grad for p in params):
        marks.add("params")
    if not module.track_running_stats:
        marks.add("no_track")
    return frozenset(marks)


@dataclass
class Frozen:
    """A layer seen frozen, with its running statistics at that moment."""

    marks: frozenset[str]
    running_mean: Tensor
    running_var: Tensor

    def released(self, module: _BatchNorm) -> bool:
        """Unfrozen on purpose since: parameters trainable again or tracking switched back on.

        That is what ``BaseFinetuning.make_trainable`` and ``unfreeze_and_add_param_group`` do. Eval mode alone cannot
        tell a deliberate ``.train()`` from an accidental one, so it never releases.
        """
        now = freeze_marks(module)
        return any(mark in self.marks and mark not in now for mark in ("params", "no_track"))


@dataclass
class Layer:
    name: str
    module: _BatchNorm
    capture: Capture = field(default_factory=Capture)
    frozen: Frozen | None = None


def buffer_used(layer: Layer, name: str) -> Tensor:
    """The buffer as the monitored step's forward saw it (captured by the hook), else its current value."""
    captured = getattr(layer.capture, name)
    if isinstance(captured, Tensor):
        return captured.detach().float().flatten()
    current = getattr(layer.module, name)
    assert isinstance(current, Tensor)
    return current.detach().float().flatten()


def watch_frozen(layers: Sequence[Layer]) -> None:
    """Keep the running statistics of layers frozen now that are not watched yet."""
    for layer in layers:
        m = layer.module
        if layer.frozen is not None or not isinstance(m.running_mean, Tensor):
            continue
        marks = freeze_marks(m)
        if marks:
            assert isinstance(m.running_var, Tensor)
            layer.frozen = Frozen(marks, m.running_mean.detach().clone(), m.running_var.detach().clone())


def frozen_changes(layers: Sequence[Layer], device: torch.device) -> Tensor:
    """1.0 for each watched frozen layer whose running statistics changed since it was seen frozen."""
    changed = torch.zeros(len(layers), device=device)
    for i, layer in enumerate(layers):
        snap, m = layer.frozen, layer.module
        if snap is None:
            continue
        if snap.released(m):
            layer.frozen = None  # unfrozen on purpose: stop watching (watched again if frozen again)
            continue
        assert isinstance(m.running_mean, Tensor) and isinstance(m.running_var, Tensor)
        moved = (m.running_mean != snap.running_mean).any() | (m.running_var != snap.running_var).any()
        changed[i] = moved.to(device=device, dtype=torch.float32)
    return changed


def warn_frozen_changes(
    layers: Sequence[Layer], changed: list[float], step: int, where: str, warned: WarnOnce, owner: str
) -> None:
    """One warning per frozen layer whose running statistics changed, with the likely cause."""
    for layer, flag in zip(layers, changed, strict=True):
        if flag <= 0 or layer.frozen is None or not warned.first(layer.name, "frozen"):
            continue
        marks = layer.frozen.marks
        how = " and ".join(
            text
            for mark, text in (("eval", "in eval mode"), ("params", "with `requires_grad=False` affine parameters"))
            if mark in marks
        )
        if "eval" in marks:
            cause = (
                "it ran in train mode in a training step since: something called `.train()` on it or on a "
                "parent module. Keep it in eval mode, e.g. call `.eval()` on it in `on_train_epoch_start`, "
                "after any code that calls `.train()`."
            )
        else:
            cause = (
                "it is in train mode and tracks running statistics, so every training step updates them; "
                "`requires_grad=False` freezes only gamma and beta. Call `.eval()` on it in "
                "`on_train_epoch_start`, or freeze it with `BaseFinetuning.freeze(..., train_bn=False)`."
            )
        rank_zero_warn(
            f"{owner}: BatchNorm layer {layer.name!r} was frozen ({how or 'tracking off'}) but its running "
            f"statistics changed by step {step}{where}: {cause}"
        )


def attach_hooks(holder: object, layers: Sequence[Layer], make_hook: Callable[[Layer], Any]) -> list[RemovableHandle]:
    """Fresh captures and forward pre-hooks for a monitored step, with ``torch.compile``d code run eagerly.

    Compiled code runs eagerly until `remove_hooks`: compiled code does not call hooks added after it was compiled, and
    a hook compiled into a graph would keep running (and be recompiled) on every later step; eager, the compiled graphs
    stay free of the monitor.
    """
    _hold_eager(holder)
    for layer in layers:
        layer.capture = Capture()
    return [layer.module.register_forward_pre_hook(make_hook(layer)) for layer in layers]


def remove_hooks(holder: object, handles: list[RemovableHandle]) -> None:
    """Remove the hooks; compiled code runs compiled again (once no other monitor needs it eager)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    _release_eager(holder)


def _hold_eager(holder: object) -> None:
    """Make compiled code run eagerly until `_release_eager` is called for every holder.

    Monitors of one Trainer hold and release in any order; the stance before the first hold comes back after the last
    release.
    """
    global _eager_stance
    if SET_STANCE is None or id(holder) in _eager_holders:
        return
    if not _eager_holders:
        _eager_stance = SET_STANCE("force_eager")
    _eager_holders.add(id(holder))


def _release_eager(holder: object) -> None:
    global _eager_stance
    if id(holder) not in _eager_holders:
        return
    _eager_holders.discard(id(holder))
    if not _eager_holders and _eager_stance is not None:
        stance, _eager_stance = _eager_stance, None
        stance.__exit__(None, None, None)


__all__ = [
    "SET_STANCE",
    "Capture",
    "Frozen",
    "Layer",
    "attach_hooks",
    "buffer_used",
    "freeze_marks",
    "frozen_changes",
    "remove_hooks",
    "warn_frozen_changes",
    "watch_frozen",
]
