"""``check_in_fresh_process``: a program loaded with torch alone in a new process, compared within fold's tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bnsgd.bn.export import check_in_fresh_process, export_folded


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        y = self.norm(self.linear(x))
        return {"logits": y, "aux": (2 * y, y.sum(1))}


def test_nested_outputs_match_and_a_changed_output_is_caught(tmp_path):
    model = _DictOutput()
    model.train()(torch.randn(32, 3) * 3 + 1)  # running statistics away from their initial values
    x = torch.randn(5, 3)
    result = export_folded(model, x, tmp_path / "m.pt2")
    assert result.fold is not None and result.fold.folded == ["norm"]
    with torch.no_grad():
        expected = model.eval()(x)
    assert check_in_fresh_process(result.path, x, expected) < 1e-4
    wrong = {"logits": expected["logits"] * (1 + 1e-3), "aux": expected["aux"]}
    with pytest.raises(RuntimeError, match=r"(?s)could not reproduce the outputs.*outside the tolerance"):
        check_in_fresh_process(result.path, x, wrong)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)could not reproduce the outputs of .*nothing\.pt2"):
        check_in_fresh_process(tmp_path / "nothing.pt2", torch.zeros(2, 3), torch.zeros(2, 4))
