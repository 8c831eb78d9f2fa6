"""Tests of minialign/policy_gradient.py: each member of the family by hand, by gradcheck, and by the
identities that tie it to its parent (RLOO = G/(G-1) x the centred advantage, GSPO = GRPO at |y| = 1,
DAPO = GRPO's token mean at eps_low = eps_high, CISPO = REINFORCE weighted by the clipped ratio)."""

import math

import pytest
import torch
from handworked import expect

from minialign import policy_gradient as PG
from minialign.grpo import group_advantages, grpo_loss, kl_penalised_rewards

D = torch.float64

# the batch of tests/equations/test_grpo.py: answer 0 has 2 tokens, answer 1 has 3 (column 2 of answer 0 is padding)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
# pi_theta / pi_old per token: answer 0: 1.5, 0.9 ; answer 1: 0.5, 1.1, 1.0 (7.0 is padding)
NEW = OLD + torch.log(torch.tensor([[1.5, 0.9, 7.0], [0.5, 1.1, 1.0]]))
ADV = torch.tensor([1.0, -2.0])


def grad_of(fn, x):
    """d fn(x) / dx."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def random_batch(B=4, T=3, seed=0):
    """float64 log-probs with ratios within 1 +- 0.15 of pi_old (away from the clip's kinks at +-0.2),
    and a mask with answers of 1, 2, 3 and 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=D) - 1
    new = old + 0.15 * (2 * torch.rand(B, T, generator=g, dtype=D) - 1)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])[:B, :T]
    return new, old, mask


# ----------------------------------------------------------------------------------------------
# REINFORCE: the per-token loss, then the aggregation as its own step
# ----------------------------------------------------------------------------------------------

LOGPS = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 1.0, 0.25]]))


def test_reinforce_per_token_and_aggregations_by_hand():
    # log pi: answer 0: ln 0.5 = -0.693147, ln 0.25 = -1.386294 ; answer 1: -0.693147, 0, -1.386294
    # A = 2, -1; per token -A log pi: answer 0: 1.386294, 2.772589 (padding 0) ; answer 1: -0.693147, 0, -1.386294
    per_token = PG.reinforce_per_token(LOGPS, torch.tensor([2.0, -1.0]), MASK)
    expect(per_token, [[1.386294, 2.772589, 0.0], [-0.693147, 0.0, -1.386294]], abs=1e-6)
    # token sum = 4.158883 - 2.079442 = 2.079442
    # sequence_sum (REINFORCE): 2.079442 / B = 2.079442 / 2 = 1.039721
    expect(PG.aggregate(per_token, MASK, "sequence_sum"), 1.039721, abs=1e-6)
    # token_mean: 2.079442 / 5 tokens = 0.415888
    expect(PG.aggregate(per_token, MASK, "token_mean"), 0.415888, abs=1e-6)
    # answer_mean: (4.158883 / 2 + -2.079442 / 3) / 2 = (2.079442 - 0.693147) / 2 = 0.693147
    expect(PG.aggregate(per_token, MASK, "answer_mean"), 0.693147, abs=1e-6)
    # constant: 2.079442 / (B * max_len) = 2.079442 / 8 = 0.259930
    expect(PG.aggregate(per_token, MASK, "constant", max_len=4), 0.259930, abs=1e-6)


def test_reinforce_gradient_by_hand():
    # sequence_sum: d/d log pi_t of -(1/B) sum A log pi = -A / 2: answer 0: -1, -1 ; answer 1: +0.5 each; padding 0
    g = grad_of(lambda x: PG.reinforce_loss(x, torch.tensor([2.0, -1.0]), MASK)[0], LOGPS)
    expect(g, [[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]], abs=1e-7)
    # a (B, T) advantage (REINFORCE++'s) weighs each token on its own: token mean, d = -A_t / 5
    A = torch.tensor([[1.0, 2.0, 9.0], [0.5, -1.0, 0.0]])
    g = grad_of(lambda x: PG.reinforce_loss(x, A, MASK, aggregation="token_mean")[0], LOGPS)
    expect(g, [[-0.2, -0.4, 0.0], [-0.1, 0.2, 0.0]], abs=1e-7)


