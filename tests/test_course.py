"""Checks the course kit's pages (docs/reading_guide.md, course.md, course_answers.md, glossary.md):
every function, test, tutorial and exercise they name exists."""

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

from minialign import exercises

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["reading_guide.md", "course.md", "course_answers.md", "glossary.md"]


@lru_cache(maxsize=None)
def defined_names(path: Path) -> frozenset:
    """Top-level functions and classes of a Python file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return frozenset(names)


def page(name: str) -> str:
    path = ROOT / "docs" / name
    if not path.is_file():
        pytest.skip(f"docs/{name} is not written yet")
    return path.read_text()


@pytest.mark.parametrize("name", PAGES)
def test_every_function_test_and_tutorial_named_exists(name):
    text = page(name)
    functions = re.findall(r"`minialign/(\w+)\.py: ([\w.]+)`", text)
    tests = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)", text)
    files = re.findall(r"`((?:tutorials|minialign|tests)/\w+\.py)", text)
    assert functions or tests or files, f"{name} names no code"
    missing = [f"minialign/{f}.py: {fn}" for f, fn in functions
               if fn not in defined_names(ROOT / "minialign" / f"{f}.py")]
    missing += [f"{f}::{t}" for f, t in tests if not (ROOT / f).is_file() or t not in defined_names(ROOT / f)]
    missing += [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"docs/{name} names what does not exist: {missing}"


def test_the_reading_guide_names_each_exercise_where_its_equation_is():
    text = page("reading_guide.md")
    last_column = [row.rstrip().rstrip("|").rsplit("|", 1)[-1] for row in text.splitlines()
                   if row.startswith("| E") or row.startswith("| GAE") or row.startswith("| the value loss")]
    named = {n for cell in last_column for n in re.findall(r"`(\w+)`", cell)}
    assert named == set(exercises.BY_NAME), set(exercises.BY_NAME) ^ named
    for eq in ["E0a", "E0b"] + [f"E{i}" for i in range(1, 15)]:
        assert re.search(rf"^\| {eq}\b", text, re.M), f"the reading guide has no row for {eq}"


def test_the_doc_pages_link_to_the_glossary():
    glossary = page("glossary.md")
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', glossary))
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name == "glossary.md":
            continue
        text = path.read_text()
        assert "glossary.md" in text, f"docs/{path.name} does not link to the glossary"
        for anchor in re.findall(r"glossary\.md#([\w-]+)", text):
            assert anchor in anchors, f"docs/{path.name} links to glossary.md#{anchor}, which does not exist"
