"""MkDocs hooks of the course site (``hooks:`` in mkdocs.yml). What the site adds to docs/:

- ``quickstart.md``: the README, so the site opens with the install and run commands and the
  tutorials' table; a page's ``../README.md`` link points there.
- ``exercises.md``: one section per exercise of the registry (``minialign/tools/exercises.py``), built
  from it at every build so it cannot go stale: the equation, the function to write, its shapes,
  the tests that grade it and the commands that make the copy and grade it.
- the plots of ``docs_site/figures.py``'s FIGURES below the paragraph that names them, from
  ``docs/figures/`` (``python docs_site/figures.py`` makes them) or the folder that
  ``$MINIALIGN_SITE_FIGURES`` names; where they are missing the page says which command makes
  them, and ``tests/runtime/test_site.py`` names what is missing.
- MathJax's single-file build (``tex-svg-full.js``: the TeX input, every extension and SVG
  output, so no font files), copied from the installed PyPI package ``django-static-mathjax``
  into ``assets/mathjax/``: the equations render with no network at view time.
- the nav in mkdocs.yml may name the family pages that are being written (PENDING): an entry for
  one of those is dropped while its file does not exist; any other missing file stops the build.
"""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import FIGURES, FIGURES_DIR, MANIFEST, plots  # noqa: E402

log = logging.getLogger("mkdocs.hooks.minialign")
ROOT = Path(__file__).resolve().parent.parent
PENDING = {"policy_gradient.md", "preference.md"}
MATHJAX = "static/mathjax/es5/tex-svg-full.js"
# where an exercise's algorithm is explained (by the stem of the file that holds it)
PAGE_OF_MODULE = {"pretrain": "pretraining_and_sft.md", "ops": "pretraining_and_sft.md",
                  "reward_model": "reward_model.md", "ppo": "ppo.md", "dpo": "dpo.md", "grpo": "grpo.md"}


# ----------------------------------------------------------------------------------------------
# nav
# ----------------------------------------------------------------------------------------------


def nav_files(nav) -> list[str]:
    """Every page a nav names (a nested list of {title: page or list} and bare pages)."""
    out = []
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out += nav_files(value)
        elif isinstance(value, str) and not re.match(r"\w+://", value):
            out.append(value)
    return out


def prune_pending(nav, docs_dir: Path):
    """The nav without the entries of PENDING pages whose file does not exist yet."""
    kept = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            item = {next(iter(item)): prune_pending(value, docs_dir)}
        elif isinstance(value, str) and value in PENDING and not (docs_dir / value).is_file():
            log.info("nav: %s is not written yet; left out", value)
            continue
        kept.append(item)
    return kept


# nav entries that point into a page (course.md#session-1-...): MkDocs's nav takes whole pages, so
# they are taken out here and put back by on_nav as links to the built page's anchor
_ANCHORED: list[tuple[list[str], int, str, str]] = []   # (section titles, index, title, page#anchor)


def take_anchored(nav, path=()):
    kept = []
    for item in nav:
        title, value = (next(iter(item.items())) if isinstance(item, dict) else (None, item))
        if isinstance(value, list):
            item = {title: take_anchored(value, (*path, title))}
        elif isinstance(value, str) and re.fullmatch(r"[\w/]+\.md#[\w-]+", value):
            _ANCHORED.append((list(path), len(kept), title, value))
            continue
        kept.append(item)
    return kept


def on_config(config):
    _ANCHORED.clear()
    config["nav"] = take_anchored(prune_pending(config["nav"], Path(config["docs_dir"])))
    return config


def on_nav(nav, config, files):
    from mkdocs.structure.nav import Link
    inserted: dict[tuple, int] = {}
    for path, index, title, target in _ANCHORED:       # in nav order: each goes after the one before
        items = nav.items
        for section in path:
            items = next(i for i in items if i.is_section and i.title == section).children
        page, anchor = target.split("#")
        file = files.get_file_from_path(page)
        if file is None:
            raise PluginError(f"nav: {target} names a page that does not exist")
        key = tuple(path)
        items.insert(index + inserted.get(key, 0), Link(title, f"{file.url}#{anchor}"))
        inserted[key] = inserted.get(key, 0) + 1
    return nav


# ----------------------------------------------------------------------------------------------
# generated pages and assets
# ----------------------------------------------------------------------------------------------


def exercise_registry():
    """minialign's exercise registry (minialign/tools/exercises.py)."""
    return importlib.import_module("minialign.tools.exercises")


def exercise_function(path: Path, marker_line: int) -> tuple[str, str]:
    """(name, header source) of the innermost function whose body holds the 0-based marker line."""
    source = path.read_text()
    best = None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= marker_line + 1 <= node.end_lineno:
            if best is None or node.lineno > best.lineno:
                best = node
    if best is None:
        raise PluginError(f"{path}: the exercise marker on line {marker_line + 1} is in no function")
    lines = source.splitlines()[best.lineno - 1:best.body[0].lineno - 1]
    return best.name, textwrap.dedent("\n".join(lines))


def exercise_tests(test_file: Path, name: str) -> list[str]:
    """The tests of ``test_file`` marked ``@pytest.mark.exercise("name")``."""
    tree = ast.parse(test_file.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.exercise")
                        and d.args and isinstance(d.args[0], ast.Constant) and d.args[0].value == name):
                    out.append(node.name)
    return out


