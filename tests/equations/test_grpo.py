"""Tests of minialign/grpo.py, equation by equation (E11-E14), then the iteration and the family's
members in it, by hand. (The stage end to end: tests/runtime/test_grpo_stage.py.)"""

import math

import pytest
import torch
from handworked import expect

from minialign import grpo
from minialign import policy_gradient as PG
from minialign.grpo import group_advantages, grpo_loss, kl_penalised_rewards, reset_reference
from minialign.ops import kl_k3
from minialign.stages.grpo import GRPOConfig  # GRPOHyperparams with the member's options (policy_gradient.MemberOptions)


# ----------------------------------------------------------------------------------------------
# E11, E12: group baseline and normalised advantage
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("group_advantages")
def test_e11_e12_by_hand_on_four_rewards():
    # rewards of one group of G = 4 answers: 1, 0, 0, 3
    # E11: mean = (1 + 0 + 0 + 3) / 4 = 1
    # deviations: 0, -1, -1, 2; sample std = sqrt((0 + 1 + 1 + 4) / 3) = sqrt(2) = 1.414214
    # E12: A = dev / (1.414214 + 1e-4) = 0, -0.707057, -0.707057, 1.414114
    A = group_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0]), group_size=4)
    expect(A, [0.0, -0.707057, -0.707057, 1.414114], abs=1e-6)
    # without E12's division (Dr. GRPO): A = r - mean = 0, -1, -1, 2
    A = group_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0]), group_size=4, scale_by_std=False)
    expect(A, [0.0, -1.0, -1.0, 2.0], abs=0)


@pytest.mark.exercise("group_advantages")
def test_groups_are_consecutive_rows_and_zero_spread_gives_zero():
    # group 1: 1, 0 -> mean 0.5, std = sqrt((0.25 + 0.25) / 1) = 0.707107, with eps = 1e-12: A = +-0.5 / 0.707107 = +-0.707107
    # group 2: all 0.1 (every answer the same): A = 0 exactly, never NaN
    # group 3: all 1 with eps tiny: still exactly 0
    r = torch.tensor([1.0, 0.0, 0.1, 0.1, 1.0, 1.0])
    A = group_advantages(r, group_size=2, eps=1e-12)
    expect(A, [0.707107, -0.707107, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # a group of 3 equal floats whose float mean is not exactly them (0.1 * 3 / 3 != 0.1)
    A = group_advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), group_size=3)
    assert A.tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.tensor([]), group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)


# ----------------------------------------------------------------------------------------------
# E13: the clipped objective, by hand on two answers of different lengths
# ----------------------------------------------------------------------------------------------

# answer 0 has 2 tokens, answer 1 has 3 tokens (T = 3, the last column of answer 0 is padding)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
OLD = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
# pi_theta / pi_old per token: answer 0: 1.5, 0.9 ; answer 1: 0.5, 1.1, 1.0
NEW = OLD + torch.log(torch.tensor([[1.5, 0.9, 7.0], [0.5, 1.1, 1.0]]))
ADV = torch.tensor([1.0, -2.0])


def by_hand_surrogate():
    # E13 per token, min(rho A, clip(rho, 0.8, 1.2) A):
    # answer 0 (A = +1): rho 1.5 -> min(1.5, 1.2) = 1.2 (clipped); rho 0.9 -> min(0.9, 0.9) = 0.9
    # answer 1 (A = -2): rho 0.5 -> min(-1.0, -1.6) = -1.6 (clipped); rho 1.1 -> -2.2; rho 1.0 -> -2.0
    return [[1.2, 0.9], [-1.6, -2.2, -2.0]]


@pytest.mark.exercise("grpo_loss")
def test_e13_answer_mean_by_hand():
    # answer means: (1.2 + 0.9) / 2 = 1.05 ; (-1.6 - 2.2 - 2.0) / 3 = -1.933333
    # E13: objective = (1.05 - 1.933333) / 2 = -0.441667, loss = +0.441667
    loss, stats = grpo_loss(NEW, OLD, None, ADV, MASK, clip_eps=0.2, beta=0.0)
    expect(loss, 0.441667, abs=1e-5)
    # the padded column (rho = 7) does not count; clipped tokens: 1.5 (A>0) and 0.5 (A<0): 2 of 5
    expect(stats["clip_frac"], 2 / 5, rel=1e-6)


