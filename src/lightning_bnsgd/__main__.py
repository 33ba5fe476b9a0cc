"""``python -m lightning_bnsgd``: the main job from an installed package, no clone needed.

It runs ``lightning-bnsgd fit --config <the packaged digits.yaml>`` followed by any arguments given (for example
``python -m lightning_bnsgd --trainer.max_epochs=5``): train the BatchNorm CNN on the bundled digits with every
piece of the plugin switched on, test it and print the test accuracy. Logs go to ``runs/digits/`` under the
current directory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main_job_args(extra: Sequence[str] = ()) -> list[str]:
    """The ``lightning-bnsgd`` arguments of the main job, followed by ``extra``.

    Examples:
        >>> args = main_job_args(["--trainer.max_epochs=1"])
        >>> args[0], args[1], args[2].endswith("digits.yaml"), args[3]
        ('fit', '--config', True, '--trainer.max_epochs=1')
    """
    from lightning_bnsgd.cli import packaged_config

    return ["fit", "--config", str(packaged_config()), *extra]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the main job (``argv`` defaults to ``sys.argv[1:]``)."""
    from lightning_bnsgd.cli import cli_main

    cli_main(main_job_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # pragma: no cover
    main()
