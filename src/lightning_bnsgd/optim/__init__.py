"""SGD with per-step warmup and decay."""

from lightning_bnsgd.optim.schedule import WarmupLR, lr_factor
from lightning_bnsgd.optim.sgd_warmup import SGDWarmup, effective_batch_size, lr_scale, param_groups

__all__ = ["SGDWarmup", "WarmupLR", "effective_batch_size", "lr_factor", "lr_scale", "param_groups"]
