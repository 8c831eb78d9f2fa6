"""The course site as a reader sees it: ``mkdocs build`` (mkdocs.yml, docs_site/hooks.py) into a
temporary folder, then every internal link, anchor and image of the built HTML resolved, nothing
loaded from the network, every page of docs/ in the nav, the tutorials' plots and the exercises on
their pages; and every page opened in headless Chromium (tests/runtime/browser.py), which fails on a math
rendering error, an image that does not load, a console error or a request off this machine, and
saves a screenshot of the DPO page to build/screenshots/.

Skips, each with its reason: without mkdocs (``pip install -e '.[docs]'``); the browser test
without Chromium (Debian: ``apt-get install chromium``); the plots' test without docs/figures/
(``python docs_site/figures.py``): then the slow tests/runtime/test_notebooks.py checks the plots, in a
site built with those its notebooks drew.
"""

from __future__ import annotations

import functools
import html.parser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs_site"))
from figures import FIGURES, FIGURES_DIR, plots  # noqa: E402

needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or
                                  importlib.util.find_spec("material") is None,
                                  reason="mkdocs and its Material theme are not installed: pip install -e '.[docs]'")


def load_hooks():
    spec = importlib.util.spec_from_file_location("site_hooks", ROOT / "docs_site" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_config() -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader)


