"""Checks minialign/pretrain.py: the E0a loss by hand, and a seeded run that learns and reproduces."""

import json
import math

import pytest
import torch
from handworked import expect

from minialign.pretrain import PretrainConfig, lm_loss, main


@pytest.mark.exercise("lm_loss")
def test_lm_loss_by_hand():
    # V = 2, T = 3: positions 0 and 1 predict tokens 1 and 2
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[1, 1, 0]])
    # -log softmax([0, 0])[1] = ln 2 = 0.6931; -log softmax([ln 3, 0])[0] = -log(3/4) = 0.2877
    # mean over the two predicted tokens: (0.6931 + 0.2877) / 2 = 0.4904
    every = torch.tensor([[0, 1, 1]])
    expect(lm_loss(logits, ids, every), 0.4904, abs=1e-4)
    # E0b: only the last token is a response token -> 0.2877
    expect(lm_loss(logits, ids, torch.tensor([[0, 0, 1]])), 0.2877, abs=1e-4)


@pytest.mark.exercise("lm_loss")
def test_lm_loss_gradcheck():
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert torch.autograd.gradcheck(lambda z: lm_loss(z, ids, mask), (logits,))


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
