"""A change that moves code changes no number: every stage's seeded tiny run (tests/runtime/seeded_runs.py)
gives the saved models' sha256 and the summary's values recorded in tests/runtime/seeded_runs.json."""

import pytest
import seeded_runs


@pytest.mark.slow
def test_seeded_runs_are_identical_to_the_record(tmp_path):
    recorded = seeded_runs.this_machines_record()
    if recorded is None:
        pytest.skip(f"the record holds {[r['machine'] for r in seeded_runs.records()]}, not "
                    f"{seeded_runs.machine()}; run `python tests/runtime/seeded_runs.py record` on this machine "
                    "before a change and `compare` after it")
    diff = seeded_runs.differences(recorded, seeded_runs.run_all(tmp_path), seeded_runs.RENAMED)
    assert not diff, "\n".join(diff)


def test_differences_names_a_changed_hash_a_changed_value_and_a_renamed_key():
    before = {"dpo": {"files": {"model.pt": "a"}, "summary": {"loss": 0.5, "old_name": 1}}}
    assert seeded_runs.differences(before, before) == []
    after = {"dpo": {"files": {"model.pt": "b"}, "summary": {"loss": 0.25, "new_name": 1}}}
    assert seeded_runs.differences(before, after, renamed={"old_name": "new_name"}) == [
        "dpo: saved files differ: {'model.pt': 'a'} != {'model.pt': 'b'}", "dpo: summary loss: 0.5 != 0.25"]
    assert "dpo: summary key old_name is gone" in seeded_runs.differences(before, after)