def build_site(out: Path, figures: Path | None = None) -> Path:
    """``mkdocs build`` into ``out``, with the plots of ``figures`` (default: docs/figures/)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    if figures is not None:
        env["MINIALIGN_SITE_FIGURES"] = str(figures)
    else:
        env.pop("MINIALIGN_SITE_FIGURES", None)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"mkdocs build failed:\n{done.stdout}\n{done.stderr}"
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


# ----------------------------------------------------------------------------------------------
# the built HTML
# ----------------------------------------------------------------------------------------------


class Page(html.parser.HTMLParser):
    """The references (tag, attribute, value) and element ids of one HTML file."""

    def __init__(self, text: str):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.ids: set[str] = set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for attr in ("href", "src"):
            if a.get(attr) is not None:
                self.refs.append((tag, attr, a[attr]))


@functools.lru_cache(maxsize=None)
def parsed(path: Path) -> Page:
    return Page(path.read_text())


def resolve(site: Path, page: Path, url: str) -> tuple[Path, str]:
    """The file a relative URL of ``page`` names, and its fragment."""
    parts = urlsplit(url)
    target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


def broken_references(site: Path) -> list[str]:
    problems = []
    for page in sorted(site.rglob("*.html")):
        for tag, attr, url in parsed(page).refs:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//"):
                if tag in ("script", "img") or (tag == "link" and attr == "href" and ".css" in url):
                    problems.append(f"{page.relative_to(site)}: <{tag} {attr}={url!r}> is loaded from the network")
                continue                                   # an outbound link a reader may follow
            if url.startswith("/") and page.name == "404.html" and page.parent == site:
                target, fragment = resolve(site, site / "index.html", url.lstrip("/"))  # served at any path
            elif url.startswith("/"):
                problems.append(f"{page.relative_to(site)}: absolute {url!r} breaks when the site is not at /")
                continue
            else:
                target, fragment = resolve(site, page, url)
            if not target.is_file() or site.resolve() not in target.parents:
                problems.append(f"{page.relative_to(site)}: <{tag} {attr}={url!r}> names a missing file")
            elif fragment and target.suffix == ".html" and fragment not in parsed(target).ids:
                problems.append(f"{page.relative_to(site)}: {url!r}: no id {fragment!r} in {target.relative_to(site)}")
    return problems


@needs_mkdocs
def test_every_internal_link_anchor_and_image_resolves(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= len(list((ROOT / "docs").glob("*.md"))), "fewer pages than docs/*.md"
    problems = broken_references(site)
    assert not problems, "\n".join(problems[:30])


def test_the_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="x">x</h2><a href="#x">ok</a><a href="#nope">bad anchor</a>'
                                               '<a href="../b/">missing page</a><img src="p.png">'
                                               '<script src="https://cdn.example/m.js"></script>'
                                               '<a href="https://example.org/">outbound: fine</a>'
                                               '<a href="../c/#y">ok</a><link rel="stylesheet" href="/s.css">')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "index.html").write_text('<p id="y">y</p>')
    parsed.cache_clear()
    problems = broken_references(tmp_path)
    assert len(problems) == 5, problems
    assert ["nope" in p for p in problems].count(True) == 1
    assert any("'../b/'" in p for p in problems) and any("p.png" in p for p in problems)
    assert any("network" in p for p in problems) and any("absolute" in p for p in problems)


@needs_mkdocs
def test_nothing_is_loaded_from_the_network(site):
    for css in site.rglob("*.css"):
        assert not re.search(r"url\(['\"]?(https?:)?//", css.read_text()), f"{css.name} loads a URL"
    dpo = (site / "dpo" / "index.html").read_text()
    assert '<script src="../assets/mathjax/tex-svg-full.js">' in dpo, "MathJax is not served from the site"
    assert (site / "assets" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000
    assert "fonts.googleapis" not in dpo and "fonts.gstatic" not in dpo


@needs_mkdocs
def test_every_equation_reaches_mathjax_and_code_is_highlighted(site):
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        article = text[text.find("<article"):text.find("</article>")]
        # what arithmatex did not take is a stray dollar in the text: an unclosed or mangled equation
        prose = re.sub(r"<(pre|code|script)[^>]*>.*?</\1>", "", article, flags=re.S)
        prose = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", prose, flags=re.S)
        assert "$" not in prose, f"{page.relative_to(site)}: a $ outside any equation: " \
            f"{re.search(r'.{0,60}[$].{0,60}', prose, re.S).group()!r}"
    dpo = (site / "dpo" / "index.html").read_text()
    assert dpo.count('class="arithmatex"') >= 40
    assert r"\mathcal{L}_{DPO}(\theta)" in dpo
    assert '<div class="highlight"><pre>' in dpo and '<span class="n">' in dpo, "code is not highlighted"


@needs_mkdocs
def test_the_search_index_holds_every_page(site):
    index = json.loads((site / "search" / "search_index.json").read_text())
    locations = {d["location"].split("#")[0] for d in index["docs"]}
    for md in (ROOT / "docs").glob("*.md"):
        assert f"{md.stem}/" in locations or md.stem == "index", f"{md.name} is not in the search index"


# ----------------------------------------------------------------------------------------------
# the nav, the plots, the exercises
# ----------------------------------------------------------------------------------------------


@needs_mkdocs
def test_every_page_of_docs_is_in_the_nav_in_the_course_order():
    hooks = load_hooks()
    named = hooks.nav_files(mkdocs_config()["nav"])
    pages = [n.split("#")[0] for n in named]
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    generated = {"quickstart.md", "exercises.md"}
    missing = sorted(docs - set(pages))
    assert not missing, f"docs/{missing} are not in mkdocs.yml's nav: add each where it belongs in the course"
    absent = sorted(set(pages) - docs - generated - hooks.PENDING)
    assert not absent, f"mkdocs.yml's nav names {absent}, which do not exist"
    order = ["index.md", "reading_guide.md", "course.md", "pretraining_and_sft.md", "reward_model.md", "ppo.md",
             "dpo.md", "grpo.md", "theory.md", "real_models.md", "runs.md", "measurements.md", "glossary.md"]
    first = [pages.index(p) for p in order]
    assert first == sorted(first), "the nav is not in the course's order"
    sessions = [n for n in named if n.startswith("course.md#session-")]
    assert len(sessions) == 6, "the nav names the six sessions of docs/course.md"


@needs_mkdocs
def test_the_built_nav_lists_the_six_sessions_in_order(site):
    hrefs = [url for tag, attr, url in parsed(site / "dpo" / "index.html").refs if "#session-" in url]
    numbers = [int(re.search(r"#session-(\d)", u).group(1)) for u in hrefs]
    assert numbers[:6] == [1, 2, 3, 4, 5, 6], hrefs


@needs_mkdocs
def test_pending_pages_are_dropped_only_while_they_do_not_exist(tmp_path):
    hooks = load_hooks()
    nav = [{"A": "index.md"}, {"Algorithms": [{"PG": "policy_gradient.md"}, {"DPO": "dpo.md"}]}]
    assert hooks.nav_files(hooks.prune_pending(nav, tmp_path)) == ["index.md", "dpo.md"]
    (tmp_path / "policy_gradient.md").write_text("# PG\n")
    assert hooks.nav_files(hooks.prune_pending(nav, tmp_path)) == ["index.md", "policy_gradient.md", "dpo.md"]
    assert hooks.nav_files([{"X": [{"Y": "other.md"}]}]) == ["other.md"]


def test_each_plot_is_named_once_by_its_page():
    for figure in FIGURES:
        text = (ROOT / "docs" / figure.page).read_text()
        assert text.count(figure.anchor) == 1, \
            f"docs/{figure.page} should name {figure.anchor!r} once (docs_site/figures.py: FIGURES)"
        for plot in figure.plots:
            name = Path(plot).name
            pattern = re.sub(r"_[a-z]+\.png$", "_*.png", name)          # frontier_*.png names them all
            assert f"`{name}`" in text or f"/{name}`" in text or f"`{pattern}`" in text, \
                f"docs/{figure.page} does not talk about {name}"


def plots_on_their_pages(site: Path) -> list[str]:
    """What is wrong with the tutorials' plots in a built site: each where its paragraph is."""
    problems = []
    for figure in FIGURES:
        page = site / Path(figure.page).stem / "index.html"
        srcs = {src for tag, attr, src in parsed(page).refs if tag == "img"}
        problems += [f"{figure.page} does not show {plot}" for plot in figure.plots if f"../figures/{plot}" not in srcs]
        if "Plots not built" in page.read_text():
            problems.append(f"{figure.page} says its plots are not built")
    return problems


