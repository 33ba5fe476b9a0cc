"""Layer-name patterns of ``BNStatsMonitor(include=..., exclude=...)``: globs, or regular expressions after ``re:``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

REGEX_PREFIX = "re:"
NamePredicate = Callable[[str], bool]


def _compile_one(pattern: object, argument: str, owner: str) -> NamePredicate:
    if not isinstance(pattern, str):
        raise TypeError(f"{owner}: `{argument}` patterns must be non-empty strings, got {pattern!r}.")
    if not pattern:
        raise ValueError(f"{owner}: `{argument}` patterns must be non-empty strings, got {pattern!r}.")
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as err:
            raise ValueError(
                f"{owner}: `{argument}` has an invalid regular expression {pattern!r}: {err}. "
                f"Patterns starting with {REGEX_PREFIX!r} are regular expressions (re.search), others are globs."
            ) from err
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def compile_name_patterns(patterns: str | Iterable[str] | None, argument: str, owner: str) -> list[NamePredicate]:
    r"""Turn layer-name patterns into predicates.

    A pattern is a glob (``fnmatch``, matching the whole name) unless it starts with ``"re:"``: then the rest is a
    regular expression searched in the name.

    Raises:
        TypeError: ``patterns`` is neither a string nor an iterable of strings.
        ValueError: an empty pattern or an invalid regular expression (the message names ``owner`` and
            ``argument``).

    Examples:
        >>> predicates = compile_name_patterns(["*.0.*", r"re:\.1\."], "include", "BNStatsMonitor")
        >>> [p("net.features.0.norm") for p in predicates]
        [True, False]
        >>> compile_name_patterns([""], "exclude", "BNStatsMonitor")
        Traceback (most recent call last):
        ...
        ValueError: BNStatsMonitor: `exclude` patterns must be non-empty strings, got ''.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable):
        raise TypeError(f"{owner}: `{argument}` must be a pattern string, a list of them, or None; got {patterns!r}.")
    return [_compile_one(p, argument, owner) for p in patterns]


def select_layer_names(
    names: Iterable[str], include: Sequence[NamePredicate] = (), exclude: Sequence[NamePredicate] = ()
) -> list[str]:
    """Names matched by any ``include`` predicate (all when there is none) and by no ``exclude`` predicate.

    Examples:
        >>> names = ["a.norm", "b.norm", "b.bn"]
        >>> include = compile_name_patterns("b.*", "include", "X")
        >>> select_layer_names(names, include, compile_name_patterns("*bn", "exclude", "X"))
        ['b.norm']
    """
    return [n for n in names if (not include or any(p(n) for p in include)) and not any(p(n) for p in exclude)]


#: The name ``torch.compile``'s wrapper gives the module it wraps (``OptimizedModule._orig_mod``).
COMPILED_WRAPPER_NAME = "_orig_mod"


def user_module_name(name: str) -> str:
    """The module's name as the user wrote the model: without the ``_orig_mod`` level that ``torch.compile`` adds.

    ``torch.compile`` adds it under every compiled module (``self.net = torch.compile(net)`` names ``net.bn1`` as
    ``net._orig_mod.bn1``).

    Examples:
        >>> user_module_name("net._orig_mod.layer1.0._orig_mod.bn1"), user_module_name("net.bn1")
        ('net.layer1.0.bn1', 'net.bn1')
    """
    return ".".join(part for part in name.split(".") if part != COMPILED_WRAPPER_NAME)
