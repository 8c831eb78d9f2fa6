"""Tests of minialign/best_of_n.py: the selection rule and its ties, rejection sampling's data, the
exact best-of-N distribution and KL against brute-force enumeration and the log N - (N-1)/N formula,
one round of rejection sampling, and best-of-N's estimate from samples. (The rejection-sampling
stage, its runner on scripted samples and end to end: tests/runtime/test_rejection_sampling.py.)"""

import itertools
import math

import pytest
import torch
from handworked import expect

from minialign import theory as T
from minialign.best_of_n import (RejectionSamplingHyperparams, best_of_n, best_of_n_distribution,
                                 best_of_n_expected_reward, best_of_n_from_samples, best_of_n_kl, best_of_n_kl_bound,
                                 rejection_sampling_round, score_samples, select_for_sft)

D = torch.float64


def test_best_of_n_by_hand_ties_go_to_the_first_sample():
    # rewards 1, 3, 3, 2: the largest is 3, at samples 1 and 2; the first of them wins
    out = best_of_n(torch.tensor([1.0, 3.0, 3.0, 2.0]))
    assert int(out.index) == 1 and float(out.reward) == 3.0
    # batched over prompts: (P, N)
    out = best_of_n(torch.tensor([[0.0, 0.0, 0.0], [-1.0, 5.0, 5.0], [2.0, 1.0, 2.0]]))
    assert out.index.tolist() == [0, 1, 0] and out.reward.tolist() == [0.0, 5.0, 2.0]
    with pytest.raises(ValueError, match="finite"):
        best_of_n(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="N >= 1"):
        best_of_n(torch.tensor(1.0))


def test_rejection_sampling_selection_by_hand():
    prompts = ["what is 1 + 1 ?", "what is 2 + 2 ?", "what is 3 + 3 ?"]
    completions = [["2", "3", "2"], ["5", "3", "1"], ["6", "6", "7"]]
    rewards = score_samples(lambda p, y: float(int(y) == 2 * int(p.split()[2])), prompts, completions)
    assert rewards.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    # best-of-3 without a threshold: every prompt keeps its best (ties: the first sample)
    out = select_for_sft(prompts, completions, rewards, RejectionSamplingHyperparams(samples_per_prompt=3))
    assert [(r["prompt"][8], r["completion"]) for r in out.rows] == [("1", "2"), ("2", "5"), ("3", "6")]
    # only correct answers (min_reward = 1): the second prompt has none and is dropped
    hp = RejectionSamplingHyperparams(samples_per_prompt=3, keep_per_prompt=2, min_reward=1.0)
    out = select_for_sft(prompts, completions, rewards, hp)
    assert [r["completion"] for r in out.rows] == ["2", "2", "6", "6"]
    assert (out.prompts_kept, out.prompts_dropped) == (2, 1)
    # mean reward of all 9 samples: 4 / 9 = 0.444444; of the kept rows: 1
    expect(out.mean_reward_sampled, 4 / 9)
    expect(out.mean_reward_kept, 1.0)
    # distinct: a completion sampled twice counts once
    hp = RejectionSamplingHyperparams(samples_per_prompt=3, keep_per_prompt=2, min_reward=1.0, distinct=True)
    assert [r["completion"] for r in select_for_sft(prompts, completions, rewards, hp).rows] == ["2", "6"]


def test_rejection_sampling_bad_input():
    with pytest.raises(ValueError, match="keep_per_prompt"):
        RejectionSamplingHyperparams(samples_per_prompt=2, keep_per_prompt=3).validate()
    hp = RejectionSamplingHyperparams(samples_per_prompt=2)
    with pytest.raises(ValueError, match=r"\(P, N\) = \(1, 2\)"):
        select_for_sft(["a"], [["x", "y"]], torch.zeros(1, 3), hp)
    with pytest.raises(ValueError, match="samples_per_prompt = 2"):
        select_for_sft(["a"], [["x"]], torch.zeros(1, 2), hp)
    with pytest.raises(ValueError, match="finite"):
        select_for_sft(["a"], [["x", "y"]], torch.tensor([[0.0, float("inf")]]), hp)
    with pytest.raises(ValueError, match="same number N"):
        score_samples(lambda p, y: 0.0, ["a", "b"], [["x"], ["x", "y"]])


