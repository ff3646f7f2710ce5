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


def test_ci_installs_the_pytorch_reference_and_runs_the_readme_test_command():
    """.ci/run installs the CPU PyTorch before the README's test command (so the torch-marked parity
    tests run in CI), checks it imports, and the README's command is unchanged (PyTorch stays optional)."""
    root = DOCS.parent
    ci = (root / ".ci" / "run").read_text()
    readme = (root / "README.md").read_text()
    command = "pip install -e '.[test]' && python -m pytest -q"
    assert command in readme and command in ci
    torch_line = next(i for i, line in enumerate(ci.splitlines()) if line.startswith("pip install") and "torch==" in line)
    test_line = next(i for i, line in enumerate(ci.splitlines()) if line.startswith(command))
    assert torch_line < test_line and "import torch" in ci
    assert "torch" not in (root / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
