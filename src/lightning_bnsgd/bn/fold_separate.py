"""BatchNorm subclasses with a forward of their own, separated for `fold_batchnorm` where that is exact.

Such a subclass (timm's ``BatchNormAct2d``: normalize, then ``drop``, then ``act``) is separated into a plain torch
BatchNorm layer followed by the layer's own child modules, where that is exactly what the layer computes in eval mode.

The pattern is recognized by structure, without importing the library that defines the class: a subclass of a
torch BatchNorm class (``BatchNorm1d``/``2d``/``3d``, ``SyncBatchNorm``) that overrides ``forward``, holds no
parameters or buffers besides the BatchNorm ones, and has child modules. The separated form is
``Sequential(bn=<plain BatchNorm sharing the layer's parameters and buffers>, <children in registration order>)``;
it is taken only when it gives the layer's own eval outputs (within the fold's tolerance) on random inputs of the
shape the layer receives in the traced model. The fold then treats ``bn`` like any other BatchNorm layer; what it
cannot fold is not separated at all (the original layer stays).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.fold_check import output_difference

#: The torch classes whose forward is the plain normalization (eval mode: the running statistics).
PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OWN = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
#: The name of the plain BatchNorm layer inside the separated form.
NORM = "bn"


def has_own_forward(bn: _BatchNorm) -> bool:
    """Whether ``bn``'s class overrides the forward of the torch BatchNorm class it derives from."""
    return type(bn).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def separate(bn: _BatchNorm) -> nn.Sequential | str:
    """``bn`` as a plain BatchNorm layer followed by its child modules, or why it cannot be written so.

    Unchecked: `separable` checks the outputs.
    """
    name = type(bn).__name__
    base = next((cls for cls in type(bn).__mro__ if cls in PLAIN), None)
    if base is None:
        return f"{name} has a forward of its own and derives from no torch BatchNorm class with a known forward"
    children = list(bn.named_children())
    if not children:
        return f"{name} has a forward of its own and no child modules to separate it into"
    extra = sorted({*bn._parameters, *bn._buffers} - _OWN)
    if extra:
        return f"{name} has a forward of its own and tensors of its own ({', '.join(extra)})"
    if any(child == NORM for child, _ in children):
        return f"{name} has a child named {NORM!r}"
    plain = base(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    plain.track_running_stats = bn.track_running_stats
    for key in _OWN:
        setattr(plain, key, getattr(bn, key))  # shared, not copied: the same values, dtype and device
    plain.train(bn.training)
    return nn.Sequential(OrderedDict([(NORM, plain), *children]))


def separable(gm: fx.GraphModule, generator: torch.Generator, checks: int = 2) -> tuple[dict[str, str], dict[str, str]]:
    """The BatchNorm layers with a forward of their own in ``gm`` (traced, shapes propagated), by whether they separate.

    Those that separate exactly come with the names of the children that follow the normalization, and those that do not
    with the reason.
    """
    parts: dict[str, str] = {}
    refused: dict[str, str] = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        bn = gm.get_submodule(target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or not has_own_forward(bn) or target in parts or target in refused:
            continue
        separated = separate(bn)
        if isinstance(separated, str):
            refused[target] = separated
            continue
        children = ", ".join(list(separated._modules)[1:])
        source = node.args[0] if node.args else None
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            refused[target] = f"{type(bn).__name__} has a forward of its own and its input is not one tensor"
            continue
        device = next(iter([*bn.buffers(recurse=False), *bn.parameters(recurse=False)]), torch.empty(0)).device
        probes = [(torch.randn(meta.shape, generator=generator).to(device, meta.dtype),) for _ in range(checks)]
        why = f"{type(bn).__name__}'s forward is not its normalization followed by {children}"
        try:
            if output_difference(bn, separated, probes) is None:
                refused[target] = why
                continue
        except Exception as err:  # the plain class rejects the input (a BatchNorm2d subclass fed 3-d inputs)
            refused[target] = f"{why} ({type(err).__name__}: {err})"
            continue
        parts[target] = children
    return parts, refused


def separated_copy(model: nn.Module, names: list[str]) -> nn.Module:
    """An eval copy of ``model`` with the layers at ``names`` replaced by their separated form."""
    model = copy.deepcopy(model).eval()
    for name in names:
        parent, _, leaf = name.rpartition(".")
        bn = model.get_submodule(name)
        assert isinstance(bn, _BatchNorm)
        separated = separate(bn)
        assert not isinstance(separated, str), separated
        setattr(model.get_submodule(parent), leaf, separated)
    return model


__all__ = ["NORM", "PLAIN", "has_own_forward", "separable", "separate", "separated_copy"]
