"""Training dynamics of BatchNorm + SGD: scale-invariant weights, effective LR, angular updates (pure torch).

A weight vector whose output a BatchNorm normalizes (directly, or through positively homogeneous operations such as
ReLU or max pooling) is *scale-invariant*: multiplying it by ``c > 0`` leaves the network's output unchanged. Its
gradient is then orthogonal to it and shrinks as ``1 / ||w||``, so SGD's real step is the angle the vector rotates,
about ``lr / ||w||^2`` per unit of normalized gradient (van Laarhoven 2017, arXiv 1706.05350; Hoffer et al. 2018,
arXiv 1803.01814). With weight decay, the norm and the angular update per step settle to an equilibrium (Wan et al.
2021, "Spherical Motion Dynamics", arXiv 2006.08419; Kosson et al. 2023, "Rotational Equilibrium", arXiv
2305.17212).

* `find_scale_invariant` finds such weights on the model at hand, numerically: it scales each candidate weight
  and compares the model's outputs in train mode on a probe batch, instead of trusting module order.
* `effective_lr`, `angular_update` and `equilibrium_angular_update` are the small pure functions of the math.

Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter

from lightning_bnsgd._validation import check_choice, check_number
from lightning_bnsgd.bn.batches import ForwardFn, default_forward

ProbeMode = Literal["train", "as_is"]
#: A random perturbation changing the output less than this (relative) means the output ignores the weight.
_NO_EFFECT = 1e-6
Granularity = Literal["channel", "tensor"]
_GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
_MODES: tuple[str, ...] = get_args(ProbeMode)


# ---------------------------------------------------------------------------------------------------- the math
def effective_lr(lr: float, weight_norm: float) -> float:
    """The effective learning rate of a scale-invariant weight: ``lr / ||w||^2``.

    For a scale-invariant ``w`` the gradient scales as ``1 / ||w||``, so one SGD step rotates ``w`` by about
    ``lr * ||g(w / ||w||)|| / ||w||^2`` radians: halving the norm quadruples the step (van Laarhoven 2017,
    Hoffer et al. 2018). Returns ``inf`` for a zero norm.

    Examples:
        >>> effective_lr(0.1, 2.0)
        0.025
    """
    return lr / weight_norm**2 if weight_norm > 0 else math.inf


def angular_update(before: Tensor, after: Tensor) -> Tensor:
    """The angle (radians, a 0-d tensor on the inputs' device) between two snapshots of a weight, as flat vectors.

    Computed as ``2 * atan2(||u - v||, ||u + v||)`` on the unit vectors ``u``, ``v``, which stays accurate for the
    tiny angles of one SGD step (``acos`` of the cosine loses them to rounding). NaN if either norm is zero.

    Examples:
        >>> round(float(angular_update(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))), 6)
        0.785398
        >>> float(angular_update(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])))
        0.0
    """
    return _norm_and_angle(before, after)[1]


def _norm_and_angle(before: Tensor, after: Tensor) -> tuple[Tensor, Tensor]:
    """``(||after||, angular_update(before, after))`` as 0-d float64 tensors on the inputs' device.

    Computed in place, in three float64 temporaries of the weight's size (the unit vectors and their sum).

    Examples:
        >>> [round(float(t), 6) for t in _norm_and_angle(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 3.0]))]
        [4.242641, 0.785398]
    """
    u = before.detach().flatten().to(torch.float64, copy=True)
    v = after.detach().flatten().to(torch.float64, copy=True)
    norm = torch.linalg.vector_norm(v)
    u.div_(torch.linalg.vector_norm(u))
    v.div_(norm)
    plus = torch.linalg.vector_norm(u + v)
    return norm, 2 * torch.atan2(torch.linalg.vector_norm(u.sub_(v)), plus)


def equilibrium_angular_update(
    lr: float, weight_decay: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0
) -> float:
    """The expected angular update per step (radians) of a scale-invariant weight at equilibrium under SGD.

    For SGD with L2 weight decay ``wd`` and heavy-ball momentum ``m`` (``torch.optim.SGD``) it is
    ``sqrt(2 * lr * wd / (1 + m))``: the equilibrium angular update of Wan et al. 2021 ("Spherical Motion
    Dynamics", NeurIPS 2021, arXiv 2006.08419) and the SGDM prediction of Kosson et al. 2023 ("Rotational
    Equilibrium", arXiv 2305.17212), derived for a random walk whose gradients are orthogonal to the weight (checked
    against ``torch.optim.SGD`` by simulation in ``tests/unit/test_dynamics.py``). With ``nesterov=True`` the
    step is ``g + m * buf`` instead of ``buf``: the same total displacement (so the same equilibrium norm) but a
    larger share of the current gradient, which multiplies the expected angular update by
    ``sqrt(1 + 2m - 2m^3)`` (our derivation under the same assumptions, checked the same way). ``dampening``
    scales every step by ``1 - dampening``, i.e. acts as ``lr * (1 - dampening)``. Zero without weight decay: there
    is no equilibrium, the norm grows and the effective LR decays.

    Examples:
        >>> round(equilibrium_angular_update(0.1, 5e-4, momentum=0.9), 6)
        0.007255
        >>> round(equilibrium_angular_update(0.1, 5e-4, momentum=0.9, nesterov=True), 6)
        0.008404
        >>> equilibrium_angular_update(0.1, 0.0)
        0.0
    """
    check_number("lr", lr, 0.0, owner="equilibrium_angular_update")
    check_number("weight_decay", weight_decay, 0.0, owner="equilibrium_angular_update")
    check_number("momentum", momentum, 0.0, 1.0, max_open=True, owner="equilibrium_angular_update")
    check_number("dampening", dampening, 0.0, 1.0, owner="equilibrium_angular_update")
    base = 2.0 * lr * (1.0 - dampening) * weight_decay / (1.0 + momentum)
    if nesterov:
        base *= 1.0 + 2.0 * momentum - 2.0 * momentum**3
    return math.sqrt(base)


def sgd_group_equilibrium(group: dict[str, Any]) -> float | None:
    """`equilibrium_angular_update` for one ``torch.optim.SGD``-style param group, or ``None`` if it has no momentum.

    Reads ``lr``, ``weight_decay``, ``momentum``, ``nesterov`` and ``dampening`` as ``torch.optim.SGD`` stores them.
    A group without a ``momentum`` entry (Adam and other optimizers) gets ``None``: the formula is for SGD only.

    Examples:
        >>> round(sgd_group_equilibrium({"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}), 6)
        0.007255
        >>> sgd_group_equilibrium({"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}) is None
        True
    """
    if "momentum" not in group or "betas" in group:
        return None
    return equilibrium_angular_update(
        float(group["lr"]),
        float(group.get("weight_decay", 0.0)),
        float(group.get("momentum", 0.0)),
        bool(group.get("nesterov", False)),
        float(group.get("dampening", 0.0)),
    )


# ---------------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class ScaleInvariantGroup:
    """Parameters that are scale-invariant together (a weight, or a weight and the bias before a BatchNorm).

    Attributes:
        name: the module's name, as in ``model.named_modules()``.
        params: the parameter names, as in ``model.named_parameters()`` (the weight first).
        granularity: ``"channel"`` when every output channel (slice along dimension 0) is invariant on its own,
            ``"tensor"`` when only a common factor leaves the output unchanged.
        deviation: the output change measured while scaling, relative to the change a random perturbation of the
            weight causes (float rounding and BatchNorm's ``eps`` keep it above 0).
    """

    name: str
    params: tuple[str, ...]
    granularity: Granularity
    deviation: float


@dataclass
class ScaleInvarianceReport:
    """What `find_scale_invariant` found: the invariant groups and, per rejected layer, why.

    Attributes:
        groups: the scale-invariant parameter groups, in the order of ``model.named_modules()``.
        rejected: layer name -> the reason it is not scale-invariant (e.g. the relative output change measured).
        factor: the scale factor tried.
        rtol: the output change (relative to a random perturbation's) below which a layer counted as invariant.
    """

    groups: list[ScaleInvariantGroup] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    factor: float = 2.0
    rtol: float = 1e-2

    @property
    def names(self) -> list[str]:
        """The names of the layers whose weights are scale-invariant."""
        return [g.name for g in self.groups]

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} scale-invariant layer(s), {len(self.rejected)} rejected"]
        lines += [f"  invariant {g.name}: {', '.join(g.params)} (per {g.granularity})" for g in self.groups]
        lines += [f"  rejected  {name}: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules owning a trainable ``weight`` of 2 or more dimensions (conv, linear, ...), as ``(name, module)``.

    These are the candidates of `find_scale_invariant` and the layers of a gradient-flow picture. Lazy modules
    whose weight is not materialized yet are left out.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        >>> [name for name, _ in weight_layers(net)]
        ['0']
    """
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, _BatchNorm) or not isinstance(weight, nn.Parameter):
            continue
        if isinstance(weight, UninitializedParameter) or weight.dim() < 2 or not weight.requires_grad:
            continue
        found.append((name, module))
    return found


def _flat_outputs(output: Any, detach: bool = True) -> list[Tensor]:
    collected: list[Tensor] = []
    apply_to_collection(output, Tensor, lambda t: collected.append((t.detach() if detach else t).float().flatten()))
    return collected


def _relative_change(reference: Sequence[Tensor], other: Sequence[Tensor]) -> float:
    """``||new - ref|| / ||ref||`` over all output tensors together (inf when not finite)."""
    diff = math.sqrt(sum(float(torch.sum((new - ref) ** 2)) for ref, new in zip(reference, other, strict=True)))
    norm = math.sqrt(sum(float(torch.sum(ref**2)) for ref in reference))
    change = diff / max(norm, 1e-30)
    return change if math.isfinite(change) else math.inf


class _Probe:
    """Runs the probe forward with a fixed RNG seed, so dropout draws the same masks every time."""

    def __init__(self, model: nn.Module, batch: Any, forward_fn: ForwardFn, seed: int) -> None:
        self.model, self.batch, self.forward_fn, self.seed = model, batch, forward_fn, seed
        self.cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})

    def __call__(self, grad: bool = False) -> list[Tensor]:
        with torch.random.fork_rng(devices=self.cuda), torch.set_grad_enabled(grad):
            # Seed only the generators in use (torch.manual_seed also queues a lazy seed for every CUDA device).
            torch.random.default_generator.manual_seed(self.seed)
            for index in self.cuda:
                torch.cuda.default_generators[index].manual_seed(self.seed)
            outputs = _flat_outputs(self.forward_fn(self.model, self.batch), detach=not grad)
        if not outputs:
            raise ValueError(
                "find_scale_invariant: the forward returned no tensor to compare; pass a `forward_fn` that "
                "returns the model's output."
            )
        return outputs

    def change(self, reference: list[Tensor], scales: Sequence[tuple[Tensor, Tensor | float]]) -> float:
        """Relative output change with every ``param`` multiplied by its ``factor`` (restored afterwards)."""
        saved = [p.detach().clone() for p, _ in scales]
        try:
            with torch.no_grad():
                for p, factor in scales:
                    p.mul_(factor)
            return _relative_change(reference, self())
        finally:
            with torch.no_grad():
                for (p, _), old in zip(scales, saved, strict=True):
                    p.copy_(old)


def _channel_factors(weight: Tensor, generator: torch.Generator) -> Tensor:
    factors = 0.5 + 1.5 * torch.rand(weight.shape[0], generator=generator)
    return factors.to(weight.device, weight.dtype).view(-1, *([1] * (weight.dim() - 1)))


def _check_layer(
    probe: _Probe,
    reference: list[Tensor],
    name: str,
    module: nn.Module,
    factor: float,
    rtol: float,
    gen: torch.Generator,
) -> ScaleInvariantGroup | str:
    """The layer's invariant group, or the reason it has none.

    Every output change is measured relative to the change that a random, non-uniform perturbation of the weight
    (each entry times ``1 + N(0, 1)``) causes, so layers with a small influence on the output are judged fairly.
    Per-channel factors are tried first (the common case, and it implies whole-tensor invariance), then ``factor``
    for the whole tensor; each time the weight alone, then with its bias.
    """
    members = _members(module)
    weight = members[0][1]
    noise = torch.randn(weight.shape, generator=gen).to(weight.device, weight.dtype)
    influence = probe.change(reference, [(weight, 1.0 + noise)])
    if influence <= _NO_EFFECT:
        return "the output does not depend on this weight (not used by the probe forward)"
    options = [members[:1], members] if len(members) > 1 else [members]
    channels = _channel_factors(weight, gen)
    worst = math.inf
    scales: list[tuple[Tensor, Tensor | float]]
    for granularity in _GRANULARITIES:
        for members in options:
            if granularity == "channel":
                if not all(p.dim() >= 1 and p.shape[0] == weight.shape[0] for _, p in members):
                    continue
                scales = [(p, channels.view(-1, *([1] * (p.dim() - 1)))) for _, p in members]
            else:
                scales = [(p, factor) for _, p in members]
            change = probe.change(reference, scales) / influence
            if change <= rtol:
                prefix = f"{name}." if name else ""
                return ScaleInvariantGroup(name, tuple(prefix + n for n, _ in members), granularity, change)
            if granularity == "tensor":
                worst = min(worst, change)
    return f"scaling the weight by {factor:g} changes the output {worst:.2g}x as much as a random perturbation"


def _members(module: nn.Module) -> list[tuple[str, Tensor]]:
    members: list[tuple[str, Tensor]] = [("weight", _as_tensor(module.weight))]
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        members.append(("bias", bias))
    return members


def _as_tensor(value: object) -> Tensor:
    assert isinstance(value, Tensor)
    return value


def _channel_sums(weight: Tensor, grad: Tensor | None) -> Tensor:
    """Per output channel (slice along dimension 0): ``<grad, w>``, ``||w||^2`` and ``||grad||^2``, a ``(3, C)`` tensor.

    The tensor is float64; a 0-d parameter counts as one channel; no gradient counts as a zero one.

    Dot products in the parameter's precision (float32 for half-precision parameters), which torch sums pairwise:
    their rounding (about ``1e-6 ||w|| ||grad||``) stays far below the tolerance (``rtol`` times a random
    direction's cosine, about ``1e-2 / sqrt(entries per channel)``), at a fraction of the cost of float64 copies.
    The per-tensor sums are sums of these.
    """
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    w = weight.detach().reshape(weight.shape[0] if weight.dim() else 1, -1).to(dtype)
    g = torch.zeros_like(w) if grad is None else grad.detach().reshape(w.shape).to(dtype)
    dot = torch.linalg.vecdot
    return torch.stack([dot(w, g), dot(w, w), dot(g, g)]).double()


def _channel_cosines(sums: list[Tensor]) -> Tensor:
    """Per output channel: ``|<grad, w>| / (||grad|| ||w||)`` over the members' `_channel_sums` together.

    Euler's identity: ``d/dc f(c w) = <grad f(w), w>`` at ``c = 1``, so a scale-invariant ``w`` has a gradient
    orthogonal to it, for every function of the output.
    """
    if any(t.shape[1] != sums[0].shape[1] for t in sums):
        return torch.full((1,), math.inf, dtype=torch.float64, device=sums[0].device)
    dots, w_sq, g_sq = torch.stack(sums).sum(0)
    return dots.abs() / (w_sq * g_sq).sqrt().clamp_min(1e-300)


def _screen(
    probe: _Probe, candidates: list[tuple[str, nn.Module]], rtol: float, gen: torch.Generator
) -> tuple[list[ScaleInvariantGroup], dict[str, str], list[Tensor]]:
    """One forward and backward of a random projection of the output, then Euler's identity per channel and per tensor.

    The backward gives every candidate's gradient; the identity is checked for the weight alone and for weight and bias
    together. Also returns the forward's outputs (detached): the reference outputs of the probe.
    """
    outputs = probe(grad=True)
    projection = torch.stack([(out * torch.randn(out.shape, generator=gen).to(out)).sum() for out in outputs]).sum()
    params = [p for _, m in candidates for _, p in _members(m)]
    grads = torch.autograd.grad(projection, params, allow_unused=True) if params else ()
    by_param = dict(zip(map(id, params), grads, strict=True))
    reference = [out.detach() for out in outputs]
    # Every number on the device first, then one transfer to the host for all layers.
    values: list[Tensor] = []
    layout: list[tuple[str, int, list[tuple[list[tuple[str, Tensor]], Granularity, int]]]] = []
    for name, module in candidates:
        members = _members(module)
        sums = [_channel_sums(p, by_param[id(p)]) for _, p in members]
        sizes = [p.numel() for _, p in members]
        used = by_param[id(members[0][1])] is not None
        layout.append((name, len(values), []))
        values.append(sums[0][2].sum() if used else torch.zeros((), dtype=torch.float64, device=sums[0].device))
        for granularity in _GRANULARITIES:
            for count in (1, 2)[: len(members)]:
                part, size = sums[:count], sum(sizes[:count])
                if granularity == "channel":
                    if any(t.shape[1] != part[0].shape[1] for t in part):
                        continue
                    value = _channel_cosines(part).max() * math.sqrt(size / part[0].shape[1])
                else:
                    dot, w_sq, g_sq = torch.stack([t.sum(1) for t in part]).sum(0)
                    value = dot.abs() / (w_sq * g_sq).sqrt().clamp_min(1e-300) * math.sqrt(size)
                layout[-1][2].append((members[:count], granularity, len(values)))
                values.append(value)
    host = torch.stack(values).cpu().tolist() if values else []
    groups: list[ScaleInvariantGroup] = []
    rejected: dict[str, str] = {}
    for name, used_at, options in layout:
        if not host[used_at] > 0:
            rejected[name] = "the output does not depend on this weight (not used by the probe forward)"
            continue
        prefix = f"{name}." if name else ""
        passed = [(chosen, granularity, host[at]) for chosen, granularity, at in options if host[at] <= rtol]
        if passed:  # the first option that passes, in the order channel/tensor, weight alone/with its bias
            chosen, granularity, value = passed[0]
            groups.append(ScaleInvariantGroup(name, tuple(prefix + n for n, _ in chosen), granularity, value))
        else:
            worst = min((host[at] for _, granularity, at in options if granularity == "tensor"), default=math.inf)
            rejected[name] = (
                "the output changes with the weight's scale: its gradient is not orthogonal to it (cosine "
                f"{worst:.2g}x a random direction's)"
            )
    return groups, rejected, reference


def _confirm(
    probe: _Probe,
    reference: list[Tensor],
    groups: list[ScaleInvariantGroup],
    model: nn.Module,
    factor: float,
    rtol: float,
    gen: torch.Generator,
) -> bool:
    """Scale every screened group at once (per channel or as a whole) and compare the outputs.

    The comparison is relative to the change a random perturbation of the same weights causes.
    """
    params = dict(model.named_parameters())
    scales: list[tuple[Tensor, Tensor | float]] = []
    noise: list[tuple[Tensor, Tensor | float]] = []
    for group in groups:
        members = [params[p] for p in group.params]
        factors = _channel_factors(members[0], gen) if group.granularity == "channel" else None
        for p in members:
            scales.append((p, factor if factors is None else factors.view(-1, *([1] * (p.dim() - 1)))))
        noise.append((members[0], 1.0 + torch.randn(members[0].shape, generator=gen).to(members[0])))
    if not scales:
        return True
    return probe.change(reference, scales) <= rtol * probe.change(reference, noise)


@contextmanager
def _local_batch_norm(model: nn.Module) -> Iterator[None]:
    """Inside, every ``SyncBatchNorm`` layer normalizes with this process's batch statistics.

    That is ``_BatchNorm``'s own forward: the probe runs on one process, where a collective would wait for the other
    ranks forever. Scale invariance is the same under either statistics.
    """
    patched = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    for module in patched:
        module.forward = types.MethodType(_BatchNorm.forward, module)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _set_train(model: nn.Module, mode: ProbeMode) -> dict[nn.Module, bool]:
    flags = {m: m.training for m in model.modules()}
    if mode == "train":
        model.train()
    return flags


def find_scale_invariant(
    model: nn.Module,
    batch: Any,
    forward_fn: ForwardFn | None = None,
    *,
    layers: Iterable[tuple[str, nn.Module]] | None = None,
    factor: float = 2.0,
    rtol: float = 1e-2,
    mode: ProbeMode = "train",
    seed: int = 0,
) -> ScaleInvarianceReport:
    """Find the weights whose scale the model's output does not depend on, by trying it on a probe batch.

    Three forwards and one backward, whatever the number of layers. (1) A screen: one forward (its outputs are the
    reference) and the backward of a random projection of the outputs give every candidate's gradient; a
    scale-invariant weight has a gradient orthogonal to it (Euler's identity, ``d/dc f(c w) = <grad, w>``), per
    output channel (slice along dimension 0) or only for the whole tensor, the weight alone or with its bias (a bias
    before a BatchNorm that follows a ReLU is invariant only with its weight); a weight without gradient is not
    used. (2, 3) The numerical check: every
    screened group is scaled at once (by a random factor in [0.5, 2] per channel, or by ``factor``) and the change
    of the outputs is compared with the change a random perturbation of the same weights causes. Should that
    check fail, each layer is tested on its own by scaling (a few forwards per layer). Parameters, BatchNorm
    buffers, training flags and the global RNG state are restored; dropout draws the same masks in every forward.
    ``SyncBatchNorm`` layers use this process's batch statistics (no collective: other processes need not take
    part).

    Args:
        model: the network.
        batch: a probe batch, as ``forward_fn`` takes it (a few samples per BatchNorm channel are enough).
        forward_fn: ``forward_fn(model, batch)`` returns the output to compare (tensors, or any collection of
            them); default: ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list.
        layers: the ``(name, module)`` candidates (default: `weight_layers` of ``model``).
        factor: the scale factor tried (> 0, not 1).
        rtol: tolerance of both tests: the cosine between gradient and weight, in units of a random direction's
            (about ``1 / sqrt(size)``), and the output change when scaling, relative to the change caused by a
            random perturbation of the weights (each entry times ``1 + N(0, 1)``); changes are ``||y' - y|| / ||y||``
            over all output tensors. BatchNorm's ``eps`` breaks invariance slightly for channels of tiny variance.
        mode: ``"train"`` compares outputs with every module in train mode (batch statistics); ``"as_is"`` keeps
            the current training flags (BatchNorm layers frozen in eval mode then make nothing before them
            invariant, which is what training sees).
        seed: the RNG seed of every probe forward.

    Returns:
        A `ScaleInvarianceReport`: the invariant groups and, per rejected candidate, the measured change.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
        >>> report = find_scale_invariant(net, torch.randn(8, 1, 8, 8))
        >>> [(g.name, g.params, g.granularity) for g in report.groups]
        [('0', ('0.weight', '0.bias'), 'channel')]
        >>> list(report.rejected)
        ['4']
    """
    check_number("factor", factor, 0.0, min_open=True, owner="find_scale_invariant")
    if factor == 1.0:
        raise ValueError("find_scale_invariant: `factor` must differ from 1, got 1.0.")
    check_number("rtol", rtol, 0.0, min_open=True, owner="find_scale_invariant")
    check_choice("mode", mode, _MODES, owner="find_scale_invariant")
    forward = forward_fn if forward_fn is not None else default_forward
    candidates = list(weight_layers(model) if layers is None else layers)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    flags = _set_train(model, mode)
    report = ScaleInvarianceReport(factor=float(factor), rtol=float(rtol))
    try:
        with _local_batch_norm(model):
            probe = _Probe(model, batch, forward, seed)
            gen = torch.Generator().manual_seed(seed)
            groups, rejected, reference = _screen(probe, candidates, float(rtol), gen)
            if _confirm(probe, reference, groups, model, float(factor), float(rtol), gen):
                report.groups, report.rejected = groups, rejected
            else:  # the screen let a layer through that scaling exposes: test each layer on its own
                for name, module in candidates:
                    found = _check_layer(probe, reference, name, module, float(factor), float(rtol), gen)
                    if isinstance(found, ScaleInvariantGroup):
                        report.groups.append(found)
                    else:
                        report.rejected[name] = found
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for module, flag in flags.items():
            module.training = flag
    return report


__all__ = [
    "ScaleInvarianceReport",
    "ScaleInvariantGroup",
    "angular_update",
    "effective_lr",
    "equilibrium_angular_update",
    "find_scale_invariant",
    "sgd_group_equilibrium",
    "weight_layers",
]
