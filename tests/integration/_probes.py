"""Callbacks that tests add to CLI runs (imported by class path, so this folder must be on PYTHONPATH)."""

from __future__ import annotations

import json
import os

import torch

from lightning_bnsgd._compat import Callback


class DumpRankState(Callback):
    """At the end of fit, writes each rank's BN buffers and its optimizer's peak LR to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        rank = trainer.global_rank
        buffers = {k: v.detach().cpu().clone() for k, v in pl_module.named_buffers() if "running" in k}
        torch.save(buffers, os.path.join(self.out_dir, f"bn_rank{rank}.pt"))
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        info = {"rank": rank, "world_size": trainer.world_size, "base_lrs": list(scheduler.base_lrs)}
        with open(os.path.join(self.out_dir, f"info_rank{rank}.json"), "w") as f:
            json.dump(info, f)
