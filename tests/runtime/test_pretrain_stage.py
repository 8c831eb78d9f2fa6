"""The pre-training stage (minialign/stages/pretrain.py): a seeded tiny run learns and reproduces.
(The equations of minialign/pretrain.py: tests/equations/test_pretrain.py.)"""

import json

import pytest

from minialign.stages.pretrain import PretrainConfig, main


def run_tiny(tmp_path, seed=0):
    cfg = PretrainConfig(out=str(tmp_path), steps=30, batch_size=16, corpus_size=500, eval_size=50,
                         eval_every=10, n_layer=1, n_head=2, n_embd=32, block_size=48, seed=seed,
                         progress=False, device="cpu")
    return main(cfg)


@pytest.mark.slow
def test_seeded_pretraining_reproduces_and_learns(tmp_path):
    a = run_tiny(tmp_path / "a")
    b = run_tiny(tmp_path / "b")
    assert a["heldout_loss"] == b["heldout_loss"]  # same seed, same numbers on the CPU
    rows = [json.loads(line) for line in (tmp_path / "a" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert held[-1] < held[0] - 1.0  # from ~ln(53) = 3.97 towards the floor
    assert a["entropy_floor"] == pytest.approx(1.0676, abs=1e-4)
    assert (tmp_path / "a" / "pretrain" / "model.pt").is_file()
    assert (tmp_path / "a" / "pretrain" / "loss.png").is_file()
