"""Names that moved: the old import path keeps working for one release, with a warning that names the new one."""

from __future__ import annotations

import warnings
from collections.abc import Collection
from types import ModuleType
from typing import Any

_warned: set[str] = set()


def moved_attribute(module: str, name: str, moved: Collection[str], new_home: ModuleType) -> Any:
    """A module ``__getattr__``'s answer for ``module.name``.

    ``new_home.name`` when ``name`` is one of ``moved`` (with a ``FutureWarning``, the first time in a process), else
    the ``AttributeError`` Python raises for a missing attribute.

    Examples:
        >>> import warnings
        >>> from lightning_bnsgd import bn
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     layers = moved_attribute("doctest_module", "batchnorm_layers", ["batchnorm_layers"], bn)
        >>> layers is bn.batchnorm_layers, caught[0].category.__name__
        (True, 'FutureWarning')
        >>> moved_attribute("lightning_bnsgd", "nope", [], bn)
        Traceback (most recent call last):
        ...
        AttributeError: module 'lightning_bnsgd' has no attribute 'nope'
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    if f"{module}.{name}" not in _warned:  # once per name: `from m import x` looks the name up twice
        _warned.add(f"{module}.{name}")
        warnings.warn(
            f"`{module}.{name}` moved to `{new_home.__name__}.{name}` in 0.3; import it from there (the old name "
            "goes in 0.4).",
            FutureWarning,
            stacklevel=3,
        )
    return getattr(new_home, name)
