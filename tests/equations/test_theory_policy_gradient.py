"""Tests of minialign/theory_policy_gradient.py: the exact expected update of each member of the
family, checked against a brute-force sum over every ordered group, and every fixed point the docs
state checked by an independent computation (a closed form, a stationarity condition)."""

import itertools

import pytest
import torch

from minialign import policy_gradient as PG
from minialign.grpo import group_advantages, grpo_loss
from minialign import theory as T
from minialign import theory_policy_gradient as L

D = torch.float64


def small_problem(beta=1.0):
    # three responses, the best one the rarest under pi_ref (tests/equations/test_theory.py's)
    return T.Problem(ref_probs=[0.5, 0.3, 0.2], rewards=[0.0, 1.0, 2.0], beta=beta, name="small")


def grad_at(fn, theta):
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(th), th)
    return g


def live_gradient(g, p):
    """The gradient over the responses, less the part that moves no probability (theory.run_to_convergence's measure)."""
    return (g - p * g.sum()).abs().max()


# ----------------------------------------------------------------------------------------------
# the expectation is exact: against a brute-force sum of the member's own loss over every ordered group
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,loss,options", [
    ("none", "reinforce", {}), ("rloo", "reinforce", {}), ("group_mean", "reinforce", {}),
    ("grpo", "dapo", {"eps_low": 0.2, "eps_high": 0.28}), ("grpo", "gspo", {"eps_low": 0.1, "eps_high": 0.15}),
    ("grpo", "cispo", {"eps_low": 0.2, "eps_high": 0.28}), ("grpo", "grpo", {"clip_eps": 0.2})])
def test_expected_member_loss_matches_brute_force_over_every_ordered_group(estimator, loss, options):
    # K = G = 3: all 27 ordered groups, each called with its own advantages, weighted by its probability
    # under pi_old; pi_theta != pi_old so that ratios leave the clip range (the +/- split must handle it),
    # graded rewards so that one response gets advantages of both signs across groups
    pb = small_problem()
    K, G = 3, 3
    old = torch.tensor([0.3, -0.4, 0.2], dtype=D)
    logp_old = torch.log_softmax(old, 0)
    rewards = pb.rewards  # 0, 1, 2: response 1's advantage is > 0 in a group with a 0 and < 0 in one with a 2

    def brute(th):
        logp = torch.log_softmax(th, 0)
        total = th.new_zeros(())
        for group in itertools.product(range(K), repeat=G):
            idx = torch.tensor(group)
            if estimator in ("grpo", "group_mean"):  # GRPO's own E12, or Dr. GRPO's r - mean
                A = group_advantages(rewards[idx], G, scale_by_std=estimator == "grpo")
            else:
                A = PG.advantages(estimator, rewards[idx], G)
            ones = torch.ones(G, 1, dtype=D)
            if loss == "grpo":  # E13 without its KL term
                value, _ = grpo_loss(logp[idx, None], logp_old[idx, None], None, A, ones, beta=0.0, **options)
            else:
                value, _ = PG.policy_loss(loss, logp[idx, None], logp_old[idx, None], A, ones, **options)
            total = total + torch.exp(logp_old[idx].sum()) * value
        return total

    member = L.Member("m", estimator, loss, G, kl="none", loss_options=options)
    exact = lambda th: L.expected_member_loss(th, pb, member, T.GroupEnumeration(K, G), old_theta=old)
    # pi_theta / pi_old = (1.22, 0.64, 0.95) and (0.87, 1.66, 0.78): response 1 outside the clip range both ways
    for step in ([0.35, -0.3, 0.1], [-0.2, 0.45, -0.3]):
        theta = old + torch.tensor(step, dtype=D)
        if loss != "cispo":  # CISPO's value holds log pi, not a surrogate: only its gradient is compared
            assert float(exact(theta)) == pytest.approx(float(brute(theta)), abs=1e-12)
        assert torch.allclose(grad_at(exact, theta), grad_at(brute, theta), atol=1e-12)


