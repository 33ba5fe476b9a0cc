"""SGD with per-step warmup and decay."""

from lightning_bnsgd.optim.sgd_warmup import SGDWarmup

__all__ = ["SGDWarmup"]
