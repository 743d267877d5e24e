"""The documentation stands on its own: no citation of an outside specification, no dead link.

Two checks, pure file reading:
- no "SPEC" citation (the word SPEC, upper case) in README.md or in the text files of
  lion_local/, serving/, slurm/, docs/, configs/ and benchmarks/: the project's own documents
  (docs/method.md, docs/run-directory.md, ...) are what the code and the docs refer to;
- every relative markdown link of README.md and docs/*.md, `[text](path)` or
  `[text](path#anchor)`, names a path that exists in the repository. Links with a scheme
  (https://, mailto:, ...) and pure `#anchor` links are not checked; neither are links inside
  code spans or fenced code blocks, which are not links.
Each failure names file:line and the reference at fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

SPEC_SCANNED = ("README.md", "lion_local", "serving", "slurm", "docs", "configs", "benchmarks")
SPEC_CITATION = re.compile(r"\bSPEC\b")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
BINARY_SUFFIXES = {".pyc", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".safetensors", ".bin", ".gz", ".zip"}

# [text](target) or [text](target "title"); the text may hold one level of brackets.
MARKDOWN_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def text_files(relative: str, root: Path = ROOT) -> list[Path]:
    """The text files at or under `relative` (a file or a folder of the repository)."""
    top = root / relative
    if top.is_file():
        return [top]
    if not top.is_dir():
        return []
    files = []
    for path in sorted(top.rglob("*")):
        parts = path.relative_to(root).parts
        if not path.is_file() or any(part in SKIPPED_DIRS or part.startswith(".") for part in parts):
            continue
        if path.suffix.lower() not in BINARY_SUFFIXES:
            files.append(path)
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def spec_citations(relative_paths: tuple[str, ...] = SPEC_SCANNED, root: Path = ROOT) -> list[str]:
    """`file:line: text` of every SPEC citation."""
    found = []
    for relative in relative_paths:
        for path in text_files(relative, root):
            text = read_text(path)
            if text is None:
                continue
            for number, line in enumerate(text.split("\n"), start=1):
                if SPEC_CITATION.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of each markdown link outside code."""
    links = []
    in_fence = None
    for number, line in enumerate(text.split("\n"), start=1):
        fence = FENCE.match(line)
        if fence:
            if in_fence is None:
                in_fence = fence.group(1)
            elif fence.group(1) == in_fence:
                in_fence = None
            continue
        if in_fence is not None:
            continue
        prose = CODE_SPAN.sub("", line)
        links += [(number, match.group(1)) for match in MARKDOWN_LINK.finditer(prose)]
    return links


def is_checked(target: str) -> bool:
    """A relative path (perhaps with an anchor); not a URL with a scheme, not a pure anchor."""
    return not (target.startswith("#") or SCHEME.match(target))


def dead_links(documents: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: target` of every relative link whose path does not exist in the repository."""
    dead = []
    for document in documents:
        for number, target in markdown_links(document.read_text(encoding="utf-8")):
            if not is_checked(target):
                continue
            path_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
            resolved = (root / path_part.lstrip("/")) if path_part.startswith("/") else (document.parent / path_part)
            resolved = resolved.resolve()
            if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
                dead.append(f"{document.relative_to(root)}:{number}: {target}")
    return dead


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------------------------
# The checks of the repository
# ----------------------------------------------------------------------------------------------


def test_no_spec_citations():
    found = spec_citations()
    assert not found, (
        f"{len(found)} SPEC citation(s); cite the project's own documents (docs/method.md, "
        "docs/run-directory.md, ...) instead:\n" + "\n".join(found)
    )


def test_relative_links_in_readme_and_docs_resolve():
    dead = dead_links(documents())
    assert not dead, f"{len(dead)} relative link(s) to paths that do not exist:\n" + "\n".join(dead)


def test_the_documents_the_readme_points_to_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for document in ("docs/method.md", "docs/run-directory.md"):
        assert (ROOT / document).is_file(), f"{document} is missing"
        assert f"]({document}" in readme, f"README.md does not link {document}"


# ----------------------------------------------------------------------------------------------
# The checkers themselves
# ----------------------------------------------------------------------------------------------


def test_link_extraction_skips_urls_anchors_and_code():
    text = "\n".join(
        [
            "See [the method](docs/method.md) and [a section](docs/method.md#stage-2-discrimination).",
            "Not checked: [paper](https://arxiv.org/abs/2305.12870), [mail](mailto:a@b.c), [up](#top).",
            "In code: `[x](nowhere.md)` is not a link.",
            "```",
            "[y](inside/a/fence.md)",
            "```",
            "An image: ![plot](plots/gaps.png \"the gaps\").",
        ]
    )
    links = markdown_links(text)
    assert links == [
        (1, "docs/method.md"),
        (1, "docs/method.md#stage-2-discrimination"),
        (2, "https://arxiv.org/abs/2305.12870"),
        (2, "mailto:a@b.c"),
        (2, "#top"),
        (7, "plots/gaps.png"),
    ]
    assert [target for _, target in links if is_checked(target)] == [
        "docs/method.md",
        "docs/method.md#stage-2-discrimination",
        "plots/gaps.png",
    ]


def test_dead_links_are_named_with_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("# here\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/here.md#here)\n\n[gone](docs/gone.md)\n[outside](../elsewhere.md)\n", encoding="utf-8"
    )
    assert dead_links([readme], root=tmp_path) == ["README.md:3: docs/gone.md", "README.md:4: ../elsewhere.md"]


def test_spec_citations_are_found_by_word(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text('"""As SPEC 2.3 says."""\nServerSpec = 1  # SPECIAL, spec\n', encoding="utf-8")
    assert spec_citations(("pkg",), root=tmp_path) == ['pkg/a.py:1: """As SPEC 2.3 says."""']