def test_conditional_advantages_of_the_baselines_in_closed_form():
    # a(y) = (w+(y) - w-(y)) / pi(y): REINFORCE's is r(y) itself; RLOO's is r(y) - E_pi r exactly (unbiased);
    # the group mean's is (1 - 1/G)(r(y) - E_pi r): it includes r_i, so it shrinks the gradient by 1 - 1/G
    pb = small_problem()
    p = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    centred = pb.rewards - (p * pb.rewards).sum()
    for G in (2, 3, 5):
        groups = T.GroupEnumeration(3, G)

        def a(estimator):
            plus, minus = L.advantage_mass(estimator, pb.rewards, torch.log(p), groups)
            return (plus - minus) / p
        assert torch.allclose(a("none"), pb.rewards, atol=1e-12)
        assert torch.allclose(a("rloo"), centred, atol=1e-12)
        assert torch.allclose(a("group_mean"), (1 - 1 / G) * centred, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# fixed points
# ----------------------------------------------------------------------------------------------


def test_with_the_kl_in_the_reward_pi_star_is_every_members_fixed_point():
    # at pi* the k1-penalised reward r - beta log(pi*/pi_ref) = beta log Z is the same for every response
    # (checked directly): every group is zero-spread and every member's expected gradient is 0;
    # at pi_ref it is not
    pb = small_problem()
    star = T.pi_star(pb)
    penalised = pb.rewards - pb.beta * torch.log(star / pb.ref_probs)
    assert float(penalised.max() - penalised.min()) < 1e-12
    for member in L.family(G=3, N=4):
        if member.kl != "reward_k1":
            continue
        groups = T.GroupEnumeration(3, member.size)
        fn = lambda th: L.expected_member_loss(th, pb, member, groups)
        assert live_gradient(grad_at(fn, torch.log(star)), star) < 1e-10, member.name
        assert live_gradient(grad_at(fn, torch.log(pb.ref_probs)), pb.ref_probs) > 1e-3, member.name


def test_unbiased_members_with_the_kl_in_the_reward_converge_to_pi_star():
    pb = small_problem()
    star = T.pi_star(pb)
    for member in L.family(G=3, N=4)[:4]:  # REINFORCE (A = r, group mean, batch mean) and RLOO, k1 in the reward
        run, predicted, label = L.land(pb, member, max_steps=300)
        assert label == "pi* (E7)"
        assert float(T.tv(run.policy, star)) < 1e-8, member.name
        assert run.steps < 300, member.name


def test_k3_in_the_loss_lands_where_the_baseline_scale_says():
    # the forward-KL optimum's stationarity, computed directly: r(y) + beta' pi_ref(y) / pi(y) is the same
    # for every response, with beta' = beta / c and c the shrink of the baseline: 1 (A = r, RLOO),
    # 1 - 1/G (group mean), 1 - 1/N (batch mean)
    pb = small_problem(beta=0.5)
    G, N = 3, 4
    expected_beta = {"none": 0.5, "rloo": 0.5, "group_mean": 0.5 * G / (G - 1), "batch_mean": 0.5 * N / (N - 1)}
    for member in L.family(G=G, N=N):
        if member.kl != "loss_k3":
            continue
        run, predicted, _ = L.land(pb, member, max_steps=300)
        lagrange = pb.rewards + expected_beta[member.advantage] * pb.ref_probs / run.policy
        assert float(lagrange.max() - lagrange.min()) < 1e-7, member.name
        assert float(T.tv(run.policy, predicted)) < 1e-8, member.name
        assert float(T.tv(run.policy, T.pi_star(pb))) > 0.05, member.name  # and that is not pi*


def test_without_a_kl_the_members_land_on_pi_ref_restricted_to_the_right_answers():
    # verifiable problem, pi_ref = (0.45, 0.30, 0.15, 0.10), right answers 1 and 3: they keep pi_ref's
    # ratio 0.30 : 0.10 = 3 : 1 under the natural flow, so the landing point is (0, 0.75, 0, 0.25)
    pb = T.verifiable_problem()
    for member in L.family(G=3):
        if member.kl != "none":
            continue
        run, predicted, label = L.land(pb, member, max_steps=300)
        assert label == "pi_ref on argmax r"
        assert predicted.tolist() == pytest.approx([0.0, 0.75, 0.0, 0.25], abs=1e-15)
        assert run.policy.tolist() == pytest.approx([0.0, 0.75, 0.0, 0.25], abs=1e-9), member.name


def test_dynamic_sampling_divides_the_expected_gradient_by_the_signal_probability():
    # 0/1 rewards, accuracy q = pi(1) + pi(3): a group of G carries no signal with probability q^G + (1 - q)^G
    pb = T.verifiable_problem()
    G = 4
    groups = T.GroupEnumeration(4, G)
    options = {"eps_low": 0.2, "eps_high": 0.28}
    plain = L.Member("plain", "grpo", "dapo", G, kl="none", loss_options=options)
    dynamic = L.Member("dynamic", "grpo", "dapo", G, kl="none", dynamic=True, loss_options=options)
    for t in (0.0, 1.5, 3.0):
        theta = torch.log(pb.ref_probs) + t * pb.rewards
        p = torch.softmax(theta, 0)
        q = float(p[1] + p[3])
        signal = 1 - q ** G - (1 - q) ** G
        assert L.signal_probability(pb, p, G) == pytest.approx(signal, abs=1e-12)
        g_plain = grad_at(lambda th: L.expected_member_loss(th, pb, plain, groups), theta)
        g_dynamic = grad_at(lambda th: L.expected_member_loss(th, pb, dynamic, groups), theta)
        assert torch.allclose(g_dynamic, g_plain / signal, atol=1e-12)  # same direction, 1/P(signal) larger


def test_one_dapo_iteration_on_two_responses_moves_p_to_the_binding_clip():
    # right answer with probability p, wrong otherwise; run to stationarity the iteration stops where both
    # clips bind: p' = max(p (1 + eps_high), 1 - (1 - p)(1 - eps_low))
    # p = 0.3: max(0.3 * 1.28 = 0.384, 1 - 0.7 * 0.8 = 0.44) = 0.44: the wrong answer's lower clip binds last,
    #   and clip-higher changes nothing; p = 0.6: max(0.6 * 1.28 = 0.768, 0.68) = 0.768 (0.72 with eps_high = 0.2)
    # p = 0.8: 0.8 * 1.28 = 1.024 > 1: the right answer never reaches its clip and takes everything (1)
    assert L.two_response_dapo_step(0.8, 0.2, 0.28) == 1.0
    for p, eps_high, expected in ((0.3, 0.28, 0.44), (0.6, 0.28, 0.768), (0.6, 0.2, 0.72)):
        assert L.two_response_dapo_step(p, 0.2, eps_high) == pytest.approx(expected)
        pb = T.Problem(ref_probs=[p, 1 - p], rewards=[1.0, 0.0], beta=1.0)
        member = L.Member("dapo", "grpo", "dapo", 4, kl="none", loss_options={"eps_low": 0.2, "eps_high": eps_high})
        history = L.iterate(pb, member, iterations=1, inner_steps=150, lr=0.02)
        # the last inner step overshoots the kink by at most one step (lr * gradient)
        assert float(history[0]["policy"][0]) == pytest.approx(expected, abs=3e-3), (p, eps_high)


def test_bad_member_settings():
    with pytest.raises(ValueError, match="estimator must be one of"):
        L.advantage_mass("ppo", torch.zeros(3, dtype=D), torch.log(torch.full((3,), 1 / 3, dtype=D)),
                         T.GroupEnumeration(3, 2))
    with pytest.raises(ValueError, match="group size"):
        T.GroupEnumeration(3, 1)  # RLOO's G = 1 is refused where the groups are made