@pytest.mark.exercise("grpo_loss")
def test_token_mean_and_constant_by_hand():
    # token_mean: (1.2 + 0.9 - 1.6 - 2.2 - 2.0) / 5 = -3.7 / 5 = -0.74, loss 0.74
    loss, _ = grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, aggregation="token_mean")
    expect(loss, 0.74, abs=1e-6)
    # constant, B * max_len = 2 * 4 = 8: -3.7 / 8 = -0.4625, loss 0.4625
    loss, _ = grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, aggregation="constant", max_len=4)
    expect(loss, 0.4625, abs=1e-6)


@pytest.mark.exercise("grpo_loss")
def test_kl_in_loss_by_hand():
    # one answer of one token: rho = 1 (pi = pi_old = 0.5), A = 1, pi_ref = 0.25
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1 = 0.5 - log 0.5 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # objective = 1 * 1 - 0.1 * 0.193147 = 0.980685, loss = -0.980685
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, stats = grpo_loss(logp, logp, ref, torch.tensor([1.0]), torch.ones(1, 1), beta=0.1)
    expect(loss, -0.980685, abs=1e-6)
    expect(stats["kl"], 0.193147, abs=1e-6)
    # kl_in="reward": the loss has no KL term: loss = -1
    loss, stats = grpo_loss(logp, logp, ref, torch.tensor([1.0]), torch.ones(1, 1), beta=0.1, kl_in="reward")
    expect(loss, -1.0, abs=1e-6)
    expect(stats["kl"], 0.193147, abs=1e-6)  # still reported


@pytest.mark.exercise("kl_penalised_rewards")
def test_kl_in_reward_by_hand():
    # two answers of a group, rewards 1 and 1 (zero spread: no signal from the reward alone)
    # answer 0: 2 tokens, each pi = 0.5, pi_ref = 0.25: k3 = 0.193147 each (as above), summed over
    #   the answer: 0.386294; its third column is padding (pi = 0.9, pi_ref = 0.1: k3 = 1.308 if counted)
    # answer 1: 3 tokens equal to pi_ref: k3 = 0 + 0 + 0 = 0
    # E14: r = 1 - 0.1 * 0.386294 = 0.961371 and 1 - 0 = 1
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.3, 0.6, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.3, 0.6, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = kl_penalised_rewards(torch.tensor([1.0, 1.0]), logps, ref, mask, beta=0.1)
    expect(r, [0.961371, 1.0], abs=1e-6)
    # E11 on them: mean = (0.961371 + 1) / 2 = 0.9806853; r - mean = -0.0193147, +0.0193147:
    # the answer closer to pi_ref now has the positive advantage
    A = group_advantages(r, 2, scale_by_std=False)
    expect(A, [-0.0193147, 0.0193147], abs=1e-6)


@pytest.mark.exercise("grpo_loss")
def test_gradcheck_float64():
    torch.manual_seed(0)
    B, T = 3, 4
    old = torch.randn(B, T, dtype=torch.float64) - 1
    # keep ratios away from the clip boundaries, where the min/clip are not differentiable
    new = (old + 0.5 * torch.randn(B, T, dtype=torch.float64)).requires_grad_(True)
    ref = torch.randn(B, T, dtype=torch.float64) - 1
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    for agg in PG.AGGREGATIONS[:3]:  # GRPO's own (sequence_sum is REINFORCE's)
        for kl_in in PG.KL_IN:
            def f(x):
                return grpo_loss(x, old, ref, adv, mask, beta=0.1, kl_in=kl_in, aggregation=agg, max_len=T)[0]
            assert f(new).dtype == torch.float64  # float64 in, float64 loss (float32 below that)
            assert torch.autograd.gradcheck(f, (new,), eps=1e-6, atol=1e-6)


@pytest.mark.exercise("grpo_loss")
def test_loss_gradient_pushes_towards_better_answers():
    # A > 0 and rho inside the clip range: d loss / d logp = -A * rho / (count) < 0, so a step
    # against the gradient raises the log-prob of the good answer
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0)
    loss.backward()
    # d/dlogp of -(1/2) sum exp(logp - 0) * 1 = -0.5 * exp(0) = -0.5 per token
    expect(logp.grad, [[-0.5, -0.5]], abs=1e-7)


