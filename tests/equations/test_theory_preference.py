"""Tests of minialign/theory_preference.py: every stated optimum of the preference family checked by a
second, different computation (the exact gradient flow through preference.py against a closed form or
the stationarity equations solved by hand), float64."""

import math

import pytest
import torch
from handworked import expect

from minialign import theory as T
from minialign import theory_preference as TP

D = torch.float64
PROBLEMS = [T.graded_problem(), T.verifiable_problem()]


def bt_weights(problem, **kw):
    return TP.pair_weights(problem, TP.label_probabilities(problem, **kw))


def test_pair_weights_sum_to_one_and_match_theory_dpo():
    pb = T.graded_problem()
    W = bt_weights(pb)
    expect(W.sum(), 1.0, abs=1e-14)
    # the exact DPO loss through preference.py equals theory.dpo_expected_loss (dpo.dpo_loss per pair)
    theta = torch.randn(pb.K, generator=torch.Generator().manual_seed(0), dtype=D)
    expect(TP.pairwise_expected_loss(theta, pb, "dpo", W), T.dpo_expected_loss(theta, pb), abs=1e-14)


def test_ipo_optimum_by_hand_two_responses():
    # pi_ref = (1/2, 1/2), r = (1, 0), beta = 1: Q_01 = sigma(1) = 0.731059
    # win rates p(y) = sum_j mu_j Q_yj: p_0 = 0.5 * 0.5 + 0.5 * 0.731059 = 0.615529, p_1 = 0.384471
    # pi ~ pi_ref exp(p / beta): pi_0 = sigma(0.615529 - 0.384471) = sigma(0.231059) = 0.557510
    pb = T.Problem(ref_probs=[0.5, 0.5], rewards=[1.0, 0.0], beta=1.0)
    p = TP.ipo_optimum(pb, TP.label_probabilities(pb))
    expect(p[0], 0.557510, abs=1e-6)
    # its margin h = log(pi_0/pi_1) = 0.231059 = (2 Q_01 - 1) / (2 beta) = 0.462117 / 2: the pair's minimiser
    expect(math.log(float(p[0] / p[1])), (2 * 0.731059 - 1) / 2, abs=1e-6)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_ipo_gradient_flow_lands_on_the_closed_form(problem):
    Q = TP.label_probabilities(problem)
    p, _, g = TP.run_member(problem, "ipo", TP.pair_weights(problem, Q))
    assert g < 1e-9
    expect(p, TP.ipo_optimum(problem, Q), abs=1e-9)
    # deterministic labels: DPO has no minimiser, IPO's is still finite and the flow finds it
    Qd = TP.label_probabilities(problem, deterministic=True)
    p, _, g = TP.run_member(problem, "ipo", TP.pair_weights(problem, Qd))
    expect(p, TP.ipo_optimum(problem, Qd), abs=1e-9)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_dpo_and_simpo_optima_in_closed_form(problem):
    W = bt_weights(problem)
    # DPO on Bradley-Terry labels: pi* (E7), from the stationarity equations and from the flow
    expect(TP.pairwise_optimum(problem, "dpo", W), T.pi_star(problem), abs=1e-9)
    p, _, _ = TP.run_member(problem, "dpo", W)
    expect(p, T.pi_star(problem), abs=1e-8)
    # SimPO, gamma = 0, |y| = 1: beta (log pi_i - log pi_j) = r_i - r_j is realisable, so pi ~ exp(r / beta):
    # E7 with a uniform reference
    uniform_tilt = torch.softmax(problem.rewards / problem.beta, 0)
    expect(TP.pairwise_optimum(problem, "simpo", W, gamma=0.0), uniform_tilt, abs=1e-9)
    p, _, _ = TP.run_member(problem, "simpo", W, gamma=0.0)
    expect(p, uniform_tilt, abs=1e-8)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_cdpo_and_simpo_margin_flow_matches_the_stationarity_equations(problem):
    W = bt_weights(problem)
    for member, settings in (("cdpo", dict(label_smoothing=0.1)), ("simpo", dict(gamma=0.5))):
        p, _, g = TP.run_member(problem, member, W, **settings)
        assert g < 1e-9
        expect(p, TP.pairwise_optimum(problem, member, W, **settings), abs=1e-8)
    # label smoothing on clean labels pulls the optimum towards pi_ref: less KL than pi*
    cdpo = TP.pairwise_optimum(problem, "cdpo", W, 0.1)
    assert float(T.kl(cdpo, problem.ref_probs)) < float(T.kl(T.pi_star(problem), problem.ref_probs))


