"""Every ```python block of every docs/*.md page runs, in order, in one namespace per page.

The snippets carry their own ``assert`` statements for what the page claims,
so a page whose text drifts from the code fails here. Figures referenced by a
page must exist and stay small enough to commit.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path):
    """The source of each ```python block of ``page``, with its first line number."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"transposed_convolution.md", "gradcheck.md", "upsampling.md", "fcn8s.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no ```python blocks"
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, source in blocks:
        code = compile(source, f"{page.name}:{line}", "exec")
        try:
            exec(code, namespace)  # noqa: S102 (the docs are the code under test)
        except Exception as exc:  # name the page and line in the failure
            raise AssertionError(f"{page.name}, block at line {line} failed: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_images_exist(page):
    for target in IMAGE.findall(page.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path = (page.parent / target).resolve()
        assert path.is_file(), f"{page.name} shows {target}, which does not exist"
        assert os.path.getsize(path) < 200_000, f"{target} is {os.path.getsize(path)} bytes; keep figures small"
