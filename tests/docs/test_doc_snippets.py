"""Every fenced code block of ``README.md`` and ``docs/**/*.md`` is exercised here, so the docs cannot rot.

The convention (summarized for writers in ``docs/contributing.md``, section "Writing docs"), by the block's language
tag:

``python``
    Executed. The blocks of one page run in order as one module named ``my_project`` (a later block builds on the
    names of earlier ones, and a YAML block of the page may name their classes ``my_project.<Name>``), in a
    temporary working directory, with ``torch.set_num_threads(1)``. A block with ``>>>`` prompts runs as a doctest
    (in the same namespace) instead.
``yaml``
    A LightningCLI config or a fragment of one, rooted at the top level (``trainer:``, ``model:``, ``data:``,
    ``seed_everything:``, ``test_after_fit:``, ...). It is merged onto the packaged ``configs/digits.yaml`` and
    instantiated through ``lightning_bnsgd.cli.cli_main(..., run=False)``: every ``class_path`` is resolved as
    LightningCLI resolves it (short names such as ``LearningRateMonitor`` included) and built with its
    ``init_args``, so a wrong field name, type or value fails. A config whose ``model`` or ``data`` is
    ``my_project.<Name>`` (a class defined by the page) is instantiated through a plain ``LightningCLI`` instead.
``bash`` / ``console``
    Every command line (in ``console`` blocks the lines starting with ``$``; the other lines are output) must have
    one of these forms, checked without training anything:

    * ``bash scripts/<name>.sh ...``: the script exists;
    * ``python -m lightning_bnsgd ...`` (the main job: parsed as ``lightning-bnsgd fit --config <packaged>
      ...``); a command with ``--print_config`` may end in ``> FILE``, and a later ``--config FILE`` of the same
      block reads the packaged config;
    * ``lightning-bnsgd <subcommand> ...``, ``python -m lightning_bnsgd.cli ...``, and either one behind ``srun`` or
      ``torchrun <options> -m lightning_bnsgd.cli ...``: parsed by the real CLI with the same arguments, from the
      repository root (``--config`` files must exist; every field name and type is checked), without instantiating
      or running anything (so GPU and multi-node commands are checked on a CPU too);
    * ``python examples/<name>.py <flags>``: the file exists and every ``--flag`` appears in its ``--help`` (for
      scripts outside ``examples/experiments/``, dotted CLI overrides such as ``--trainer.max_epochs`` are passed
      on to the CLI and not looked up);
    * accepted without running: ``pip install``, ``python -m pip install``, ``git clone``, ``cd``, ``source``,
      ``mkdocs serve``, ``mkdocs build``.

    Any other command fails the test, so new docs must follow the convention.
``text``
    Output or plain text: not code, skipped.
``mermaid``
    A diagram (rendered by the docs site): skipped.

Blocks inside content tabs (``=== "..."`` followed by a four-space indented block) are dedented and run like any
other, so both tabs of a pair are tested.

``docs/cli.md``'s YAML field reference is generated from the packaged config (``tests/docs/cli_reference.py``);
``test_cli_reference_*`` hold it to the YAML.

Any other language tag, or none, fails. A page may import ``pytorch_lightning`` or ``lightning.pytorch``: while it
runs, both names point to the namespace lightning_bnsgd chose (``alias_lightning``), as for a reader who imports
their Lightning before lightning_bnsgd.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from lightning_bnsgd.__main__ import main_job_args
from lightning_bnsgd._compat import LightningCLI
from lightning_bnsgd.cli import BNSGDCLI, cli_main, packaged_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_reference  # a sibling module (tests/docs is not a package)

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = ("python", "yaml", "bash", "console", "text", "mermaid")
CLI_KEYS = {"seed_everything", "trainer", "model", "data", "test_after_fit", "ckpt_path", "optimizer", "lr_scheduler"}
ACCEPTED = (
    ("pip", "install"),
    ("python", "-m", "pip", "install"),
    ("git", "clone"),
    ("cd",),
    ("source",),
    ("mkdocs", "serve"),
    ("mkdocs", "build"),
)
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
PAGE_MODULE = "my_project"


@dataclass
class Block:
    """One fenced code block: its 1-based line (the opening fence), language tag and body."""

    line: int
    lang: str
    code: str


def extract_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order (indented fences, e.g. in lists, are dedented)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip()
        lang = info.split()[0].strip("{}.").lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line)
            j += 1
        else:
            raise AssertionError(f"line {i + 1}: code fence {fence!r} is never closed")
        blocks.append(Block(i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def test_extract_blocks():
    text = "x\n```python\na = 1\n```\n\n  ~~~yaml title='t'\n  k: 1\n  ~~~\n````text\n```\n````\n```\nbare\n```\n"
    assert [(b.line, b.lang, b.code) for b in extract_blocks(text)] == [
        (2, "python", "a = 1\n"),
        (6, "yaml", "k: 1\n"),
        (9, "text", "```\n"),
        (12, "", "bare\n"),
    ]


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def captured() -> Iterator[io.StringIO]:
    """Capture stdout and stderr (jsonargparse prints its errors there before exiting)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def expect_clean_exit(run, what: str, must_exit: bool = True) -> str:
    """Run ``run()`` and return its output; it must exit with status 0 (``--help``, ``--print_config``), or, with
    ``must_exit=False``, return normally."""
    with captured() as out:
        try:
            run()
        except SystemExit as exc:
            code = exc.code
        else:
            code = "no exit" if must_exit else 0
    if code not in (0, None):
        raise AssertionError(f"{what} exited with {code!r}:\n{out.getvalue()[-3000:]}")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------- python


