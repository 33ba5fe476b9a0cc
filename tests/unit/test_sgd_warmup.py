"""Unit tests of ``SGDWarmup``, its param groups and its LR scaling rule (no Trainer runs)."""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import asdict

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from lightning_bnsgd.models.cnn import BNConvNet
from lightning_bnsgd.optim.schedule import WarmupLR
from lightning_bnsgd.optim.sgd_warmup import (
    SGDWarmup,
    effective_batch_size,
    lr_scale,
    param_groups,
    per_device_batch_size,
)


class _Bottleneck(nn.Module):
    """A ResNet-style block whose shortcut BatchNorm is named ``downsample.1`` (name-based rules miss it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm([8])
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.scale = nn.Parameter(torch.ones(8))  # a 1-D parameter outside any norm layer
        self.head = nn.Linear(8, 4)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def _by_name(groups: list[dict]) -> dict[str, list[torch.Tensor]]:
    return {g["name"]: g["params"] for g in groups}


def test_param_groups_on_bnconvnet() -> None:
    net = BNConvNet(input_size=8, padding="same")
    groups = _by_name(param_groups(net, weight_decay=1e-3, norm_weight_decay=0.0))
    no_decay, decay = _ids(groups["no_decay"]), _ids(groups["decay"])
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.BatchNorm2d) or name == "bias":
                assert id(p) in no_decay and id(p) not in decay
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                assert id(p) in decay and id(p) not in no_decay
    assert len(no_decay) + len(decay) == len(list(net.parameters()))


def test_param_groups_by_type_and_shape_not_by_name() -> None:
    block = _Bottleneck()
    groups = param_groups(block, weight_decay=5e-4, norm_weight_decay=1e-5)
    named = _by_name(groups)
    assert [g["weight_decay"] for g in groups] == [5e-4, 1e-5]
    no_decay, decay = _ids(named["no_decay"]), _ids(named["decay"])
    expected_no_decay = [
        block.bn1.weight, block.bn1.bias, block.downsample[1].weight, block.downsample[1].bias,
        block.gn.weight, block.gn.bias, block.ln.weight, block.ln.bias, block.inorm.weight, block.inorm.bias,
        block.scale, block.head.bias,
    ]  # fmt: skip
    assert no_decay == _ids(expected_no_decay)
    assert decay == _ids([block.conv1.weight, block.downsample[0].weight, block.head.weight])
    frozen = _ids(list(block.frozen.parameters()))
    assert not frozen & (no_decay | decay), "frozen parameters are left out"


def test_shared_parameter_appears_once() -> None:
    lin = nn.Linear(4, 4)
    net = nn.Sequential(OrderedDict(a=lin, b=lin))
    groups = param_groups(net)
    assert sum(len(g["params"]) for g in groups) == 2
    torch.optim.SGD(groups, lr=0.1)  # torch refuses duplicates across groups


def test_lazy_modules_are_grouped_by_owning_type_before_materialization() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(2))
    groups = _by_name(param_groups(net, weight_decay=1e-3))
    assert _ids(groups["decay"]) == _ids([net[0].weight, net[3].weight])
    assert _ids(groups["no_decay"]) == _ids([net[0].bias, net[1].weight, net[1].bias, net[3].bias])
    net(torch.zeros(2, 1, 6, 6))  # materialize: the optimizer's parameter objects stay the same
    assert _by_name(param_groups(net))["decay"][0] is groups["decay"][0]


def test_uninitialized_parameter_of_an_unknown_module_is_an_error() -> None:
    class OwnLazy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.UninitializedParameter()

    with pytest.raises(ValueError, match=r"`1\.scale` of OwnLazy is not materialized"):
        param_groups(nn.Sequential(nn.Linear(2, 2), OwnLazy()))


def test_param_groups_of_a_part_and_a_prefix() -> None:
    block = _Bottleneck()
    sub = _by_name(param_groups(block, params=block.downsample, prefix="ds."))
    assert _ids(sub["ds.decay"]) == _ids([block.downsample[0].weight])
    assert _ids(sub["ds.no_decay"]) == _ids(list(block.downsample[1].parameters()))
    chosen = _by_name(param_groups(block, params=[block.bn1.weight, block.conv1.weight]))
    assert (_ids(chosen["decay"]), _ids(chosen["no_decay"])) == (_ids([block.conv1.weight]), _ids([block.bn1.weight]))
    with pytest.raises(ValueError, match="not parameters of _Bottleneck"):
        param_groups(block, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="params"):
        param_groups(block, params=3)  # type: ignore[arg-type]


def test_effective_batch_and_scaling_rule() -> None:
    assert effective_batch_size(32, world_size=2, accumulate_grad_batches=4) == 256
    assert lr_scale(64, 256, "linear") == 0.25
    assert lr_scale(1024, 256, "sqrt") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        effective_batch_size(8, 1, 0)
    with pytest.raises(ValueError, match="lr_base_scale"):
        lr_scale(8, 256, "none")


def test_per_device_batch_size_reads_loaders_and_samplers() -> None:
    assert per_device_batch_size(DataLoader(range(10), batch_size=3)) == 3
    sampler = BatchSampler(SequentialSampler(range(10)), batch_size=5, drop_last=False)
    assert per_device_batch_size([DataLoader(range(10), batch_sampler=sampler)]) == 5
    assert per_device_batch_size([1, 2]) is None
    with pytest.raises(ValueError, match="batch_size"):
        per_device_batch_size({"a": DataLoader(range(4), batch_size=2), "b": DataLoader(range(4), batch_size=4)})


def test_asdict_is_plain_data_and_rebuilds() -> None:
    cfg = SGDWarmup(lr_base=0.2, warmup_epochs=2.5, decay="multistep", milestones=[5, 8], lr_base_scale="sqrt")
    data = asdict(cfg)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    assert SGDWarmup(**torch.load(buffer, weights_only=True)) == cfg


def test_resolve_converts_epochs_and_scales() -> None:
    cfg = SGDWarmup(lr_base=0.1, min_lr=0.01, warmup_epochs=1.5, decay="multistep", milestones=[4, 6])
    r = cfg.resolve(total_steps=80, steps_per_epoch=10, batch_size=32, world_size=2, accumulate_grad_batches=2)
    assert r.effective_batch_size == 128
    assert r.lr == pytest.approx(0.05) and r.min_lr == 0.01  # min_lr is absolute, never scaled
    assert (r.warmup_steps, r.total_steps, r.milestones) == (15, 80, [40, 60])
    sqrt = SGDWarmup(lr_base=0.1, warmup_steps=0, lr_base_scale="sqrt").resolve(total_steps=5, batch_size=1024)
    assert sqrt.lr == pytest.approx(0.2)
    step = SGDWarmup(lr=0.3, warmup_steps=0, decay="step", step_size=2.5).resolve(total_steps=90, steps_per_epoch=12)
    assert step.step_size == 30.0
    assert step.lr == 0.3  # an absolute lr ignores the batch (none is known here)
    assert SGDWarmup(total_steps=7, warmup_steps=2, batch_size=8).resolve(total_steps=1000).total_steps == 7
    given = SGDWarmup(lr=0.3, lr_base=9.0, warmup_steps=0).resolve(total_steps=5, batch_size=1024)
    assert given.lr == 0.3 and given.effective_batch_size == 1024  # lr wins over lr_base, as in timm


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        (SGDWarmup(), {"total_steps": None, "steps_per_epoch": 10}, "max_steps"),
        (SGDWarmup(), {"total_steps": 100}, "warmup_steps"),  # epochs without steps per epoch
        (SGDWarmup(warmup_epochs=11), {"total_steps": 100, "steps_per_epoch": 10}, "warmup_epochs=11"),
        (SGDWarmup(warmup_steps=0), {"total_steps": 100}, "batch_size"),
        (SGDWarmup(warmup_steps=0, min_lr=0.2), {"total_steps": 100, "batch_size": 64}, "min_lr"),
    ],
)
def test_resolve_errors_say_what_to_set(cfg: SGDWarmup, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cfg.resolve(**kwargs)


def test_build_without_trainer() -> None:
    net = BNConvNet(input_size=8, padding="same")
    out = SGDWarmup(lr_base=0.4, warmup_steps=3, total_steps=12, batch_size=64).build(net)
    opt, sched_cfg = out["optimizer"], out["lr_scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    assert {k: sched_cfg[k] for k in ("interval", "frequency", "name")} == {
        "interval": "step",
        "frequency": 1,
        "name": "lr-SGD",
    }
    sched = sched_cfg["scheduler"]
    assert isinstance(sched, WarmupLR)
    assert sched.base_lrs == [pytest.approx(0.1)] * 2
    assert (sched.warmup_steps, sched.total_steps) == (3, 12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # warmup_start_factor x base


def test_build_detached_lightning_module() -> None:
    from lightning_bnsgd.models.classifier import ConvNetClassifier

    model = ConvNetClassifier(
        input_size=8, padding="same", optimizer=SGDWarmup(warmup_steps=1, total_steps=4, batch_size=64)
    )
    out = model.configure_optimizers()
    assert out["lr_scheduler"]["scheduler"].total_steps == 4
    with pytest.raises(ValueError, match=r"ConvNetClassifier is not attached to a Trainer.*total_steps"):
        SGDWarmup(warmup_steps=1).build(model)


def test_build_on_a_module_attached_to_a_trainer_without_data() -> None:
    """The pattern of Lightning's own optimizer tests: a Trainer attached by hand, no ``fit``, so no data."""
    from lightning_bnsgd._compat import Trainer
    from lightning_bnsgd.models.classifier import ConvNetClassifier

    model = ConvNetClassifier(input_size=8, padding="same", optimizer=SGDWarmup(lr=0.1, warmup_steps=2, total_steps=10))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    out = model.configure_optimizers()  # everything given: it builds (before: a bare AssertionError from Lightning)
    sched = out["lr_scheduler"]["scheduler"]
    assert (sched.warmup_steps, sched.total_steps, sched.peak_lr) == (2, 10, 0.1)
    with pytest.raises(ValueError, match=r"the Trainer of ConvNetClassifier has no train data.*outside `trainer\.fit`"):
        SGDWarmup(lr=0.1, warmup_steps=2).build(model)  # the run's length is unknown there: said so


