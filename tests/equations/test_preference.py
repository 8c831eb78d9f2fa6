"""Tests of minialign/preference.py: each member of the preference family by hand, its gradcheck,
the identities that tie it to DPO (or SFT), and the dispatcher."""

import math

import pytest
import torch
from handworked import expect

from minialign import preference as P
from minialign.dpo import dpo_loss
from minialign.pretrain import lm_loss

D = torch.float64


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def random_inputs(n=5, count=4, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator, dtype=D) * scale).requires_grad_() for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# cDPO and rDPO
# ----------------------------------------------------------------------------------------------


def test_conservative_dpo_by_hand():
    # h = (-2 - -3) - (-4 - -3) = 1 - (-1) = 2, beta = 0.5: beta h = 1
    # -(0.9) log sigma(1) - 0.1 log sigma(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262
    out = P.conservative_dpo_loss(t(-2.0), t(-4.0), t(-3.0), t(-3.0), beta=0.5, label_smoothing=0.1)
    expect(out.loss, 0.413262, abs=1e-6)
    # E10's rewards, unchanged: 0.5 * (-2 - -3) = 0.5, 0.5 * (-4 - -3) = -0.5
    expect(out.chosen_rewards, [0.5])
    expect(out.rejected_rewards, [-0.5])


@pytest.mark.exercise("robust_dpo_loss")
def test_label_smoothing_zero_is_dpo():
    a, b, c, d = (x.detach() for x in random_inputs())
    loss, r_w, r_l = dpo_loss(a, b, c, d, beta=0.3)
    for fn in (P.conservative_dpo_loss, P.robust_dpo_loss):
        out = fn(a, b, c, d, beta=0.3, label_smoothing=0.0)
        expect(out.loss, loss, abs=1e-12)
        expect(out.chosen_rewards, r_w, abs=0)
        expect(out.rejected_rewards, r_l, abs=0)


@pytest.mark.exercise("robust_dpo_loss")
def test_robust_dpo_by_hand():
    # beta h = 1 as above, eps = 0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = (0.281936 - 0.131326) / 0.8
    #                                                                        = 0.150610 / 0.8 = 0.188262
    out = P.robust_dpo_loss(t(-2.0), t(-4.0), t(-3.0), t(-3.0), beta=0.5, label_smoothing=0.1)
    expect(out.loss, 0.188262, abs=1e-6)


@pytest.mark.exercise("robust_dpo_loss")
def test_robust_dpo_is_unbiased_for_its_flip_rate():
    # a label flipped with probability eps swaps y_w and y_l (h -> -h); averaged over the flip,
    # rDPO with that eps is E9 on the clean label: (1-eps) rdpo(h) + eps rdpo(-h) = dpo(h), per pair
    a, b, c, d = (x.detach() for x in random_inputs(seed=3))
    for eps in (0.05, 0.2, 0.4):
        clean = -torch.nn.functional.logsigmoid(0.7 * ((a - c) - (b - d)))
        kept = P.robust_dpo_loss(a, b, c, d, 0.7, eps).losses
        flipped = P.robust_dpo_loss(b, a, d, c, 0.7, eps).losses
        expect((1 - eps) * kept + eps * flipped, clean, abs=1e-12)
    # cDPO is not: the same average is the smoothed cross-entropy, larger than E9 for a confident pair
    cons = P.conservative_dpo_loss(a, b, c, d, 0.7, 0.2).losses
    assert not torch.allclose(cons, clean)


@pytest.mark.exercise("robust_dpo_loss")
def test_robust_and_conservative_gradcheck_float64():
    inputs = random_inputs()
    for fn in (P.conservative_dpo_loss, P.robust_dpo_loss):
        assert torch.autograd.gradcheck(lambda a, b, c, d, fn=fn: fn(a, b, c, d, 0.3, 0.2)[:3], inputs)


