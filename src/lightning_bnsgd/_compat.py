"""The one module that imports Lightning, and the rules for its two namespaces.

Lightning ships under two import names: ``pytorch_lightning`` (the standalone package, our declared dependency)
and ``lightning.pytorch`` (inside the unified ``lightning`` package, whose install also brings
``pytorch_lightning``). Both are often installed, and users import either, in any order relative to this package.
Three rules keep every piece right whichever the user's Trainer is:

1. **Callbacks** subclass `Callback`, which derives from the ``Callback`` class of *every* installed namespace, so
   either namespace's ``Trainer`` and ``LightningCLI`` accept them.
2. **Anything namespace-specific at run time** (a Lightning logger or callback class for ``isinstance``, a Lightning
   base class for ``is_overridden``) is looked up with `namespace_of` on the object at hand (the Trainer, the
   DataModule), never taken from an import-time choice.
3. **Classes that must subclass one namespace's base** (``ConvNetClassifier``, ``DigitsDataModule``, the CLI) use
   `BACKEND`, picked once at import by `select_backend`: the ``LIGHTNING_BNSGD_BACKEND`` environment variable if
   set; else the namespace already imported (``lightning.pytorch`` when both are); else ``lightning.pytorch`` when
   the unified ``lightning`` package is installed; else ``pytorch_lightning``. A Trainer of the other namespace
   rejects them with Lightning's own error before any of their hooks runs; set ``LIGHTNING_BNSGD_BACKEND`` to the
   namespace of your Trainer in that case.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.imports import package_available

ENV_VAR = "LIGHTNING_BNSGD_BACKEND"
_MODULES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}


def select_backend(
    env: Mapping[str, str] | None = None,
    imported: Mapping[str, object] | None = None,
    installed: Mapping[str, bool] | None = None,
) -> str:
    """Return the Lightning namespace our LightningModule, DataModule and CLI subclass.

    ``"pytorch_lightning"`` or ``"lightning"`` (for ``lightning.pytorch``).

    Args:
        env: environment to read ``LIGHTNING_BNSGD_BACKEND`` from (default ``os.environ``).
        imported: modules already imported (default ``sys.modules``).
        installed: which of the two distributions are importable (default: looked up).

    Examples:
        >>> select_backend(env={"LIGHTNING_BNSGD_BACKEND": "pytorch_lightning"}, imported={}, installed={})
        'pytorch_lightning'
        >>> select_backend(env={}, imported={"pytorch_lightning": object()}, installed={})
        'pytorch_lightning'
        >>> select_backend(env={}, imported={}, installed={"pytorch_lightning": True, "lightning": True})
        'lightning'
    """
    env = os.environ if env is None else env
    imported = sys.modules if imported is None else imported
    choice = env.get(ENV_VAR, "").strip()
    if choice:
        if choice not in _MODULES:
            raise ValueError(
                f"{ENV_VAR}={choice!r} is not a Lightning namespace; allowed: 'pytorch_lightning' or 'lightning'."
            )
        return choice
    has_pl = "pytorch_lightning" in imported
    has_l = "lightning.pytorch" in imported
    if has_pl != has_l:
        return "pytorch_lightning" if has_pl else "lightning"
    if has_l:  # both imported: the unified package's namespace
        return "lightning"
    if installed is None:
        installed = {name: package_available(name) for name in ("pytorch_lightning", "lightning")}
    if installed.get("lightning", False) or not installed.get("pytorch_lightning", False):
        return "lightning"
    return "pytorch_lightning"


def _import_namespace(backend: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError:
        return None


BACKEND: str = select_backend()
pl: ModuleType = importlib.import_module(_MODULES[BACKEND])
#: Every installed Lightning namespace module, the selected one first.
NAMESPACES: tuple[ModuleType, ...] = tuple(
    m for m in (pl, *(_import_namespace(b) for b in _MODULES if b != BACKEND)) if m is not None
)

LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
loggers: ModuleType = importlib.import_module(f"{_MODULES[BACKEND]}.loggers")
_cli: ModuleType = importlib.import_module(f"{_MODULES[BACKEND]}.cli")
LightningCLI = _cli.LightningCLI
LightningArgumentParser = _cli.LightningArgumentParser
SaveConfigCallback = _cli.SaveConfigCallback

if TYPE_CHECKING:
    from pytorch_lightning import Callback
else:
    _CALLBACK_BASES = tuple(dict.fromkeys(m.Callback for m in NAMESPACES))
    if len(_CALLBACK_BASES) == 1:
        Callback = _CALLBACK_BASES[0]
    else:

        class Callback(*_CALLBACK_BASES):
            """A Lightning ``Callback`` of every installed namespace (``pytorch_lightning`` and ``lightning.pytorch``).

            Our callbacks derive from it so that either namespace's ``Trainer`` and ``LightningCLI`` accept them.
            """

        Callback.__module__ = __name__


def namespace_name(obj: object) -> str | None:
    """``"pytorch_lightning"``, ``"lightning.pytorch"`` or ``None``: the Lightning namespace of ``obj``'s class.

    The first class in the method resolution order that Lightning defines decides, so a user's subclass of a
    Lightning class counts as its base's namespace.

    Examples:
        >>> namespace_name(Trainer(logger=False, enable_progress_bar=False)) == pl.__name__
        True
        >>> namespace_name(object()) is None
        True
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        module = klass.__module__ or ""
        for name in _MODULES.values():
            if module == name or module.startswith(name + "."):
                return name
    return None


