"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``).

Mermaid goes into the built site, so that the diagrams render without network access: the theme uses a global
``mermaid`` when a page already defines one and fetches it from a CDN only otherwise. The file comes from the
pinned npm package (``package.json``; ``npm ci`` installs it, ``scripts/setup.sh`` runs that where npm exists);
without it the site still builds and the diagrams load Mermaid from the CDN, as before.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MERMAID = ROOT / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
TARGET = Path("javascripts") / "mermaid.min.js"  # the path listed under `extra_javascript`

log = logging.getLogger("mkdocs.hooks.mermaid")


def on_post_build(config: Any, **_: Any) -> None:
    """Copy the pinned Mermaid into the site."""
    if not MERMAID.exists():
        log.info("Mermaid is not installed (npm ci): the diagrams will load it from the CDN")
        return
    target = Path(config["site_dir"]) / TARGET
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MERMAID, target)