def test_label_smoothing_range_is_checked():
    a = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        P.robust_dpo_loss(a, a, a, a, 0.1, 0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        P.conservative_dpo_loss(a, a, a, a, 0.1, 0.6)


# ----------------------------------------------------------------------------------------------
# IPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("ipo_loss")
def test_ipo_by_hand():
    # pair 1: h = 2 (as above), beta = 0.5: 1/(2 beta) = 1, (2 - 1)^2 = 1
    # pair 2: h = (-1 - -1) - (-2 - -2) = 0: (0 - 1)^2 = 1... use pair 2 with h = 1: policy -1, -3, ref -1, -2
    #         h = (-1 - -1) - (-3 - -2) = 0 - (-1) = 1: (1 - 1)^2 = 0;  mean = (1 + 0) / 2 = 0.5
    out = P.ipo_loss(t(-2.0, -1.0), t(-4.0, -3.0), t(-3.0, -1.0), t(-3.0, -2.0), beta=0.5)
    expect(out.losses, [1.0, 0.0])
    expect(out.loss, 0.5)


@pytest.mark.exercise("ipo_loss")
def test_ipo_minimiser_is_one_over_two_beta():
    # d/dh (h - 1/(2 beta))^2 = 2 (h - 1/(2 beta)) = 0 at h* = 1/(2 beta): the loss is 0 there, its gradient too
    for beta in (0.1, 0.5, 2.0):
        h_star = 1 / (2 * beta)
        pi_w = torch.tensor([h_star], dtype=D, requires_grad=True)
        out = P.ipo_loss(pi_w, t(0.0, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), beta)
        out.loss.backward()
        expect(out.loss, 0.0, abs=1e-24)
        expect(pi_w.grad, [0.0], abs=1e-12)
        # a larger margin costs again: DPO's loss would keep falling
        assert float(P.ipo_loss(t(h_star + 1, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), beta).loss) > 0
        assert float(dpo_loss(t(h_star + 1, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), beta)[0]) < \
            float(dpo_loss(t(h_star, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), t(0.0, dtype=D), beta)[0])


@pytest.mark.exercise("ipo_loss")
def test_ipo_mean_normalisation_divides_each_logp_by_its_length():
    # chosen (length 2): policy -2, ref -4 -> per token -1, -2; rejected (length 4): policy -8, ref -4 -> -2, -1
    # h = (-1 - -2) - (-2 - -1) = 1 + 1 = 2; beta = 0.25: 1/(2 beta) = 2, loss 0.  With "sum": h = 2 - (-4) = 6, (6-2)^2 = 16
    args = (t(-2.0), t(-8.0), t(-4.0), t(-4.0))
    out = P.ipo_loss(*args, beta=0.25, normalise="mean", chosen_lengths=t(2.0), rejected_lengths=t(4.0))
    expect(out.loss, 0.0)
    expect(out.chosen_rewards, [0.25])   # 0.25 * (-1 - -2)
    expect(P.ipo_loss(*args, beta=0.25).loss, 16.0)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        P.ipo_loss(*args, beta=0.25, normalise="mean")


@pytest.mark.exercise("ipo_loss")
def test_ipo_gradcheck_float64():
    inputs = random_inputs()
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=D)
    assert torch.autograd.gradcheck(lambda a, b, c, d: P.ipo_loss(a, b, c, d, 0.3)[:3], inputs)
    assert torch.autograd.gradcheck(lambda a, b, c, d: P.ipo_loss(a, b, c, d, 0.3, "mean", lengths, lengths.flip(0))[0],
                                    inputs)


# ----------------------------------------------------------------------------------------------
# SimPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("simpo_loss")
def test_simpo_by_hand():
    # r_w = beta / |y_w| log pi(y_w) = 1 * -2 / 2 = -1,  r_l = 1 * -6 / 3 = -2
    # z = r_w - r_l - gamma = -1 + 2 - 0.5 = 0.5,  -log sigma(0.5) = 0.474077
    out = P.simpo_loss(t(-2.0), t(-6.0), t(2.0), t(3.0), beta=1.0, gamma=0.5)
    expect(out.chosen_rewards, [-1.0])
    expect(out.rejected_rewards, [-2.0])
    expect(out.loss, 0.474077, abs=1e-6)