def test_best_of_two_by_hand():
    # pi_ref = (1/2, 1/2), r = (0, 1), N = 2: the best is y_1 unless both samples are y_0: P = 1 - 1/4 = 3/4
    q, r = torch.tensor([0.5, 0.5], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    expect(best_of_n_distribution(q, r, 2), [0.25, 0.75], abs=1e-15)
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812, below log 2 - 1/2 = 0.193147
    expect(best_of_n_kl(q, r, 2), 0.130812, abs=1e-6)
    expect(best_of_n_kl_bound(2), 0.193147, abs=1e-6)
    expect(best_of_n_expected_reward(q, r, 2), 0.75)


def test_best_of_one_is_the_reference_with_kl_zero():
    pb = T.graded_problem()
    expect(best_of_n_distribution(pb.ref_probs, pb.rewards, 1), pb.ref_probs, abs=1e-15)
    expect(best_of_n_kl(pb.ref_probs, pb.rewards, 1), 0.0, abs=1e-15)
    expect(best_of_n_kl_bound(1), 0.0, abs=0)


def enumerate_best_of_n(q: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """Every ordered N-tuple of responses, its probability, and best_of_n's choice: the law by brute force."""
    dist = torch.zeros_like(q)
    for tup in itertools.product(range(q.numel()), repeat=n):
        choice = tup[int(best_of_n(r[list(tup)]).index)]
        dist[choice] += math.prod(float(q[y]) for y in tup)
    return dist


def test_exact_distribution_and_kl_match_brute_force_with_ties():
    # responses 1 and 2 tie at reward 1: the first-sample rule picks each in proportion to pi_ref
    q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D)
    r = torch.tensor([0.0, 1.0, 1.0, -2.0], dtype=D)
    for n in (1, 2, 3, 5):
        brute = enumerate_best_of_n(q, r, n)
        exact = best_of_n_distribution(q, r, n)
        expect(exact, brute, abs=1e-14)
        expect(best_of_n_kl(q, r, n), T.kl(brute, q), abs=1e-14)
        expect(best_of_n_expected_reward(q, r, n), (brute * r).sum(), abs=1e-14)
    # by hand for N = 2: level 1 holds 0.45; P(best at level 1) = F(1)^2 - F^-(1)^2 = 1 - 0.55^2 = 0.6975
    # split 0.3 : 0.15, so pi_BoN(1) = 0.6975 * 2/3 = 0.465
    expect(best_of_n_distribution(q, r, 2)[1], 0.465, abs=1e-12)


def test_kl_is_below_the_formula_and_meets_it_in_the_continuous_limit():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # random references, rewards with ties (rounded), N = 1..64
        K = int(torch.randint(2, 9, (1,), generator=generator))
        q = torch.softmax(torch.randn(K, generator=generator, dtype=D) * 2, 0)
        r = torch.round(torch.randn(K, generator=generator, dtype=D) * 2)
        for n in (1, 2, 3, 8, 64):
            assert best_of_n_kl(q, r, n) <= best_of_n_kl_bound(n) + 1e-12
            # and never above best-of-infinity's: -log pi_ref(top reward level)
            assert best_of_n_kl(q, r, n) <= -math.log(float(q[r == r.max()].sum())) + 1e-12
    # uniform pi_ref over K distinct rewards: as K grows, the KL tends to log N - (N-1)/N
    for n in (2, 16, 64):
        gaps = [best_of_n_kl_bound(n) - best_of_n_kl(torch.full((K,), 1 / K, dtype=D), torch.arange(K, dtype=D), n)
                for K in (10, 100, 10_000)]
        assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 1e-5
    # N = 2, K = 2 uniform distinct: the KL by hand is 0.130812 (above); the formula is only reached as K -> infinity


def test_exact_theory_bad_input():
    q, r = torch.tensor([0.5, 0.5], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="integer >= 1"):
        best_of_n_kl(q, r, 0)
    with pytest.raises(ValueError, match="distribution"):
        best_of_n_kl(torch.tensor([0.5, 0.6], dtype=D), r, 2)
    with pytest.raises(ValueError, match="one shape"):
        best_of_n_kl(q, torch.tensor([0.0, 1.0, 2.0], dtype=D), 2)


# ----------------------------------------------------------------------------------------------
# rejection sampling: one round, and best-of-N's estimate from samples
# ----------------------------------------------------------------------------------------------


def test_best_of_n_from_samples_by_hand():
    # M = 4 samples, scores 1, 2, 2, 3 (values 10, 20, 30, 40), N = 2.
    # levels 1, 2, 3 with q = 1/4, 1/2, 1/4; F = 0.25, 0.75, 1
    # P(best level) = F^2 - F^-^2: 0.0625, 0.5625 - 0.0625 = 0.5, 1 - 0.5625 = 0.4375
    # the tied level 2 picks samples 2 and 3 with pi_ref's weights, half each: value (20 + 30) / 2 = 25
    # E[value] = 0.0625 * 10 + 0.5 * 25 + 0.4375 * 40 = 0.625 + 12.5 + 17.5 = 30.625
    # KL = 0.0625 log(0.0625 / 0.25) + 0.5 log(0.5 / 0.5) + 0.4375 log(0.4375 / 0.25)
    #    = -0.0866434 + 0 + 0.2448319 = 0.1581885
    value, kl = best_of_n_from_samples(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0, 40.0]), 2)
    expect(value, 30.625)
    expect(kl, 0.1581885, rel=1e-6)
    # N = 1 is pi_ref itself: the mean value, KL 0
    value, kl = best_of_n_from_samples(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0, 40.0]), 1)
    assert (value, kl) == (25.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        best_of_n_from_samples(torch.zeros(3), torch.zeros(4), 2)


def test_a_round_keeps_each_prompts_best_sample(tiny_model, world):
    """The reward is the response's length in characters: each kept row is the longest of its prompt's N."""
    tok = world.tokenizer
    prompts = ["review the movie", "what is 1 + 2 ?"]

    def length(prompts, completions, finished, **columns):
        return [float(len(y)) for y in completions]

    hp = RejectionSamplingHyperparams(samples_per_prompt=5)
    result = rejection_sampling_round(tiny_model, tok, length, prompts, hp, torch.Generator().manual_seed(0), 8)
    assert result.rewards.shape == (2, 5) and [len(c) for c in result.completions] == [5, 5]
    for i, row in enumerate(result.selection.rows):
        assert row["prompt"] == prompts[i]
        lengths = [len(y) for y in result.completions[i]]
        assert row["completion"] == result.completions[i][lengths.index(max(lengths))]  # ties: the first
        assert row["reward"] == max(lengths)
    expect(result.selection.mean_reward_sampled, float(result.rewards.mean()))
