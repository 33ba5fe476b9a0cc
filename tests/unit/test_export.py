"""``export_folded``: the written program loads in a fresh process with torch alone and gives the model's outputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_bnsgd.bn.export import export_folded
from lightning_bnsgd.models.cnn import BNConvNet

FRESH = textwrap.dedent(
    """
    import sys
    import torch
    program = torch.export.load(sys.argv[1]).module()
    x, expected = torch.load(sys.argv[2])
    out = program(x)
    assert not any(name.startswith("lightning_bnsgd") for name in sys.modules), "the package was imported"
    print(float((out - expected).abs().max()))
    """
)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_round_trip_in_a_fresh_process(tmp_path, padding):
    net = BNConvNet(input_size=12, channels=(4, 6), padding=padding)
    net.train()(torch.randn(64, 1, 12, 12))  # running statistics away from their initial values
    result = export_folded(net, torch.randn(8, 1, 12, 12), tmp_path / "net.pt2")
    assert result.path.is_file() and result.fold is not None and result.fold.folded
    x = torch.randn(5, 1, 12, 12)  # another batch size than the example's
    with torch.no_grad():
        expected = net.eval()(x)
    torch.save((x, expected), tmp_path / "io.pt")
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(result.path), str(tmp_path / "io.pt")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 1e-4


def test_the_model_is_unchanged_and_unfolded_export_works(tmp_path):
    net = BNConvNet(input_size=8, padding="same")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = export_folded(net, torch.randn(4, 1, 8, 8), tmp_path / "sub" / "net.pt2", fold=False, dynamic_batch=False)
    assert result.fold is None and result.max_abs_diff == 0.0
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    program = torch.export.load(result.path).module()
    assert program(torch.randn(4, 1, 8, 8)).shape == (4, 10)
