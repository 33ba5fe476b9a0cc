"""Which training batches a callback that logs "every ``log_every_n_steps`` steps" works at: the monitors share it.

The rule is Lightning's own for the metrics a LightningModule logs with ``self.log``: they reach the loggers at the
end of a training batch that steps the optimizers (the last micro-batch of an accumulation window; every batch under
manual optimization) when the count of such batches, this one included, is a multiple of ``log_every_n_steps``, or
when the Trainer has been told to stop (``trainer.should_stop``: it then logs every step until ``min_steps`` or
``min_epochs`` let it stop); ``Trainer(log_every_n_steps=0)`` logs no training step. A callback following this
rule logs its values for exactly the batches whose ``self.log`` metrics Lightning logs, at the same step.
"""

from __future__ import annotations

from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_bnsgd._compat import is_last_train_batch, logging_step


def ends_with_step(trainer: Any, batch_idx: int) -> bool:
    """Whether this training batch ends with an optimizer step, as Lightning decides it.

    Decided once per batch, however many optimizers: the end of an accumulation window, or the epoch's last batch unless
    the strategy accumulates gradients itself. The last batch is the one that reaches ``num_training_batches``, or,
    for a train dataloader without a length, the one Lightning's data fetcher found nothing after.
    """
    if (batch_idx + 1) % max(int(trainer.accumulate_grad_batches), 1) == 0:
        return True
    total = trainer.num_training_batches
    last = (isinstance(total, int) and batch_idx + 1 >= total) or is_last_train_batch(trainer)
    return last and not trainer.strategy.handles_gradient_accumulation


def is_logging_step(stepped_before: int, interval: int, should_stop: bool = False) -> bool:
    """Whether Lightning logs the ``self.log`` metrics of a batch that steps the optimizers.

    The batch comes after ``stepped_before`` such batches, for ``log_every_n_steps=interval``.

    Examples:
        >>> [n for n in range(8) if is_logging_step(n, 3)]
        [2, 5]
        >>> is_logging_step(0, 3, should_stop=True), is_logging_step(2, 0)
        (True, False)
    """
    return interval > 0 and ((stepped_before + 1) % interval == 0 or should_stop)


class LoggingCadence:
    """The logging cadence of one callback: its interval, and whether the current training batch is logged.

    Args:
        every_n: the callback's own ``log_every_n_steps`` (>= 1), or None for the Trainer's.

    Examples:
        >>> cadence = LoggingCadence(None)
        >>> cadence.interval, cadence.stepped
        (1, 0)
    """

    def __init__(self, every_n: int | None) -> None:
        self.every_n = every_n
        self.interval = every_n or 1
        #: Training batches that ended with an optimizer step so far (Lightning's logging step).
        self.stepped = 0
        self._steps = False  # the current batch ends with an optimizer step
        self._restored: tuple[int, str] | None = None

    def setup(self, trainer: Any, stage: str, owner: str, what_stops: str = "") -> int:
        """Take the interval: the callback's own, else the Trainer's ``log_every_n_steps``.

        The Trainer's 0 turns the callback off, said in a warning (``what_stops``: what else stops with it).
        """
        self.interval = self.every_n if self.every_n is not None else int(trainer.log_every_n_steps)
        if self.interval == 0 and stage == "fit":
            rank_zero_warn(
                f"{owner}: the Trainer's `log_every_n_steps=0` turns logging off, and the monitor with it"
                f"{what_stops}. Pass `{owner}(log_every_n_steps=N)` to monitor anyway."
            )
        return self.interval

    def restore(self, stepped: int, where: str | None = None) -> None:
        """Take a checkpointed count.

        With ``where`` (the state's name in messages), the next training batch warns when the Trainer's own count
        disagrees with it.
        """
        self.stepped = stepped
        self._restored = (stepped, where) if where else None

    def begin_batch(self, trainer: Any, batch_idx: int) -> bool:
        """At ``on_train_batch_start``: whether Lightning logs this batch's ``self.log`` metrics.

        The count is taken from the Trainer, which the monitors follow.
        """
        count = logging_step(trainer)
        if self._restored is not None:
            (restored, where), self._restored = self._restored, None
            if restored != count:
                rank_zero_warn(
                    f"{where} counts {restored} training batches that stepped, the Trainer {count}; the monitor "
                    "follows the Trainer's count, so that its values keep lining up with the module's own logs "
                    "(was the state written by another run?)."
                )
        self.stepped = count
        self._steps = ends_with_step(trainer, batch_idx)
        return self._steps and is_logging_step(count, self.interval, bool(trainer.should_stop))

    def end_batch(self) -> None:
        """At ``on_train_batch_end``: count the batch when it stepped."""
        if self._steps:
            self.stepped += 1
            self._steps = False


__all__ = ["LoggingCadence", "ends_with_step", "is_logging_step"]
