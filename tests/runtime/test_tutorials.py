"""Checks tutorials/: each is a script and a notebook (``# %%`` cells that parse on their own, no
``__main__`` guard), ends with its "Try this" experiments and a ``summary`` line, and the course
(docs/course.md) records the expected output of every command it suggests."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def refresher():
    spec = importlib.util.spec_from_file_location("refresh_expected", ROOT / "tutorials" / "refresh_expected.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def course_pairs() -> dict[str, list[str]]:
    """command -> the summary lines docs/course.md quotes as its expected output."""
    text = (ROOT / "docs" / "course.md").read_text()
    return {command: block.group(1).strip().splitlines() for command, block in refresher().pairs(text)}


def cells(source: str) -> list[str]:
    return re.split(r"^# %%.*$", source, flags=re.M)


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_each_tutorial_is_a_notebook_of_cells(path):
    source = path.read_text()
    chunks = cells(source)
    assert len(chunks) >= 4, f"{path.name}: fewer than three # %% cells"
    for i, chunk in enumerate(chunks):
        ast.parse(chunk, f"{path.name}, cell {i}")             # each cell runs on its own, in order
    assert "__main__" not in source, f"{path.name}: a notebook runs the cells, not a main() behind a guard"
    assert "parse_args(parser)" in source, f"{path.name}: flags through _common.parse_args (notebook-safe)"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_try_this_and_the_summary_line_are_recorded_in_the_course(path):
    source = path.read_text()
    last = cells(source)[-1]
    assert "TRY_THIS" in last and re.search(r"summary\(\s*\"" + path.stem, last), \
        f"{path.name}: the last cell prints its Try this and its summary line"
    try_this = ast.literal_eval(re.search(r'TRY_THIS = (""".*?""")', source, re.S).group(1))
    commands = re.findall(r"^\s+(python tutorials/\S+\.py.*)$", try_this, re.M)
    assert 1 <= len(commands) <= 3, f"{path.name}: one to three Try this experiments"
    pairs = course_pairs()
    for command in [f"python tutorials/{path.name}"] + commands:
        assert command in pairs, f"docs/course.md has no expected output for `{command}`"
        if command.split()[1] != f"tutorials/{path.name}":
            continue                                   # a follow-up with the next tutorial: its keys checked there
        for line in pairs[command]:
            tutorial, figures = line.split(":", 1)
            assert tutorial == f"summary {path.stem}", f"`{command}` is quoted with another tutorial's line"
            for key in re.findall(r"(\w+)=", figures):
                assert f"{key}=" in source or "**{" in source, f"{path.name} prints no {key}= for the course"


def test_the_refresher_finds_command_and_output_pairs():
    text = ("x\n```\npython tutorials/04_dpo.py --betas 0.1\n```\n```\nsummary 04_dpo: a=1\n```\n"
            "```\nminialign exercises check course\n```\nnot an output\n```\nprint('x')\n```\n"
            "```\npython tutorials/01_pretrain.py\npython tutorials/02_sft.py\n```\n```\nsummary 02_sft: b=2\n```\n")
    pairs = refresher().pairs(text)
    assert [(c, b.group(1)) for c, b in pairs] == [("python tutorials/04_dpo.py --betas 0.1", "summary 04_dpo: a=1\n")]


def test_each_figure_is_judged_against_the_range_measured_over_seeds(tmp_path):
    """_common.range_verdicts: inside the recorded [min, max], near it (within its width), or far;
    a run with other settings than the measured one is compared with nothing."""
    import json
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import _common
    record = tmp_path / "r.json"
    record.write_text(json.dumps({"ranges": {"06_grpo": {
        "G": {"values": ["8", "8"]}, "accuracy": {"mean": 0.5, "min": 0.4, "max": 0.6, "n": 5, "values": []}}}}))
    verdict = lambda **f: _common.range_verdicts("06_grpo", f, record)  # noqa: E731
    assert "is inside" in verdict(G="8", accuracy="0.45")[0]
    assert "is near" in verdict(G="8", accuracy="0.75")[0]       # the width is 0.2: 0.2 .. 0.8 is near
    assert "FAR OUTSIDE" in verdict(G="8", accuracy="0.85")[0]
    assert "no range to compare with" in verdict(G="4", accuracy="0.45")[0]
    assert _common.range_verdicts("06_grpo", {"accuracy": "0.5"}, tmp_path / "none.json") == []


def test_a_member_the_tutorial_does_not_know_is_refused_before_anything_trains(capsys):
    """_common.choose_members: the family tutorials' --members, each name checked before any model is
    trained (an unknown name used to train the whole chain first, then fall through to PPO)."""
    import argparse
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import _common
    parser = argparse.ArgumentParser(prog="11_preference_family.py")
    assert _common.choose_members(parser, " DPO, IPO ,", ("DPO", "IPO", "PPO")) == ["DPO", "IPO"]
    for text in ("DPO,XYZ", ",,"):
        with pytest.raises(SystemExit):
            _common.choose_members(parser, text, ("DPO", "IPO", "PPO"))
    assert "--members: none given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _common.choose_members(parser, "grpo", ("DPO",))
    assert "--members: unknown ['grpo']; choose from DPO" in capsys.readouterr().err


def test_measure_ranges_reads_keys_with_a_dot():
    """A figure named after a setting (``beta0.1=``, ``grpo_beta0.3=``) keeps its whole name: reading
    only word characters once cut it to ``1`` and ``3``, and figures of different betas overwrote
    each other in the record."""
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import measure_ranges
    name, figures = measure_ranges.parse_summary(
        "summary 09_compare: r_star_sft=0.076 ppo_beta0.3=0.273@0.03 dpo_beta0.3=0.229@0.03 beta10=0.1")
    assert name == "09_compare"
    assert figures == {"r_star_sft": "0.076", "ppo_beta0.3": "0.273@0.03", "dpo_beta0.3": "0.229@0.03", "beta10": "0.1"}


def test_the_pages_quote_the_ranges_of_the_record():
    """Every range a page quotes is written by ``measure_ranges.py`` from ``tutorials/expected_ranges.json``:
    the README's and the course's tables, and each doc page's ``<!-- ranges: NN_name -->`` block.
    A figure edited by hand, or a record remeasured without ``--write``, fails here."""
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import measure_ranges
    record = measure_ranges.load()
    pages = measure_ranges.rewrite_pages(record)
    quoted = set()
    for path, text in pages.items():
        assert text == path.read_text(), (f"{path.relative_to(ROOT)} quotes other ranges than the record: "
                                          "python tutorials/measure_ranges.py --write")
        quoted |= {m.group(2) for m in measure_ranges.PAGE_BLOCK.finditer(text)}
        starts = [line for line in text.splitlines() if line.startswith("<!--r ")]
        assert not starts, (f"{path.relative_to(ROOT)}: a figure's tag opens a line, where Markdown reads it as "
                            f"an HTML block and cuts the paragraph in two: {starts[0][:60]}")
    assert measure_ranges.README_START in pages[ROOT / "README.md"]
    assert measure_ranges.README_START in pages[ROOT / "docs" / "course.md"]
    missing = {name for name in record["ranges"] if name[:2] <= "08"} - quoted
    assert not missing, f"no doc page quotes the ranges of {sorted(missing)}"


def test_a_sentence_quotes_one_figure_of_the_record(tmp_path):
    """``<!--r NN_name key-->...<!--/r-->`` becomes the figure's range, ``key@seed`` that seed's value;
    a figure the record lacks is refused by name instead of left as it was."""
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import measure_ranges
    record = {"runs": {"06_grpo@0": {"figures": {"accuracy": "0.75"}, "machine": {}, "seconds": 40.0},
                       "06_grpo@1": {"figures": {"accuracy": "0.85"}, "machine": {}, "seconds": 50.2}},
              "ranges": {"06_grpo": {"accuracy": measure_ranges.stats([0.75, 0.85])}}}
    page = tmp_path / "page.md"
    page.write_text("from <!--r 06_grpo accuracy-->old<!--/r--> (seed 1: <!--r 06_grpo accuracy@1-->x<!--/r-->) "
                    "in <!--r 06_grpo seconds-->1 s<!--/r-->")
    text = measure_ranges.rewrite_pages(record, [page])[page]
    assert text == ("from <!--r 06_grpo accuracy-->0.800 [0.750, 0.850]<!--/r--> "
                    "(seed 1: <!--r 06_grpo accuracy@1-->0.85<!--/r-->) in <!--r 06_grpo seconds-->45 s<!--/r-->")
    for missing in ("<!--r 06_grpo kl-->x<!--/r-->", "<!--r 06_grpo accuracy@2-->x<!--/r-->"):
        page.write_text(missing)
        with pytest.raises(SystemExit, match="does not have"):
            measure_ranges.rewrite_pages(record, [page])



def test_a_tutorials_own_bar_follows_the_progress_flags():
    """``_common.bar``: tutorial 11's bars drew carriage returns into a log file; now ``--progress``
    always draws, ``--no-progress`` never, and the default only on a terminal (pytest's is not)."""
    import argparse
    import sys
    sys.path.insert(0, str(ROOT / "tutorials"))
    import _common
    drawn = {flag: not _common.bar(range(2), argparse.Namespace(progress=flag), "x").disable
             for flag in (None, True, False)}
    assert drawn == {None: False, True: True, False: False}
