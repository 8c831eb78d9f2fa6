"""Checks minialign/pretrain.py: the E0a loss by hand (and its sum over a constant, SFT's other
aggregation). (A seeded run that learns and reproduces: tests/runtime/test_pretrain_stage.py.)"""

import math

import pytest
import torch
from handworked import expect

from minialign.pretrain import lm_loss


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


def two_rows():
    """V = 2, T = 3: row 0 has two response tokens, row 1 one."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                           [[math.log(3), 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, 1], [0, 0, 0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    return logits, ids, mask


@pytest.mark.exercise("lm_loss")
def test_constant_aggregation_by_hand():
    logits, ids, mask = two_rows()
    # row 0: two tokens at p = 1/2, -log(1/2) = 0.693147 each; row 1: logits [ln 3, 0], target 0,
    # p = 3/4, -log(3/4) = 0.287682. Token sum 0.693147 + 0.693147 + 0.287682 = 1.673976, N = 3
    # token_mean: 1.673976 / 3 = 0.557992;  constant C = 6 (B = 2 rows x 3): 1.673976 / 6 = 0.278996
    expect(lm_loss(logits, ids, mask), 0.557992, abs=1e-6)
    expect(lm_loss(logits, ids, mask, constant=6), 0.278996, abs=1e-6)
    # a token's weight: the gradient of -log p_0 in row 1's logits is softmax - onehot = [-0.25, 0.25],
    # times 1/N under token_mean: N = 3 gives [-0.083333, 0.083333], and with row 0 down to one
    # token N = 2 gives [-0.125, 0.125]; times 1/C under constant whatever row 0 holds: [-0.041667, 0.041667]
    for row0, token_mean_weight in (([0, 1, 1], 0.083333), ([0, 0, 1], 0.125)):
        m = torch.tensor([row0, [0, 1, 0]])
        for constant, w in ((None, token_mean_weight), (6, 0.041667)):
            z = logits.clone().requires_grad_(True)
            lm_loss(z, ids, m, constant).backward()
            expect(z.grad[1, 0], [-w, w], abs=1e-6)


@pytest.mark.exercise("lm_loss")
def test_constant_aggregation_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert torch.autograd.gradcheck(lambda z: lm_loss(z, ids, mask, constant=8.0), (logits,))
