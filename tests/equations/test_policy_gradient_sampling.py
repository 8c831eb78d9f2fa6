"""Tests of minialign/policy_gradient_sampling.py: the zero-spread share, DAPO's dynamic sampling and overlong
handling, by hand.
(In the step: tests/equations/test_grpo.py, test_dynamic_sampling_in_the_iteration_by_hand and
test_overlong_in_the_iteration.)"""

import pytest
import torch
from handworked import expect

from minialign import policy_gradient as PG
from minialign import policy_gradient_sampling as PGS
from test_policy_gradient import ADV, MASK, NEW, OLD  # the batch of tests/equations/test_grpo.py


def test_zero_spread_fraction_by_hand():
    # G = 2: groups (1, 0), (0.1, 0.1), (1, 1): the last two score all the same, 2 of 3
    r = torch.tensor([1.0, 0.0, 0.1, 0.1, 1.0, 1.0])
    assert PGS.zero_spread_fraction(r, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="group of one"):      # always 'zero spread': a meaningless 1.0
        PGS.zero_spread_fraction(r, 1)
    with pytest.raises(ValueError, match="6 answers is not a"):  # 6 rewards do not make groups of 4
        PGS.zero_spread_fraction(r, 4)


def test_dynamic_sampling_by_hand():
    # G = 2; groups drawn in order: (1,1) no signal, (0,1) signal, (0,0) no, (1,0) signal, (1,0) signal
    # questions = 2: kept groups 1 and 3; the batch is full at group 3: 4 questions drawn, 2 of them
    # without signal: zero_spread = 2 / 4 = 0.5; group 4 is not used
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert PGS.signal_groups(r, 2).tolist() == [False, True, False, True, True]
    d = PGS.dynamic_sampling(r, 2, questions=2)
    assert d.keep.tolist() == [False, False, True, True, False, False, True, True, False, False]
    assert (d.kept, d.drawn, d.full) == (2, 4, True)
    assert d.zero_spread == pytest.approx(0.5)
    # questions = 4: only 3 groups carry a signal: not full, every drawn group counted (2 of 5 without signal)
    d = PGS.dynamic_sampling(r, 2, questions=4)
    assert (d.kept, d.drawn, d.full) == (3, 5, False)
    assert d.zero_spread == pytest.approx(0.4)


def test_overlong_filter_and_penalty_by_hand():
    # answer 1 is truncated: its tokens leave the loss; DAPO's token mean is then (1.28 + 0.9) / 2 = 1.09
    mask = PGS.overlong_filter(MASK, torch.tensor([True, False]))
    assert mask.tolist() == [[1, 1, 0], [0, 0, 0]]
    expect(PG.dapo_loss(NEW, OLD, ADV, mask)[0], -1.09, abs=1e-6)
    # soft punishment, L_max = 10, L_cache = 4: no penalty up to 10 - 4 = 6, then (6 - |y|) / 4, -1 if truncated
    # |y| = 3 -> 0 ; 6 -> 0 ; 8 -> (6 - 8) / 4 = -0.5 ; 9 -> -0.75 ; 10 -> -1.0
    expect(PGS.overlong_penalty(torch.tensor([3, 6, 8, 9, 10]), 10, 4), [0.0, 0.0, -0.5, -0.75, -1.0], abs=1e-7)
    # a truncated answer (no EOS) is the paper's |y| > L_max: -1, whatever its length reads
    expect(PGS.overlong_penalty(torch.tensor([3, 8, 10]), 10, 4, finished=torch.tensor([True, True, False])),
           [0.0, -0.5, -1.0], abs=1e-7)
    # ... also where its length alone would give less: |y| = 3 or 8 unfinished -> -1, not 0 or -0.5
    expect(PGS.overlong_penalty(torch.tensor([3, 8]), 10, 4, finished=torch.tensor([False, False])), [-1.0, -1.0],
           abs=1e-7)


def test_bad_input_is_a_clear_error():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="cache_len"):
        PGS.overlong_penalty(torch.tensor([3]), 10, 0)
    with pytest.raises(ValueError, match="cache_len"):
        PGS.overlong_penalty(torch.tensor([3]), 10, 11)
    with pytest.raises(ValueError, match="lengths must be in"):
        PGS.overlong_penalty(torch.tensor([11]), 10, 4)
    with pytest.raises(ValueError, match="questions must be"):
        PGS.dynamic_sampling(r, 2, 0)
