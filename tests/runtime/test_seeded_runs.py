"""A change that moves code changes no number: every stage's and every tutorial's seeded tiny run
(tests/runtime/seeded_runs.py) gives the saved models' sha256 and the summaries' values recorded in
tests/runtime/seeded_runs.json. The tutorials take minutes on a 2-core machine: a test of their own."""

import pytest
import seeded_runs


def compare_with_the_record(results: dict) -> list[str]:
    """The differences of ``results`` from this machine's record; skips where the record has no entry
    for this machine or none of these cases (an entry made before they were added)."""
    recorded = seeded_runs.this_machines_record()
    if recorded is None:
        pytest.skip(f"the record holds {[r['machine'] for r in seeded_runs.records()]}, not "
                    f"{seeded_runs.machine()}; run `python tests/runtime/seeded_runs.py record` on this machine "
                    "before a change and `compare` after it")
    recorded, unrecorded = seeded_runs.recorded_for(results, recorded)
    if not recorded:
        pytest.skip(f"this machine's record has none of {unrecorded}: record them before a change")
    return seeded_runs.differences(recorded, results, seeded_runs.RENAMED)


@pytest.mark.slow
def test_seeded_runs_are_identical_to_the_record(tmp_path):
    diff = compare_with_the_record(seeded_runs.run_all(tmp_path))
    assert not diff, "\n".join(diff)


@pytest.mark.slow
def test_seeded_tutorials_are_identical_to_the_record(tmp_path):
    diff = compare_with_the_record(seeded_runs.run_tutorials(tmp_path))
    assert not diff, "\n".join(diff)


def test_differences_names_a_changed_hash_a_changed_value_and_a_renamed_key():
    before = {"dpo": {"files": {"model.pt": "a"}, "summary": {"loss": 0.5, "old_name": 1}}}
    assert seeded_runs.differences(before, before) == []
    after = {"dpo": {"files": {"model.pt": "b"}, "summary": {"loss": 0.25, "new_name": 1}}}
    assert seeded_runs.differences(before, after, renamed={"old_name": "new_name"}) == [
        "dpo: saved files differ: {'model.pt': 'a'} != {'model.pt': 'b'}", "dpo: summary loss: 0.5 != 0.25"]
    assert "dpo: summary key old_name is gone" in seeded_runs.differences(before, after)


def test_a_case_the_record_lacks_is_named_and_not_compared_and_a_recorded_one_not_run_is_left_out():
    """An entry recorded before the tutorial cases existed (another machine's, say) holds only the
    stages: the tutorials run are named as unrecorded, never a difference; and a run of the stages
    alone is not compared with the record's tutorials."""
    case = {"files": {"model.pt": "a"}, "summary": {"loss": 0.5}}
    old_record = {"dpo": case}
    results = {"dpo": case, "tutorial_04_dpo": case}
    recorded, unrecorded = seeded_runs.recorded_for(results, old_record)
    assert recorded == {"dpo": case} and unrecorded == ["tutorial_04_dpo"]
    assert seeded_runs.differences(recorded, results) == []
    recorded, unrecorded = seeded_runs.recorded_for({"dpo": case}, {"dpo": case, "tutorial_04_dpo": case})
    assert recorded == {"dpo": case} and unrecorded == []


def test_a_tutorials_summary_line_gives_each_figure_as_printed():
    printed = "banner\nsummary 04_dpo: r_star_sft=-7.000 beta0.1=-7.000@0.013 above=none\nrange 04_dpo: ...\n"
    assert seeded_runs.summary_line(printed) == {"r_star_sft": "-7.000", "beta0.1": "-7.000@0.013", "above": "none"}


def test_the_tutorial_cases_are_every_tutorial_in_order_with_its_tiny_settings():
    cases = seeded_runs.tutorial_cases()  # puts tutorials/ on the import path
    import make_notebooks
    assert [c for c, _ in cases] == [f"tutorial_{p.stem}" for p in make_notebooks.TUTORIALS]  # 01, 02, ...
    assert dict(cases)["tutorial_04_dpo"] == make_notebooks.TINY["04_dpo"].split()