def test_reinforce_is_grpo_at_pi_old():
    # at logps = old_logps (rho = 1, nothing clipped), E13's gradient is A * d rho = A * d log pi: REINFORCE's,
    # for each aggregation both share
    new, old, mask = random_batch()
    A = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=D)
    for agg in ("answer_mean", "token_mean", "constant"):
        g_grpo = grad_of(lambda x: grpo_loss(x, x.detach(), None, A, mask, beta=0.0, aggregation=agg, max_len=3)[0], old)
        g_pg = grad_of(lambda x: PG.reinforce_loss(x, A, mask, aggregation=agg, max_len=3)[0], old)
        assert torch.allclose(g_grpo, g_pg, atol=1e-12), agg


def test_reinforce_gradcheck_float64():
    new, _, mask = random_batch()
    A = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=D)
    for agg in PG.AGGREGATIONS:
        assert torch.autograd.gradcheck(lambda x: PG.reinforce_loss(x, A, mask, agg, max_len=3)[0],
                                        (new.clone().requires_grad_(True),))


def test_batch_mean_by_hand_and_as_one_big_group():
    # rewards 1, 0, 0, 3: batch mean 1, A = 0, -1, -1, 2
    r = torch.tensor([1.0, 0.0, 0.0, 3.0])
    expect(PG.batch_mean_advantages(r), [0.0, -1.0, -1.0, 2.0], abs=0)
    # it is the group mean with the whole batch as one group
    r = torch.tensor([0.3, 1.0, -2.0, 0.5, 0.0, 4.0], dtype=D)
    assert torch.allclose(PG.batch_mean_advantages(r), group_advantages(r, 6, scale_by_std=False), atol=1e-15)


# ----------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("rloo_advantages")
def test_rloo_by_hand():
    # one group of G = 4, rewards 1, 0, 0, 3; the mean of the other three:
    # answer 0: (0 + 0 + 3) / 3 = 1 -> A = 1 - 1 = 0
    # answer 1: (1 + 0 + 3) / 3 = 1.333333 -> A = -1.333333 (answer 2 likewise)
    # answer 3: (1 + 0 + 0) / 3 = 0.333333 -> A = 3 - 0.333333 = 2.666667
    expect(PG.rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0]), 4), [0.0, -1.333333, -1.333333, 2.666667], abs=1e-6)
    # two groups of G = 2: (1, 0) -> 1 - 0 = 1, 0 - 1 = -1 ; (5, 5) -> 0, 0 (no signal, no NaN)
    expect(PG.rloo_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0]), 2), [1.0, -1.0, 0.0, 0.0], abs=0)


def test_rloo_is_g_over_g_minus_1_times_the_centred_advantage():
    # r_i - (G R - r_i)/(G - 1) = (G/(G - 1)) (r_i - R)
    r = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=D)
    for G in (2, 3, 4, 6):
        centred = group_advantages(r, G, scale_by_std=False)
        assert torch.allclose(PG.rloo_advantages(r, G), G / (G - 1) * centred, atol=1e-14), G
    # r_0 is not in its own baseline, only in the others'
    r2 = r.clone()
    r2[0] += 1.0
    diff = PG.rloo_advantages(r2, 4) - PG.rloo_advantages(r, 4)
    # A_0 rises by exactly 1 (its own baseline is unchanged); the other three fall by 1/3 (r_0 is in their baselines)
    expect(diff[:4], [1.0, -1 / 3, -1 / 3, -1 / 3], abs=1e-12)


