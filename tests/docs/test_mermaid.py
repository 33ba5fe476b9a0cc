"""Every Mermaid diagram in the README and the docs parses with Mermaid's own parser.

The docs site bundles the same Mermaid (``package.json``: installed by ``npm ci``, which ``scripts/setup.sh`` runs
for the test set-up wherever npm is available), so a diagram that parses here renders there, offline too.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from tests.docs.test_doc_snippets import DOC_FILES, ROOT, extract_blocks

PARSER = ROOT / "tests" / "docs" / "mermaid_parse.mjs"
MERMAID = ROOT / "node_modules" / "mermaid" / "package.json"

DIAGRAMS = [
    (f"{doc.relative_to(ROOT)}:{block.line}", block.code)
    for doc in DOC_FILES
    for block in extract_blocks(doc.read_text(encoding="utf-8"))
    if block.lang == "mermaid"
]

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (Mermaid's parser)")


def parse(sources: list[str]) -> list[str | None]:
    """Mermaid's verdict per diagram: ``None`` when it parses, else the parser's message."""
    assert MERMAID.exists(), "Mermaid is not installed: run `npm ci` in the repository root (scripts/setup.sh does)"
    done = subprocess.run(
        ["node", str(PARSER)], input=json.dumps(sources), capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_docs_have_diagrams():
    assert len(DIAGRAMS) >= 2, DIAGRAMS


def test_the_parser_rejects_a_broken_diagram():
    verdicts = parse(["sequenceDiagram\n    A->>B: fine\n", "sequenceDiagram\n    Note over A: one; two\n    A-<>B\n"])
    assert verdicts[0] is None
    assert verdicts[1] and "Parse error" in verdicts[1]


def test_every_diagram_parses():
    verdicts = parse([code for _, code in DIAGRAMS])
    broken = {where: message for (where, _), message in zip(DIAGRAMS, verdicts, strict=True) if message}
    assert not broken, broken
