"""The docs never drift from the code: every code excerpt in docs/ appears verbatim in the file it
names, every test a page cites exists, and the pages keep to one notation and to this repository.

An excerpt is a fenced ``python`` block whose first line names a file of the repository,
``# minialign/dpo.py``; the lines after it must appear in that file as consecutive lines (the
excerpt may be dedented as a whole, so a loop body can be shown without its indentation).
"""

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```python\n# ((?:minialign|tests|tutorials|benchmarks)/[\w/]+\.py)\n(.*?)^```", re.M | re.S)
# the pages of the course: each shows the code beside its equations
COURSE_PAGES = ["pretraining_and_sft.md", "reward_model.md", "ppo.md", "dpo.md", "grpo.md", "theory.md"]


def excerpts(page: Path) -> list[tuple[str, str]]:
    """(file named, excerpt text) of every code excerpt on a page."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def appears_verbatim(excerpt: str, source: str) -> bool:
    """The excerpt's lines are consecutive lines of ``source``, up to one common indentation."""
    want = textwrap.dedent(excerpt).strip("\n").splitlines()
    lines = source.splitlines()
    for i in range(len(lines) - len(want) + 1):
        if textwrap.dedent("\n".join(lines[i:i + len(want)])).splitlines() == want:
            return True
    return False


def test_appears_verbatim_by_hand():
    source = "def f(x):\n    y = x + 1\n    return y\n"
    assert appears_verbatim("y = x + 1\nreturn y\n", source)              # dedented as a whole
    assert appears_verbatim("    y = x + 1\n", source)
    assert not appears_verbatim("y = x + 2\n", source)                     # a changed line
    assert not appears_verbatim("def f(x):\n    return y\n", source)       # lines that are not consecutive
    assert not appears_verbatim("y = x + 1\n  return y\n", source)         # another relative indentation


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_code_excerpt_appears_verbatim_in_the_file_it_names(page):
    for name, text in excerpts(page):
        path = ROOT / name
        assert path.is_file(), f"{page.name}: an excerpt names {name}, which does not exist"
        assert appears_verbatim(text, path.read_text()), \
            f"{page.name}: this excerpt is no longer in {name}:\n{text}"


@pytest.mark.parametrize("page", COURSE_PAGES)
def test_every_course_page_shows_its_code(page):
    named = {name for name, _ in excerpts(ROOT / "docs" / page)}
    assert len(named) >= 1, f"docs/{page} has no code excerpt"


def test_every_test_the_docs_cite_exists():
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    for page in DOCS + [ROOT / "README.md"]:
        cited = set(re.findall(r"\b(test_\w+)(?![\w*]|\.py)", page.read_text()))  # test_cuda_* is a pattern
        missing = sorted(cited - defined)
        assert not missing, f"{page.name} cites tests that do not exist: {missing}"


def test_one_notation_and_no_path_outside_the_repository():
    for path in DOCS + sorted((ROOT / "minialign").rglob("*.py")) + [ROOT / "README.md"]:
        text = path.read_text()
        assert ".. math::" not in text, f"{path.name} uses RST math; write $...$ as GitHub renders it"
        # the source post lives in ../shared/seeds/, outside; runs/seeds/ is measure_ranges' run folder
        assert not re.search(r"(?<!runs/)seeds/", text), f"{path.name} names the source post's path, outside this repository"
        # a command or a file outside the repository (a tool such as /usr/bin/time is fine)
        outside = re.findall(r"(?<![\w.~])/(?:tmp|work|home|root|mnt|opt|Users)/\S*", text)
        assert not outside, f"{path.name} names paths outside this repository: {outside[:3]}"
