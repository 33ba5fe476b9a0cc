"""The ``lightning-bnsgd`` console script: a LightningCLI for any LightningModule and LightningDataModule.

``ConvNetClassifier`` and ``DigitsDataModule`` are the packaged config's choice.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import weakref
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt, import_object

from lightning_bnsgd._compat import (
    LightningArgumentParser,
    LightningCLI,
    LightningDataModule,
    LightningModule,
    forget_config_dump,
    instantiate_cli_classes,
)
from lightning_bnsgd.checkpoint_export import BNSGDTrainer

#: Data-module attributes copied into the model's arguments of the same name, when both sides have them.
LINKED_ARGUMENTS = ("in_channels", "input_size", "num_classes")


def _instantiate(parser: ArgumentParser, config: Namespace) -> Namespace:
    """``parser.instantiate(config)``: jsonargparse's ``instantiate`` since 4.49, ``instantiate_classes`` before it.

    ``instantiate_classes`` is deprecated since 4.49 and removed in 5.0.
    """
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config)


def _instantiate_data(data_config: Namespace) -> Any:
    """The data module a ``data:`` config describes (nested class configs included), built on its own."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    config = parser.parse_object({"data": data_config.clone().as_dict()})
    return _instantiate(parser, config).data


def linkable_names(config: Namespace) -> list[str]:
    """The names of `LINKED_ARGUMENTS` that the ``model:`` config's class takes.

    Only when the config has both a model and a data class (a user's own classes may take none).
    """
    data_config, model_config = config.get("data"), config.get("model")
    if not isinstance(data_config, Namespace) or not isinstance(model_config, Namespace):
        return []
    if not model_config.get("class_path") or not data_config.get("class_path"):
        return []
    accepted = inspect.signature(import_object(model_config.class_path)).parameters
    return [name for name in LINKED_ARGUMENTS if name in accepted]


def copy_links(config: Namespace, data: object, names: Sequence[str]) -> list[str]:
    """Copy each of ``names`` that ``data`` has into the model's ``init_args``; returns the names copied."""
    linked = [name for name in names if hasattr(data, name)]
    for name in linked:
        config.model.init_args[name] = getattr(data, name)
    return linked


def link_data_into_model(config: Namespace) -> list[str]:
    """Copy the data module's ``in_channels``, ``input_size`` and ``num_classes`` into the model's ``init_args``.

    Each is copied only when the model's class takes an argument of that name and the data module has that attribute (a
    user's own classes need neither). Builds the data module to read them; returns the names copied.
    """
    names = linkable_names(config)
    return copy_links(config, _instantiate_data(config.data), names) if names else []


class _Prebuilt:
    """A jsonargparse instantiator that hands out, once, the data module the CLI already built to read its links.

    That data module is not built a second time; any other data module is built as usual.
    """

    def __init__(self, data: object) -> None:
        self.data: object | None = data

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        data, self.data = self.data, None
        if data is not None and type(data) is class_type:
            return data
        return class_type(*args, **kwargs)


#: The configs a CLI run linked in place (the whole config and its subcommand's section), by ``id``: any parser
#: dumps them as they are (the root parser for Lightning's saved hyperparameters, the subcommand's for
#: ``config.yaml``), without building the data module again.
_LINKED: weakref.WeakValueDictionary[int, Namespace] = weakref.WeakValueDictionary()


def _is_linked(cfg: Namespace) -> bool:
    return _LINKED.get(id(cfg)) is cfg


