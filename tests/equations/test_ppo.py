"""Tests of minialign/ppo.py: E5 (clipped surrogate), GAE and E6 (A = r - V(x)), the per-token
rewards of E2, the clipped value loss, the value head, one iteration by hand. (The stage end to end:
tests/runtime/test_ppo_stage.py.)"""

import math

import pytest
import torch
from handworked import expect

from minialign.ppo import (AdaptiveKLController, PolicyWithValueHead, clipped_surrogate_loss, gae,
                           logps_values_entropy, one_step_advantages, per_token_rewards, value_loss)

# ----------------------------------------------------------------------------------------------
# E5: the clipped surrogate
# ----------------------------------------------------------------------------------------------

# six response tokens in a (2, 4) batch, the last column of each row is padding (mask 0)
RATIOS = [[1.5, 1.5, 0.5, 9.0],
          [0.5, 1.0, 1.1, 9.0]]
ADVS = [[1.0, -1.0, 1.0, 5.0],
        [-1.0, 2.0, -1.0, 5.0]]
MASK = [[1, 1, 1, 0],
        [1, 1, 1, 0]]


def _e5_inputs(dtype=torch.float32):
    old_logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.2, -0.7, -2.2, -0.1]], dtype=dtype)
    logps = (old_logps + torch.tensor(RATIOS, dtype=dtype).log()).requires_grad_(True)
    return logps, old_logps, torch.tensor(ADVS, dtype=dtype), torch.tensor(MASK)


@pytest.mark.exercise("clipped_surrogate_loss")
def test_clipped_surrogate_by_hand():
    logps, old_logps, adv, mask = _e5_inputs()
    loss, stats = clipped_surrogate_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    # token by token, min(rho A, clip(rho, 0.8, 1.2) A):
    #   rho 1.5, A +1: min(1.5, 1.2)   =  1.2   clip binds (ratio too high for a good action)
    #   rho 1.5, A -1: min(-1.5, -1.2) = -1.5   no clip (a bad action made likelier: full penalty)
    #   rho 0.5, A +1: min(0.5, 0.8)   =  0.5   no clip
    #   rho 0.5, A -1: min(-0.5, -0.8) = -0.8   clip binds (ratio too low for a bad action)
    #   rho 1.0, A +2: min(2, 2)       =  2.0   inside the range
    #   rho 1.1, A -1: min(-1.1, -1.1) = -1.1   inside the range
    # mean = (1.2 - 1.5 + 0.5 - 0.8 + 2.0 - 1.1) / 6 = 0.3 / 6 = 0.05; loss = -0.05
    expect(loss, -0.05, abs=1e-6)
    expect(stats["clip_frac"], 2 / 6, rel=1e-6)
    # approx KL (k3) = mean of (rho - 1) - log rho:
    #   1.5: 0.5 - 0.405465 = 0.094535 (twice); 0.5: -0.5 + 0.693147 = 0.193147 (twice);
    #   1.0: 0; 1.1: 0.1 - 0.095310 = 0.004690; sum 0.580054 / 6 = 0.096676
    expect(stats["approx_kl"], 0.096676, abs=1e-5)
    expect(stats["ratio"], (1.5 + 1.5 + 0.5 + 0.5 + 1.0 + 1.1) / 6, abs=1e-6)


@pytest.mark.exercise("clipped_surrogate_loss")
def test_clipped_surrogate_gradient_is_zero_exactly_where_the_clip_binds():
    logps, old_logps, adv, mask = _e5_inputs()
    loss, _ = clipped_surrogate_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    loss.backward()
    # d(rho A)/d logp = rho A; loss = -(1/6) sum, so where the clip does not bind: -rho A / 6
    #   (1.5, -1): +1.5/6 = 0.25;  (0.5, +1): -0.5/6 = -0.083333;  (1.0, +2): -2/6 = -0.333333;
    #   (1.1, -1): +1.1/6 = 0.183333;  where it binds ((1.5, +1) and (0.5, -1)): exactly 0;
    #   padding: exactly 0
    expected = torch.tensor([[0.0, 0.25, -0.5 / 6, 0.0],
                             [0.0, -2 / 6, 1.1 / 6, 0.0]])
    expect(logps.grad, expected, abs=1e-6)
    binds = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    response = torch.tensor(MASK, dtype=torch.bool)
    assert (logps.grad[binds] == 0).all()                        # zero where the clip binds ...
    assert (logps.grad[response & ~binds] != 0).all()           # ... and only there
    assert binds.sum() == 2 and logps.grad[~response].abs().sum() == 0