def test_build_of_a_plain_submodule_names_the_real_cause() -> None:
    from lightning_bnsgd.models.classifier import ConvNetClassifier

    model = ConvNetClassifier(input_size=8, padding="same")
    with pytest.raises(ValueError, match=r"BNConvNet is a plain torch.nn.Module.*build\(self, self.generator\)"):
        SGDWarmup(warmup_steps=1).build(model.net)


def test_build_a_part_with_its_own_scheduler_name() -> None:
    gan = nn.ModuleDict({"generator": nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), "critic": nn.Linear(4, 1)})
    cfg = SGDWarmup(lr=0.1, warmup_steps=1, total_steps=5)
    gen = cfg.build(gan, gan["generator"])
    critic = cfg.build(gan, list(gan["critic"].parameters()))
    assert gen["lr_scheduler"]["name"] == "lr-SGD-generator"
    assert critic["lr_scheduler"]["name"] == "lr-SGD-critic"
    assert [len(g["params"]) for g in gen["optimizer"].param_groups] == [1, 3]
    assert [len(g["params"]) for g in critic["optimizer"].param_groups] == [1, 1]
    assert SGDWarmup(lr=0.1, warmup_steps=1, total_steps=5, name="lr-G").build(gan)["lr_scheduler"]["name"] == "lr-G"


