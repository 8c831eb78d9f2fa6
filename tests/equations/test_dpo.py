"""Tests of minialign/dpo.py, equation by equation (E7, E8, E3, E9, E10), then the step. (The stage
end to end: tests/runtime/test_dpo_stage.py.)"""

import math

import pytest
import torch
from handworked import expect

from minialign import dpo
from minialign.data import collate
from minialign.dpo import (chosen_rejected_logps, dpo_loss, dpo_loss_gradients, implied_reward,
                           log_partition, optimal_policy, pair_logps, preference_batch,
                           preference_probability, tokenize_pairs)
from minialign.ops import sequence_logps


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# E9 / E10: the loss on sequence log-probs
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("dpo_loss")
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps_w, logps_l = t(-3.0, -10.0, -0.5), t(-4.0, -2.0, -7.5)
    loss, r_w, r_l = dpo_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=0.1)
    # every log-ratio is 0, so r_w = r_l = 0 and L = -log sigma(0) = -log(1/2) = ln 2 = 0.693147
    expect(loss, math.log(2), abs=1e-7)
    expect(r_w, [0.0, 0.0, 0.0], abs=0)
    expect(r_l, [0.0, 0.0, 0.0], abs=0)


@pytest.mark.exercise("dpo_loss")
def test_e9_e10_by_hand():
    policy_w, policy_l = t(-2.0, -5.0), t(-4.0, -3.0)
    ref_w, ref_l = t(-3.0, -5.0), t(-3.0, -4.0)
    loss, r_w, r_l = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=0.5)
    # E10, pair 1: r_w = 0.5 * (-2 - -3) = 0.5,  r_l = 0.5 * (-4 - -3) = -0.5
    #      pair 2: r_w = 0.5 * (-5 - -5) = 0.0,  r_l = 0.5 * (-3 - -4) = 0.5
    expect(r_w, [0.5, 0.0])
    expect(r_l, [-0.5, 0.5])
    # E9, pair 1: z = 0.5 - (-0.5) = 1,  sigma(1) = 0.731059,  -log(0.731059) = 0.313262
    #     pair 2: z = 0.0 - 0.5 = -0.5,  sigma(-0.5) = 0.377541, -log(0.377541) = 0.974077
    #     mean = (0.313262 + 0.974077) / 2 = 0.643669
    expect(loss, 0.643669, abs=1e-5)


@pytest.mark.exercise("dpo_loss")
def test_loss_is_finite_for_huge_margins():
    # z = 0.1 * (0 - -2000) = 200 or -200: log(sigmoid(-200)) underflows to -inf, logsigmoid does not
    loss, _, _ = dpo_loss(t(0.0), t(-2000.0), t(0.0), t(0.0), beta=0.1)
    expect(loss, 0.0, abs=1e-30)
    # -log sigma(-200) = 200 + log(1 + e^-200) = 200
    loss, _, _ = dpo_loss(t(-2000.0), t(0.0), t(0.0), t(0.0), beta=0.1)
    expect(loss, 200.0, rel=1e-6)


@pytest.mark.exercise("dpo_loss")
def test_analytic_gradient_matches_autograd():
    policy_w = t(-2.0, -5.0, -1.0).requires_grad_()
    policy_l = t(-4.0, -3.0, -1.5).requires_grad_()
    ref_w, ref_l, beta = t(-3.0, -5.0, -2.0), t(-3.0, -4.0, -0.5), 0.5
    loss, r_w, r_l = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta)
    loss.backward()
    g_w, g_l = dpo_loss_gradients(policy_w.detach(), policy_l.detach(), ref_w, ref_l, beta)
    # dL/d log pi(y_w) = -beta sigma(r_l - r_w) / B, dL/d log pi(y_l) = +beta sigma(r_l - r_w) / B
    expected = beta * torch.sigmoid(r_l - r_w).detach() / 3
    assert torch.allclose(policy_w.grad, -expected, atol=1e-7) and torch.allclose(g_w, -expected)
    assert torch.allclose(policy_l.grad, expected, atol=1e-7) and torch.allclose(g_l, expected)
    # pair 1 by hand: r_w - r_l = 1, sigma(-1) = 0.268941, * beta / B = 0.268941 * 0.5 / 3 = 0.044824
    expect(policy_l.grad[0], 0.044824, abs=1e-6)


