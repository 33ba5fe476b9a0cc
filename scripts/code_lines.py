"""Code lines of the package per area: lines holding code, without docstrings, comments and blank lines.

Run ``python scripts/code_lines.py`` from the repository root (``--files`` also lists every module). The areas are
those of issue 21 ("Every concept once"); a module belongs to the area that needs it (shared helpers are counted
once, in the first area that lists them).
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "lightning_bnsgd"
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
    text = path.read_text()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", action="store_true", help="also list every module's count")
    args = parser.parse_args()
    counted: set[str] = set()
    for area, files in AREAS.items():
        mine = [f for f in files if f not in counted and (PACKAGE / f).exists()]
        counted.update(mine)
        print(f"{area:32s} {sum(code_lines(PACKAGE / f) for f in mine):5d}  ({len(mine)} modules)")
    modules = sorted(PACKAGE.rglob("*.py"))
    print(f"{'src/ total':32s} {sum(code_lines(p) for p in modules):5d}  ({len(modules)} modules)")
    if args.files:
        for path in modules:
            print(f"{code_lines(path):5d}  {path.relative_to(PACKAGE)}")


if __name__ == "__main__":
    main()
