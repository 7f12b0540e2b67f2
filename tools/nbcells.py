"""Write a notebook from a list of cells: a tiny helper for authoring the numbered notebooks.

    python tools/nbcells.py            (re)writes nothing by itself; import `write_notebook`

The notebooks in notebooks/ are the source of truth once written; this helper only makes
sure each starts with a code cell tagged ``parameters`` (papermill's convention).
"""
from __future__ import annotations

from pathlib import Path

import nbformat


def write_notebook(path: str | Path, parameters: str, cells: list[tuple[str, str]]) -> None:
    """``cells``: ``("md", text)`` or ``("code", source)`` after the tagged parameters cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(parameters.strip())
    params.metadata["tags"] = ["parameters"]
    nb.cells.append(params)
    for kind, text in cells:
        text = text.strip()
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.write(nb, str(path))
