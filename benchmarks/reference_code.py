"""Importing the published TarFlow code from the folder a benchmark is given (never committed)."""

from __future__ import annotations

import sys
from pathlib import Path


def import_reference(folder: Path):
    """The published `transformer_flow` module from `folder` (its directory goes on sys.path)."""
    if not (folder / "transformer_flow.py").is_file():
        sys.exit(f"{folder}/transformer_flow.py not found: fetch apple/ml-tarflow there (see benchmarks/README.md)")
    sys.path.insert(0, str(folder.resolve()))
    import transformer_flow

    return transformer_flow