@pytest.mark.exercise("simpo_loss")
def test_simpo_with_one_token_and_no_margin_is_dpo_with_a_uniform_reference():
    # |y| = 1, gamma = 0: -log sigma(beta (log pi_w - log pi_l)); a uniform reference over V responses
    # gives log pi_ref = -log V to both, which cancels in h: the same loss and the same rewards up to beta log V
    a, b = (x.detach() for x in random_inputs(count=2, seed=5))
    ones = torch.ones(5, dtype=D)
    uniform = torch.full((5,), -math.log(7.0), dtype=D)
    simpo = P.simpo_loss(a, b, ones, ones, beta=0.4, gamma=0.0)
    loss, r_w, r_l = dpo_loss(a, b, uniform, uniform, beta=0.4)
    expect(simpo.loss, loss, abs=1e-12)
    expect(simpo.chosen_rewards - simpo.rejected_rewards, r_w - r_l, abs=1e-12)
    # a margin gamma > 0 asks for more: the loss rises
    assert float(P.simpo_loss(a, b, ones, ones, beta=0.4, gamma=1.0).loss) > float(loss)


@pytest.mark.exercise("simpo_loss")
def test_simpo_gradcheck_and_bad_lengths():
    inputs = random_inputs(count=2)
    n_w, n_l = torch.tensor([1.0, 2, 3, 4, 5], dtype=D), torch.tensor([5.0, 1, 2, 2, 9], dtype=D)
    assert torch.autograd.gradcheck(lambda a, b: P.simpo_loss(a, b, n_w, n_l, 2.0, 0.5)[:3], inputs)
    a = t(-1.0, -2.0)
    with pytest.raises(ValueError, match=">= 1"):
        P.simpo_loss(a, a, t(1.0, 0.0), t(1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match=r"\(B,\) = \(2,\)"):
        P.simpo_loss(a, a, t(1.0), t(1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="gamma"):
        P.simpo_loss(a, a, t(1.0, 1.0), t(1.0, 1.0), 1.0, gamma=-0.1)


# ----------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------


def test_kto_by_hand():
    # row 0 desirable, log-ratio -1 - -2 = 1; row 1 undesirable, log-ratio -3 - -2 = -1; z0 = 0.5, beta = 2
    # row 0: lambda_D (1 - sigma(2 (1 - 0.5))) = 1 - sigma(1) = 0.268941
    # row 1: lambda_U (1 - sigma(2 (0.5 - -1))) = 2 (1 - sigma(3)) = 2 * 0.047426 = 0.094852
    # mean = (0.268941 + 0.094852) / 2 = 0.181897
    out = P.kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), torch.tensor(0.5), beta=2.0,
                     desirable_weight=1.0, undesirable_weight=2.0)
    expect(out.losses, [0.268941, 0.094852], abs=1e-6)
    expect(out.loss, 0.181897, abs=1e-6)
    expect(out.chosen_rewards, [2.0])      # beta * 1
    expect(out.rejected_rewards, [-2.0])   # beta * -1


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    logps = torch.tensor([-1.0, -2.0, -3.0, -1.5], dtype=D, requires_grad=True)
    desirable = torch.tensor([True, False, True, False])
    out = P.kto_loss(logps, torch.full((4,), -2.0, dtype=D), desirable, torch.tensor(0.3, dtype=D), beta=0.5)
    out.loss.backward()
    # dL/d log pi(y) = -lambda_D beta s'(.) / B < 0 for a desirable y (descent raises it), > 0 for an undesirable one
    assert (logps.grad[desirable] < 0).all() and (logps.grad[~desirable] > 0).all()
    # row 0 by hand: u = 0.5 (1 - 0.3) = 0.35, sigma(0.35) = 0.586618, s' = 0.586618 * 0.413382 = 0.242496
    #                -beta s' / B = -0.5 * 0.242496 / 4 = -0.030312
    expect(logps.grad[0], -0.030312, abs=1e-6)


def test_kto_reference_point_is_a_clamped_detached_batch_mean():
    kl_policy = torch.tensor([-1.0, -2.0, -4.0], dtype=D, requires_grad=True)
    # mean(-1 - -2, -2 - -2, -4 - -3) = mean(1, 0, -1) = 0
    expect(P.kto_reference_point(kl_policy, torch.tensor([-2.0, -2.0, -3.0], dtype=D)), 0.0, abs=1e-15)
    # mean(1, 0, 2) = 1; a negative estimate clamps to 0
    z0 = P.kto_reference_point(kl_policy, torch.tensor([-2.0, -2.0, -6.0], dtype=D))
    expect(z0, 1.0)
    assert not z0.requires_grad
    expect(P.kto_reference_point(kl_policy, torch.tensor([0.0, 0.0, 0.0], dtype=D)), 0.0, abs=0)
    # the mismatched pairs: row i takes row i-1's response
    assert P.kto_mismatched_index(4).tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        P.kto_mismatched_index(1)


