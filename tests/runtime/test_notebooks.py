"""Every tutorial runs as a notebook: ``tutorials/make_notebooks.py`` converts each (Jupytext) and
nbclient executes them top to bottom, in order, in one run folder, on the tiny settings of
``make_notebooks.TINY`` (given to each notebook through ``$MINIALIGN_TUTORIAL_ARGS``, read by
``_common.parse_args``); then the site is built with the plots they drew and each is checked on
the page that talks about it. Skips without the ``[docs]`` extra (jupytext, nbclient, ipykernel)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tutorials"))
sys.path.insert(0, str(ROOT / "docs_site"))
import make_notebooks  # noqa: E402

MISSING = [m for m in ("jupytext", "nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
needs_jupyter = pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not installed: pip install -e '.[docs]'")


@needs_jupyter
def test_a_notebook_is_the_script_with_a_setup_cell():
    script = ROOT / "tutorials" / "04_dpo.py"
    nb = make_notebooks.notebook(script)
    assert nb.cells[0].cell_type == "markdown" and "Tutorial 04" in nb.cells[0].source
    assert "os.chdir(_root)" in nb.cells[1].source and "__doc__ = " in nb.cells[1].source
    code = "\n".join(c.source for c in nb.cells[2:] if c.cell_type == "code")
    assert code.count("\n") > 100 and "parse_args(parser)" in code
    assert "Tutorial 04" not in code.split("\n", 3)[0], "the docstring is the Markdown cell, not a code cell"
    assert set(make_notebooks.TINY) == {p.stem for p in make_notebooks.TUTORIALS}, "every tutorial has tiny settings"


@needs_jupyter
@pytest.mark.slow
def test_every_tutorial_runs_as_a_notebook_on_tiny_settings(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    from figures import plots

    folder = tmp_path / "notebooks"
    out = tmp_path / "runs"
    paths = make_notebooks.write_all(folder)
    assert [p.stem for p in paths] == [p.stem for p in make_notebooks.TUTORIALS]
    import nbformat
    for path in paths:
        if path.stem == "08_real_model" and importlib.util.find_spec("transformers") is None:
            continue                                           # the [hf] extra: test_hf.py skips too
        monkeypatch.setenv("MINIALIGN_TUTORIAL_ARGS", f"{make_notebooks.TINY[path.stem]} --out {shlex.quote(str(out))}")
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(folder)}}).execute()   # raises on a failing cell
        printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert f"summary {path.stem}:" in printed, f"{path.name} ran but printed no summary line"
        print(f"{path.name}: {time.time() - start:.0f} s")
    missing = [p for p in plots() if not (out / p).is_file()]
    assert not missing, f"the notebooks drew no {missing}"
    if importlib.util.find_spec("mkdocs") is None:
        return
    # the site with these plots: each below the paragraph that names it, every link and image resolving
    from figures import copy_plots
    from test_site import broken_references, build_site, plots_on_their_pages
    copy_plots(out, tmp_path / "figures", "tiny")
    site = build_site(tmp_path / "site", figures=tmp_path / "figures")
    problems = plots_on_their_pages(site) + broken_references(site)
    assert not problems, "\n".join(problems[:30])