def test_build_a_part_from_a_parameter_generator() -> None:
    gan = nn.ModuleDict({"generator": nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), "critic": nn.Linear(4, 1)})
    out = SGDWarmup(lr=0.1, warmup_steps=1, total_steps=5).build(gan, gan["generator"].parameters())
    assert out["lr_scheduler"]["name"] == "lr-SGD-generator"
    assert [len(g["params"]) for g in out["optimizer"].param_groups] == [1, 3]


def test_nesterov_applies_only_with_momentum() -> None:
    opt = SGDWarmup(lr=0.1, momentum=0.0, warmup_steps=0, total_steps=3).build(nn.Linear(2, 2))["optimizer"]
    assert [(g["momentum"], g["nesterov"]) for g in opt.param_groups] == [(0.0, False)] * 2


def _steps(out: dict, n: int, step_scheduler: bool) -> None:
    x = torch.randn(4, 2)
    for _ in range(n):
        out["optimizer"].zero_grad()
        out["net"](x).sum().backward()
        out["optimizer"].step()
        if step_scheduler:
            out["lr_scheduler"]["scheduler"].step()


def test_a_schedule_never_stepped_warns_once_after_an_epoch_of_steps() -> None:
    net = nn.Linear(2, 2)
    out = {**SGDWarmup(lr=0.1, warmup_steps=3, total_steps=20).build(net), "net": net}
    _steps(out, 3, step_scheduler=False)  # the warmup's worth: not yet
    with pytest.warns(UserWarning, match="not stepped during the first 3 optimizer steps") as record:
        _steps(out, 10, step_scheduler=False)
    assert len([w for w in record if "not stepped" in str(w.message)]) == 1
    stepped = {**SGDWarmup(lr=0.1, warmup_steps=3, total_steps=20).build(net), "net": net}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(stepped, 10, step_scheduler=True)