def namespace_of(obj: object) -> ModuleType:
    """The Lightning namespace module (``pytorch_lightning`` or ``lightning.pytorch``) of ``obj``'s class.

    Use it for every run-time lookup of a Lightning class (``namespace_of(trainer).loggers.TensorBoardLogger``), so
    that the answer matches the user's Trainer whatever was imported first.

    Raises:
        TypeError: when ``obj`` is not an instance (or subclass) of a Lightning class.

    Examples:
        >>> namespace_of(Trainer(logger=False, enable_progress_bar=False)) is pl
        True
    """
    name = namespace_name(obj)
    if name is None:
        raise TypeError(f"{type(obj).__name__} is not a class of pytorch_lightning or lightning.pytorch.")
    return importlib.import_module(name)


def logging_step(trainer: object) -> int:
    """The step at which Lightning's own logger connector writes metrics right now.

    That is the step a metric that the LightningModule logs with ``self.log`` in this training batch (or in this
    validation run) is logged at.

    During a training batch it is the number of batches that ended with an optimizer step *before* this one (0 for
    the first), so it is one less than ``trainer.global_step`` once the batch has stepped. The plugin's callbacks
    log at this step so that their metrics line up with the module's for the same batch. Lightning keeps the count
    in a private attribute of its fit loop (the only such read, kept here); ``trainer.global_step`` is the fallback
    where it is missing.

    Examples:
        >>> logging_step(Trainer(logger=False, enable_progress_bar=False))
        0
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    count = getattr(getattr(fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
    if isinstance(count, int):
        return count
    return int(getattr(trainer, "global_step", 0))


def batches_done_in_interrupted_epoch(trainer: Any) -> int:
    """Batches of the current epoch already trained when ``fit`` resumes from a mid-epoch checkpoint, else 0.

    Read from the fit loop's ``restarting`` flag and its epoch loop's completed-batch counter.
    """
    fit_loop = trainer.fit_loop
    if not fit_loop.restarting:
        return 0
    return int(fit_loop.epoch_loop.batch_progress.current.completed)


def is_last_train_batch(trainer: Any) -> bool:
    """Whether the current training batch is the epoch's last, as Lightning's epoch loop knows it.

    Its data fetcher looks one batch ahead, so this holds for a train dataloader without a length too (its
    ``batch_progress.is_last_batch``, set before ``on_train_batch_start``).
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def load_train_data(trainer: Any) -> None:
    """Have the fit loop load the train dataloader now (its ``setup_data()``).

    In ``max_steps``-only runs Lightning has not loaded it when ``configure_optimizers`` needs its length.
    """
    trainer.fit_loop.setup_data()


def skipping_backward(trainer: Any) -> bool:
    """Whether the fit loop skips backward (its ``_skip_backward`` flag).

    As in the extra BatchNorm-update epoch of Lightning's ``StochasticWeightAveraging``.
    """
    return bool(getattr(trainer.fit_loop, "_skip_backward", False))


def forget_config_dump(cli: object) -> None:
    """Drop the config dump a ``LightningCLI`` caches (``config_dump``), so that the next build dumps the config again.

    The dump is written the first time its instantiator builds a model or data module, and used as their saved
    hyperparameters. Used e.g. after the CLI changed the config in place.
    """
    if "config_dump" in vars(cli):
        del vars(cli)["config_dump"]


