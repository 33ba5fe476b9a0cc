"""``torch_threads``: the CLI field that sets torch's thread count before the run (the packaged job uses 1)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_bnsgd.cli import cli_main, packaged_config


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def build(*overrides: str):
    return cli_main(["--config", str(packaged_config()), "--trainer.logger=false", *overrides], run=False)


def test_the_packaged_job_runs_on_one_thread(restore_threads):
    assert yaml.safe_load(packaged_config().read_text())["torch_threads"] == 1
    torch.set_num_threads(2)
    build()
    assert torch.get_num_threads() == 1


def test_null_keeps_torch_s_default_and_a_count_is_applied(restore_threads):
    torch.set_num_threads(2)
    build("--torch_threads=null")
    assert torch.get_num_threads() == 2
    build("--torch_threads=3")
    assert torch.get_num_threads() == 3


def test_a_count_below_one_is_refused_naming_the_field(restore_threads, capsys):
    with pytest.raises(SystemExit):
        build("--torch_threads=0")
    assert "torch_threads" in capsys.readouterr().err
