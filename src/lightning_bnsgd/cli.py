"""The ``lightning-bnsgd`` console script: a LightningCLI over ``ConvNetClassifier`` and ``DigitsDataModule``."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from lightning_bnsgd._compat import LightningArgumentParser, LightningCLI
from lightning_bnsgd.data import DigitsDataModule
from lightning_bnsgd.models import ConvNetClassifier

#: Data-module attributes that LightningCLI copies into the model's arguments.
LINKED_ARGUMENTS = ("in_channels", "input_size", "num_classes")


def packaged_config(name: str = "digits.yaml") -> Path:
    """Path of a YAML config shipped inside the package (``configs/``).

    Examples:
        >>> packaged_config().name
        'digits.yaml'
    """
    path = Path(str(files("lightning_bnsgd") / "configs" / name))
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"No packaged config named {name!r}; available: {available}.")
    return path


class BNSGDCLI(LightningCLI):
    """LightningCLI with the data module's shape attributes linked into the model and an optional test after fit.

    ``fit --test_after_fit true`` runs ``trainer.test`` on the fitted model right after ``fit`` and prints the
    test accuracy, so one command trains and evaluates.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_ARGUMENTS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run the test set on the fitted model after fit and print the test accuracy.",
        )

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), {})
        if not config.get("test_after_fit", False):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        acc = results[0].get("test/acc") if results else None
        if acc is not None and self.trainer.is_global_zero:
            print(f"test accuracy: {acc:.4f}", flush=True)


def cli_main(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> BNSGDCLI:
    """Entry point of the ``lightning-bnsgd`` console script.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``), e.g. ``["fit", "--config", "digits.yaml"]``.
        run: run the subcommand (``False`` only instantiates, as LightningCLI's ``run`` does).
        **kwargs: passed on to ``LightningCLI`` (e.g. ``save_config_kwargs``).
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # The model's own configure_optimizers (SGDWarmup, stepped per batch) is the one to use; LightningCLI's
    # automatic --optimizer/--lr_scheduler would step schedulers per epoch.
    kwargs.setdefault("auto_configure_optimizers", False)
    return BNSGDCLI(
        ConvNetClassifier,
        DigitsDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main() -> None:
    """The console script ``lightning-bnsgd`` (returns nothing, so the shell sees exit status 0)."""
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