@pytest.mark.exercise("grpo_loss")
def test_grpo_loss_sends_no_gradient_into_pi_old_or_pi_ref():
    """pi_old (the sampler) and pi_ref are constants of E13: only pi_theta's log-probs get a gradient."""
    old = torch.log(torch.tensor([[0.5, 0.4]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.5]])).requires_grad_(True)
    logp = torch.log(torch.tensor([[0.55, 0.35]])).requires_grad_(True)
    loss, _ = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1)
    loss.backward()
    assert old.grad is None and ref.grad is None and logp.grad is not None


# ----------------------------------------------------------------------------------------------
# the k3 estimator, the reference reset, bad input
# ----------------------------------------------------------------------------------------------


def test_k3_by_hand_nonnegative_and_zero_at_pi_ref():
    # pi = 0.5, pi_ref = 0.25: 0.5 - log(0.5) - 1 = 0.193147
    # pi = 0.25, pi_ref = 0.5: 2 - log(2) - 1 = 0.306853
    logp = torch.log(torch.tensor([0.5, 0.25]))
    logq = torch.log(torch.tensor([0.25, 0.5]))
    assert kl_k3(logp, logq).tolist() == pytest.approx([0.193147, 0.306853], abs=1e-6)
    x = torch.randn(1000, dtype=torch.float64)
    y = torch.randn(1000, dtype=torch.float64)
    assert (kl_k3(x, y) >= 0).all()
    assert (kl_k3(x, x) == 0).all()  # pi = pi_ref: exp(0) - 1 - 0 = 0 exactly
    # strictly positive where pi != pi_ref (e^u - 1 - u > 0 for u != 0; ~u^2/2 for small u)
    assert (kl_k3(x, y)[(x - y).abs() > 1e-4] > 0).all()


def test_reference_reset_copies_weights(tiny_model):
    import copy
    ref = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.1)
    assert not torch.equal(ref.wte.weight, tiny_model.wte.weight)
    reset_reference(ref, tiny_model)
    for (n, p), q in zip(tiny_model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        assert p.data_ptr() != q.data_ptr()  # a copy, not shared: training pi_theta leaves pi_ref
    with torch.no_grad():
        tiny_model.wte.weight.add_(1.0)
    assert not torch.equal(ref.wte.weight, tiny_model.wte.weight)


def test_grpo_loss_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        grpo_loss(NEW, OLD[:, :2], None, ADV, MASK, beta=0.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(NEW, OLD, None, ADV[:1], MASK, beta=0.0)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, aggregation="sum")
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, aggregation="constant")
    with pytest.raises(ValueError, match="kl_in"):
        grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, kl_in="value")
    with pytest.raises(ValueError, match="no response tokens"):
        grpo_loss(NEW, OLD, None, ADV, torch.tensor([[1, 1, 0], [0, 0, 0]]), beta=0.0)
    with pytest.raises(ValueError, match="group_size"):
        grpo_loss(NEW, OLD, None, ADV, MASK, beta=0.0, group_size=3)