@pytest.mark.exercise("clipped_surrogate_loss")
def test_clipped_surrogate_sends_no_gradient_into_pi_old():
    """pi_old is the rollout's policy, a constant of E5: the gradient moves pi_theta only."""
    logps, old_logps, adv, mask = _e5_inputs()
    old_logps.requires_grad_(True)  # as if a caller passed log-probs still attached to a graph
    loss, _ = clipped_surrogate_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    loss.backward()
    assert old_logps.grad is None and logps.grad is not None


@pytest.mark.exercise("clipped_surrogate_loss")
def test_clipped_surrogate_gradcheck_float64():
    logps, old_logps, adv, mask = _e5_inputs(torch.float64)
    # finite differences must not straddle a kink: every ratio is >= 0.1 away from 0.8 and 1.2
    # except 1.0 and 1.1, which sit inside with room for eps=1e-6
    adv.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lp, a: clipped_surrogate_loss(lp, old_logps, a, mask, 0.2)[0], (logps, adv))


# ----------------------------------------------------------------------------------------------
# Advantages: GAE and the source's A = r - V(x) (E6)
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("gae")
def test_gae_by_hand_three_steps_in_a_padded_batch():
    # row 0: two prompt columns (mask 0), three response tokens, one pad; row 1: one token (EOS)
    rewards = torch.tensor([[9.0, 9.0, 0.0, 0.0, 1.0, 9.0],
                            [9.0, 9.0, 2.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[5.0, 5.0, 0.5, 0.6, 0.7, 5.0],
                           [5.0, 5.0, 0.5, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 0, 1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, gamma = 0.9, gamma * lam = 0.72, V = 0 after the last token:
    #   delta_3 = 1 + 0.9 * 0   - 0.7 = 0.3
    #   delta_2 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    #   delta_1 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    #   A_3 = 0.3;  A_2 = 0.03 + 0.72 * 0.3 = 0.246;  A_1 = 0.04 + 0.72 * 0.246 = 0.21712
    #   returns = A + V = 0.71712, 0.846, 1.0
    # row 1: A_1 = 2 - 0.5 = 1.5, return 2.0; everything outside the mask is 0
    expect(adv, [[0, 0, 0.21712, 0.246, 0.3, 0],
                 [0, 0, 1.5, 0, 0, 0]], abs=1e-6)
    expect(ret, [[0, 0, 0.71712, 0.846, 1.0, 0],
                 [0, 0, 2.0, 0, 0, 0]], abs=1e-6)


@pytest.mark.exercise("gae")
@pytest.mark.exercise("one_step_advantages")
def test_gae_with_gamma_lambda_one_is_r_minus_v_at_the_first_response_token():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 0, 0, 0, 0],
                         [0, 1, 1, 1, 1, 1, 1]])
    score = torch.tensor([1.5, -0.3, 2.0])
    logps, ref_logps, values = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    rewards = per_token_rewards(score, logps, ref_logps, mask, beta=0.1)  # reward at the EOS + KL
    r = rewards.sum(1)                                       # r(x, y) = r_phi - beta sum log ratio
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # the sum telescopes: A_1 = sum_t r_t + sum_{t>1} V_t - sum_{t>=1} V_t = r - V_1 = r - V(x)
    torch.testing.assert_close(adv[:, 1], r - values[:, 1])
    src_adv, src_ret = one_step_advantages(r, values, mask)
    torch.testing.assert_close(adv[:, 1], src_adv[:, 1])
    torch.testing.assert_close(ret[:, 1], r)                # the return of the first token is r
    # the source's advantage is one number per answer, copied on every response token
    torch.testing.assert_close(src_adv, torch.where(mask.bool(), (r - values[:, 1])[:, None], torch.tensor(0.)))
    torch.testing.assert_close(src_ret, torch.where(mask.bool(), r[:, None], torch.tensor(0.)))


@pytest.mark.exercise("one_step_advantages")
def test_one_step_advantages_by_hand():
    # E6 as the source writes it: A = r(x, y) - V(x), with V(x) read at the first response token,
    # copied onto every response token; the value target is r(x, y) on every response token
    # row 0: prompt column, 3 response tokens, a pad; V(x) = values[0, 1] = 0.5, r = 2.0 -> A = 1.5
    # row 1: 2 prompt columns, 1 response token (its EOS); V(x) = values[1, 2] = -1.0, r = -0.5 -> A = 0.5
    total_reward = torch.tensor([2.0, -0.5])
    values = torch.tensor([[9.0, 0.5, 0.7, 0.9, 9.0],
                           [9.0, 9.0, -1.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0],
                         [0, 0, 1, 0, 0]])
    adv, ret = one_step_advantages(total_reward, values, mask)
    expect(adv, [[0.0, 1.5, 1.5, 1.5, 0.0],
                 [0.0, 0.0, 0.5, 0.0, 0.0]])
    expect(ret, [[0.0, 2.0, 2.0, 2.0, 0.0],
                 [0.0, 0.0, -0.5, 0.0, 0.0]])
    # the values at later response tokens (0.7, 0.9) play no part: only V(x) is the baseline
    values[0, 2:4] = -100.0
    torch.testing.assert_close(one_step_advantages(total_reward, values, mask)[0], adv)


# ----------------------------------------------------------------------------------------------
# E2 / E6: per-token rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("per_token_rewards")
def test_per_token_rewards_score_at_eos_and_sum_is_e2():
    # a padded batch as ``logps_values_entropy`` sees it: prompt column, response, then pads
    logps = torch.tensor([[7.0, -1.0, -2.0, -0.5, 7.0],
                          [7.0, -0.2, 7.0, 7.0, 7.0]])
    ref_logps = torch.tensor([[-3.0, -1.5, -1.0, -0.5, -3.0],
                              [-3.0, -0.7, -3.0, -3.0, -3.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0],
                         [0, 1, 0, 0, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards = per_token_rewards(score, logps, ref_logps, mask, beta=0.1)
    # row 0: -0.1 * (logp - ref) = -0.1 * 0.5 = -0.05, -0.1 * (-1) = 0.1, -0.1 * 0 = 0, + score 2 at EOS
    # row 1: its only token is the EOS: -0.1 * 0.5 + (-1) = -1.05
    expect(rewards, [[0.0, -0.05, 0.1, 2.0, 0.0],
                     [0.0, -1.05, 0.0, 0.0, 0.0]], abs=1e-6)
    # the sum is r_phi - beta * sum(log pi - log pi_ref): 2 - 0.1 * (-0.5) = 2.05; -1 - 0.05 = -1.05
    log_ratio = ((logps - ref_logps) * mask).sum(1)
    torch.testing.assert_close(rewards.sum(1), score - 0.1 * log_ratio)
    expect(rewards.sum(1), [2.05, -1.05], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# the clipped value loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("value_loss")
def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 2.0, 4.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 1: V 1.0 moved +0.5 from 0.5 -> clipped V = 0.7: max((1-2)^2, (0.7-2)^2) = max(1, 1.69) = 1.69
    # token 2: V 0.0 moved -0.5 -> clipped V = 0.3: max((0-1)^2, (0.3-1)^2) = max(1, 0.49) = 1
    # token 3: V did not move: (2-1)^2 = 1
    # loss = 0.5 * (1.69 + 1 + 1) / 3 = 0.615
    expect(loss, 0.615, abs=1e-6)
    expect(stats["value_clip_frac"], 1 / 3, rel=1e-6)
    loss.backward()
    # d/dV of 0.5 * err / 3: token 1 clipped (0), token 2 (0 - 1) / 3, token 3 (2 - 1) / 3, pad 0
    expect(values.grad, [[0.0, -1 / 3, 1 / 3, 0.0]], abs=1e-5)
    plain, _ = value_loss(values, old_values, returns, mask, clip_range=None)
    expect(plain, 0.5 * (1 + 1 + 1) / 3, rel=1e-6)  # 0.5 mean (V - R)^2 = 0.5
    for bad in (-1.0, float("nan")):  # a negative range returned 0.5, a NaN one NaN
        with pytest.raises(ValueError, match="clip_range must be >= 0"):
            value_loss(values, old_values, returns, mask, clip_range=bad)


@pytest.mark.exercise("value_loss")
def test_value_loss_gradcheck_float64():
    values = torch.tensor([[1.0, 0.0, 2.05, 4.0], [0.3, -0.4, 0.6, 0.1]], dtype=torch.float64,
                          requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 2.0, 0.0], [0.2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: value_loss(v, old_values, returns, mask, 0.2)[0], (values,))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    B, T = 2, 4
    x = torch.zeros(B, T)
    empty = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="empty"):
        per_token_rewards(torch.zeros(B), x, x, empty, 0.1)
    with pytest.raises(ValueError, match="empty"):
        gae(x, x, empty)
    with pytest.raises(ValueError, match="empty"):
        one_step_advantages(torch.zeros(B), x, empty)
    with pytest.raises(ValueError, match="empty"):
        clipped_surrogate_loss(x, x, x, empty)
    with pytest.raises(ValueError, match="empty"):
        value_loss(x, x, x, empty)
    mask = torch.ones(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        clipped_surrogate_loss(torch.zeros(B, T + 1), x, x, mask)
    with pytest.raises(ValueError, match="shape"):
        per_token_rewards(torch.zeros(B), x, torch.zeros(B, T - 1), mask, 0.1)
    with pytest.raises(ValueError, match="score"):
        per_token_rewards(torch.zeros(B + 1), x, x, mask, 0.1)
    with pytest.raises(ValueError, match="shape"):
        gae(x, torch.zeros(B + 1, T), mask)
    with pytest.raises(ValueError, match="shape"):
        value_loss(x, x, torch.zeros(B, T, 1), mask)
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_surrogate_loss(x, x, x, mask, clip_eps=0.0)


# ----------------------------------------------------------------------------------------------
# the KL controller, the value head, the rollout layout
# ----------------------------------------------------------------------------------------------


def test_adaptive_kl_controller():
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(100.0, 64) == 0.1
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=640)
    # KL 4 is twice the target: error clip(4/2 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 64/640 = 1.02
    assert ctl.update(4.0, 64) == pytest.approx(0.102)
    # KL 1.8: error 1.8/2 - 1 = -0.1; beta *= 1 - 0.1 * 0.1 = 0.99
    assert ctl.update(1.8, 64) == pytest.approx(0.102 * 0.99)


@pytest.mark.parametrize("shared", [True, False])
def test_value_head_policy_and_alignment(tiny_model, world, shared):
    tok = world.tokenizer
    model = PolicyWithValueHead(tiny_model, shared_trunk=shared)
    prompt, response = tok.prompt("review the movie"), tok.response("the movie was good .")
    ids = torch.tensor([prompt + response])
    P, T = len(prompt), len(response)
    mask = torch.ones_like(ids)
    logits, values = model(ids, mask, P)
    torch.testing.assert_close(logits, tiny_model(ids)[:, P - 1:-1])  # the policy is the GPT unchanged
    assert values.shape == (1, T) and values.dtype == torch.float32
    assert (values == 0).all()                                 # the head starts at zero
    head = {id(p) for p in model.value_head.parameters()}
    trunk = {id(p) for p in tiny_model.parameters()}
    critic = {id(p) for p in model.parameters()} - head - trunk
    assert bool(critic) != shared                              # a separate critic trunk iff not shared
    logps, v, ent = logps_values_entropy(model, ids, mask, P)
    assert logps.shape == v.shape == ent.shape == (1, T)       # one column per response token
    torch.testing.assert_close(logps, torch.log_softmax(tiny_model(ids)[:, P - 1:-1], -1)
                               .gather(-1, ids[:, P:, None]).squeeze(-1))


def test_rollout_tensors_line_up_with_each_response(tiny_model, world):
    """On a real rollout (prompts of different lengths, left-padded; responses ending at their EOS),
    column t of the log-probs is log pi(y_t | x, y_<t) of that row alone, with or without sharing."""
    from minialign.generation import generate
    tok = world.tokenizer
    prompts = [tok.prompt("review the movie"), tok.prompt("what is 3 + 4 ?")] * 2   # different lengths
    rollout = generate(tiny_model, prompts, 6, tok.eos_id, tok.pad_id, generator=torch.Generator().manual_seed(0))
    model = PolicyWithValueHead(tiny_model)
    for share in (True, False):
        logps, _, _ = logps_values_entropy(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len,
                                           share_prompt=share)
        for i, (x, y) in enumerate(zip(prompts, rollout.response_ids)):
            n = int(rollout.response_mask[i].sum())
            ids = torch.tensor([x + y[:n].tolist()])
            alone = torch.log_softmax(tiny_model(ids)[0, len(x) - 1:-1], -1).gather(-1, ids[0, len(x):, None])[:, 0]
            torch.testing.assert_close(logps[i, :n], alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# E6: one iteration, by hand
# ----------------------------------------------------------------------------------------------


def test_ppo_iteration_by_hand(world):
    from conftest import RecordingUpdate, eos_policy

    from minialign.ppo import PPOHyperparams, PPOIterationResult, ppo_iteration
    tok = world.tokenizer
    V = tok.vocab_size
    actor_critic = PolicyWithValueHead(eos_policy(world, 50.0)).double()  # pi(EOS) = 1: every response is one EOS
    reference = eos_policy(world, math.log(V - 1))                          # pi_ref(EOS) = 1/2
    scores = torch.tensor([2.0, -1.0, 0.5, 1.0], dtype=torch.float64)

    def reward_model(sequences, attention_mask, response_mask):             # r_phi of the four responses
        return scores

    hp = PPOHyperparams(minibatch_size=4, ppo_epochs=2, max_new_tokens=2, advantage="source",
                        whiten_advantages=False)
    update = RecordingUpdate()
    prompts = [tok.prompt(p) for p in world.review_prompts()[:4]]
    result = ppo_iteration(actor_critic, reference, reward_model, tok, prompts, hp, 0.1,
                           torch.Generator().manual_seed(0), torch.Generator().manual_seed(0), update)
    assert isinstance(result, PPOIterationResult)
    assert result.rollout.response_mask.tolist() == [[1]] * 4 and result.rollout.finished.all()
    # E2/E6: log pi(EOS) = 0, log pi_ref(EOS) = log 1/2: r = r_phi - 0.1 * 0.693147 = r_phi - 0.069315;
    # V = 0 (the head starts at zero), so A = r - V(x) = r and the returns are r:
    # 2 - 0.069315 = 1.930685, -1.069315, 0.430685, 0.930685
    r = [1.930685, -1.069315, 0.430685, 0.930685]
    expect(result.advantages[:, 0], r)
    expect(result.returns[:, 0], r)
    # E5 at rho = 1: -mean A = -(1.930685 - 1.069315 + 0.430685 + 0.930685) / 4 = -0.555685
    # value loss, V = V_old = 0: 0.5 * (3.727546 + 1.143434 + 0.185490 + 0.866175) / 4 = 0.740331
    # loss = -0.555685 + 0.5 * 0.740331 = -0.185520 (entropy bonus off)
    assert len(update.calls) == 2                                           # 2 epochs of one minibatch
    for call in update.calls:
        assert call["rows"] == [0, 1, 2, 3] and call["units"] == 4 and call["total"] == 4  # 4 tokens
        expect(call["loss"], -0.185520)
    m = result.metrics
    # KL per response 0.693147; objective E2 = mean r_phi - 0.1 * 0.693147 = 0.625 - 0.069315 = 0.555685;
    # a critic at V = 0 explains none of the returns' variance
    expect([m["pg_loss"], m["value_loss"], m["loss"], m["kl"], m["objective"], m["score"], m["clip_frac"],
            m["explained_variance"], m["response_length"]],
           [-0.555685, 0.740331, -0.185520, 0.693147, 0.555685, 0.625, 0.0, 0.0, 1.0])


def test_ppo_hyperparams_are_checked_alone():
    from minialign.ppo import PPOHyperparams
    with pytest.raises(ValueError, match="--lam must be in \\[0, 1\\]"):
        PPOHyperparams(lam=1.5)
    with pytest.raises(ValueError, match="--minibatch-size must be >= 1"):
        PPOHyperparams(minibatch_size=0)
