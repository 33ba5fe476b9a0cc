"""Code lines of the package per area: lines holding code, without docstrings, comments and blank lines.

Run ``python scripts/code_lines.py`` from the repository root (``--files`` also lists every module). The areas are
those of issue 21 ("Every concept once"); a module belongs to the area that needs it (shared helpers are counted
once, in the first area that lists them).

``--since REV`` says where each area's lines came from since the commit ``REV``: every commit after it (merges
left out) is counted against its parent and put in one of two kinds by its subject: a restructure (subjects that
start with one of ``RESTRUCTURE_PREFIXES``: no behaviour change) or a change of behaviour (fixes and features).
``--commits`` also lists each commit's change per area.
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "lightning_bnsgd"
#: Commit subjects of changes without a change of behaviour (the project's commit conventions).
RESTRUCTURE_PREFIXES = ("Restructure", "Mend", "Style", "Lint", "Docstrings", "Docs", "Perf", "Test")
_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
AREAS = {
    "recalibration": [
        "bn/recalibrate.py",
        "bn/passes.py",
        "bn/collector.py",
        "bn/_sequential.py",
        "bn/moments.py",
        "bn/buffers.py",
        "bn/batches.py",
        "bn/distributed.py",
        "bn/_modes.py",
        "callbacks/recalibration.py",
        "callbacks/_recalibration_sources.py",
        "callbacks/_recalibration_run.py",
        "callbacks/_recalibration_checks.py",
        "callbacks/_batches.py",
        "callbacks/_own_forwards.py",
    ],
    "monitors": [
        "callbacks/bn_monitor.py",
        "callbacks/_bn_layers.py",
        "callbacks/_bn_checks.py",
        "callbacks/_bn_step.py",
        "callbacks/_monitor_layout.py",
        "callbacks/dynamics_monitor.py",
        "callbacks/_cadence.py",
        "callbacks/_name_patterns.py",
        "callbacks/_warn_once.py",
        "callbacks/_log_prefix.py",
        "bn/_host.py",
        "bn/dynamics.py",
        "bn/inspect.py",
    ],
    "schedule and optimizer config": [
        "optim/plan.py",
        "optim/shapes.py",
        "optim/schedule.py",
        "optim/sgd_warmup.py",
    ],
    "optimizer, rest": ["optim/groups.py", "optim/_trainer.py"],
}


def code_lines(path: Path) -> int:
    """The number of lines of ``path`` that hold code (a docstring's lines and comment-only lines do not count)."""
    return code_lines_of(path.read_text())


def code_lines_of(text: str) -> int:
    """The number of lines of the Python source ``text`` that hold code."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in _SKIPPED:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def area_lines(count: Callable[[str], int | None]) -> dict[str, tuple[int, int]]:
    """Each area's ``(code lines, modules)``; ``count(module)`` gives a module's lines (``None``: no such module)."""
    counted: set[str] = set()
    out = {}
    for area, files in AREAS.items():
        found = [(f, n) for f in files if f not in counted and (n := count(f)) is not None]
        counted.update(f for f, _ in found)
        out[area] = (sum(n for _, n in found), len(found))
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


class _Commits:
    """Each area's code lines at a commit, each commit's tree and each blob read once."""

    def __init__(self) -> None:
        self._blobs: dict[str, int] = {}
        self._commits: dict[str, dict[str, int]] = {}

    def lines_at(self, rev: str) -> dict[str, int]:
        if rev not in self._commits:
            listing = _git("ls-tree", "-r", rev, str(PACKAGE)).splitlines()
            blobs = {path: entry.split()[2] for entry, path in (line.split("\t") for line in listing)}
            areas = area_lines(lambda f: self._blob_lines(blobs.get(f"src/lightning_bnsgd/{f}")))
            self._commits[rev] = {area: lines for area, (lines, _) in areas.items()}
        return self._commits[rev]

    def _blob_lines(self, blob: str | None) -> int | None:
        if blob is not None and blob not in self._blobs:
            self._blobs[blob] = code_lines_of(_git("cat-file", "blob", blob))
        return None if blob is None else self._blobs[blob]


def history(since: str, list_commits: bool) -> None:
    """Where each area's lines came from since ``since``: restructures and changes of behaviour, summed."""
    commits = _Commits()
    start, end = commits.lines_at(_git("rev-parse", since).strip()), commits.lines_at(_git("rev-parse", "HEAD").strip())
    sums = {kind: dict.fromkeys(AREAS, 0) for kind in ("restructure", "behaviour")}
    log = _git("log", "--reverse", "--no-merges", "--format=%H %P %s", f"{since}..HEAD")
    for rev, parent, subject in (line.split(" ", 2) for line in log.splitlines()):
        before, after = commits.lines_at(parent), commits.lines_at(rev)
        kind = "restructure" if subject.startswith(RESTRUCTURE_PREFIXES) else "behaviour"
        delta = {area: after[area] - before[area] for area in AREAS}
        for area in AREAS:
            sums[kind][area] += delta[area]
        if list_commits and any(delta.values()):
            print(rev[:7], " ".join(f"{delta[a]:+5d}" for a in AREAS), f"{kind[:5]}  {subject[:80]}")
    print(f"{'area':32s} {since[:7]:>7s} {'behaviour':>10s} {'restructure':>12s} {'HEAD':>6s}")
    for area in AREAS:
        behaviour, restructure = sums["behaviour"][area], sums["restructure"][area]
        print(f"{area:32s} {start[area]:7d} {behaviour:+10d} {restructure:+12d} {end[area]:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", action="store_true", help="also list every module's count")
    parser.add_argument("--since", metavar="REV", help="where each area's lines came from since the commit REV")
    parser.add_argument("--commits", action="store_true", help="with --since: list each commit's change")
    args = parser.parse_args()
    if args.since:
        history(args.since, args.commits)
        return
    areas = area_lines(lambda f: code_lines(PACKAGE / f) if (PACKAGE / f).exists() else None)
    for area, (lines, modules) in areas.items():
        print(f"{area:32s} {lines:5d}  ({modules} modules)")
    paths = sorted(PACKAGE.rglob("*.py"))
    print(f"{'src/ total':32s} {sum(code_lines(p) for p in paths):5d}  ({len(paths)} modules)")
    if args.files:
        for path in paths:
            print(f"{code_lines(path):5d}  {path.relative_to(PACKAGE)}")


if __name__ == "__main__":
    main()