def test_kto_gradcheck_and_no_gradient_through_z0():
    logps, ref = random_inputs(count=2, seed=7)
    desirable = torch.tensor([True, False, True, True, False])
    z0 = torch.tensor(0.4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: P.kto_loss(a, b, desirable, z0, 0.7, 1.0, 1.5)[:3], (logps, ref))
    P.kto_loss(logps, ref, desirable, z0, 0.7).loss.backward()
    assert z0.grad is None  # detached inside


def test_kto_bad_input():
    a = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="bool"):
        P.kto_loss(a, a, torch.tensor([1, 0]), torch.tensor(0.0), 0.1)
    with pytest.raises(ValueError, match="scalar"):
        P.kto_loss(a, a, torch.tensor([True, False]), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="finite"):
        P.kto_loss(a, a, torch.tensor([True, False]), torch.tensor(float("nan")), 0.1)


# ----------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------


def test_orpo_by_hand():
    # chosen: log pi = 2 ln 0.5 over 2 tokens, mean ln 0.5: P = 0.5, odds = 1, log odds = 0
    # rejected: log pi = ln 0.2 over 1 token: P = 0.2, odds = 0.25, log odds = -1.386294
    # L_OR = -log sigma(0 - -1.386294) = log(1 + 0.25) = 0.223144
    # L_SFT = -(2 ln 0.5) / 2 = 0.693147;  lambda = 0.5: 0.693147 + 0.5 * 0.223144 = 0.804719
    out = P.orpo_loss(t(2 * math.log(0.5)), t(math.log(0.2)), t(2.0), t(1.0), lam=0.5)
    expect(out.chosen_rewards, [0.0], abs=1e-6)
    expect(out.rejected_rewards, [-1.386294], abs=1e-6)
    expect(out.odds_ratio_loss, 0.223144, abs=1e-6)
    expect(out.sft_loss, 0.693147, abs=1e-6)
    expect(out.loss, 0.804719, abs=1e-6)


def test_orpo_with_lambda_zero_is_sfts_loss(tiny_model, world):
    from minialign.data import collate
    from minialign.ops import sequence_logps
    tok = world.tokenizer
    rows = world.preference_dataset(4, seed=1)
    prompts = [tok.prompt(r["prompt"]) for r in rows]
    chosen = [tok.response(r["chosen"]) for r in rows]
    batch = collate(prompts, chosen, tok.pad_id, tiny_model.config.block_size)
    logits = tiny_model(batch["input_ids"], batch["attention_mask"])
    logits = logits[0] if isinstance(logits, tuple) else logits
    sft = lm_loss(logits, batch["input_ids"], batch["response_mask"])     # E0b, the mean over response tokens
    logps = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                           share_prompt=False)                              # (B,) sums, E1
    lengths = batch["response_mask"][:, 1:].sum(1).float()
    out = P.orpo_loss(logps, logps - 1.0, lengths, lengths, lam=0.0)
    expect(out.loss, sft, abs=1e-5)


def test_orpo_log_odds_are_finite_at_probability_one():
    # mean log-prob 0 (every token at probability 1 in floating point): the odds are infinite;
    # they are taken at m = -tiny: log odds = log(1/tiny) = 87.3 in float32, the loss finite, no NaN gradient
    for dtype in (torch.float32, torch.float64):
        w = torch.tensor([0.0, -1e-30, -0.7], dtype=dtype, requires_grad=True)
        l = torch.tensor([-0.5, 0.0, -1e-6], dtype=dtype, requires_grad=True)
        out = P.orpo_loss(w, l, torch.ones(3, dtype=dtype), torch.ones(3, dtype=dtype), lam=1.0)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(w.grad).all() and torch.isfinite(l.grad).all()
        expect(out.chosen_rewards[0], -math.log(torch.finfo(dtype).tiny), rel=1e-6)
    # log1mexp agrees with the naive formula where that one is accurate
    x = torch.tensor([-5.0, -1.0, -0.5, -0.01], dtype=D)
    expect(P.log1mexp(x), torch.log(1 - torch.exp(x)), abs=1e-12)