def run_python(block: Block, module: types.ModuleType, doc: Path) -> None:
    if any(line.lstrip().startswith(">>>") for line in block.code.splitlines()):
        parser = doctest.DocTestParser()
        test = parser.get_doctest(block.code, module.__dict__, f"{doc.name}:{block.line}", str(doc), block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report = io.StringIO()
        runner.run(test, out=report.write, clear_globs=False)
        module.__dict__.update(test.globs)
        if runner.failures:
            raise AssertionError(report.getvalue())
        return
    # Leading newlines make tracebacks point at the right line of the Markdown file.
    code = compile("\n" * block.line + block.code, str(doc), "exec")
    exec(code, module.__dict__)


# ------------------------------------------------------------------------------------------------------- yaml


def run_yaml(block: Block, tmp_path: Path) -> None:
    config = yaml.safe_load(block.code)
    if not isinstance(config, dict) or not config or not set(config) <= CLI_KEYS:
        raise AssertionError(
            f"a yaml block must be a LightningCLI config rooted at its top level (keys from {sorted(CLI_KEYS)}), "
            f"got {type(config).__name__} with keys {sorted(config) if isinstance(config, dict) else None}"
        )
    path = tmp_path / f"block_{block.line}.yaml"
    path.write_text(block.code)
    own_class = any(
        isinstance(config.get(key), dict) and str(config[key].get("class_path", "")).startswith(PAGE_MODULE + ".")
        for key in ("model", "data")
    )
    if own_class:
        expect_clean_exit(
            lambda: LightningCLI(args=["--config", str(path)], run=False, save_config_callback=None),
            "LightningCLI (page-defined classes)",
            must_exit=False,
        )
    else:
        expect_clean_exit(
            lambda: cli_main(["--config", str(packaged_config()), "--config", str(path)], run=False),
            "lightning_bnsgd.cli merged onto configs/digits.yaml",
            must_exit=False,
        )


# --------------------------------------------------------------------------------------------- bash / console


def command_lines(block: Block) -> list[str]:
    """The command lines of a bash/console block, with backslash continuations joined."""
    commands: list[str] = []
    pending = ""
    for raw in block.code.splitlines():
        line = raw.strip()
        if not pending and block.lang == "console":
            if not line.startswith("$"):
                continue  # output
            line = line[1:].strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    if pending:
        commands.append(pending)
    return commands


_HELP: dict[Path, str] = {}


def script_help(script: Path) -> str:
    """``python <script> --help``, run in this process (torch is already imported: fast)."""
    if script not in _HELP:
        old_argv, old_path = sys.argv, list(sys.path)
        sys.argv = [str(script), "--help"]
        sys.path.insert(0, str(script.parent))
        try:
            _HELP[script] = expect_clean_exit(
                lambda: runpy.run_path(str(script), run_name="__main__"), f"{script.name} --help"
            )
        finally:
            sys.argv, sys.path[:] = old_argv, old_path
    return _HELP[script]


def check_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse ``args`` with the real CLI (``cli_main``) from the repository root, instantiating and running nothing.

    ``--print_config`` is dropped: jsonargparse prints and exits as soon as it meets it, before it would report an
    unknown argument. ``--help`` prints and exits 0.
    """
    args = [arg for arg in args if arg.split("=", 1)[0] != "--print_config"]
    with monkeypatch.context() as patch, working_directory(ROOT):
        patch.setattr(BNSGDCLI, "instantiate_classes", lambda self: None)
        patch.setattr(BNSGDCLI, "_run_subcommand", lambda self, subcommand: None)
        expect_clean_exit(lambda: cli_main(args), f"lightning-bnsgd {shlex.join(args)}", must_exit=False)


def check_example(tokens: list[str]) -> None:
    script = ROOT / tokens[1]
    if not script.is_file():
        raise AssertionError(f"{tokens[1]} does not exist")
    experiment = tokens[1].startswith("examples/experiments/")
    flags = [t.split("=", 1)[0] for t in tokens[2:] if t.startswith("-") and len(t) > 1 and not t[1].isdigit()]
    if not experiment:
        flags = [f for f in flags if "." not in f]
    if not flags and not experiment:
        return
    text = script_help(script)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    if missing:
        raise AssertionError(f"{tokens[1]} --help does not list {missing}:\n{text}")


def run_command(command: str, monkeypatch: pytest.MonkeyPatch, written: dict[str, Path] | None = None) -> None:
    """Check one command line. ``written`` maps the files that earlier commands of the same block wrote with
    ``--print_config > FILE`` to the config they print (the packaged one): a later ``--config FILE`` reads it."""
    tokens = shlex.split(command, comments=True)
    if not tokens:
        return
    written = {} if written is None else written
    if ">" in tokens:
        at = tokens.index(">")
        if at + 2 != len(tokens) or "--print_config" not in tokens[:at]:
            raise AssertionError(f"only `... --print_config > FILE` may redirect output: {command}")
        written[tokens[at + 1]] = packaged_config()
        tokens = tokens[:at]
    for i, token in enumerate(tokens[:-1]):
        if token == "--config" and tokens[i + 1] in written:
            tokens[i + 1] = str(written[tokens[i + 1]])
    command = shlex.join(tokens)
    if any(tuple(tokens[: len(prefix)]) == prefix for prefix in ACCEPTED):
        return
    if tokens[0] == "srun":
        return run_command(shlex.join(tokens[1:]), monkeypatch, written)
    if tokens[0] == "bash" and len(tokens) >= 2 and re.fullmatch(r"scripts/[\w.-]+\.sh", tokens[1]):
        if not (ROOT / tokens[1]).is_file():
            raise AssertionError(f"{tokens[1]} does not exist")
        return None
    if tokens[0] == "lightning-bnsgd":
        return check_cli(tokens[1:], monkeypatch)
    if tokens[:3] == ["python", "-m", "lightning_bnsgd.cli"]:
        return check_cli(tokens[3:], monkeypatch)
    if tokens[:3] == ["python", "-m", "lightning_bnsgd"]:
        return check_cli(main_job_args(tokens[3:]), monkeypatch)
    if tokens[0] == "torchrun" and "-m" in tokens:
        at = tokens.index("-m")
        if tokens[at + 1 : at + 2] == ["lightning_bnsgd.cli"]:
            return check_cli(tokens[at + 2 :], monkeypatch)
    if tokens[0] == "python" and len(tokens) >= 2 and re.fullmatch(r"examples/[\w/.-]+\.py", tokens[1]):
        return check_example(tokens)
    raise AssertionError(f"unknown command form (see tests/docs/test_doc_snippets.py for the allowed ones): {command}")


# ------------------------------------------------------------------------------------------------------- pages


SUBPACKAGES = ("callbacks", "loggers", "tuner", "cli", "strategies", "utilities", "core")


def alias_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``import pytorch_lightning`` and ``import lightning.pytorch`` both mean the namespace lightning_bnsgd chose.

    A reader runs a page in a fresh process: it imports its Lightning first, and lightning_bnsgd follows that
    namespace. Here lightning_bnsgd was imported before the page (with the namespace ``_compat`` picked), so for the
    page's run both names point to that namespace: the page works as it does for a reader, whichever name it uses,
    in an environment with both packages or with only one of them.
    """
    from lightning_bnsgd import ConvNetClassifier

    modules = [base.__module__ for base in ConvNetClassifier.__mro__]
    chosen = "lightning.pytorch" if any(m.startswith("lightning.pytorch.") for m in modules) else "pytorch_lightning"
    for sub in SUBPACKAGES:
        importlib.import_module(f"{chosen}.{sub}")
    other = "lightning.pytorch" if chosen == "pytorch_lightning" else "pytorch_lightning"
    for name, mod in list(sys.modules.items()):
        if name == chosen or name.startswith(chosen + "."):
            monkeypatch.setitem(sys.modules, other + name[len(chosen) :], mod)
    if other == "lightning.pytorch":  # `import lightning.pytorch as L` reads the attribute of the parent package
        parent = sys.modules.get("lightning")
        if parent is None:
            try:
                parent = importlib.import_module("lightning")
            except ImportError:
                parent = types.ModuleType("lightning")
                monkeypatch.setitem(sys.modules, "lightning", parent)
        monkeypatch.setattr(parent, "pytorch", sys.modules[chosen], raising=False)


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("doc", DOC_FILES, ids=page_id)
def test_doc_page(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = extract_blocks(doc.read_text(encoding="utf-8"))
    bad = [(b.line, b.lang or "(none)") for b in blocks if b.lang not in LANGUAGES]
    assert not bad, f"{page_id(doc)}: code blocks with a language other than {LANGUAGES}: {bad}"
    alias_lightning(monkeypatch)
    module = types.ModuleType(PAGE_MODULE)
    module.__file__ = str(doc)
    monkeypatch.setitem(sys.modules, PAGE_MODULE, module)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in blocks:
            where = f"{page_id(doc)}:{block.line} ({block.lang} block)"
            try:
                if block.lang == "python":
                    run_python(block, module, doc)
                elif block.lang == "yaml":
                    run_yaml(block, tmp_path)
                elif block.lang in ("bash", "console"):
                    written: dict[str, Path] = {}
                    for command in command_lines(block):
                        run_command(command, monkeypatch, written)
            except Exception as exc:
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)


MISTAKES = {
    "yaml-callback-field": (
        "yaml",
        "trainer:\n  callbacks:\n    - class_path: LearningRateMonitor\n      init_args: {logging_intervall: step}\n",
    ),
    "yaml-value": ("yaml", "model:\n  init_args:\n    optimizer: {lr: -1.0}\n"),
    "yaml-trainer-field": ("yaml", "trainer:\n  max_epoch: 3\n"),
    "yaml-not-rooted": ("yaml", "callbacks:\n  - class_path: lightning_bnsgd.BNStatsMonitor\n"),
    "cli-field": (
        "bash",
        "lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml --trainer.max_epochz=5\n",
    ),
    "example-flag": ("bash", "python examples/plot_lr_schedule.py --no-such-flag\n"),
    "missing-script": ("bash", "bash scripts/no_such_script.sh\n"),
    "unknown-command": ("bash", "make all\n"),
    "redirect": ("bash", "lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml > out.txt\n"),
    "main-job-field": ("bash", "python -m lightning_bnsgd --trainer.max_epochz=5\n"),
    "console-missing-config": ("console", "$ lightning-bnsgd fit --config no_such_file.yaml\noutput line\n"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_mistakes_are_caught(mistake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks are not vacuous: a wrong field, value, flag, file or command form fails."""
    lang, code = MISTAKES[mistake]
    monkeypatch.chdir(tmp_path)
    block = Block(1, lang, code)
    with pytest.raises((AssertionError, ValueError)):  # ValueError: a constructor refusing a value
        if lang == "yaml":
            run_yaml(block, tmp_path)
        else:
            for command in command_lines(block):
                run_command(command, monkeypatch)


# ------------------------------------------------------------------------------------------- cli field reference


def test_cli_reference_is_current() -> None:
    """``docs/cli.md``'s field tables are what ``cli_reference.py`` generates from the packaged YAML now."""
    region = cli_reference.page_region(cli_reference.PAGE.read_text(encoding="utf-8"))
    assert region is not None, "docs/cli.md lost the markers of its generated field reference"
    assert region == cli_reference.generated(), (
        "docs/cli.md's field reference is out of date with src/lightning_bnsgd/configs/digits.yaml: "
        "run `python tests/docs/cli_reference.py`"
    )


def test_cli_reference_covers_every_field() -> None:
    """Every scalar field of the packaged YAML (read by a real YAML parser) has a row, and every row a field."""
    config = yaml.safe_load(cli_reference.CONFIG.read_text(encoding="utf-8"))
    expected = {key.replace(".init_args", "") for key in cli_reference.leaf_keys(config)}
    rows = {
        (re.sub(r"\[\d+\]", "", section.path) + "." if section.path else "") + key
        for section in cli_reference.parse_config(cli_reference.CONFIG.read_text(encoding="utf-8"))
        for key, _, _ in section.rows
    }
    assert rows == expected, f"missing rows: {sorted(expected - rows)}; rows of no field: {sorted(rows - expected)}"


def test_cli_reference_reads_comments_values_and_types() -> None:
    text = (
        "seed_everything: 0   # seeds all\n"
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_bnsgd.BNRecalibration   # exact statistics (docs/recalibration.md)\n"
        "      init_args:\n"
        "        every_n_epochs: 2             # how often\n"
        "model:\n"
        "  class_path: lightning_bnsgd.ConvNetClassifier\n"
        "  init_args:\n"
        "    optimizer:                    # the recipe\n"
        "      momentum: 0.9               # SGD | momentum\n"
    )
    page = cli_reference.render(cli_reference.parse_config(text))
    assert "| `seed_everything` | `0` | seeds all |" in page
    assert "### `trainer.callbacks`: `BNRecalibration` { #bnrecalibration }" in page
    assert "exact statistics ([recalibration](recalibration.md))." in page
    assert "| `every_n_epochs` | `int` | `2` | how often |" in page
    assert "### `model.init_args.optimizer`: `SGDWarmup` { #sgdwarmup }" in page
    assert "| `momentum` | `float` | `0.9` | SGD \\| momentum |" in page