def instantiate_cli_classes(cli: Any, instantiators: list[tuple[Callable[..., Any], type, bool]]) -> None:
    """``LightningCLI.instantiate_classes`` (the body of Lightning 2.1 to 2.6) with ``instantiators`` tried first.

    The instantiators go to jsonargparse's ``instantiate(config, instantiators=...)`` where it has it (4.49 and later,
    which deprecate ``instantiate_classes`` and ``add_instantiator``), else to those two.
    """
    parser = cli.parser
    instantiate = getattr(parser, "instantiate", None)
    if instantiate is not None and "instantiators" in inspect.signature(instantiate).parameters:
        cli.config_init = instantiate(cli.config, instantiators=instantiators)
    else:  # pragma: no cover - jsonargparse before 4.49
        for instantiator, class_type, subclasses in instantiators:
            parser.add_instantiator(instantiator, class_type, subclasses=subclasses, prepend=True)
        cli.config_init = parser.instantiate_classes(cli.config)
    cli.datamodule = cli._get(cli.config_init, "data")
    cli.model = cli._get(cli.config_init, "model")
    cli._add_configure_optimizers_method_to_model(cli.subcommand)
    cli.trainer = cli.instantiate_trainer()


def _submodule(trainer: object, name: str) -> ModuleType:
    """``<the Trainer's namespace>.<name>``, e.g. ``lightning.pytorch.trainer.states``."""
    return importlib.import_module(f"{namespace_of(trainer).__name__}.{name}")


def request_train_dataloaders(trainer: object) -> object | None:
    """The train dataloader(s) of the Trainer's data source, requested outside ``fit`` as Lightning's fit loop does.

    That is ``train_dataloader()`` of the DataModule (or LightningModule) the run was given, or the
    ``train_dataloaders`` a ``fit`` was given. ``None`` when the source defines none.

    Lightning sets up train data only in ``fit``; in ``test`` and ``predict`` it still records the source (its
    fit loop's ``_data_source``, a private attribute: the only such read, kept here). A ``CombinedLoader`` is
    returned as the collection it combines.
    """
    source = trainer.fit_loop._data_source  # type: ignore[attr-defined]
    if not source.is_defined():
        return None
    connector = _submodule(trainer, "trainer.connectors.data_connector")
    loaders = connector._request_dataloader(source)
    combined = _submodule(trainer, "utilities.combined_loader").CombinedLoader
    return loaders.iterables if isinstance(loaders, combined) else loaders


def prepare_train_dataloader(trainer: object, loader: object) -> tuple[object, int | float]:
    """``loader`` prepared as Lightning's fit loop prepares its train dataloaders, and its number of batches.

    ``loader`` is one train dataloader from `request_train_dataloaders`. The preparation is Lightning's private
    ``_process_dataloader``: a ``DistributedSampler`` injected under DDP when ``use_distributed_sampler``, the
    strategy's processing, the worker seeding. The number of batches is what the Trainer's ``limit_train_batches``
    leaves of it (``inf`` for a loader without a length).

    The length is this process's own (no collective: a caller that must agree across processes does so itself).
    """
    connector = _submodule(trainer, "trainer.connectors.data_connector")
    states = _submodule(trainer, "trainer.states")
    fit, training = states.TrainerFn.FITTING, states.RunningStage.TRAINING
    connector._check_dataloader_iterable(loader, trainer.fit_loop._data_source, fit)  # type: ignore[attr-defined]
    loader = connector._process_dataloader(trainer, fit, training, loader)
    try:
        length: int | float = len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        length = float("inf")
    return loader, connector._parse_num_batches(training, length, trainer.limit_train_batches)  # type: ignore[attr-defined]


def index_wrapped_batch_sampler(loader: object) -> object | None:
    """The batch sampler that Lightning's predict loop wrapped to record the indices it yields.

    The wrapper is Lightning's private ``_IndexBatchSamplerWrapper``; ``None`` when ``loader``'s batch sampler is no
    such wrapper.

    The wrapper is its own iterator: a second iteration of the same loader would restart the one the predict loop
    is reading, so a reader that must not disturb it iterates the wrapped batch sampler instead.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    for namespace in NAMESPACES:
        overrides = importlib.import_module(f"{namespace.__name__}.overrides.distributed")
        wrapper = getattr(overrides, "_IndexBatchSamplerWrapper", None)
        if isinstance(wrapper, type) and isinstance(batch_sampler, wrapper):
            return getattr(batch_sampler, "_batch_sampler", None)
    return None


__all__ = [
    "BACKEND",
    "ENV_VAR",
    "NAMESPACES",
    "Callback",
    "LightningArgumentParser",
    "LightningCLI",
    "LightningDataModule",
    "LightningModule",
    "SaveConfigCallback",
    "Trainer",
    "batches_done_in_interrupted_epoch",
    "forget_config_dump",
    "index_wrapped_batch_sampler",
    "instantiate_cli_classes",
    "is_last_train_batch",
    "load_train_data",
    "loggers",
    "logging_step",
    "namespace_name",
    "namespace_of",
    "pl",
    "prepare_train_dataloader",
    "request_train_dataloaders",
    "select_backend",
    "skipping_backward",
]