# ----------------------------------------------------------------------------------------------
# E14: one iteration, by hand
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_grpo_iteration_by_hand(world, kl_in):
    from conftest import RecordingUpdate, eos_policy
    tok = world.tokenizer
    V = tok.vocab_size
    policy = eos_policy(world, 50.0)                # pi(EOS) = 1 - (V - 1) e^-50: every answer is one EOS
    reference = eos_policy(world, math.log(V - 1))  # pi_ref(EOS) = (V - 1) / ((V - 1) + (V - 1)) = 1/2
    questions = world.arithmetic_questions("train")[:2]
    hp = grpo.GRPOHyperparams(group_size=4, batch_size=8, inner_updates=2, beta=0.1, kl_in=kl_in,
                              max_new_tokens=2, recompute_old_logps=True)
    update = RecordingUpdate()
    result = grpo.grpo_iteration(policy, reference, tok, lambda prompts, completions, finished, **_:
                                 [1, 0, 0, 0, 1, 1, 0, 0], questions, hp, torch.Generator().manual_seed(0), update)
    assert isinstance(result, grpo.GRPOIterationResult)
    assert result.completions == [""] * 8 and result.rollout.finished.all()
    assert result.rollout.response_mask.tolist() == [[1]] * 8     # |y_i| = 1: the EOS alone
    # E11-E12, group 1 (1, 0, 0, 0): mean 0.25, sample std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5,
    #   A = 0.75 / 0.5001 = 1.499700, -0.25 / 0.5001 = -0.499900
    # group 2 (1, 1, 0, 0): mean 0.5, std sqrt(4 * 0.25 / 3) = 0.577350, A = +-0.5 / 0.577450 = +-0.865875
    # with kl_in="reward" every r_i drops by the same beta * KL_i (below), which changes no advantage
    expect(result.advantages, [1.499700, -0.499900, -0.499900, -0.499900, 0.865875, 0.865875, -0.865875,
                               -0.865875], abs=1e-6)
    # k3 per token, log pi = 0 and log pi_ref = log 1/2: 1/2 - log(1/2) - 1 = 0.193147
    # E13 (answer_mean), rho = 1 on every token, the mean of each group's A is 0:
    #   loss = -(mean_i A_i - beta * k3) = 0.1 * 0.193147 = 0.019315 with the KL in the loss, 0 in the reward
    want = 0.019315 if kl_in == "loss" else 0.0
    assert len(update.calls) == 2                                  # mu = 2 passes, one minibatch of 8 each
    for call in update.calls:
        assert call["rows"] == list(range(8)) and call["units"] == 8 and call["total"] == 8  # 8 answers
        expect(call["loss"], want, abs=1e-6)
    m = result.metrics
    # 3 of 8 answers rewarded; no group has zero spread; the clip never binds at rho = 1
    expect([m["reward"], m["accuracy"], m["kl"], m["loss"], m["zero_spread"], m["clip_frac"], m["answer_len"]],
           [0.375, 0.375, 0.193147, want, 0.0, 0.0, 1.0], abs=1e-6)
    if kl_in == "reward":  # E14: r_i - beta * KL_i = 0.375 - 0.1 * 0.193147 = 0.355685 on average
        expect(m["kl_penalised_reward"], 0.355685, abs=1e-6)
    else:
        assert "kl_penalised_reward" not in m


def test_hyperparams_are_checked_alone():
    with pytest.raises(ValueError, match="group-size must be >= 2"):
        grpo.GRPOHyperparams(group_size=1)
    with pytest.raises(ValueError, match="kl-in must be one of loss, reward"):
        grpo.GRPOHyperparams(kl_in="value")




# ----------------------------------------------------------------------------------------------
# the family's members as options of the step (policy_gradient.py, policy_gradient_sampling.py)
# ----------------------------------------------------------------------------------------------

# (the member's options, its advantages by hand, its loss at rho = 1 by hand). Every answer is one EOS with
# log pi = 0 (pi(EOS) = 1 - (V - 1) e^-50) and log pi_ref = log 1/2, so the KL in the reward is the same for
# every answer: k1 = 0 - log 1/2 = 0.693147, beta * k1 = 0.069315. Rewards 1, 0, 0, 0 | 1, 1, 0, 0 (mean 0.375).
MEMBER_CASES = {
    # RLOO: r_i - the mean of the 3 others (the equal KL cancels): 1 - 0 = 1, 0 - 1/3; 1 - 1/3 = 2/3, 0 - 2/3.
    # REINFORCE's loss -A log pi is 0 at log pi = 0.
    "rloo": (dict(advantage="rloo", loss="reinforce", kl_in="reward", kl_estimator="k1"),
             [1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3], 0.0),
    # REINFORCE, A = r - beta k1: 0.930685 or -0.069315; DAPO's loss at rho = 1 is -the token mean of A:
    # -(3 - 8 * 0.069315) / 8 = -0.305685
    "reinforce_dapo": (dict(advantage="none", loss="dapo", kl_in="reward", kl_estimator="k1"),
                       [0.930685, -0.069315, -0.069315, -0.069315, 0.930685, 0.930685, -0.069315, -0.069315],
                       -0.305685),
    # the batch's mean 0.375 (the equal KL cancels): 0.625 or -0.375; GSPO's -mean(s A) at s = 1: 0
    "batch_mean_gspo": (dict(advantage="batch_mean", loss="gspo", kl_in="reward"),
                        [0.625, -0.375, -0.375, -0.375, 0.625, 0.625, -0.375, -0.375], 0.0),
    # REINFORCE++: r - beta k1 per token, whitened over the 8 tokens: sample std of 1,0,0,0,1,1,0,0 is
    # sqrt(8/7 * 0.234375) = 0.517549, A = 0.625 / 0.517649 = 1.207382 or -0.375 / 0.517649 = -0.724429;
    # PPO's clip at rho = 1: -the token mean of A = 0
    "reinforce_pp": (dict(advantage="reinforce_pp", loss="ppo_clip", kl_in="reward"),
                     [1.207382, -0.724429, -0.724429, -0.724429, 1.207382, 1.207382, -0.724429, -0.724429], 0.0),
    # CISPO on E12's advantages (beta 0): -the token mean of clip(rho) A log pi = 0 at log pi = 0
    "cispo": (dict(loss="cispo", beta=0.0),
              [1.499700, -0.499900, -0.499900, -0.499900, 0.865875, 0.865875, -0.865875, -0.865875], 0.0),
}