def test_rdpo_with_the_true_flip_rate_recovers_pi_star():
    pb = T.graded_problem()
    W = bt_weights(pb, flip_rate=0.2)
    star = T.pi_star(pb)
    # rDPO at eps = 0.2: pi* exactly, by the flow through robust_dpo_loss and by the equations
    p, _, g = TP.run_member(pb, "rdpo", W, label_smoothing=0.2)
    expect(p, star, abs=1e-8)
    expect(TP.pairwise_optimum(pb, "rdpo", W, 0.2), star, abs=1e-9)
    # plain DPO on the flipped labels does not: it lands nearer pi_ref; the flow agrees with the equations
    p, _, _ = TP.run_member(pb, "dpo", W)
    expect(p, TP.pairwise_optimum(pb, "dpo", W), abs=1e-8)
    assert float(T.kl(p, star)) > 0.3 and float(T.kl(p, pb.ref_probs)) < float(T.kl(star, pb.ref_probs))
    # the best epsilon on a grid is the flip rate
    best, _ = TP.best_rdpo_epsilon(pb, 0.2)
    assert best == 0.2
    # a too-large epsilon (above a pair's observed label probability) has no optimum
    with pytest.raises(ValueError, match="unbounded"):
        TP.pairwise_optimum(pb, "rdpo", W, 0.3)
    with pytest.raises(ValueError, match="unbounded"):
        TP.pairwise_optimum(pb, "rdpo", bt_weights(pb), 0.1)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("z0", ["kl", "data"])
def test_kto_flow_lands_on_the_stationarity_solution(problem, z0):
    W = bt_weights(problem)
    p, _, g = TP.run_member(problem, "kto", W, z0=z0)
    solution, z = TP.kto_optimum(problem, W, z0)
    expect(p, solution, abs=1e-7)
    # the responses that die are exactly those chosen less often than rejected (a_y <= 0)
    d, u = TP.kto_data(W)
    expect(solution[d <= u], torch.zeros(int((d <= u).sum()), dtype=D), abs=0)
    assert (p[d <= u] < 1e-6).all() and (p[d > u] > 1e-3).all()
    # the reference point is its own fixed point
    expect(z, TP.kto_z0(torch.log(solution.clamp_min(1e-300)), problem, W, z0), abs=1e-9)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_orpo_optima(problem):
    W = bt_weights(problem)
    # lambda = 0 is SFT on the chosen responses: pi(y) = D_y, the probability that y is chosen
    p, _, _ = TP.run_member(problem, "orpo", W, lam=0.0)
    expect(p, W.sum(1), abs=1e-8)
    p, _, _ = TP.run_member(problem, "orpo", W, lam=1.0)
    expect(p, TP.orpo_optimum(problem, W, 1.0), abs=1e-8)


def test_best_of_n_table_and_saturation():
    rows = TP.best_of_n_table(T.verifiable_problem())
    for row in rows:
        assert row["kl"] <= row["bound"] + 1e-12 and row["below_frontier"] >= -1e-9
    # the verifiable reward has two levels: best-of-infinity returns a right answer, KL -> -log 0.4 = 0.916291
    expect(rows[-1]["kl"], -math.log(0.4), abs=1e-6)
    expect(rows[-1]["reward"], 1.0, abs=1e-9)


def test_deterministic_labels_dpo_loss_keeps_falling():
    det = TP.deterministic_labels_table(T.graded_problem())
    losses = [v for _, v in det["dpo_loss_along_ray"]]
    assert losses[0] > losses[1] > losses[2] > 0
    assert math.isfinite(det["ipo"]["kl"])