def test_orpo_gradcheck_and_bad_input():
    generator = torch.Generator().manual_seed(2)
    w = (-torch.rand(5, generator=generator, dtype=D) * 4 - 0.05).requires_grad_()
    l = (-torch.rand(5, generator=generator, dtype=D) * 4 - 0.05).requires_grad_()
    n_w, n_l = torch.tensor([1.0, 2, 3, 1, 2], dtype=D), torch.tensor([2.0, 1, 1, 3, 2], dtype=D)
    assert torch.autograd.gradcheck(lambda a, b: P.orpo_loss(a, b, n_w, n_l, 0.3)[:3], (w, l))
    with pytest.raises(ValueError, match="<= 0"):
        P.orpo_loss(t(0.1, -1.0), t(-1.0, -1.0), t(1.0, 1.0), t(1.0, 1.0))
    with pytest.raises(ValueError, match="lam"):
        P.orpo_loss(t(-0.1), t(-1.0), t(1.0), t(1.0), lam=-1.0)


# ----------------------------------------------------------------------------------------------
# the dispatcher
# ----------------------------------------------------------------------------------------------


def test_dispatcher_routes_every_member_and_sigmoid_is_dpo_bit_for_bit():
    a, b, c, d = (-x.detach().abs() for x in random_inputs(seed=11))
    n = torch.tensor([1.0, 2, 3, 4, 5], dtype=D)
    loss, r_w, r_l = dpo_loss(a, b, c, d, 0.1)
    out = P.preference_loss(P.PreferenceHyperparams(), a, b, c, d)
    assert torch.equal(out.loss, loss) and torch.equal(out.chosen_rewards, r_w)
    expect(P.preference_loss(P.PreferenceHyperparams(loss="ipo", beta=0.3), a, b, c, d).loss,
           P.ipo_loss(a, b, c, d, 0.3).loss, abs=0)
    expect(P.preference_loss(P.PreferenceHyperparams(loss="robust", label_smoothing=0.2), a, b, c, d).loss,
           P.robust_dpo_loss(a, b, c, d, 0.1, 0.2).loss, abs=0)
    # the reference-free members run without any reference log-probs
    assert P.REFERENCE_FREE == {"simpo", "orpo"} and not P.needs_reference("simpo") and P.needs_reference("kto")
    expect(P.preference_loss(P.PreferenceHyperparams(loss="simpo", beta=2.0, simpo_gamma=0.3), a, b,
                             chosen_lengths=n, rejected_lengths=n).loss,
           P.simpo_loss(a, b, n, n, 2.0, 0.3).loss, abs=0)
    expect(P.preference_loss(P.PreferenceHyperparams(loss="orpo", orpo_lambda=0.2), a, b,
                             chosen_lengths=n, rejected_lengths=n).loss,
           P.orpo_loss(a, b, n, n, 0.2).loss, abs=0)
    # kto on pairs: chosen desirable, rejected undesirable, z0 from the mismatched log-probs
    idx = P.kto_mismatched_index(5)
    kto = P.preference_loss(P.PreferenceHyperparams(loss="kto"), a, b, c, d, kl_policy_logps=a[idx], kl_ref_logps=c[idx])
    z0 = P.kto_reference_point(a[idx], c[idx])
    expect(kto.loss, P.kto_loss(torch.cat([a, b]), torch.cat([c, d]), torch.tensor([True] * 5 + [False] * 5), z0,
                                0.1).loss, abs=0)


def test_dispatcher_bad_input():
    a = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        P.preference_loss(P.PreferenceHyperparams(loss="hinge"), a, a, a, a)
    with pytest.raises(ValueError, match="needs the reference"):
        P.preference_loss(P.PreferenceHyperparams(loss="ipo"), a, a)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        P.preference_loss(P.PreferenceHyperparams(loss="simpo"), a, a)
    with pytest.raises(ValueError, match="kl_policy_logps"):
        P.preference_loss(P.PreferenceHyperparams(loss="kto"), a, a, a, a)
    with pytest.raises(ValueError, match="applies to loss"):
        P.preference_loss(P.PreferenceHyperparams(loss="ipo", label_smoothing=0.1), a, a, a, a)
    with pytest.raises(ValueError, match="batch sizes differ"):
        P.preference_loss(P.PreferenceHyperparams(), a, a, a, t(-1.0))