def exercises_page() -> str:
    registry = exercise_registry()
    package = Path(registry.PACKAGE)
    out = ["# Exercises", "",
           "The equations of the course as function bodies to write, graded by the same hand-computed "
           "tests that check minialign. This page is made from the registry in "
           f"`{package.name}/{Path(registry.__file__).relative_to(package).as_posix()}` at every build "
           "of the site, so it lists what `minialign exercises` does. Make your copy once (a copy of "
           "the package, its tests and the tutorials, with these bodies replaced by a hint and "
           "`raise NotImplementedError`):", "",
           "```", "minialign exercises make course", "```", "",
           "then write each body in `course/` and grade it with the command under it. "
           "[The course](course.md) says which session each belongs to.", ""]
    for e in registry.EXERCISES:
        path = package / e.file
        found = [r for r in registry.find_regions(path.read_text(), str(path)) if r.name == e.name]
        if not found:
            raise PluginError(f"exercise {e.name}: no '# Exercise {e.name}' marker in {path}")
        region = found[0]
        function, header = exercise_function(path, region.marker)
        rel = path.relative_to(package.parent).as_posix()
        tests = exercise_tests(package.parent / e.test_file, e.name)
        page = PAGE_OF_MODULE.get(e.module)
        out += [f"## `{e.name}`: {e.title} ({e.equations})", ""]
        out += [f"$$\n{latex}\n$$\n" for latex in e.latex]
        out += [f"**Write** the body of `{function}` in `{rel}`, from the comment "
                f"`# Exercise {e.name} ({region.equations})` on:", "",
                "```python", f"# {rel}", header, "```", "",
                f"**Shapes:** {e.shapes}.", ""]
        if page:
            out += [f"**Read:** [{page}]({page}).", ""]
        out += [f"**Graded by** `{e.test_file}`: " + ", ".join(f"`{t}`" for t in tests) + ".", "",
                "```", f"minialign exercises check course {e.name}"]
        if e.tutorial in getattr(registry, "TUTORIALS", {}):
            out += [f"minialign exercises check course {e.name} --train    "
                    f"# then tutorials/{e.tutorial} with your code beside the reference's"]
        out += ["```", ""]
    return "\n".join(out)


def readme_page() -> str:
    text = (ROOT / "README.md").read_text()
    return text


def mathjax_file() -> Path:
    path = Path(str(importlib.resources.files("mathjax") / MATHJAX))
    if not path.is_file():
        raise PluginError(f"MathJax's {MATHJAX} is not installed: pip install -e '.[docs]'")
    return path


def figures_source() -> Path:
    """Where the plots are: docs/figures/, or the folder $MINIALIGN_SITE_FIGURES names."""
    return Path(os.environ.get("MINIALIGN_SITE_FIGURES") or FIGURES_DIR)


def on_files(files, config):
    source = figures_source()
    if source.resolve() != FIGURES_DIR.resolve():         # served at figures/ as if under docs/
        for p in plots():
            if (source / p).is_file() and files.get_file_from_path(f"figures/{p}") is None:
                files.append(File.generated(config, f"figures/{p}", abs_src_path=str(source / p)))
    for uri, content in (("quickstart.md", readme_page()), ("exercises.md", exercises_page())):
        files.append(File.generated(config, uri, content=content))
    js = mathjax_file()
    files.append(File.generated(config, "assets/mathjax/tex-svg-full.js", abs_src_path=str(js)))
    files.append(File.generated(config, "assets/mathjax/LICENSE", abs_src_path=str(js.parent.parent / "LICENSE")))
    return files


# ----------------------------------------------------------------------------------------------
# pages: README links and figures
# ----------------------------------------------------------------------------------------------


def figure_block(plots, source: Path, settings: str | None) -> str:
    present = [p for p in plots if (source / p).is_file()]
    tutorials = sorted({t for f in FIGURES if set(f.plots) & set(plots) for t in f.tutorials})
    made_by = " and ".join(f"`python tutorials/{t}`" for t in tutorials)
    if len(present) < len(plots):
        missing = ", ".join(f"`{p}`" for p in plots if p not in present)
        return (f'!!! note "Plots not built"\n    {missing}: made by {made_by}; run '
                "`python docs_site/figures.py`, then build the site again.\n")
    images = "\n".join(f"![{p}](figures/{p})" for p in plots)
    if settings == "tiny":
        caption = (f"Made on tiny settings by `python docs_site/figures.py --tiny` ({made_by}): "
                   "they check that the site shows the tutorials' plots, not the figures the text quotes.")
    else:
        caption = f"Made by {made_by} with its defaults (seeded): " + ", ".join(f"`runs/tutorial/{p}`" for p in plots) + "."
    return f'<div class="tutorial-plots" markdown>\n{images}\n</div>\n<p class="tutorial-plots-caption" markdown>{caption}</p>\n'


def insert_figures(markdown: str, page: str, source: Path) -> str:
    manifest = source / MANIFEST.name
    settings = json.loads(manifest.read_text())["settings"] if manifest.is_file() else None
    for figure in [f for f in FIGURES if f.page == page]:
        count = markdown.count(figure.anchor)
        if count != 1:
            raise PluginError(f"docs/{page}: the plots {list(figure.plots)} go below the paragraph with "
                              f"{figure.anchor!r}, found {count} times (docs_site/figures.py: FIGURES)")
        start = markdown.index(figure.anchor)
        end = markdown.find("\n\n", start)
        end = len(markdown) if end < 0 else end
        markdown = markdown[:end] + "\n\n" + figure_block(figure.plots, source, settings) + markdown[end:]
    return markdown


def on_page_markdown(markdown, page, config, files):
    markdown = re.sub(r"\]\(\.\./README\.md", "](quickstart.md", markdown)
    return insert_figures(markdown, page.file.src_uri, figures_source())
