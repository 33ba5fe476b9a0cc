"""Unit tests of the monitors' parts: layer-name patterns, the one host transfer of a monitored step and its
values, the once-per-layer warnings' checkpoint form."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_bnsgd.bn._host import to_host
from lightning_bnsgd.bn.inspect import ANOMALIES, BUFFER_STATS, GAP_STATS
from lightning_bnsgd.callbacks._cadence import ends_with_step, is_logging_step
from lightning_bnsgd.callbacks._monitor_layout import RANK_STATS, StepValues
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
def test_step_values_round_trip_through_one_host_transfer(has_rank: bool) -> None:
    parts = _parts(3, 0.0)
    rank = torch.arange(3 * len(RANK_STATS), dtype=torch.float32).view(3, -1) + 4000 if has_rank else None
    hist = [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)]
    device = (parts["summary"], parts["gaps"], rank, parts["flags"], parts["frozen_changed"], hist)
    summary, gaps, rank_host, flags, frozen, hist_host = to_host(device)
    moved = [summary, gaps, flags, frozen, *hist_host, *([rank_host] if has_rank else [])]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in moved)
    assert sum(t.numel() for t in moved) == sum(t.numel() for t in _leaves(device))
    named = [("a", "weight", hist_host[0]), ("b", "running_var", hist_host[1])]
    values = StepValues.from_host(summary, gaps, rank_host, flags, frozen, named)
    assert values.summary == parts["summary"].tolist()
    assert values.gaps == parts["gaps"].tolist()
    assert values.flags == parts["flags"].tolist()
    assert values.frozen_changed == parts["frozen_changed"].tolist()
    assert values.rank_diff == (rank.tolist() if rank is not None else None)
    assert [(layer, name, t.tolist()) for layer, name, t in values.histograms] == [
        ("a", "weight", [1.0, 2.0]),
        ("b", "running_var", [5.0, 6.0, 7.0]),
    ]


def _leaves(values: object) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _leaves(v)]
    return []


def test_to_host_keeps_structure_shapes_and_non_tensors() -> None:
    nested = [torch.ones(2, 3), (torch.tensor(2.0), None, [torch.arange(4, dtype=torch.int64)]), "name"]
    host = to_host(nested, torch.float64)
    assert isinstance(host, list) and isinstance(host[1], tuple) and host[1][1] is None and host[2] == "name"
    assert host[0].shape == (2, 3) and host[1][0].shape == () and host[1][2][0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert all(t.dtype == torch.float64 for t in (host[0], host[1][0], host[1][2][0]))
    assert to_host([None, "x"]) == [None, "x"]
    norms = to_host([(torch.tensor(2.0), torch.tensor(0.5, dtype=torch.float64)), [torch.tensor(3)]], torch.float64)
    assert norms == [(2.0, 0.5), [3.0]] and all(isinstance(v, float) for v in (*norms[0], *norms[1]))


def test_step_values_reject_parts_that_do_not_match() -> None:
    parts = _parts(2, 0.0)
    with pytest.raises(ValueError, match="do not match"):
        StepValues.from_host(
            parts["summary"], parts["gaps"], torch.zeros(2, 3), parts["flags"], parts["frozen_changed"]
        )
    with pytest.raises(ValueError, match="do not match"):
        StepValues.from_host(parts["summary"], parts["gaps"][:1], None, parts["flags"], parts["frozen_changed"])


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


@pytest.mark.parametrize(
    ("batches", "strategy_accumulates", "fetcher_says_last", "expected"),
    [
        (7, False, False, [2, 5, 6]),
        (7, True, False, [2, 5]),
        (float("inf"), False, False, [2, 5]),  # no length, and Lightning's fetcher has not said it is the last
        (float("inf"), False, True, [2, 5, 6]),  # no length: Lightning's fetcher found nothing after batch 6
        (float("inf"), True, True, [2, 5]),
    ],
)
def test_ends_with_step_follows_accumulation_windows_and_the_epochs_last_batch(
    batches: float, strategy_accumulates: bool, fetcher_says_last: bool, expected: list[int]
) -> None:
    progress = SimpleNamespace(is_last_batch=False)
    trainer = SimpleNamespace(
        accumulate_grad_batches=3,
        num_training_batches=batches,
        strategy=SimpleNamespace(handles_gradient_accumulation=strategy_accumulates),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    steps = []
    for i in range(7):
        progress.is_last_batch = fetcher_says_last and i == 6
        if ends_with_step(trainer, i):
            steps.append(i)
    assert steps == expected


def test_logging_step_rule_is_lightnings() -> None:
    assert [n for n in range(10) if is_logging_step(n, 4)] == [3, 7]
    assert all(is_logging_step(n, 4, should_stop=True) for n in range(10))
    assert not any(is_logging_step(n, 0, should_stop=True) for n in range(10))  # log_every_n_steps=0: never
