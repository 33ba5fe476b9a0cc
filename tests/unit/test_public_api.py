"""The top level lists what users put into a Trainer, a ``configure_optimizers`` or a YAML file; the research
helpers moved to ``lightning_bnsgd.bn`` and their old top-level names still import, with a warning, for one
release."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import lightning_bnsgd
from lightning_bnsgd import bn

MOVED = [
    "LayerShift",
    "ScaleInvarianceReport",
    "batchnorm_layers",
    "equilibrium_angular_update",
    "find_scale_invariant",
    "statistics_shift",
]


def test_the_top_level_lists_what_goes_into_a_trainer_an_optimizer_or_a_yaml_file():
    assert sorted(lightning_bnsgd.__all__) == sorted(
        [
            "BNAnomalyError",
            "BNConvNet",
            "BNFoldExport",
            "BNRecalibration",
            "BNStatsMonitor",
            "ConvNetClassifier",
            "DigitsDataModule",
            "RecalibrationReport",
            "SGDWarmup",
            "WarmupLR",
            "WeightDynamicsMonitor",
            "__version__",
            "param_groups",
            "recalibrate_bn",
        ]
    )
    for name in lightning_bnsgd.__all__:
        assert getattr(lightning_bnsgd, name) is not None
    assert not set(MOVED) & set(lightning_bnsgd.__all__)
    assert set(MOVED) <= set(bn.__all__)


def test_a_moved_name_still_imports_from_the_top_level_with_a_warning_naming_its_new_home():
    # a fresh process: the warning is given once per name and process
    code = (
        "import warnings\n"
        "import lightning_bnsgd.bn as bn\n"
        f"for name in {MOVED!r}:\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        exec(f'from lightning_bnsgd import {name} as old')\n"
        "        again = getattr(__import__('lightning_bnsgd'), name)\n"
        "    assert old is getattr(bn, name) is again, name\n"
        "    print(name, len(caught), caught[0].category.__name__, caught[0].message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == len(MOVED), out
    for name, line in zip(MOVED, lines, strict=True):
        assert line.startswith(f"{name} 1 FutureWarning "), line
        assert f"`lightning_bnsgd.{name}` moved to `lightning_bnsgd.bn.{name}`" in line


def test_a_name_that_never_existed_is_an_attribute_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
            lightning_bnsgd.not_a_name  # noqa: B018
        assert not hasattr(lightning_bnsgd, "recalibrate")