def test_the_start_up_line_describes_the_schedule_at_the_first_step(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Linear(2, 2)
    out = {**SGDWarmup(lr_base=0.4, warmup_steps=2, total_steps=9, batch_size=64).build(net), "net": net}
    with caplog.at_level(logging.INFO):
        assert "SGDWarmup" not in caplog.text
        _steps(out, 2, step_scheduler=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SGDWarmup")]
    assert lines == [
        "SGDWarmup: peak LR 0.1 (lr_base=0.4 x 64/256 (linear), effective batch 64); warmup 2 steps (linear), "
        "cosine decay to 0 at step 9."
    ]


def test_build_rejects_module_without_trainable_parameters() -> None:
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SGDWarmup(warmup_steps=0, total_steps=5).build(net)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SGDWarmup(warmup_steps=0, total_steps=5).build(nn.ReLU())


def test_lr_curve_matches_the_scheduler() -> None:
    cfg = SGDWarmup(lr=0.3, warmup_steps=4, decay="poly", power=2.0, min_lr=0.03)
    curve = cfg.lr_curve(total_steps=20)
    assert curve[0] == pytest.approx(0.03) and curve[4] == pytest.approx(0.3)
    assert curve[-1] > 0.03 and len(curve) == 20
    net = nn.Linear(2, 2)
    sched = SGDWarmup(**{**asdict(cfg), "total_steps": 20}).build(net)["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(20):
        seen.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    assert seen == curve


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": math.nan}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"lr_base": 0.0}, ValueError, "lr_base"),
        ({"lr_base_size": 0}, ValueError, "lr_base_size"),
        ({"lr_base_scale": "none"}, ValueError, "lr_base_scale"),
        ({"resume_schedule": "latest"}, ValueError, "resume_schedule"),
        ({"name": ""}, ValueError, "name"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"nesterov": "yes"}, TypeError, "nesterov"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
        ({"norm_weight_decay": -1e-4}, ValueError, "norm_weight_decay"),
        ({"warmup_epochs": 1.0, "warmup_steps": 10}, ValueError, "warmup_epochs"),
        ({"warmup_epochs": -1.0}, ValueError, "warmup_epochs"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup_start_factor": 0.0}, ValueError, "warmup_start_factor"),
        ({"warmup_start_factor": 1.01}, ValueError, "warmup_start_factor"),
        ({"warmup": "cosine"}, ValueError, "warmup"),
        ({"decay": "onecycle"}, ValueError, "decay"),
        ({"warmup_steps": 20, "total_steps": 10}, ValueError, "warmup_steps"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"lr": 0.4, "min_lr": 0.5}, ValueError, "min_lr"),
        ({"min_lr": -0.5}, ValueError, "min_lr"),
        ({"milestones": [5, 3], "decay": "multistep"}, ValueError, "milestones"),
        ({"milestones": [-1], "decay": "multistep"}, ValueError, "milestones"),
        ({"milestones": [1, 3], "decay": "multistep", "warmup_epochs": 2}, ValueError, "milestones"),
        ({"decay": "multistep"}, ValueError, "milestones"),
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"gamma": 2.0}, ValueError, "gamma"),
        ({"power": -1.0}, ValueError, "power"),
        ({"step_size": 0.0}, ValueError, "step_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_fields_are_rejected_at_construction(kwargs: dict, exc: type[Exception], field: str) -> None:
    with pytest.raises(exc, match=field) as info:
        SGDWarmup(**kwargs)
    assert "got" in str(info.value)  # the message shows the offending value
    assert str(info.value).startswith("SGDWarmup")  # and names the class the user wrote


def test_a_fast_dev_run_cuts_the_warmup_instead_of_failing():
    config = SGDWarmup(lr=0.1, warmup_steps=5)
    assert config.resolve(total_steps=1, debug_run=True).warmup_steps == 1
    with pytest.raises(ValueError, match="Warmup is longer than the run"):
        config.resolve(total_steps=1)
