"""The SFT stage (minialign/stages/sft.py): the tiny run of conftest's ``tiny_run`` writes what it
promises. (The equations of minialign/sft.py: tests/equations/test_sft.py.)"""

import json

import pytest


@pytest.mark.slow
def test_tiny_sft_run_writes_checkpoint_metrics_and_truth(tiny_run):
    sft = tiny_run / "sft"
    assert (sft / "model.pt").is_file() and (sft / "loss.png").is_file() and (sft / "truth.png").is_file()
    summary = json.loads((sft / "summary.json").read_text())
    assert 0 <= summary["heldout_accuracy"] <= 1 and -7 <= summary["true_reward"] <= 6
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["heldout_loss"] < rows[0]["heldout_loss"]
