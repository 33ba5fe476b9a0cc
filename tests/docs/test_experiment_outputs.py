"""The experiment scripts never overwrite the published results unless asked (``examples/experiments/_common.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[2] / "examples" / "experiments"


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import _common

    monkeypatch.setattr(_common, "SCRATCH", tmp_path / "scratch")
    threads = torch.get_num_threads()  # parse_args sets the torch threads (--threads, default 1)
    yield _common
    torch.set_num_threads(threads)
    sys.modules.pop("_common", None)


def test_smoke_without_out_dir_goes_to_a_scratch_folder(common, tmp_path: Path) -> None:
    args = common.parse_args(None, epochs=1, argv=["--smoke"])
    assert args.out_dir == tmp_path / "scratch"
    assert args.out_dir != common.DOCS_EXPERIMENTS


def test_out_dir_and_publish(common, tmp_path: Path) -> None:
    assert common.parse_args(None, epochs=1, argv=["--out-dir", str(tmp_path / "mine")]).out_dir == tmp_path / "mine"
    assert common.parse_args(None, epochs=1, argv=[]).out_dir == tmp_path / "scratch"
    assert common.parse_args(None, epochs=1, argv=["--publish"]).out_dir == common.DOCS_EXPERIMENTS
    assert common.DOCS_EXPERIMENTS.name == "experiments" and common.DOCS_EXPERIMENTS.parent.name == "docs"


@pytest.mark.parametrize(
    "argv", [["--smoke", "--publish"], ["--publish", "--out-dir", "/tmp/x"]], ids=["smoke", "out-dir"]
)
def test_publish_refuses_smoke_and_out_dir(common, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        common.parse_args(None, epochs=1, argv=argv)
    assert exc.value.code == 2
    assert "--publish" in capsys.readouterr().err


def test_trainer_and_model_share_a_namespace(common) -> None:
    from lightning_bnsgd import ConvNetClassifier

    assert issubclass(ConvNetClassifier, common.pl.LightningModule)
    assert common.Trainer is common.pl.Trainer