@pytest.mark.parametrize("member", MEMBER_CASES)
def test_members_in_the_iteration_by_hand(world, member):
    from conftest import RecordingUpdate, eos_policy
    options, want_advantages, want_loss = MEMBER_CASES[member]
    tok = world.tokenizer
    policy, reference = eos_policy(world, 50.0), eos_policy(world, math.log(tok.vocab_size - 1))
    hp = GRPOConfig(group_size=4, batch_size=8, inner_updates=1, beta=options.pop("beta", 0.1),  # GRPO's and the member's
                    max_new_tokens=2, recompute_old_logps=True, **options)
    update = RecordingUpdate()
    result = grpo.grpo_iteration(policy, reference, tok, lambda prompts, completions, finished, **_:
                                 [1, 0, 0, 0, 1, 1, 0, 0], world.arithmetic_questions("train")[:2], hp,
                                 torch.Generator().manual_seed(0), update, member=hp)
    assert result.rollout.response_mask.tolist() == [[1]] * 8
    expect(result.advantages.reshape(-1), want_advantages, abs=1e-6)
    assert len(update.calls) == 1 and update.calls[0]["rows"] == list(range(8))
    expect(update.calls[0]["loss"], want_loss, abs=1e-6)
    assert update.calls[0]["units"] == 8  # 8 answers, or 8 tokens for the token means: one token each
    assert "questions_drawn" not in result.metrics and result.metrics["tokens"] == 8


def test_dynamic_sampling_in_the_iteration_by_hand(world):
    """Two questions a draw. Draw 1 rewards 1,1,1,1 | 1,0,0,0: the first group has no signal, so a second
    draw is made: 0,0,0,0 | 0,1,0,0. The batch is full with the two groups that carry a signal (rows 4-7
    and 12-15 of the 16 sampled); 4 questions were drawn, half of their groups without signal."""
    from conftest import RecordingUpdate, eos_policy
    tok = world.tokenizer
    policy, reference = eos_policy(world, 50.0), eos_policy(world, 50.0)
    draws = iter([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]])
    questions = world.arithmetic_questions("train")
    more = []
    hp = GRPOConfig(group_size=4, batch_size=8, inner_updates=1, beta=0.0, max_new_tokens=2,
                    loss="dapo", dynamic_sampling=True)
    update = RecordingUpdate()
    result = grpo.grpo_iteration(policy, reference, tok, lambda prompts, completions, finished, **_: next(draws),
                                 questions[:2], hp, torch.Generator().manual_seed(0), update, member=hp,
                                 draw=lambda n: more.append(n) or questions[2:2 + n])
    assert more == [2]                                              # one more draw of two questions
    assert result.rewards.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]      # the two groups with a signal
    # E12 of (1, 0, 0, 0): 1.499700, -0.499900 (test_grpo_iteration_by_hand); of (0, 1, 0, 0) the same, moved
    expect(result.advantages, [1.4997, -0.4999, -0.4999, -0.4999, -0.4999, 1.4997, -0.4999, -0.4999], abs=1e-4)
    m = result.metrics
    assert m["questions_drawn"] == 4 and m["zero_spread"] == 0.5 and m["tokens"] == 16
    assert m["accuracy"] == 6 / 16                                  # over every answer sampled, not the batch
    with pytest.raises(ValueError, match="needs draw"):
        grpo.grpo_iteration(policy, reference, tok, lambda *a, **k: [0] * 8, questions[:2], hp,
                            torch.Generator().manual_seed(0), update, member=hp)


