"""``fold_batchnorm``: merge BatchNorm layers exactly into neighbouring convolution or linear layers, for inference.

Every BatchNorm layer that can be merged exactly into a neighbouring convolution or linear layer is merged.

In eval mode a BatchNorm layer with running statistics is a per-channel affine map ``y = s * x + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. Such a map folds exactly

* **backward**, into the convolution or linear layer whose output goes only into the BatchNorm: its output
  channels are scaled by ``s`` and shifted by ``t`` (any ``Conv1d``/``Conv2d``/``Conv3d``: groups, dilation,
  stride, with or without bias; ``Linear`` followed by ``BatchNorm1d`` on ``(N, C)``);
* **forward**, through operations that commute with a per-channel affine map, into the convolution or linear layer
  that reads the result: its input channels are scaled by ``s`` and its bias takes up ``t``. The operations that
  commute: identity, dropout (eval), average pooling (without zero padding counted in the average), adaptive
  average pooling, flatten/reshape from ``(N, C, ...)`` to ``(N, C * ...)``, and max pooling where every scale is
  non-negative (a negative scale turns a maximum into a minimum). A following convolution that pads with zeros
  does not take a forward fold: at the borders it would read the zeros unshifted, so the fold is refused (padding
  modes ``reflect``, ``replicate`` and ``circular`` pad with the shifted values and fold exactly).

A BatchNorm subclass with a forward of its own that is its normalization followed by its child modules (timm's
``BatchNormAct2d``: normalize, ``drop``, ``act``) is separated first (`lightning_bnsgd.bn.fold_separate`): its
normalization folds like any BatchNorm layer, and the children stay in its place.

Everything else stays as it is, and the report says why: BatchNorm layers that normalize with batch statistics at
inference (``track_running_stats=False``), subclasses whose forward does not separate, outputs that feed several
consumers, a ReLU between the BatchNorm and the next layer, layers called more than once. Exactness is checked, not
assumed: the folded model's outputs are compared with the unfolded eval model's on the example inputs and on random
inputs of the same shape, and a fold that does not pass is undone and reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.fold_check import ATOL, RTOL, output_difference, random_like
from lightning_bnsgd.bn.fold_separate import NORM, has_own_forward, separable, separated_copy

Action = Literal["backward", "forward", "kept"]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}


@dataclass(frozen=True)
class FoldDecision:
    """What happened to one BatchNorm layer.

    Attributes:
        layer: the BatchNorm layer's qualified name in the model.
        action: ``"backward"`` (merged into the layer before it), ``"forward"`` (merged into the layer after it) or
            ``"kept"``.
        into: the convolution or linear layer it was merged into (``None`` when kept).
        reason: why it was kept, or the path of the fold.
    """

    layer: str
    action: Action
    into: str | None
    reason: str


@dataclass
class FoldReport:
    """What `fold_batchnorm` did.

    Attributes:
        decisions: one per BatchNorm layer, in the order the forward reaches them.
        max_abs_diff: the largest absolute output difference between the folded and the unfolded eval model over
            the checked inputs.
        tolerance: the check every output passed: ``|folded - unfolded| <= RTOL * |unfolded| + ATOL * max|unfolded|``.
    """

    decisions: list[FoldDecision] = field(default_factory=list)
    max_abs_diff: float = 0.0
    tolerance: str = f"|folded - unfolded| <= {RTOL:g} * |unfolded| + {ATOL:g} * max|unfolded|"

    @property
    def folded(self) -> list[str]:
        """Names of the BatchNorm layers that were merged away."""
        return [d.layer for d in self.decisions if d.action != "kept"]

    @property
    def kept(self) -> dict[str, str]:
        """Names of the BatchNorm layers still in the model, with the reason."""
        return {d.layer: d.reason for d in self.decisions if d.action == "kept"}

    def __str__(self) -> str:
        lines = [
            f"fold_batchnorm: {len(self.folded)} of {len(self.decisions)} BatchNorm layer(s) folded "
            f"(max output difference {self.max_abs_diff:.2e}; {self.tolerance})"
        ]
        for d in self.decisions:
            where = f" into {d.into}" if d.into else ""
            lines.append(f"  {d.layer}: {d.action}{where}: {d.reason}")
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm layer (subclasses too) kept as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class _Plan:
    target: str  # the BatchNorm module's qualified name in the traced model
    layer: str  # the BatchNorm layer's qualified name in the model (the same unless separated)
    action: Action
    into: str | None  # the conv/linear module's qualified name
    reason: str
    repeat: int = 1  # forward folds through a flatten: each channel covers this many features


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(s, t)`` of ``y = s * x + t``, in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean, var = bn.running_mean.double(), bn.running_var.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def _why_not_foldable(bn: _BatchNorm) -> str | None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "normalizes with batch statistics at inference (track_running_stats=False)"
    if has_own_forward(bn):
        return f"{type(bn).__name__} has a forward of its own"
    return None


def _backward_target(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> tuple[str | None, str]:
    """The conv/linear the BatchNorm at ``node`` can fold into backward, or ``None`` and why not."""
    producer = node.args[0] if node.args else None
    if not isinstance(producer, fx.Node):
        return None, "its input is not a layer's output"
    module = _module(gm, producer)
    if not isinstance(module, (*_CONVS, nn.Linear)):
        before = producer.target if producer.op == "call_module" else producer.name
        return None, f"the operation before it ({before}) is not a convolution or linear layer"
    if len(producer.users) != 1:
        return None, f"{producer.target}'s output also feeds {len(producer.users) - 1} other consumer(s)"
    if calls[str(producer.target)] != 1:
        return None, f"{producer.target} is called more than once"
    shape = _shape(producer)
    if isinstance(module, nn.Linear) and (shape is None or len(shape) != 2):
        return None, f"{producer.target}'s output is not (N, features), so BatchNorm1d does not normalize its features"
    return str(producer.target), f"{producer.target} -> BatchNorm"


def _commutes(gm: fx.GraphModule, node: fx.Node, s: Tensor) -> tuple[bool, int, str]:
    """Whether the per-channel affine map commutes with ``node``; the repeat factor a flatten adds; its name."""
    module = _module(gm, node)
    label = str(node.target) if node.op == "call_module" else node.name
    if isinstance(module, _PASS_THROUGH):
        return True, 1, label
    if isinstance(module, _MAX_POOLS):
        return bool((s >= 0).all()), 1, label if bool((s >= 0).all()) else f"{label} (a negative BatchNorm scale)"
    if isinstance(module, _ADAPTIVE_AVG):
        return True, 1, label
    if isinstance(module, _AVG_POOLS):
        pad = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        ok = not any(pad) or not module.count_include_pad
        return ok, 1, label if ok else f"{label} (zero padding counted in the average)"
    if isinstance(module, nn.Flatten) or node.target in _RESHAPES:
        before, after = _shape(node.args[0]), _shape(node)
        if before and after and len(before) >= 2 and len(after) == 2 and before[0] == after[0]:
            rest = math.prod(before[2:])
            if after[1] == before[1] * rest:
                return True, rest, label
        return False, 1, f"{label} (not a flatten of (N, C, ...) to (N, C * ...))"
    return False, 1, label


def _reads_shape_only(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: the same for the BatchNorm's input as for its output."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",)


def _pads_with_zeros(conv: Any) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    if conv.padding == "valid":
        return False
    return any(p > 0 for p in conv.padding)


def _forward_target(gm: fx.GraphModule, node: fx.Node, s: Tensor, calls: dict[str, int]) -> tuple[str | None, str, int]:
    """The conv/linear the BatchNorm at ``node`` can fold into forward, the path, and the flatten repeat factor."""
    path: list[str] = []
    repeat = 1
    current = node
    while True:
        users = [u for u in current.users if not _reads_shape_only(u)]
        if len(users) != 1 or (current is not node and len(current.users) != 1):
            consumers = len(users)
            return None, f"its output feeds {consumers} consumers" if consumers else "its output is not used", 1
        (user,) = users
        module = _module(gm, user)
        if isinstance(module, (*_CONVS, nn.Linear)):
            name = str(user.target)
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, f"{name} takes more than this input", 1
            if calls[name] != 1:
                return None, f"{name} is called more than once", 1
            if isinstance(module, nn.Linear):
                shape = _shape(current)
                if shape is None or len(shape) != 2:
                    return None, f"{name} reads a tensor that is not (N, features)", 1
            elif _pads_with_zeros(module):
                return None, f"{name} pads with zeros: the padded borders would not be shifted", 1
            return name, " -> ".join(["BatchNorm", *path, name]), repeat
        if user.op == "output":
            return None, "its output is the model's output (no layer after it)", 1
        ok, factor, label = _commutes(gm, user, s)
        if not ok:
            return None, f"the next operation, {label}, does not commute with a per-channel affine map", 1
        path.append(label)
        repeat *= factor
        current = user


def _decide(gm: fx.GraphModule, node: fx.Node, bn: _BatchNorm, calls: dict[str, int]) -> _Plan:
    target = str(node.target)
    why = _why_not_foldable(bn)
    if why is None and calls[target] != 1:
        why = "it is called more than once in a forward"
    if why is not None:
        return _Plan(target, target, "kept", None, why)
    s, _ = _affine(bn)
    into, reason = _backward_target(gm, node, calls)
    if into is not None:
        return _Plan(target, target, "backward", into, reason)
    into_f, reason_f, repeat = _forward_target(gm, node, s, calls)
    if into_f is not None:
        return _Plan(target, target, "forward", into_f, reason_f, repeat)
    return _Plan(target, target, "kept", None, f"backward: {reason}; forward: {reason_f}")


def _plan(gm: fx.GraphModule, separated: dict[str, str], refused: dict[str, str]) -> list[_Plan]:
    """One plan per BatchNorm layer, with the layers separated and the layers refused.

    ``separated`` maps a layer replaced by its separated form to the children after its normalization (its plain
    BatchNorm is traced as ``<layer>.bn``), ``refused`` the layers with a forward of their own that do not separate to
    the reason.
    """
    calls = _calls(gm)
    plans: list[_Plan] = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not isinstance(bn, _BatchNorm):
            continue
        plan = _decide(gm, node, bn, calls)  # torch.fx keeps the qualified names of the traced model
        layer, _, norm = plan.target.rpartition(".")
        if norm == NORM and layer in separated:  # timm's BatchNormAct2d and the like
            parts = separated[layer]
            if plan.action == "kept":
                why = f"its normalization separates from its {parts} but does not fold: {plan.reason}"
                plan = replace(plan, layer=layer, reason=why)
            else:
                plan = replace(plan, layer=layer, reason=f"{plan.reason} (its {parts} stay in its place)")
        elif plan.target in refused:
            plan = replace(plan, reason=refused[plan.target])
        plans.append(plan)
    return plans


@torch.no_grad()
def _fold_backward(layer: Any, s: Tensor, t: Tensor) -> None:
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_weight, new_bias = weight * s.reshape(shape), bias * s + t
    _set(layer, new_weight, new_bias)


@torch.no_grad()
def _fold_forward(layer: Any, s: Tensor, t: Tensor, repeat: int) -> None:
    s, t = s.repeat_interleave(repeat), t.repeat_interleave(repeat)
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(layer, nn.Linear):
        new_weight, new_bias = weight * s, bias + weight @ t
    else:
        groups = layer.groups
        per_group = weight.shape[1]
        out_per_group = weight.shape[0] // groups
        # input channel of weight[o, j] is (o // out_per_group) * per_group + j
        index = (torch.arange(weight.shape[0]) // out_per_group)[:, None] * per_group + torch.arange(per_group)
        scale, shift = s[index], t[index]
        spatial = (1,) * (weight.dim() - 2)
        new_weight = weight * scale.reshape(*scale.shape, *spatial)
        new_bias = bias + (weight * shift.reshape(*shift.shape, *spatial)).flatten(1).sum(1)
    _set(layer, new_weight, new_bias)


def _set(layer: Any, weight: Tensor, bias: Tensor) -> None:
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _apply(model: nn.Module, plans: Sequence[_Plan]) -> fx.GraphModule:
    """A traced eval copy of ``model`` with the folds of ``plans`` (not ``"kept"``) applied."""
    gm = _trace(separated_copy(model, [p.layer for p in plans if p.action != "kept" and p.target != p.layer]))
    nodes = {str(node.target): node for node in gm.graph.nodes if node.op == "call_module"}
    for plan in plans:
        if plan.action == "kept" or plan.into is None:
            continue
        node = nodes[plan.target]  # a folded BatchNorm is called once
        bn = gm.get_submodule(str(node.target))
        assert isinstance(bn, _BatchNorm)
        s, t = _affine(bn)
        target = gm.get_submodule(plan.into)
        if plan.action == "backward":
            _fold_backward(target, s, t)
        else:
            _fold_forward(target, s, t, plan.repeat)
        source = node.args[0]
        assert isinstance(source, fx.Node)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fold_batchnorm(
    model: nn.Module,
    example_inputs: Any,
    *,
    random_checks: int = 2,
    seed: int = 0,
) -> tuple[fx.GraphModule | nn.Module, FoldReport]:
    """A new eval-mode copy of ``model`` with its BatchNorm layers folded, and a report.

    In the copy every BatchNorm layer that folds exactly is merged into a neighbouring convolution or linear layer; the
    report says what was folded, what was kept and why.

    ``model`` itself is not changed (not even its mode). The copy is a ``torch.fx.GraphModule`` (traced with every
    BatchNorm layer kept as one call); a model that torch.fx cannot trace comes back as an eval copy with every
    BatchNorm kept and the reason in the report. A BatchNorm subclass whose forward is its normalization followed by
    its child modules (timm's ``BatchNormAct2d``: ``drop``, ``act``) has its normalization folded and its children
    left in its place; one whose forward is something else is kept.

    Args:
        model: any ``nn.Module`` with BatchNorm layers (``nn.Sequential``, torchvision or timm models, your own).
        example_inputs: the input of one forward: a tensor, or a tuple of the forward's positional arguments. Its
            shapes decide the shape-dependent folds (a flatten into a linear layer), and it is the first input of
            the exactness check.
        random_checks: further inputs, random with the shapes, dtypes and rough scale of ``example_inputs``, on
            which the folded model must give the unfolded model's outputs (within `RTOL`/`ATOL`).
        seed: seed of those random inputs.

    Returns:
        ``(folded_model, report)``.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
        ValueError: when ``random_checks`` is negative.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 2))
        >>> folded, report = fold_batchnorm(net, torch.randn(8, 1, 8, 8))
        >>> report.folded
        ['1', '3']
        >>> [d.action for d in report.decisions], [d.into for d in report.decisions]
        (['backward', 'forward'], ['0', '5'])
        >>> any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), net.training
        (False, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm: `model` must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(random_checks, int) or isinstance(random_checks, bool) or random_checks < 0:
        raise ValueError(f"fold_batchnorm: `random_checks` must be an integer >= 0, got {random_checks!r}.")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    reference = copy.deepcopy(model).eval()
    try:
        traced = _trace(copy.deepcopy(model).eval())
        ShapeProp(traced).propagate(*inputs)
    except Exception as err:  # torch.fx cannot trace every model (data-dependent control flow)
        reason = f"torch.fx could not trace the model ({type(err).__name__}: {err})"
        names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        return reference, FoldReport([FoldDecision(n, "kept", None, reason) for n in names])
    separated, refused = separable(traced, torch.Generator().manual_seed(seed))
    if separated:
        try:
            traced = _trace(separated_copy(model, list(separated)))
            ShapeProp(traced).propagate(*inputs)
        except Exception as err:  # the model's forward relies on the layer's class
            why = f"the model does not trace with the layer separated ({type(err).__name__}: {err})"
            refused.update(dict.fromkeys(separated, why))
            separated = {}
            traced = _trace(copy.deepcopy(model).eval())
    plans = _plan(traced, separated, refused)
    generator = torch.Generator().manual_seed(seed)
    checks = [inputs, *(random_like(inputs, generator) for _ in range(random_checks))]

    def check(folded: nn.Module) -> float | None:
        return output_difference(reference, folded, checks)

    folded = _apply(model, plans)
    worst = check(folded)
    if worst is None:  # find the fold(s) that fail, one at a time
        accepted: list[_Plan] = []
        for i, plan in enumerate(plans):
            if plan.action == "kept":
                accepted.append(plan)
                continue
            trial = _apply(model, [*accepted, plan])
            if check(trial) is None:
                reason = f"the {plan.action} fold into {plan.into} did not pass the exactness check; undone"
                plans[i] = replace(plan, action="kept", into=None, reason=reason)
                accepted.append(plans[i])
            else:
                accepted.append(plan)
        folded = _apply(model, plans)
        worst = check(folded)
        assert worst is not None, "the folds that passed one at a time failed together"
    report = FoldReport([FoldDecision(p.layer, p.action, p.into, p.reason) for p in plans], max_abs_diff=worst)
    return folded, report


__all__ = ["ATOL", "RTOL", "FoldDecision", "FoldReport", "fold_batchnorm", "output_difference"]