@pytest.mark.exercise("rloo_advantages")
def test_rloo_gradcheck_through_the_reinforce_loss():
    new, _, mask = random_batch()
    A = PG.rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D), 2)
    assert torch.autograd.gradcheck(lambda x: PG.policy_loss("reinforce", x, x.detach(), A, mask)[0],
                                    (new.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------
# REINFORCE++
# ----------------------------------------------------------------------------------------------


def test_reinforce_pp_by_hand():
    # rewards 1 and 0, beta = 0.1; per-token k1 = log pi_old - log pi_ref: answer 0: 0.2, 0.4 (padding 9.0);
    # answer 1: 0.0, -0.1, 0.3. Returns r - beta * (k1 summed from t on):
    # answer 0: 1 - 0.1 * 0.6 = 0.94, 1 - 0.1 * 0.4 = 0.96 ; answer 1: -0.1 * 0.2 = -0.02, -0.1 * 0.2 = -0.02, -0.03
    # batch mean = (0.94 + 0.96 - 0.02 - 0.02 - 0.03) / 5 = 0.366; sample std = 0.533179
    # A = (return - 0.366) / (0.533179 + 1e-4): 1.076359, 1.113863, -0.723824, -0.723824, -0.742575
    old = torch.tensor([[0.2, 0.4, 9.0], [0.0, -0.1, 0.3]])
    A = PG.reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, old, torch.zeros(2, 3), beta=0.1)
    expect(A, [[1.076359, 1.113863, 0.0], [-0.723824, -0.723824, -0.742575]], abs=1e-5)
    # every return the same: 0, not NaN
    A = PG.reinforce_pp_advantages(torch.tensor([1.0, 1.0]), MASK)
    assert A.abs().max() == 0


def test_reinforce_pp_with_one_token_is_e12_over_the_batch_of_kl_penalised_rewards():
    # one-token answers: the return is r - beta k1, whitened over the batch: E12 with the whole batch as the group
    g = torch.Generator().manual_seed(2)
    r = torch.randn(6, generator=g, dtype=D)
    old, ref = torch.randn(6, 1, generator=g, dtype=D), torch.randn(6, 1, generator=g, dtype=D)
    mask = torch.ones(6, 1)
    A = PG.reinforce_pp_advantages(r, mask, old, ref, beta=0.3)
    penalised = kl_penalised_rewards(r, old, ref, mask, 0.3, estimator="k1")
    assert torch.allclose(A[:, 0], group_advantages(penalised, 6), atol=1e-12)


def test_reinforce_pp_gradcheck_through_the_ppo_clip():
    new, old, mask = random_batch()
    A = PG.advantages("reinforce_pp", torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=D), 1, mask=mask, old_logps=old,
                      ref_logps=old - 0.1, beta=0.1)
    assert A.shape == (4, 3)
    assert torch.autograd.gradcheck(lambda x: PG.policy_loss("ppo_clip", x, old, A, mask)[0],
                                    (new.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------
# DAPO
# ----------------------------------------------------------------------------------------------


def test_dapo_clip_higher_by_hand():
    # clip to [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; min(rho A, clip(rho) A) per token:
    # answer 0 (A = +1): rho 1.5 -> min(1.5, 1.28) = 1.28 (E13's symmetric clip gives 1.2) ; rho 0.9 -> 0.9
    # answer 1 (A = -2): rho 0.5 -> min(-1.0, -1.6) = -1.6 ; rho 1.1 -> -2.2 ; rho 1.0 -> -2.0
    # token mean: (1.28 + 0.9 - 1.6 - 2.2 - 2.0) / 5 = -3.62 / 5 = -0.724, loss 0.724
    loss, stats = PG.dapo_loss(NEW, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28)
    expect(loss, 0.724, abs=1e-6)
    expect(stats["clip_frac"], 2 / 5, abs=1e-7)
    # gradient: a clipped token gets none; the others -rho A / 5: (0,1): -0.18, (1,1): +0.44, (1,2): +0.4
    g = grad_of(lambda x: PG.dapo_loss(x, OLD, ADV, MASK)[0], NEW)
    expect(g, [[0.0, -0.18, 0.0], [0.0, 0.44, 0.4]], abs=1e-6)
    # eps_high = 0.6: rho = 1.5 is inside [0.8, 1.6]: 1.5 + 0.9 - 1.6 - 2.2 - 2.0 = -3.4, loss 0.68
    expect(PG.dapo_loss(NEW, OLD, ADV, MASK, eps_high=0.6)[0], 0.68, abs=1e-6)


def test_dapo_with_equal_clips_is_grpo_token_mean():
    new, old, mask = random_batch()
    new = old + 3 * (new - old)  # ratios up to 1 +- 0.45: some clipped
    A = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    for eps in (0.1, 0.2):
        dapo = lambda x: PG.dapo_loss(x, old, A, mask, eps_low=eps, eps_high=eps)[0]
        grpo = lambda x: grpo_loss(x, old, None, A, mask, clip_eps=eps, beta=0.0, aggregation="token_mean")[0]
        assert torch.allclose(dapo(new), grpo(new), atol=1e-14)
        assert torch.allclose(grad_of(dapo, new), grad_of(grpo, new), atol=1e-14)


def test_dapo_gradcheck_float64():
    new, old, mask = random_batch()
    A = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    assert torch.autograd.gradcheck(lambda x: PG.dapo_loss(x, old, A, mask, 0.2, 0.28)[0],
                                    (new.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------
# GSPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("gspo_sequence_ratio")
def test_gspo_by_hand():
    # s_0 = (1.5 * 0.9)^(1/2) = sqrt(1.35) = 1.161895 ; s_1 = (0.5 * 1.1 * 1.0)^(1/3) = 0.55^(1/3) = 0.819321
    expect(PG.gspo_sequence_ratio(NEW, OLD, MASK), [1.161895, 0.819321], abs=1e-6)
    # clip [0.8, 1.2]: both inside; (1.161895 * 1 + 0.819321 * -2) / 2 = -0.238374, loss 0.238374
    loss, stats = PG.gspo_loss(NEW, OLD, ADV, MASK, eps_low=0.2, eps_high=0.2)
    expect(loss, 0.238374, abs=1e-6)
    assert stats["clip_frac"] == 0
    # the paper's [1 - 3e-4, 1 + 4e-4]: answer 0 -> min(1.161895, 1.0004) = 1.0004 ;
    # answer 1 -> min(-1.638642, 0.9997 * -2 = -1.9994) = -1.9994 ; (1.0004 - 1.9994) / 2 = -0.4995
    loss, stats = PG.gspo_loss(NEW, OLD, ADV, MASK)
    expect(loss, 0.4995, abs=1e-6)
    assert stats["clip_frac"] == 1
    # gradient inside the clip: d/d log pi_t of -(1/B) s_i A_i = -s_i A_i / (B |y_i|):
    # answer 0: -1.161895 / 4 = -0.290474 per token ; answer 1: 0.819321 * 2 / 6 = 0.273107 per token
    g = grad_of(lambda x: PG.gspo_loss(x, OLD, ADV, MASK, 0.2, 0.2)[0], NEW)
    expect(g, [[-0.290474, -0.290474, 0.0], [0.273107, 0.273107, 0.273107]], abs=1e-6)


def test_gspo_with_one_token_answers_is_grpo():
    # |y_i| = 1: s_i = rho_i, and one clipped term per answer is E13's answer mean
    g = torch.Generator().manual_seed(3)
    old = torch.randn(5, 1, generator=g, dtype=D)
    new = old + 0.5 * torch.randn(5, 1, generator=g, dtype=D)  # some outside 1 +- 0.2
    A = torch.randn(5, generator=g, dtype=D)
    mask = torch.ones(5, 1)
    gspo = lambda x: PG.gspo_loss(x, old, A, mask, eps_low=0.2, eps_high=0.2)[0]
    grpo = lambda x: grpo_loss(x, old, None, A, mask, clip_eps=0.2, beta=0.0)[0]
    assert torch.allclose(gspo(new), grpo(new), atol=1e-14)
    assert torch.allclose(grad_of(gspo, new), grad_of(grpo, new), atol=1e-14)


@pytest.mark.exercise("gspo_sequence_ratio")
def test_gspo_gradcheck_float64_and_log_space():
    new, old, mask = random_batch()
    A = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    assert torch.autograd.gradcheck(lambda x: PG.gspo_loss(x, old, A, mask, 0.2, 0.2)[0],
                                    (new.clone().requires_grad_(True),))
    # 2000 tokens, each ratio 1.01: the product 1.01^2000 = 4.4e8 but s = 1.01 exactly (log-mean), and
    # a log-ratio of -3 per token (product e^-6000 = 0 in float64) still gives s = e^-3
    lp = torch.full((2, 2000), -3.0, dtype=D)
    s = PG.gspo_sequence_ratio(lp + torch.tensor([[math.log(1.01)], [-3.0]], dtype=D), lp, torch.ones(2, 2000))
    expect(s, [1.01, math.exp(-3)], abs=1e-12)


# ----------------------------------------------------------------------------------------------
# CISPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("cispo_loss")
def test_cispo_by_hand():
    # weights sg(clip(rho, 1 - 1, 1 + 0.28)) = clip(rho, 0, 1.28): 1.28 (from 1.5), 0.9 ; 0.5, 1.1, 1.0
    # log pi = log(0.5 rho): ln 0.75 = -0.287682, ln 0.45 = -0.798508 ; ln 0.25 = -1.386294, ln 0.55 = -0.597837, ln 0.5 = -0.693147
    # w A log pi: -0.368233, -0.718657 ; 1.386294, 1.315241, 1.386294 ; sum 3.000940; loss = -3.000940 / 5 = -0.600188
    loss, stats = PG.cispo_loss(NEW, OLD, ADV, MASK)
    expect(loss, -0.600188, abs=1e-5)
    expect(stats["clip_frac"], 1 / 5, abs=1e-7)  # only rho = 1.5 is clipped (the lower bound is 0)
    # gradient -w A / 5: every token keeps one, the clipped ones too (E13 gives 0 at (0,0) and (1,0)):
    # (0,0): -1.28 / 5 = -0.256, (0,1): -0.18 ; (1,0): -(0.5 * -2) / 5 = 0.2, (1,1): 0.44, (1,2): 0.4
    g = grad_of(lambda x: PG.cispo_loss(x, OLD, ADV, MASK)[0], NEW)
    expect(g, [[-0.256, -0.18, 0.0], [0.2, 0.44, 0.4]], abs=1e-6)
    # eps_low = 0.2: the weight of rho = 0.5 is raised to 0.8: (1,0) becomes -(0.8 * -2) / 5 = 0.32
    g = grad_of(lambda x: PG.cispo_loss(x, OLD, ADV, MASK, eps_low=0.2)[0], NEW)
    expect(g[1, 0], 0.32, abs=1e-6)


@pytest.mark.exercise("cispo_loss")
def test_cispo_gradient_is_reinforce_weighted_by_the_clipped_ratio():
    new, old, mask = random_batch()
    new = old + 4 * (new - old)  # ratios up to 1 +- 0.6: some clipped
    A = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    weight = torch.clamp(torch.exp(new - old), 1 - 0.2, 1 + 0.28)
    g_cispo = grad_of(lambda x: PG.cispo_loss(x, old, A, mask, eps_low=0.2, eps_high=0.28)[0], new)
    g_reinforce = grad_of(lambda x: PG.reinforce_loss(x, A, mask, aggregation="token_mean")[0], new)
    assert torch.allclose(g_cispo, weight * g_reinforce, atol=1e-14)
    assert (g_cispo[mask.bool()] != 0).all()  # every token keeps a gradient


@pytest.mark.exercise("cispo_loss")
def test_cispo_gradcheck_float64():
    # the weight sg(clip(rho)) is a constant of the gradient, so the check differentiates at a fixed
    # log-ratio: old_logps = logps - log_ratio keeps rho, hence the weight, constant as logps moves
    new, old, mask = random_batch()
    log_ratio = 4 * (new - old)  # ratios up to 1 +- 0.6: clipped weights included
    A = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    assert torch.autograd.gradcheck(lambda x: PG.cispo_loss(x, x - log_ratio, A, mask, 0.2, 0.28)[0],
                                    (new.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------
# the dispatchers, every member end to end (advantage, then loss), and bad input
# ----------------------------------------------------------------------------------------------


def test_every_member_through_the_dispatchers_gradcheck():
    new, old, mask = random_batch()
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=D)
    for member, (estimator, loss, _) in PG.MEMBERS.items():
        extra = dict(mask=mask, old_logps=old, ref_logps=old - 0.1, beta=0.1) if estimator == "reinforce_pp" else {}
        A = group_advantages(rewards, 2) if estimator == "grpo" else PG.advantages(estimator, rewards, 2, **extra)
        def f(x):  # CISPO's weight is stopped: hold the log-ratio fixed (test_cispo_gradcheck_float64)
            if loss == "grpo":  # GRPO's own E13, with its KL term
                return grpo_loss(x, old, old - 0.1, A, mask, beta=0.04)[0]
            return PG.policy_loss(loss, x, x - (new - old) if loss == "cispo" else old, A, mask)[0]
        assert f(new).dtype == D, member
        assert torch.autograd.gradcheck(f, (new.clone().requires_grad_(True),)), member


def test_dispatchers_are_the_functions_they_name():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0])
    assert torch.equal(PG.advantages("none", r, 4), r)
    assert torch.equal(PG.advantages("rloo", r, 4), PG.rloo_advantages(r, 4))
    assert torch.equal(PG.advantages("batch_mean", r, 4), PG.batch_mean_advantages(r))
    assert torch.equal(PG.policy_loss("reinforce", NEW, OLD, ADV, MASK)[0], PG.reinforce_loss(NEW, ADV, MASK)[0])
    for name, fn in (("dapo", PG.dapo_loss), ("gspo", PG.gspo_loss), ("cispo", PG.cispo_loss)):
        assert torch.equal(PG.policy_loss(name, NEW, OLD, ADV, MASK)[0], fn(NEW, OLD, ADV, MASK)[0]), name


def test_bad_input_is_a_clear_error():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        PG.rloo_advantages(r, 1)  # RLOO with G = 1: no other answer to take the mean of
    with pytest.raises(ValueError, match="multiple of group_size"):
        PG.rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="finite"):
        PG.rloo_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        PG.batch_mean_advantages(torch.tensor([]))
    with pytest.raises(ValueError, match="empty"):  # GSPO with an empty answer: no 1/|y|
        PG.gspo_loss(NEW, OLD, ADV, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="eps_low must be in"):
            PG.dapo_loss(NEW, OLD, ADV, MASK, eps_low=bad)
        with pytest.raises(ValueError, match="eps_low must be in"):
            PG.gspo_loss(NEW, OLD, ADV, MASK, eps_low=bad)
    PG.cispo_loss(NEW, OLD, ADV, MASK, eps_low=1.0)  # CISPO: no lower bound is allowed
    with pytest.raises(ValueError, match="eps_low must be in"):
        PG.cispo_loss(NEW, OLD, ADV, MASK, eps_low=1.5)
    with pytest.raises(ValueError, match="eps_high must be > 0"):
        PG.dapo_loss(NEW, OLD, ADV, MASK, eps_high=0.0)
    with pytest.raises(ValueError, match="no tokens"):  # every answer filtered out
        PG.dapo_loss(NEW, OLD, ADV, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="advantages must be"):
        PG.reinforce_loss(NEW, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="two response tokens"):
        PG.reinforce_pp_advantages(torch.tensor([1.0]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="needs old_logps"):
        PG.reinforce_pp_advantages(r, MASK, beta=0.1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        PG.advantages("ppo", r, 2)
    with pytest.raises(ValueError, match="already hold the KL"):
        PG.advantages("rloo", r, 2, beta=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        PG.policy_loss("sft", NEW, OLD, ADV, MASK)
    with pytest.raises(ValueError, match="loss must be one of"):  # GRPO's own E13 is grpo.grpo_loss
        PG.policy_loss("grpo", NEW, OLD, ADV, MASK)
    with pytest.raises(ValueError, match="fixes its own aggregation"):
        PG.policy_loss("cispo", NEW, OLD, ADV, MASK, aggregation="answer_mean")
    with pytest.raises(ValueError, match="eps_low / eps_high"):
        PG.policy_loss("reinforce", NEW, OLD, ADV, MASK, eps_high=0.3)
