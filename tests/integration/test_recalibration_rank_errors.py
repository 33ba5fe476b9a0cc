"""``BNRecalibration`` under 2-process DDP (gloo, CPU) when one rank's ``dataloader=`` or forward goes wrong.

Every error the callback meets on one rank (at setup, at the first training batch, during a recalibration) must be
raised on every rank at once: the failing rank raises its own error noting its rank, the other ranks an error naming
the failing rank and its error. No rank may wait in a collective (the process group's timeout is 20 s here: a rank
left waiting would end with a timeout error instead). An empty shard on one rank is no error: the other ranks' data
is used, as ``recalibrate_bn`` does.

All cases run in one spawn of two processes that keep their process group from one ``Trainer.fit`` to the next
(Lightning's ``ddp`` strategy on processes it did not launch), so the test costs one start-up.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_ranks
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnsgd._compat import Callback, Trainer, pl
from lightning_bnsgd.callbacks.recalibration import BNRecalibration
from lightning_bnsgd.data.digits import DigitsDataModule
from lightning_bnsgd.models.classifier import ConvNetClassifier

WORLD = 2
FAILING = 1  # the rank that goes wrong
TIMEOUT = timedelta(seconds=20)

#: kind -> (where every rank must stop: "setup", "first_batch", "recalibration" or None for no error, the failing
#: rank's error type)
KINDS: dict[str, tuple[str | None, str | None]] = {
    "empty_shard": (None, None),
    "not_a_loader_at_setup": ("setup", "TypeError"),
    "no_length_at_setup": ("setup", "ValueError"),
    "trial_forward": ("first_batch", "RuntimeError"),
    "forward_during_recalibration": ("recalibration", "_Boom"),
    "not_a_loader_at_recalibration": ("recalibration", "TypeError"),
}


class _Boom(RuntimeError):
    pass


def _images(channels: int = 1, n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, channels, 8, 8, generator=gen), torch.zeros(n, dtype=torch.long))


class _RankLoader:
    """``BNRecalibration(dataloader=...)``: a good loader of 64 samples, except on `FAILING` (see `KINDS`). Its calls:
    1 at setup, 2 at the first training batch, 3 at the recalibration before validation."""

    def __init__(self, kind: str) -> None:
        self.kind, self.calls = kind, 0

    def __call__(self) -> Any:
        self.calls += 1
        good = DataLoader(_images(), batch_size=16)
        if dist.get_rank() != FAILING:
            return good
        if self.kind == "empty_shard":
            return DataLoader(_images(n=0), batch_size=16)
        if self.kind == "not_a_loader_at_setup" or (self.kind == "not_a_loader_at_recalibration" and self.calls >= 3):
            return 5
        if self.kind == "no_length_at_setup":
            return (batch for batch in good)  # no length, and num_samples=None
        if self.kind == "trial_forward":
            return DataLoader(_images(channels=3), batch_size=16)  # the model takes one channel
        return good


class _RankForward:
    """``BNRecalibration(forward_fn=...)``: on `FAILING`, in kind ``forward_during_recalibration``, its third call (the
    recalibration's second forward; the first call is the trial forward at the first training batch) raises."""

    def __init__(self, kind: str) -> None:
        self.kind, self.calls = kind, 0

    def __call__(self, module: Any, batch: Any) -> None:
        self.calls += 1
        if self.kind == "forward_during_recalibration" and dist.get_rank() == FAILING and self.calls == 3:
            raise _Boom("the user's forward failed")
        module(batch[0])


class _Where(Callback):
    """Records where the fit was when it stopped."""

    def __init__(self) -> None:
        self.where = "setup"

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.where = "first_batch"  # training has started: the first batch's checks come next

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.where = "recalibration"


def _fit(kind: str, root: str) -> dict[str, Any]:
    where = _Where()
    recal = BNRecalibration(num_samples=None, dataloader=_RankLoader(kind), forward_fn=_RankForward(kind))
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=pl.strategies.DDPStrategy(timeout=TIMEOUT),
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[where, recal],
    )
    model = ConvNetClassifier(input_size=8, padding="same", channels=(8, 8))
    result: dict[str, Any] = {"error": None}
    try:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    except Exception as err:
        result["error"] = {
            "type": type(err).__name__,
            "message": str(err),
            "notes": list(getattr(err, "__notes__", [])),
            "where": where.where,
            "global_step": trainer.global_step,
        }
    else:
        result["samples_per_rank"] = recal.last_report.samples_per_rank if recal.last_report else None
        result["buffers"] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return result


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        results = {}
        for kind in KINDS:
            results[kind] = _fit(kind, out)
            dist.barrier()  # both ranks are done with this fit (a rank left behind would time out here)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("rank_errors")
    return spawn_ranks(_worker, out, WORLD)


@pytest.mark.ddp
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_ranks_error_stops_every_rank_naming_it(ranks: list[dict[str, Any]], kind: str) -> None:
    where, failing_type = KINDS[kind]
    results = [ranks[r][kind] for r in range(WORLD)]
    if where is None:  # an empty shard: recalibrated from the other rank's data, identically everywhere
        assert all(r["error"] is None for r in results), results
        assert results[0]["samples_per_rank"] == results[1]["samples_per_rank"] == [64, 0]
        for key, value in results[0]["buffers"].items():
            assert torch.equal(value, results[1]["buffers"][key]), key
        return
    for r, result in enumerate(results):
        error = result["error"]
        assert error is not None, f"rank {r} did not raise"
        assert "timed out" not in error["message"].lower() and "connection" not in error["message"].lower(), error
        assert error["where"] == where, error
        if where != "recalibration":
            assert error["global_step"] == 0, error  # before the first optimizer step
        if r == FAILING:
            assert error["type"] == failing_type, error
            assert any(f"raised on rank {FAILING} of 2" in note for note in error["notes"]), error
            assert all(not note.startswith("recalibrate_bn") for note in error["notes"]), error
        else:
            assert error["type"] == "RankFailure", error
            assert error["message"].startswith(f"BNRecalibration: rank {FAILING} of 2 failed"), error
            assert f"rank {FAILING} raised {failing_type}: " in error["message"], error
