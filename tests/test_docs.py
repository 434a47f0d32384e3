"""The front door stays true: every relative link in README.md and docs/ resolves (files and
heading anchors), every document the code, configurations and results cite is in the repository,
and the README's Python examples run and print what their comments say.

The ten-line API example loads real MNIST (a download on first use, then about 10 s of training).
The fast test runs it with ``kldwrm_ref.data.load_mnist`` replaced by a stand-in: synthetic data
with MNIST's shapes (784 features, 10 classes) but 1,536 training images, so it checks that the
code runs as written, not the accuracy it prints.  The slow test (``pytest -m slow``) runs it
unchanged on real MNIST and checks the printed accuracy against the README's comment.
"""

import ast
import contextlib
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kldwrm_ref import data

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INDENTED_CODE = re.compile(r"(?:(?<=\n\n)|\A)(?:(?: {4}|\t).*(?:\n|\Z))+")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text without fenced code blocks, indented code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", INDENTED_CODE.sub("", FENCE.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose target file, folder or heading anchor is missing."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        where, _, anchor = target.partition("#")
        resolved = (path.parent / where).resolve() if where else path
        if not resolved.exists():
            broken.append(f"{path.name}: {target} (no such file or folder)")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{path.name}: {target} (no heading with that anchor)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(DOCUMENTS) >= 10
    assert [b for path in DOCUMENTS for b in broken_links(path)] == []


def test_the_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## 4.2 SO-KLD-WRM and `Theorem 2`\n\n## Repeat\n\n## Repeat\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#42-so-kld-wrm-and-theorem-2) [ok](other.md#repeat-1) [ok](#here) "
        "![ok](other.md) [web](https://example.org/missing)\n\n# Here\n\n"
        "[gone](missing.md) ![gone](img/missing.png) [bad anchor](other.md#nowhere) [bad local](#there)\n\n"
        "`[code span](missing.md)`\n\n```\n[fenced](missing.md)\n```\n\n    [indented](missing.md)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file or folder)",
        "page.md: img/missing.png (no such file or folder)",
        "page.md: other.md#nowhere (no heading with that anchor)",
        "page.md: #there (no heading with that anchor)",
    ]


CITED_DOCUMENT = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md|[A-Z][A-Z_-]*\.md)\b")
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".cfg", ".txt"}


def cited_documents_missing(root: Path, files) -> list[str]:
    """``docs/NAME.md`` and upper-case ``NAME.md`` citations (code, docstrings, configurations, results)
    that name no file in the repository root."""
    missing = []
    for path in files:
        for name in sorted(set(CITED_DOCUMENT.findall(path.read_text(errors="replace")))):
            if not (root / name).is_file():
                missing.append(f"{path.relative_to(root)}: {name}")
    return missing


def test_every_cited_document_is_in_the_repository():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    names = [name for name in listed.stdout.splitlines() if Path(name).suffix in TEXT_SUFFIXES and name != "tests/test_docs.py"]
    files = [ROOT / name for name in names if (ROOT / name).is_file()]
    assert len(files) > 100
    assert cited_documents_missing(ROOT, files) == []


def test_the_citation_check_finds_documents_that_are_not_there(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "theory.md").write_text("# Theory\n")
    (tmp_path / "README.md").write_text("see docs/theory.md\n")
    code = tmp_path / "module.py"
    code.write_text('"""Follows docs/theory.md §2, README.md and ' + "SPEC" + '.md; see docs/' + "gone" + '.md."""\nOUT = "summary.md"\n')
    assert cited_documents_missing(tmp_path, [tmp_path / "README.md", code]) == ["module.py: SPEC.md", "module.py: docs/gone.md"]


def readme_examples() -> list[str]:
    return PYTHON_BLOCK.findall((ROOT / "README.md").read_text())


def run_example(code: str) -> list[str]:
    """Execute one example in a fresh namespace; its printed lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md example", "exec"), {"__name__": "readme_example"})
    return out.getvalue().splitlines()


def documented_outputs(code: str) -> list[str | None]:
    """Per print statement, in order, the comment after it (None where there is none)."""
    comments = []
    for line in code.splitlines():
        if line.lstrip().startswith("print("):
            comments.append(line.split("#", 1)[1].strip() if "#" in line else None)
    return comments


def check_literal_outputs(code: str, printed: list[str]) -> None:
    """Where a print's comment is a Python literal, the printed line must be that literal."""
    comments = documented_outputs(code)
    assert len(printed) == len(comments)
    for line, comment in zip(printed, comments):
        try:
            expected = ast.literal_eval(comment) if comment else None
        except (ValueError, SyntaxError):
            continue
        if expected is not None:
            assert ast.literal_eval(line) == expected, (line, comment)


def stand_in_mnist(*args, **kwargs) -> data.Mnist:
    """Synthetic data with MNIST's shapes: 1,536 training and 256 test images of 784 features, 10 classes."""
    X, y = data.synthetic_classification(1536 + 256, 784, 10, seed=0)
    return data.Mnist(X[:1536], y[:1536], X[1536:], y[1536:])


def test_the_readme_has_its_two_examples():
    examples = readme_examples()
    assert len(examples) == 2
    assert "load_mnist()" in examples[0] and len([line for line in examples[0].splitlines() if line.strip()]) <= 11


@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs(index, monkeypatch):
    code = readme_examples()[index]
    monkeypatch.setattr(data, "load_mnist", stand_in_mnist)
    printed = run_example(code)
    check_literal_outputs(code, printed)
    if index == 0:
        assert 0.0 <= float(printed[0]) <= 1.0
    else:
        before, after = (float(v) for v in re.fullmatch(r"loss (\S+) -> (\S+)", printed[1]).groups())
        assert after < before


@pytest.mark.slow
@pytest.mark.mnist
def test_readme_api_example_prints_the_documented_accuracy_on_real_mnist():
    code = readme_examples()[0]
    (comment,) = [c for c in documented_outputs(code) if c]
    documented = float(re.fullmatch(r"about (\S+)", comment).group(1))
    (printed,) = run_example(code)
    assert abs(float(printed) - documented) <= 0.01, (printed, comment)
    assert np.isfinite(float(printed))