@pytest.mark.parametrize("overlong", ["penalty", "filter"])
def test_overlong_in_the_iteration(world, overlong):
    """pi(EOS) = 1/2 at every step, answers of at most 2 tokens, L_cache = 1: an answer of one token (its
    EOS) gets no penalty, one of two tokens (finished or not) the paper's -1 (|y| = L_max, or truncated).
    The filter takes the truncated answers out of the loss and keeps them in their group's advantages."""
    from conftest import RecordingUpdate, eos_policy
    tok = world.tokenizer
    policy = eos_policy(world, math.log(tok.vocab_size - 1))        # pi(EOS) = (V - 1) / (2 (V - 1)) = 1/2
    hp = GRPOConfig(group_size=4, batch_size=16, inner_updates=1, beta=0.0, max_new_tokens=2,
                    overlong=overlong, overlong_cache=1, loss="dapo")
    rewards = [1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
    update = RecordingUpdate()
    result = grpo.grpo_iteration(policy, policy, tok, lambda *a, **k: rewards, world.arithmetic_questions("train")[:4],
                                 hp, torch.Generator().manual_seed(1), update, member=hp)
    lengths, finished = result.rollout.response_mask.sum(1), result.rollout.finished
    assert 0 < (lengths == 1).sum() < 16 and 0 < (~finished).sum()  # this seed draws every case
    if overlong == "penalty":
        penalised = torch.tensor(rewards, dtype=torch.float32) - (lengths > 1).float()
        assert torch.equal(result.advantages, group_advantages(penalised, 4))
        assert update.calls[0]["rows"] == list(range(16))
    else:
        assert torch.equal(result.advantages, group_advantages(torch.tensor(rewards, dtype=torch.float32), 4))
        assert update.calls[0]["rows"] == finished.nonzero().squeeze(1).tolist()
    # DAPO's token mean: the units are the tokens of the answers trained on
    assert update.calls[0]["units"] == lengths[update.calls[0]["rows"]].sum().item()


def test_member_options_are_checked():
    H = GRPOConfig  # grpo.GRPOHyperparams with policy_gradient.MemberOptions (and the run's settings)
    with pytest.raises(ValueError, match="kl-in must be reward"):
        H(loss="dapo")                                              # beta 0.04 in a loss that has no KL term
    H(loss="dapo", beta=0.0)
    H(loss="dapo", kl_in="reward")
    with pytest.raises(ValueError, match="kl-estimator must be k3 unless"):
        H(kl_estimator="k1")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        H(loss="dapo", beta=0.0, aggregation="token_mean")      # DAPO fixes its token mean
    with pytest.raises(ValueError, match="aggregation must be one of"):
        H(aggregation="sequence_sum")                             # REINFORCE's, not E13's
    H(loss="reinforce", kl_in="reward", aggregation="sequence_sum")
    with pytest.raises(ValueError, match="advantage must be one advantage per answer"):
        H(advantage="reinforce_pp", loss="gspo", beta=0.0)
    with pytest.raises(ValueError, match="scale-by-std must be true"):
        H(advantage="rloo", scale_by_std=False)
    with pytest.raises(ValueError, match="clip-eps-high must be 0 with --loss grpo"):
        H(clip_eps_high=0.28)
    with pytest.raises(ValueError, match="clip-eps-low must be in"):
        H(loss="dapo", beta=0.0, clip_eps_low=1.0)                # 1 - eps_low = 0: no ratio left
    H(loss="cispo", beta=0.0, clip_eps_low=1.0)                   # CISPO: no lower bound
    with pytest.raises(ValueError, match="overlong-cache must be in"):
        H(overlong="penalty", overlong_cache=5, max_new_tokens=4)
    with pytest.raises(ValueError, match="advantage must be one of"):
        H(advantage="ppo")