class LinkingArgumentParser(LightningArgumentParser):
    """The CLI's parser: every config it writes out holds the model arguments linked from the data module.

    The configs written out are ``--print_config`` and the run's saved ``config.yaml``; the links are those of
    `link_data_into_model`, i.e. the values the run uses.

    jsonargparse prints ``--print_config`` while parsing, before any link is applied; a link applied at
    instantiation (LightningCLI's ``apply_on="instantiate"``, and this CLI's own link) would print the model's
    default instead (e.g. ``num_classes: 1000`` for a run that uses the data module's 10), and a link applied
    at parse time is left out of the printout. Linking the copy that is dumped prints the true values, and the
    printed config parses back to the same run. A config whose data module cannot be built yet (a template with
    required arguments missing) is printed as it is.
    """

    #: While True, ``dump`` links nothing (the CLI is building the data module the links come from).
    defer_links = False

    def dump(self, cfg: Namespace | None = None, *args: Any, **kwargs: Any) -> str:
        """Dump ``cfg`` as jsonargparse does, from a copy with the data module's values linked into the model arguments.

        Nothing is linked while `defer_links` is set or into a config the CLI already linked; a config that cannot be
        linked (a template whose data module cannot be built yet) is dumped as it is.
        """
        if isinstance(cfg, Namespace) and not self.defer_links and not _is_linked(cfg):
            cfg = cfg.clone()
            subcommand = cfg.get("subcommand")
            section = cfg.get(subcommand) if isinstance(subcommand, str) else cfg
            if isinstance(section, Namespace):
                with contextlib.suppress(Exception):  # an incomplete config (a template): dumped as it is
                    link_data_into_model(section)
        return super().dump(cfg, *args, **kwargs)


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
    """LightningCLI over any ``LightningModule`` and ``LightningDataModule``, linking the data module into the model.

    ``--model``/``--data`` take class paths (``subclass_mode``). The data module's shape attributes are linked into the
    model where both have them (`link_data_into_model`), and an optional test runs after fit.

    ``fit --test_after_fit true`` runs ``trainer.test`` on the fitted model right after ``fit``, so one command
    trains and evaluates: Lightning prints its table of every test metric, and the CLI adds a line
    ``test accuracy: ...`` when there is an accuracy (``test/acc``, or the first metric whose name contains
    ``acc``).

    ``export --ckpt_path PATH`` (`BNSGDTrainer.export`) folds the checkpoint's model and writes it as a
    ``torch.export`` program that loads with torch alone, checked in a fresh process.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands and ``export``, which takes the model and the data module."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_after_fit`` and ``--torch_threads``."""
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run the test set on the fitted model after fit and print every test metric.",
        )
        parser.add_argument(
            "--torch_threads",
            type=PositiveInt | None,
            default=None,
            help="torch.set_num_threads(n) before anything runs (null: torch's default, one thread per core). Small "
            "models on a busy CPU run fastest on 1 thread.",
        )

    def instantiate_classes(self) -> None:
        """Apply ``--torch_threads``, then build the classes.

        Where the model takes links from the data module, the data module is built once, by `_link_from_data`, and
        reused.
        """
        config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
        if isinstance(config, Namespace):
            threads = config.get("torch_threads")
            if threads is not None:
                torch.set_num_threads(int(threads))
            data = self._link_from_data(config)
            if data is not None:
                instantiate_cli_classes(self, [(_Prebuilt(data), LightningDataModule, True)])
                return
        super().instantiate_classes()

    def _link_from_data(self, config: Namespace) -> object | None:
        """Build the data module once, the way the run builds it, and link its attributes into the model's config.

        It is built with Lightning's instantiator, so its hyperparameters are recorded as usual. Its linked attributes
        are copied into the model's config in place, and the run uses that same instance: a user's data module that
        downloads or prints in ``__init__`` runs it once.
        """
        names = linkable_names(config)
        if not names:
            return None
        subcommand = self.config.get("subcommand")
        only_data = Namespace(data=config.data)
        partial = Namespace(subcommand=subcommand, **{subcommand: only_data}) if subcommand else only_data
        parser = self.parser
        if isinstance(parser, LinkingArgumentParser):
            parser.defer_links = True
        try:
            built = _instantiate(parser, partial)
        finally:
            if isinstance(parser, LinkingArgumentParser):
                parser.defer_links = False
        data = (built.get(subcommand) if subcommand else built).data
        copy_links(config, data, names)
        for linked in (self.config, config):
            _LINKED[id(linked)] = linked
        forget_config_dump(self)  # dumped while building the data module, before the links: dump it again
        return data

    def after_fit(self) -> None:
        """With ``--test_after_fit``: test the fitted model and print its test accuracy (rank zero), if there is one."""
        config = self.config.get(str(self.subcommand), {})
        if not config.get("test_after_fit", False):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)  # Lightning's table
        acc = find_test_accuracy(results[0] if results else {})
        if acc is not None and self.trainer.is_global_zero:
            print(f"test accuracy: {acc:.4f}", flush=True)


def find_test_accuracy(metrics: dict[str, Any]) -> float | None:
    """The test accuracy among ``trainer.test``'s metrics.

    ``test/acc``, else the first metric whose name contains ``acc`` (``test_acc1``, ``test/accuracy``), else ``None``.

    Examples:
        >>> find_test_accuracy({"test_loss": 0.3, "test_acc1": 0.9}), find_test_accuracy({"loss": 1.0})
        (0.9, None)
    """
    if "test/acc" in metrics:
        return float(metrics["test/acc"])
    return next((float(v) for k, v in metrics.items() if "acc" in k.rsplit("/", 1)[-1]), None)


def cli_main(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> BNSGDCLI:
    """Entry point of the ``lightning-bnsgd`` console script.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``), e.g. ``["fit", "--config", "digits.yaml"]``.
        run: run the subcommand (``False`` only instantiates, as LightningCLI's ``run`` does).
        **kwargs: passed on to ``LightningCLI`` (e.g. ``save_config_kwargs``). A ``trainer_class`` of your own
            must derive from `BNSGDTrainer` (its ``export`` method is the ``export`` subcommand).
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # The model's own configure_optimizers (SGDWarmup, stepped per batch) is the one to use; LightningCLI's
    # automatic --optimizer/--lr_scheduler would step schedulers per epoch.
    kwargs.setdefault("auto_configure_optimizers", False)
    kwargs.setdefault("parser_class", LinkingArgumentParser)
    kwargs.setdefault("trainer_class", BNSGDTrainer)  # Lightning's Trainer with `export` (the export subcommand)
    return BNSGDCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        **kwargs,
    )


def main() -> None:
    """The console script ``lightning-bnsgd`` (returns nothing, so the shell sees exit status 0).

    Like ``python -m``, it puts the current directory first on ``sys.path``, so ``--model my_module.MyModel``
    finds ``./my_module.py`` (a console script's own ``sys.path`` starts with its ``bin/`` directory instead).
    """
    add_working_directory_to_path()
    cli_main()


def add_working_directory_to_path() -> None:
    """Put the current directory first on ``sys.path`` unless it is already there (as ``''`` or its path)."""
    cwd = os.getcwd()
    if not any(entry in ("", ".") or os.path.abspath(entry) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


if __name__ == "__main__":  # pragma: no cover
    main()