@pytest.mark.exercise("dpo_loss")
def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True) * 3 for _ in range(4)]
    inputs = [x.detach().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3)[0], inputs)
    # the implicit rewards too (E10 is linear in every input)
    assert torch.autograd.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3)[1:], inputs)


@pytest.mark.exercise("dpo_loss")
def test_low_precision_inputs_are_computed_in_float32():
    x = t(-2.0, -3.0).to(torch.bfloat16)
    loss, r_w, _ = dpo_loss(x, x - 1, x, x, beta=1.0)
    assert loss.dtype == torch.float32 and r_w.dtype == torch.float32
    # z = 0 - (-1) = 1: -log sigma(1) = 0.313262
    expect(loss, 0.313262, abs=1e-5)


def test_bad_input_is_a_clear_error():
    a = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        dpo_loss(a, a, a, t(-1.0, -2.0, -3.0), beta=0.1)
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        dpo_loss(a[None], a[None], a[None], a[None], beta=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        dpo_loss(t(), t(), t(), t(), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="must be a tensor"):
        dpo_loss([-1.0], a, a, a, beta=0.1)


# ----------------------------------------------------------------------------------------------
# E7 / E8 / E3: the closed form on one prompt with four responses
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("optimal_policy")
def test_e7_optimal_policy_by_hand():
    ref = t(0.5, 0.25, 0.25, dtype=torch.float64)
    r = t(0.0, math.log(2), -math.log(2), dtype=torch.float64)
    # beta = 1: pi_ref * exp(r) = [0.5, 0.25 * 2, 0.25 / 2] = [0.5, 0.5, 0.125], Z = 1.125
    # pi* = [0.5, 0.5, 0.125] / 1.125 = [0.444444, 0.444444, 0.111111]
    pi = optimal_policy(ref, r, beta=1.0)
    expect(pi, [0.444444, 0.444444, 0.111111], abs=1e-6)
    expect(log_partition(ref, r, 1.0), math.log(1.125), rel=1e-6)


@pytest.mark.exercise("implied_reward")
def test_e8_implied_reward_by_hand():
    # the E7 example above: pi_ref = [1/2, 1/4, 1/4], r = [0, ln 2, -ln 2], beta = 1, pi* = [4/9, 4/9, 1/9]
    # E8 without beta log Z: beta log(pi*/pi_ref) = [ln((4/9)/(1/2)), ln((4/9)/(1/4)), ln((1/9)/(1/4))]
    #                                            = [ln 8/9, ln 16/9, ln 4/9] = [-0.117783, 0.575364, -0.810930]
    ref = t(0.5, 0.25, 0.25, dtype=torch.float64)
    pi = t(4 / 9, 4 / 9, 1 / 9, dtype=torch.float64)
    expected = [math.log(8 / 9), math.log(16 / 9), math.log(4 / 9)]
    expect(implied_reward(pi, ref, beta=1.0), [-0.117783, 0.575364, -0.810930], abs=1e-6)
    # each is r - beta log Z with log Z = ln 1.125 = 0.117783: 0 - 0.117783, ln 2 - 0.117783, -ln 2 - 0.117783
    assert expected == pytest.approx([-math.log(1.125), math.log(2) - math.log(1.125), -math.log(2) - math.log(1.125)])
    # beta scales it: beta = 2 doubles every implied reward
    expect(implied_reward(pi, ref, beta=2.0), [2 * e for e in expected], abs=1e-12)


@pytest.mark.exercise("optimal_policy")
@pytest.mark.exercise("implied_reward")
def test_e7_sums_to_one_and_e8_recovers_the_reward_up_to_beta_log_z():
    generator = torch.Generator().manual_seed(1)
    ref = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
    r = torch.randn(6, generator=generator, dtype=torch.float64) * 2
    for beta in (0.1, 0.5, 2.0):
        pi = optimal_policy(ref, r, beta)
        expect(pi.sum(), 1.0, abs=1e-12)
        # E8: r = beta log(pi*/pi_ref) + beta log Z, so implied_reward = r - beta log Z, exactly
        log_z = log_partition(ref, r, beta)
        assert torch.allclose(implied_reward(pi, ref, beta), r - beta * log_z, atol=1e-10)
        # the prompt-only constant is the same for every response: the differences are r's
        diffs = implied_reward(pi, ref, beta) - r
        assert torch.allclose(diffs, diffs[0].expand(6), atol=1e-10)
    # small beta puts (almost) all mass on the best response, large beta stays at pi_ref
    assert optimal_policy(ref, r, 1e-3).argmax() == r.argmax()
    assert torch.allclose(optimal_policy(ref, r, 1e6), ref, atol=1e-5)


@pytest.mark.exercise("optimal_policy")
def test_e7_handles_large_rewards_without_overflow():
    ref = t(0.5, 0.5, dtype=torch.float64)
    # exp(1000 / 0.01) overflows; the softmax form does not
    pi = optimal_policy(ref, t(1000.0, 999.0, dtype=torch.float64), beta=0.01)
    expect(torch.isfinite(pi).all() and pi[0], 1.0, rel=1e-6)


@pytest.mark.exercise("implied_reward")
def test_z_cancels_in_bradley_terry():
    # E3 with E8's rewards: adding beta log Z(x) (or any c(x)) to both rewards changes nothing
    r_w, r_l = t(1.5, -0.2, 3.0), t(0.5, 0.7, 3.5)
    for c in (-100.0, -1.0, 0.0, 2.5, 40.0):
        assert torch.allclose(preference_probability(r_w + c, r_l + c), preference_probability(r_w, r_l), atol=1e-6)
    # sigma(1.5 - 0.5) = sigma(1) = 0.731059
    expect(preference_probability(r_w, r_l)[0], 0.731059, abs=1e-6)
    # hence DPO on implied rewards (without beta log Z) = Bradley-Terry on the true rewards
    ref = t(0.2, 0.3, 0.5, dtype=torch.float64)
    r = t(1.0, -1.0, 0.25, dtype=torch.float64)
    pi = optimal_policy(ref, r, beta=0.5)
    r_hat = implied_reward(pi, ref, beta=0.5)
    assert preference_probability(r_hat[0], r_hat[1]).item() == pytest.approx(
        preference_probability(r[0], r[1]).item(), abs=1e-12)


def test_discrete_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        optimal_policy(t(0.5, 0.5), t(1.0, 2.0, 3.0), 1.0)
    with pytest.raises(ValueError, match="probability distribution"):
        optimal_policy(t(0.5, 0.6), t(1.0, 2.0), 1.0)
    with pytest.raises(ValueError, match="beta"):
        implied_reward(t(0.5, 0.5), t(0.5, 0.5), -1.0)


# ----------------------------------------------------------------------------------------------
# Sequence log-probs: masks, batching, the reference table, the sampled KL
# ----------------------------------------------------------------------------------------------

PAIRS = [{"prompt": "review the movie", "chosen": "the movie was great .", "rejected": "the movie was bad ."},
         {"prompt": "review the song", "chosen": "the song was very good and the music was fun .",
          "rejected": "the song was dull ."}]


def test_chosen_rejected_logps_count_response_tokens_only(world, tiny_model):
    tok = world.tokenizer
    pairs = tokenize_pairs(tok, PAIRS)
    batch = preference_batch(pairs["prompt"], pairs["chosen"], pairs["rejected"], tok.pad_id)
    with torch.no_grad():
        logp_w, logp_l = chosen_rejected_logps(tiny_model, batch)
        # one pair alone (no padding at all) gives the same numbers as in the padded batch
        for i in range(2):
            for resp, got in ((pairs["chosen"][i], logp_w[i]), (pairs["rejected"][i], logp_l[i])):
                ids = torch.tensor([pairs["prompt"][i] + resp])
                logits = tiny_model(ids)[0].log_softmax(-1)                              # (T, V)
                P = len(pairs["prompt"][i])
                by_hand = sum(logits[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1]))  # E1
                assert got.item() == pytest.approx(by_hand, abs=1e-4)
        # padding tokens change nothing: write other ids into the padded slots
        noisy = dict(batch)
        noisy["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                         torch.full_like(batch["input_ids"], 7))
        w2, l2 = chosen_rejected_logps(tiny_model, noisy)
        assert torch.equal(w2, logp_w) and torch.equal(l2, logp_l)
        # the prompt's own token log-probs are not in the sum: it equals ops.sequence_logps
        seq = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        assert torch.allclose(seq, torch.cat([logp_w, logp_l]))


@pytest.mark.exercise("dpo_loss")
def test_prompt_and_padding_token_logps_change_nothing_in_the_loss():
    # token log-probs of a 2-pair batch (4 rows: chosen then rejected); mask 1 = response token
    token_logps = torch.tensor([[-1.0, -2.0, -0.5, -0.25, 0.0],
                                [-1.0, -2.0, -1.5, -0.75, -0.5],
                                [-1.0, -2.0, -3.0, 0.0, 0.0],
                                [-1.0, -2.0, -0.1, -0.2, -0.3]])
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1]])
    from minialign.ops import masked_sum

    def loss_of(x):
        logps = masked_sum(x, mask, dim=1)  # E1: chosen [-0.75, -2.75], rejected [-3.0, -0.6]
        return dpo_loss(logps[:2], logps[2:], torch.zeros(2), torch.zeros(2), beta=1.0)[0]

    # pair 1: z = -0.75 - (-3) = 2.25,  -log sigma(2.25) = log(1 + e^-2.25) = log(1.105399) = 0.100207
    # pair 2: z = -2.75 - (-0.6) = -2.15, -log sigma(-2.15) = log(1 + e^2.15) = log(9.584858) = 2.260185
    # mean = (0.100207 + 2.260185) / 2 = 1.180196
    base = loss_of(token_logps)
    expect(base, 1.180196, abs=1e-5)
    junk = torch.where(mask.bool(), token_logps, torch.full_like(token_logps, float("nan")))
    assert loss_of(junk).item() == base.item()  # even NaN / -inf at masked positions stays out
    junk = torch.where(mask.bool(), token_logps, torch.full_like(token_logps, -1e9))
    assert loss_of(junk).item() == base.item()