@needs_mkdocs
def test_the_tutorials_plots_are_on_the_pages_that_talk_about_them(site):
    if not (FIGURES_DIR / "figures.json").is_file():
        pytest.skip("docs/figures/ is not made: python docs_site/figures.py makes it (or --tiny, in minutes); "
                    "the slow tests/runtime/test_notebooks.py builds the site with its notebooks' plots and checks "
                    "them there")
    problems = plots_on_their_pages(site)
    assert not problems, "\n".join(problems)


@needs_mkdocs
def test_each_exercise_page_shows_its_equation_function_and_command(site):
    registry = load_hooks().exercise_registry()
    text = (site / "exercises" / "index.html").read_text()
    import html as html_lib
    plain = html_lib.unescape(re.sub(r"<[^>]+>", "", text))
    for e in registry.EXERCISES:
        assert f"minialign exercises check course {e.name}" in plain, f"no grading command for {e.name}"
        for latex in e.latex:
            assert latex in plain, f"{e.name}: its equation is not on the page"
        assert f"# Exercise {e.name} ({e.equations})" in plain
    assert plain.count("minialign exercises make course") >= 1
    # the function each exercise is written in, as the library defines it
    assert "def dpo_loss(" in plain and "def lm_loss(" in plain


# ----------------------------------------------------------------------------------------------
# in a browser
# ----------------------------------------------------------------------------------------------


@needs_mkdocs
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no Chromium to open the site in: apt-get install chromium (Debian's package)")
def test_every_page_renders_in_chromium(site):
    from browser import Chromium, serve

    figures = not [p for p in plots() if not (FIGURES_DIR / p).is_file()]
    shots = ROOT / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    problems = []
    with serve(site) as base, Chromium() as browser:
        for rel in pages:
            url = f"{base}/{rel}/" if rel != "." else f"{base}/"
            report = browser.open(url, allowed=base)
            problems += [f"{rel}: {p}" for p in report.problems]
            if rel == "dpo":
                assert report.equations >= 40, f"dpo: only {report.equations} equations typeset"
                if figures:
                    assert report.images >= 5, "dpo: its plots are not shown"
                browser.screenshot(shots / "dpo.png")
                browser.screenshot(shots / "dpo_top.png", full_page=False)
    assert not problems, "\n".join(problems[:30])
    assert (shots / "dpo.png").stat().st_size > 10_000
