"""The collector of mode ``"sequential"``: one pass per layer, that layer alone in train mode.

A layer pass estimates one target layer (given, or the first one its forwards reach that is not estimated yet);
every other layer runs in eval mode. Every call of the estimated layer is recorded through hooks, and the forward
ends after its last call: the first forward of each batch shape runs to the end and notes the calls (`traces`),
later forwards of that shape stop after as many calls. Between two calls of the estimated layer, what follows sees
the call's output as at inference. With SyncBatchNorm every forward runs to the end, so all processes run the
same layers. Records and merges are `StatsCollector`'s. Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_bnsgd.bn.buffers import FlatBuffers
from lightning_bnsgd.bn.collector import StatsCollector, StopForward, _run_hooked, batch_signature


class SequentialCollector(StatsCollector):
    """`StatsCollector` whose forwards are those of layer passes (see the module doc)."""

    def __init__(self, layers: list[_BatchNorm], buffers: FlatBuffers, reset_after_read: bool) -> None:
        super().__init__(layers, buffers, reset_after_read)
        # the layers already estimated, while a layer pass is open (else None)
        self._estimated: set[int] | None = None
        self._target: int | None = None  # the layer the open pass must estimate (None: the first one left)
        self._claimed: int | None = None  # the layer the open pass estimates, once a forward reached it
        self._held: Tensor | None = None  # that layer's statistics before the pass ([mean; var])
        self._claimed_calls = 0  # its calls in the current forward
        self._inner = False  # a forward of the claimed layer run by our own hook (not recorded)
        #: Per batch signature, the target layers the shape's first forward called, in order.
        self.traces: dict[tuple[Any, ...], list[int]] = {}
        self._call_counts: dict[tuple[Any, ...], list[int]] = {}  # per signature: calls of each target layer

    def open_layer_pass(self, estimated: set[int], target: int | None = None) -> None:
        """Mode "sequential": the next pass estimates ``target``, or (``None``) the first new layer its forwards reach.

        A new layer is one not in ``estimated``. It alone runs in train mode; every forward ends right after its last
        call (as many calls as the first forward of the same batch shape made: `traces`).
        """
        self._estimated = estimated
        self._target = target
        self._claimed = None
        if target is not None:
            self._parts[target].clear()  # a new estimate replaces the previous one

    def close_layer_pass(self) -> int | None:
        """End the layer pass: the estimated layer goes back to eval mode.

        Returns its index (``None``: the forwards reached no layer left to estimate).
        """
        index = self._claimed
        if index is not None:
            self.layers[index].training = False
        self._estimated = None
        self._target = None
        self._claimed = None
        self._held = None
        return index

    def repeated_layers(self) -> bool:
        """Mode "sequential": whether a forward called some target layer more than once (a shared layer)."""
        return any(len(trace) != len(set(trace)) for trace in self.traces.values())

    def _claim(self, index: int) -> None:
        if self._estimated is None or self._claimed is not None:
            return
        if index == self._target or (self._target is None and index not in self._estimated):
            self._claimed = index
            self._held = self.buffers.view(index).clone()
            self.layers[index].training = True

    def forward(self, run: Callable[[], Any], batch: Any, learn: bool) -> None:
        """One forward of ``batch`` in the open layer pass (``learn`` is not used: a layer pass reads hooks)."""
        if self._estimated is None:  # no layer pass open
            super().forward(run, batch, learn)
            return
        self._sequential_forward(run, batch)
        self._next_forward()

    def _sequential_forward(self, run: Callable[[], Any], batch: Any) -> None:
        """One forward of a layer pass: the claimed layer's every call is recorded.

        The forward ends after the layer's last call, as the shape's first forward (which runs to the end and is traced)
        counted them.
        """
        signature = batch_signature(batch)
        trace = self.traces.get(signature)
        # With SyncBatchNorm every process must run the same layers in every step (their collectives pair up), but
        # each traces its own new batch shapes: forwards then run to the end, on every process alike.
        calls = None if trace is None or self.lockstep else self._call_counts[signature]
        called: list[int] = []
        self._claimed_calls = 0
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._sequential_pre_hook(i, called)))
            handles.append(layer.register_forward_hook(self._sequential_hook(i, calls)))
        _run_hooked(run, handles)
        if trace is None:
            self.traces[signature] = called
            self._call_counts[signature] = [called.count(i) for i in range(len(self.layers))]

    def _sequential_pre_hook(self, index: int, called: list[int]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._inner:
                return
            called.append(index)
            self._claim(index)

        return hook

    def _sequential_hook(self, index: int, counts: list[int] | None) -> Callable[..., Any]:
        calls = None if counts is None else counts[index]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._inner or index != self._claimed:
                return None
            self._record(index, args[0])
            self._claimed_calls += 1
            if calls is not None and self._claimed_calls >= calls:
                raise StopForward
            # The forward goes on, maybe to another call of this layer: what follows sees this call's output as at
            # inference, normalized with the layer's statistics from before the pass (the later rounds of mode
            # "sequential" bring them to their final values).
            assert self._held is not None
            self.buffers.view(index).copy_(self._held)
            return self._eval_output(index, args)

        return hook

    def _eval_output(self, index: int, args: Any) -> Any:
        """The claimed layer's output at inference for these inputs.

        Computed with torch's kernel for its own layers and for synchronizing ones, whose forward may hold collectives;
        with the layer's own forward for other subclasses.
        """
        layer = self.layers[index]
        layer.training = False
        self._inner = True
        try:
            if type(layer).forward is _BatchNorm.forward or self.synced[index]:
                return F.batch_norm(
                    args[0], layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
                )
            return layer(*args)
        finally:
            self._inner = False
            layer.training = True


__all__ = ["SequentialCollector"]