def test_empty_response_and_mismatched_pairs_are_errors(world):
    tok = world.tokenizer
    with pytest.raises(ValueError, match="empty rejected"):
        tokenize_pairs(tok, [{"prompt": "review the movie", "chosen": "the movie was good .", "rejected": " "}])
    with pytest.raises(ValueError, match="lacks"):
        tokenize_pairs(tok, [{"prompt": "review the movie", "chosen": "the movie was good ."}])
    with pytest.raises(ValueError, match="2 prompts, 1 chosen"):
        preference_batch([[1], [1]], [[5]], [[6], [7]], tok.pad_id)
    with pytest.raises(ValueError, match="no tokens"):
        b = collate([[1, 2]], [[5]], tok.pad_id)
        b["response_mask"] = torch.zeros_like(b["response_mask"])
        chosen_rejected_logps(None, {k: torch.cat([v, v]) for k, v in b.items()})


def test_pair_logps_in_chunks_match_one_forward(world, tiny_model):
    tok = world.tokenizer
    pairs = tokenize_pairs(tok, PAIRS * 3)
    ref_w, ref_l = pair_logps(tiny_model, pairs, tok.pad_id, "cpu", batch_size=4)  # 2 chunks
    with torch.no_grad():
        w, l = chosen_rejected_logps(tiny_model, preference_batch(pairs["prompt"], pairs["chosen"],
                                                                  pairs["rejected"], tok.pad_id))
    assert ref_w.shape == (6,) and torch.allclose(ref_w, w, atol=1e-5) and torch.allclose(ref_l, l, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# dpo_step: one optimizer step through the ``update`` hook, by hand
# ----------------------------------------------------------------------------------------------


def two_pairs(world):
    """Pair 0 prefers the empty answer (EOS alone) to "good" + EOS; pair 1 the other way round."""
    tok = world.tokenizer
    eos, good = [tok.eos_id], tok.response("good")  # [28, EOS]
    return {"prompt": [tok.prompt(p) for p in world.review_prompts()[:2]], "chosen": [eos, good],
            "rejected": [good, eos]}


class SplittingUpdate:
    """The ``update`` hook as ``--grad-accum 2`` runs it, without an optimizer: one micro-batch per
    pair, each loss backpropagated with weight units / total (one process), the calls recorded."""

    def __init__(self):
        self.calls = []

    def __call__(self, rows, loss_of):
        from minialign.runtime.optim import Update
        extras = []
        for micro in ([r] for r in rows):
            loss, units, total, stats = loss_of(micro)
            (loss * units / total).backward()
            self.calls.append({"rows": micro, "loss": loss.item(), "units": units, "total": total})
            extras.append(stats)
        return Update(grad_norm=0.0, extras=extras)


@pytest.mark.parametrize("precomputed", [False, True])
def test_dpo_step_by_hand_through_the_update_hook(world, precomputed):
    from conftest import eos_policy
    V = world.tokenizer.vocab_size  # 53
    policy = eos_policy(world, math.log(V - 1))  # pi(EOS) = 52 / (52 + 52) = 1/2, any other token 1/104
    reference = eos_policy(world, 0.0)           # pi_ref: uniform, 1/53 each
    pairs = two_pairs(world)
    if precomputed:  # the table the stage precomputes: log pi_ref of every pair
        ref_w, ref_l = pair_logps(reference, pairs, world.tokenizer.pad_id, "cpu")
        reference = {"chosen": ref_w, "rejected": ref_l}
    update = SplittingUpdate()
    result = dpo.dpo_step(policy, reference, world.tokenizer, pairs, [0, 1], dpo.DPOHyperparams(beta=0.5), update)
    assert isinstance(result, dpo.DPOStepResult)
    # E1: log pi(EOS) = log 1/2 = -0.693147, log pi(good, EOS) = log 1/104 + log 1/2 = -5.337538;
    #     log pi_ref(EOS) = -log 53 = -3.970292, log pi_ref(good, EOS) = -7.940584
    expect(result.chosen_logps, [-0.693147, -5.337538], abs=1e-6)
    # E10, beta 0.5: r(EOS) = 0.5 (-0.693147 + 3.970292) = 1.638572, r(good) = 0.5 (-5.337538 + 7.940584) = 1.301523
    expect(result.chosen_rewards, [1.638572, 1.301523], abs=1e-6)
    expect(result.rejected_rewards, [1.301523, 1.638572], abs=1e-6)
    # E9 per pair: -log sigma(+-0.337049) = 0.538756 and 0.875806; one micro-batch of 1 pair each, of 2
    assert [c["rows"] for c in update.calls] == [[0], [1]]
    assert [(c["units"], c["total"]) for c in update.calls] == [(1, 2), (1, 2)]
    expect([c["loss"] for c in update.calls], [0.538756, 0.875806], abs=1e-6)
    # the step's loss is the mean over the batch, 0.707281; the metrics as TRL names them
    expect(result.loss, 0.707281, abs=1e-6)
    m = result.metrics
    expect([m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"], m["rewards/margins"],
            m["logps/chosen"], m["logps/rejected"]], [1.470048, 1.470048, 0.5, 0.0, -3.015343, -3.015343], abs=1e-6)
    # the gradient reached the policy through the hook (the reference got none)
    assert policy.ln_f.bias.grad is not None and policy.ln_f.bias.grad.abs().sum() > 0
    if not precomputed:
        assert all(p.grad is None for p in reference.parameters())


def test_dpo_step_calls_another_member_through_loss_fn(world):
    import functools
    from conftest import eos_policy
    from minialign.preference import PreferenceHyperparams, preference_loss
    V = world.tokenizer.vocab_size
    policy, reference = eos_policy(world, math.log(V - 1)), eos_policy(world, 0.0)
    hp = PreferenceHyperparams(loss="ipo", beta=0.5)
    result = dpo.dpo_step(policy, reference, world.tokenizer, two_pairs(world), [0, 1], dpo.DPOHyperparams(beta=0.5),
                          SplittingUpdate(), loss_fn=functools.partial(preference_loss, hp))
    # IPO: h = 2 x 0.337049 = 0.674099 for pair 0, -0.674099 for pair 1 (beta 0.5: 1/(2 beta) = 1);
    #   (0.674099 - 1)^2 = 0.106211, (-0.674099 - 1)^2 = 2.802607, mean 1.454409
    expect(result.loss, 1.454409, abs=1e-6)
    expect(result.chosen_rewards, [1.638572, 1.301523], abs=1e-6)  # IPO's implicit reward is E10's
