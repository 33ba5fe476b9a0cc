"""The parameter groups of ``SGDWarmup``: weight decay on conv/linear weights, none on norms and biases.

The split goes by module type and parameter shape, never by name (:func:`param_groups`); the scheduler of a part of
a module is named after that part's path (``"lr-SGD-<path>"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedParameter

from lightning_bnsgd._validation import check_number

#: Module types whose parameters never get ``weight_decay`` (they get ``norm_weight_decay``).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    _BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
    _InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


#: Lazy modules whose ``weight`` is a matrix or a kernel once materialized: it gets ``weight_decay``.
LAZY_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LazyLinear,
    nn.LazyConv1d,
    nn.LazyConv2d,
    nn.LazyConv3d,
    nn.LazyConvTranspose1d,
    nn.LazyConvTranspose2d,
    nn.LazyConvTranspose3d,
)


def _is_no_decay(owner: nn.Module, name: str, param: torch.Tensor, where: str) -> bool:
    """Whether ``param`` (called ``name`` in ``owner``) belongs to the no-decay group; decided by type and shape."""
    if isinstance(owner, NORM_LAYERS):
        return True
    if not isinstance(param, UninitializedParameter):
        return param.ndim <= 1
    if name == "bias":
        return True
    if name == "weight" and isinstance(owner, LAZY_WEIGHT_LAYERS):
        return False
    raise ValueError(
        f"param_groups: the parameter `{where}` of {type(owner).__name__} is not materialized yet (a lazy module "
        "before its first forward), so its shape cannot tell whether it gets weight decay. Run one forward pass "
        "before the optimizer is built (e.g. `self(example_batch)` in the LightningModule's `setup`), or use a "
        "module that is not lazy."
    )


def _selection(module: nn.Module, params: nn.Module | Iterable[torch.Tensor] | None) -> tuple[nn.Module, set[int]]:
    """The module to walk and the ids of the parameters to keep (empty: all of them)."""
    if params is None:
        return module, set()
    if isinstance(params, nn.Module):
        return params, set()
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            f"`params` must be None, a torch.nn.Module or an iterable of parameters, got {type(params).__name__}."
        )
    chosen = list(params)
    if not all(isinstance(p, torch.Tensor) for p in chosen):
        raise TypeError("`params` must hold tensors (parameters of the module) only.")
    known = {id(p) for p in module.parameters()}
    if any(id(p) not in known for p in chosen):
        raise ValueError(
            f"`params` holds tensors that are not parameters of {type(module).__name__}: pass the module that owns "
            "them first (their owning layers decide their weight decay)."
        )
    return module, {id(p) for p in chosen}


def param_groups(
    module: nn.Module,
    weight_decay: float = 1e-4,
    norm_weight_decay: float = 0.0,
    *,
    params: nn.Module | Iterable[torch.Tensor] | None = None,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into a weight-decay group and a no-decay group.

    The split goes by module type and parameter shape, never by name: the weights and biases of every
    normalization layer (BatchNorm*, SyncBatchNorm, InstanceNorm*, GroupNorm, LayerNorm, RMSNorm) and every
    parameter with at most one dimension (biases, scales) go to ``"no_decay"`` with ``norm_weight_decay``; all
    other parameters (conv and linear weights) go to ``"decay"`` with ``weight_decay``. Parameters with
    ``requires_grad=False`` are left out; a parameter shared by several modules appears once.

    Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ``nn.LazyBatchNorm2d``, ...) are grouped before their first
    forward by the owning module's type: lazy linear/conv weights decay, biases and lazy norm parameters do not. An
    uninitialized parameter of any other module raises a ``ValueError`` (never a silent no-decay).

    Args:
        module: the model.
        weight_decay: weight decay of the ``"decay"`` group (>= 0).
        norm_weight_decay: weight decay of the ``"no_decay"`` group (>= 0).
        params: only these parameters: a submodule (grouped by its own layers), or an iterable of parameters of
            ``module`` (grouped by their owning layers in ``module``); ``None``: all of ``module``'s.
        prefix: put before the group names (``f"{prefix}decay"``), e.g. to add groups to an optimizer that already
            has a ``"decay"`` group (Lightning's ``LearningRateMonitor`` refuses duplicate group names).

    Returns:
        ``[{"params": [...], "weight_decay": ..., "name": "decay"}, {..., "name": "no_decay"}]`` for
        ``torch.optim`` (either list may be empty).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in param_groups(net, 5e-4)]
        [('decay', 2, 0.0005), ('no_decay', 4, 0.0)]
        >>> lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(2))
        >>> [(g["name"], len(g["params"])) for g in param_groups(lazy, 5e-4, params=lazy[:2], prefix="body.")]
        [('body.decay', 1), ('body.no_decay', 3)]
    """
    check_number("weight_decay", weight_decay, 0.0, owner="param_groups")
    check_number("norm_weight_decay", norm_weight_decay, 0.0, owner="param_groups")
    root, wanted = _selection(module, params)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for path, sub in root.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad or (wanted and id(param) not in wanted):
                continue
            seen.add(id(param))
            where = f"{path}.{name}" if path else name
            (no_decay if _is_no_decay(sub, name, param, where) else decay).append(param)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "name": f"{prefix}decay"},
        {"params": no_decay, "weight_decay": float(norm_weight_decay), "name": f"{prefix}no_decay"},
    ]


def _module_path(module: nn.Module, params: nn.Module | Iterable[torch.Tensor]) -> str:
    """The dotted path in ``module`` of a submodule, or the common module path of some of its parameters."""
    if isinstance(params, nn.Module):
        return next((path for path, sub in module.named_modules() if sub is params), "")
    names = {id(p): path for path, p in module.named_parameters(remove_duplicate=False)}
    paths = [names[id(p)].split(".")[:-1] for p in params if id(p) in names]
    common: list[str] = []
    for parts in zip(*paths, strict=False) if paths else ():
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _scheduler_name(module: nn.Module, params: nn.Module | Iterable[torch.Tensor] | None) -> str:
    """``"lr-SGD"``, or ``"lr-SGD-<path>"`` for a part of ``module`` (unique per part in ``LearningRateMonitor``)."""
    path = _module_path(module, params) if params is not None else ""
    return f"lr-SGD-{path}" if path else "lr-SGD"
