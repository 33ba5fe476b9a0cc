"""Unit tests of ``BNStatsMonitor``'s parts: layer-name patterns, the layout of a monitored step's tensor, the
once-per-layer warnings' checkpoint form."""

from __future__ import annotations

import pytest
import torch

from lightning_bnsgd.bn.inspect import ANOMALIES, BUFFER_STATS, GAP_STATS
from lightning_bnsgd.callbacks._monitor_layout import RANK_STATS, StepLayout
from lightning_bnsgd.callbacks._name_patterns import compile_name_patterns, select_layer_names, user_module_name
from lightning_bnsgd.callbacks._warn_once import WarnOnce


def test_name_patterns_glob_and_regex() -> None:
    names = ["net.features.0.norm", "net.features.1.norm", "head.bn"]
    assert select_layer_names(names, compile_name_patterns("*.0.*", "include", "BNStatsMonitor")) == [names[0]]
    assert (
        select_layer_names(names, compile_name_patterns(r"re:features\.\d", "include", "BNStatsMonitor")) == names[:2]
    )
    exclude = compile_name_patterns(["head.*", "re:1"], "exclude", "BNStatsMonitor")
    assert select_layer_names(names, (), exclude) == [names[0]]
    assert select_layer_names(names) == names
    with pytest.raises(ValueError, match=r"^BNStatsMonitor: `exclude`.*invalid regular expression.*re:\("):
        compile_name_patterns(["re:("], "exclude", "BNStatsMonitor")
    with pytest.raises(ValueError, match="`include`"):
        compile_name_patterns([""], "include", "BNStatsMonitor")
    with pytest.raises(TypeError, match="`include`"):
        compile_name_patterns(3, "include", "BNStatsMonitor")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`include` patterns"):
        compile_name_patterns(["ok", 4], "include", "BNStatsMonitor")  # type: ignore[list-item]


def _parts(layers: int, offset: float) -> dict[str, torch.Tensor]:
    def block(columns: int, start: float) -> torch.Tensor:
        return torch.arange(layers * columns, dtype=torch.float32).view(layers, columns) + start

    return {
        "summary": block(len(BUFFER_STATS), offset),
        "gaps": block(len(GAP_STATS), offset + 1000),
        "flags": block(len(ANOMALIES), offset + 2000),
        "frozen_changed": torch.arange(layers, dtype=torch.float32) + offset + 3000,
    }


@pytest.mark.parametrize("has_rank", [False, True])
def test_step_layout_round_trip(has_rank: bool) -> None:
    parts = _parts(3, 0.0)
    rank = torch.arange(3 * len(RANK_STATS), dtype=torch.float32).view(3, -1) + 4000 if has_rank else None
    hist = [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)]
    layout = StepLayout(3, has_rank, (("a", "weight", 2), ("b", "running_var", 3)))
    flat = layout.pack(parts["summary"], parts["gaps"], rank, parts["flags"], parts["frozen_changed"], hist)
    assert flat.dtype == torch.float32 and flat.numel() == sum(layout.sizes())
    values = layout.unpack(flat)
    assert values.summary == parts["summary"].tolist()
    assert values.gaps == parts["gaps"].tolist()
    assert values.flags == parts["flags"].tolist()
    assert values.frozen_changed == parts["frozen_changed"].tolist()
    assert values.rank_diff == (rank.tolist() if rank is not None else None)
    assert [(layer, name, t.tolist()) for layer, name, t in values.histograms] == [
        ("a", "weight", [1.0, 2.0]),
        ("b", "running_var", [5.0, 6.0, 7.0]),
    ]


def test_step_layout_rejects_parts_that_do_not_match() -> None:
    parts = _parts(2, 0.0)
    layout = StepLayout(2, has_rank=False)
    with pytest.raises(ValueError, match="do not match"):
        layout.pack(parts["summary"], parts["gaps"], torch.zeros(2, 2), parts["flags"], parts["frozen_changed"])
    with pytest.raises(ValueError, match="sizes"):
        layout.pack(parts["summary"], parts["gaps"][:1], None, parts["flags"], parts["frozen_changed"])


def test_user_module_names_drop_what_torch_compile_adds() -> None:
    compiled = torch.compile(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)), backend="eager")
    holder = torch.nn.Module()
    holder.net = compiled
    names = [n for n, m in holder.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert names == ["net._orig_mod.1"]
    assert [user_module_name(n) for n in names] == ["net.1"]
    assert user_module_name("net.orig_mod_like._orig_mod_x") == "net.orig_mod_like._orig_mod_x"  # whole parts only


@pytest.mark.parametrize("rows", [5, "net.bn1", [["net.bn1"]], [["net.bn1", 1]], [("a", "b", "c")], [None]])
def test_warn_once_load_refuses_rows_that_are_not_string_pairs(rows: object) -> None:
    with pytest.raises(ValueError, match=r"^BNStatsMonitor: `warned` must be a list of \[layer, kind\] string pairs"):
        WarnOnce.load(rows, owner="BNStatsMonitor")  # type: ignore[arg-type]


def test_warn_once_round_trip() -> None:
    seen = WarnOnce.load([["net.bn1", "frozen"], ("net.bn2", "nonfinite_weight")])
    assert seen.state() == [["net.bn1", "frozen"], ["net.bn2", "nonfinite_weight"]]
    assert not seen.first("net.bn2", "nonfinite_weight") and seen.first("net.bn2", "frozen")
