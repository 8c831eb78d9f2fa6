"""Tests of minialign/reward_model.py: E3, E4, the reward read at EOS, bad input, the step. (The stage
end to end: tests/runtime/test_reward_model_stage.py.)"""

import math

import pytest
import torch
from handworked import expect

from minialign.data import collate, left_pad
from minialign.reward_model import (RewardModel, RewardModelHyperparams, bradley_terry_probability, centring_penalty,
                                    collate_pairs, encode_pairs, last_token_index, pair_rewards, reward_function,
                                    reward_model_loss, reward_model_step, score)
from minialign.runtime.config import TrainConfig
from minialign.runtime.optim import gradient_update, make_optimizer
from minialign.runtime.loading import save_policy

# ----------------------------------------------------------------------------------------------
# E3: Bradley-Terry probability
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("bradley_terry_probability")
def test_bradley_terry_by_hand():
    r_w = torch.tensor([1.0, 0.0, 2.0, -1.0])
    r_l = torch.tensor([0.0, 0.0, 0.0, 1.0])
    p = bradley_terry_probability(r_w, r_l)
    # sigma(1) = 1 / (1 + e^-1) = 1 / 1.36788 = 0.731059
    # sigma(0) = 0.5
    # sigma(2) = 1 / (1 + e^-2) = 1 / 1.135335 = 0.880797
    # sigma(-2) = 1 - sigma(2) = 0.119203
    expect(p, [0.731059, 0.5, 0.880797, 0.119203], abs=1e-6)
    # E3's first form, e^{r_w} / (e^{r_w} + e^{r_l}): for (1, 0), e / (e + 1) = 2.71828 / 3.71828 = 0.731059
    explicit = torch.exp(r_w) / (torch.exp(r_w) + torch.exp(r_l))
    assert torch.allclose(p, explicit, atol=1e-6)


@pytest.mark.exercise("bradley_terry_probability")
def test_adding_c_of_x_to_both_rewards_changes_no_probability():
    """Z(x) cancels: r + c(x) for any c(x) leaves every E3 probability (and E4) unchanged."""
    generator = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(16, generator=generator, dtype=torch.float64), torch.randn(16, generator=generator, dtype=torch.float64)
    for c in (torch.full((16,), 5.0, dtype=torch.float64), 100 * torch.randn(16, generator=generator, dtype=torch.float64)):
        assert torch.allclose(bradley_terry_probability(r_w + c, r_l + c), bradley_terry_probability(r_w, r_l),
                              atol=1e-12)
        assert torch.allclose(reward_model_loss(r_w + c, r_l + c), reward_model_loss(r_w, r_l), atol=1e-12)
    # and a c that is NOT the same on both sides does change it: c must depend on x only
    assert not torch.allclose(bradley_terry_probability(r_w + 1, r_l), bradley_terry_probability(r_w, r_l))


# ----------------------------------------------------------------------------------------------
# E4: reward-model loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.exercise("reward_model_loss")
def test_reward_model_loss_by_hand():
    r_w = torch.tensor([1.0, 0.0])
    r_l = torch.tensor([0.0, 2.0])
    # pair 1: gap 1, -log sigma(1) = -log 0.731059 = 0.313262
    # pair 2: gap -2, -log sigma(-2) = -log 0.119203 = 2.126928
    # mean = (0.313262 + 2.126928) / 2 = 1.220095
    expect(reward_model_loss(r_w, r_l), 1.220095, abs=1e-5)
    # equal rewards: -log sigma(0) = log 2 = 0.693147
    expect(reward_model_loss(torch.zeros(3), torch.zeros(3)), 0.693147, abs=1e-6)


@pytest.mark.exercise("reward_model_loss")
def test_reward_model_loss_is_stable_for_large_gaps():
    # gap -200: sigma underflows in float32, but -log sigma(-200) = 200 + log(1 + e^-200) = 200
    loss = reward_model_loss(torch.tensor([0.0]), torch.tensor([200.0]))
    expect(loss, 200.0, rel=1e-6)
    # gap +200: the loss is log(1 + e^-200) = 0 (not NaN)
    expect(reward_model_loss(torch.tensor([200.0]), torch.tensor([0.0])), 0.0, abs=0)


@pytest.mark.exercise("reward_model_loss")
def test_reward_model_loss_gradient_by_hand():
    r_w = torch.tensor([1.0, 0.0], requires_grad=True)
    r_l = torch.tensor([0.0, 2.0], requires_grad=True)
    reward_model_loss(r_w, r_l).backward()
    # dL/dr_w = -(1 - sigma(r_w - r_l)) / B, dL/dr_l = +(1 - sigma(r_w - r_l)) / B, B = 2
    # pair 1: 1 - sigma(1) = 0.268941, / 2 = 0.134471
    # pair 2: 1 - sigma(-2) = 0.880797, / 2 = 0.440399
    expect(r_w.grad, [-0.134471, -0.440399], abs=1e-6)
    expect(r_l.grad, [0.134471, 0.440399], abs=1e-6)


@pytest.mark.exercise("reward_model_loss")
def test_reward_model_loss_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    r_w = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    r_l = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(reward_model_loss, (r_w, r_l))
    assert torch.autograd.gradcheck(bradley_terry_probability, (r_w, r_l))


def test_centring_penalty_by_hand():
    """TRL's centring term E[(r_w + r_l)^2]: it sees the level of the rewards, which E3 cannot."""
    r_w = torch.tensor([1.0, 0.0])
    r_l = torch.tensor([0.0, 2.0])
    # pair 1: (1 + 0)^2 = 1; pair 2: (0 + 2)^2 = 4; mean (1 + 4) / 2 = 2.5
    expect(centring_penalty(r_w, r_l), 2.5, abs=1e-6)
    # shifting both rewards of each pair by c(x) = -(r_w + r_l) / 2 = [-0.5, -1]: E3 and E4 unchanged,
    # the pairs now sum to 0, so the penalty is 0 (r_w, r_l = [0.5, -1], [-0.5, 1])
    c = -(r_w + r_l) / 2
    expect(centring_penalty(r_w + c, r_l + c), 0.0, abs=1e-7)
    expect(reward_model_loss(r_w + c, r_l + c), reward_model_loss(r_w, r_l).item(), abs=1e-6)
    # its gradient, 2 (r_w + r_l) / B on both: [1, 2] for each side
    r_w.requires_grad_(True)
    centring_penalty(r_w, r_l).backward()
    expect(r_w.grad, [1.0, 2.0], abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        centring_penalty(torch.zeros(2), torch.zeros(3))


@pytest.mark.exercise("reward_model_loss")
def test_loss_is_float32_under_bfloat16():
    r = torch.tensor([0.3, -0.2], dtype=torch.bfloat16)
    assert reward_model_loss(r, torch.zeros_like(r)).dtype == torch.float32
    assert bradley_terry_probability(r, torch.zeros_like(r)).dtype == torch.float32


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        reward_model_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        reward_model_loss(torch.zeros(0), torch.zeros(0))


# ----------------------------------------------------------------------------------------------
# The model: reward read at the last real token (EOS), whatever the padding
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_rm(tiny_model):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model.config)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # a head that is not ~0, so rewards differ
    return rm.eval()


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right-padded: last real token at 2
                         [0, 0, 1, 1, 1],   # left-padded: at 4
                         [1, 1, 1, 1, 1]])  # no padding: at 4
    assert last_token_index(mask).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_reward_read_at_eos_left_and_right_padding(world, tiny_rm):
    tok = world.tokenizer
    texts = [("review the movie", "the movie was good ."),
             ("review the book", "the book was very bad and the story was not great ."),
             ("review the song", "the song was fun but the ending was long .")]
    prompts = [tok.prompt(p) for p, _ in texts]
    responses = [tok.response(r) for _, r in texts]
    with torch.no_grad():
        # each sequence alone (no padding); its reward is the head on the hidden state at its EOS
        alone = []
        for x, y in zip(prompts, responses):
            ids = torch.tensor([x + y])
            assert ids[0, -1].item() == tok.eos_id
            h = tiny_rm.body.hidden(ids)  # (1, T, C)
            alone.append(tiny_rm.score_head(h[0, -1]).item())
            assert math.isclose(tiny_rm(ids, torch.ones_like(ids)).item(), alone[-1], abs_tol=1e-5)
        alone = torch.tensor(alone)
        right = collate(prompts, responses, tok.pad_id)                 # pads after the EOS
        left_ids, left_mask = left_pad([x + y for x, y in zip(prompts, responses)], tok.pad_id)
        r_right = tiny_rm(right["input_ids"], right["attention_mask"])  # (3,)
        r_left = tiny_rm(left_ids, left_mask)                           # (3,)
        # as generation returns them: prompts left-padded, responses right-padded after their EOS
        x_ids, x_mask = left_pad(prompts, tok.pad_id)
        L = max(map(len, responses))
        y_ids = torch.tensor([y + [tok.pad_id] * (L - len(y)) for y in responses])
        y_mask = torch.tensor([[1] * len(y) + [0] * (L - len(y)) for y in responses])
        r_both = tiny_rm(torch.cat([x_ids, y_ids], 1), torch.cat([x_mask, y_mask], 1))  # (3,)
    assert right["attention_mask"].sum(1).tolist() != [right["input_ids"].size(1)] * 3  # really padded
    assert left_mask[:, 0].tolist() != [1, 1, 1]
    assert r_right.dtype == torch.float32 and r_right.shape == (3,)
    assert torch.allclose(r_right, alone, atol=1e-5)
    assert torch.allclose(r_left, alone, atol=1e-5)
    assert torch.allclose(r_both, alone, atol=1e-5)
    assert alone.std() > 1e-3  # the three rewards differ, so a wrong index would show


def test_reward_does_not_read_padding(world, tiny_rm):
    """Changing the token ids under the padding changes no reward."""
    tok = world.tokenizer
    b = collate([tok.prompt("review the meal")] * 2,
                [tok.response("the meal was nice ."), tok.response("the meal was awful and the price was bad .")],
                tok.pad_id)
    ids = b["input_ids"].clone()
    ids[b["attention_mask"] == 0] = tok.eos_id  # garbage under the pads
    with torch.no_grad():
        assert torch.allclose(tiny_rm(b["input_ids"], b["attention_mask"]), tiny_rm(ids, b["attention_mask"]),
                              atol=1e-6)


def test_from_policy_copies_the_trunk(world, tiny_model):
    rm = RewardModel.from_policy(tiny_model)
    assert rm.config == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(rm.body.state_dict()[k], v)
    ids = torch.tensor([world.tokenizer.prompt("review the game") + world.tokenizer.response("the game was fun .")])
    with torch.no_grad():
        assert torch.allclose(rm.body.hidden(ids), tiny_model.hidden(ids))
    # a copy, not a view: training the reward model leaves the policy alone
    with torch.no_grad():
        rm.body.wte.weight.add_(1.0)
    assert not torch.equal(rm.body.wte.weight, tiny_model.wte.weight)


def test_save_load_round_trip_and_mismatches(world, tiny_rm, tiny_model, tmp_path):
    tok = world.tokenizer
    path = tmp_path / "rm.pt"
    tiny_rm.save(path, tok)
    loaded, loaded_tok = RewardModel.load(path, device="cpu", tokenizer=tok)
    assert loaded_tok == tok and loaded.config == tiny_rm.config
    b = collate([tok.prompt("review the show")], [tok.response("the show was dull .")], tok.pad_id)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(b["input_ids"], b["attention_mask"]),
                           tiny_rm(b["input_ids"], b["attention_mask"]))
    # another tokenizer than the saved one
    from minialign.tokenizer import Tokenizer
    other = Tokenizer(tok.itos[5:] + ["extra"])
    with pytest.raises(ValueError, match="another tokenizer"):
        RewardModel.load(path, tokenizer=other)
    with pytest.raises(ValueError, match="do not belong together"):
        tiny_rm.save(tmp_path / "bad.pt", other)
    # a policy checkpoint is not a reward model
    save_policy(tiny_model, tok, tmp_path / "policy.pt")
    with pytest.raises(ValueError, match="not a reward-model checkpoint"):
        RewardModel.load(tmp_path / "policy.pt")
    # weights of another size than the config says
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_embd"] = 64
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="does not match"):
        RewardModel.load(tmp_path / "mismatch.pt")


# ----------------------------------------------------------------------------------------------
# Bad preference data
# ----------------------------------------------------------------------------------------------


def test_reward_function_scores_finished_answers_with_r_phi(world, tiny_rm):
    """GRPO's reward on reviews (tutorial 09): r_phi of each finished answer, the penalty without EOS."""
    tok = world.tokenizer
    prompts = ["review the movie", "review the song", "review the book"]
    answers = ["the movie was good .", "the song was bad .", "the book was"]
    reward = reward_function(tiny_rm, tok, missing_eos_score=-7.0)
    got = reward(prompts=prompts, completions=answers, finished=[True, True, False], answer=[None] * 3)
    with torch.no_grad():
        r_phi = score(tiny_rm, [tok.prompt(x) for x in prompts], [tok.response(y) for y in answers], tok.pad_id)
    assert got[:2] == pytest.approx(r_phi[:2].tolist(), abs=1e-6) and got[0] != got[1]
    assert got[2] == -7.0                       # cut off before its EOS: no place to read r_phi


def test_empty_response_is_an_error(world):
    tok = world.tokenizer
    with pytest.raises(ValueError, match="pair 1 has an empty 'rejected'"):
        encode_pairs([{"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."},
                      {"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "  "}], tok)
    with pytest.raises(ValueError, match="no string field 'chosen'"):
        encode_pairs([{"prompt": "review the movie", "rejected": "the movie was bad ."}], tok)
    x = tok.prompt("review the movie")
    with pytest.raises(ValueError, match="pair 0 has an empty chosen response"):
        collate_pairs([x], [[]], [x], [tok.response("the movie was bad .")], tok.pad_id)


def test_chosen_and_rejected_of_different_prompts_is_an_error(world):
    tok = world.tokenizer
    with pytest.raises(ValueError, match="different prompts"):
        collate_pairs([tok.prompt("review the movie")], [tok.response("the movie was good .")],
                      [tok.prompt("review the book")], [tok.response("the book was bad .")], tok.pad_id)


def test_collate_pairs_layout(world, tiny_rm):
    tok = world.tokenizer
    pairs = encode_pairs(world.preference_dataset(4, seed=1), tok)
    x, y_w, y_l = zip(*pairs)
    b = collate_pairs(x, y_w, x, y_l, tok.pad_id)
    assert b["input_ids"].shape[0] == 8  # chosen rows 0..3, rejected rows 4..7
    for i, (xi, wi, li) in enumerate(pairs):
        assert b["input_ids"][i, :len(xi) + len(wi)].tolist() == xi + wi
        assert b["input_ids"][4 + i, :len(xi) + len(li)].tolist() == xi + li
    with torch.no_grad():
        r_w, r_l = pair_rewards(tiny_rm, pairs, tok.pad_id, "cpu")
        r = tiny_rm(b["input_ids"], b["attention_mask"])
    assert torch.equal(r_w, r[:4]) and torch.equal(r_l, r[4:])


# ----------------------------------------------------------------------------------------------
# End to end on the tiny SFT checkpoint
# ----------------------------------------------------------------------------------------------


def test_reward_model_step_through_the_update_hook_by_hand(world, tiny_model):
    """One ``reward_model_step`` through ``runtime.optim.gradient_update`` (4 pairs in 2 micro-batches), with
    a head that gives every answer the reward 0.5 (weight 0, bias 0.5)."""
    tok = world.tokenizer
    pairs = encode_pairs(world.preference_dataset(4, seed=0), tok)
    rm = RewardModel(tiny_model.config)
    torch.nn.init.zeros_(rm.score_head.weight)
    torch.nn.init.constant_(rm.score_head.bias, 0.5)
    x, y_w, y_l = zip(*pairs)
    b = collate_pairs(x, y_w, x, y_l, tok.pad_id, rm.config.block_size)
    with torch.no_grad():  # the final hidden states at each EOS, (8, C): what the head's weight multiplies
        h = rm.body.hidden(b["input_ids"], b["attention_mask"])[torch.arange(8), last_token_index(b["attention_mask"])]
    h_w, h_l = h[:4], h[4:]
    config = TrainConfig(grad_accum=2, grad_clip=0.0, lr=0.1, warmup_steps=0, steps=1)
    update = gradient_update(rm, rm, make_optimizer(rm, config), config, 0)
    result = reward_model_step(rm, pairs, RewardModelHyperparams(center_rewards_coefficient=0.01), update, tok.pad_id)
    # every gap r_w - r_l is 0: E4 = -log sigma(0) = ln 2 = 0.693147 (the logged loss leaves the centring out);
    # no pair is ordered right (a tie is no win), the margin is 0, both mean rewards are 0.5
    expect(result.loss, 0.693147, abs=1e-6)
    m = result.metrics
    expect([m["accuracy"], m["margin"], m["rewards/chosen"], m["rewards/rejected"]], [0.0, 0.0, 0.5, 0.5], abs=1e-6)
    # the bias's gradient: E4 sees only the gaps, 0; the centring term c (r_w + r_l)^2 with r = b gives
    # c * d(2b)^2/db = 0.01 * 8 * 0.5 = 0.04
    expect(rm.score_head.bias.grad, [0.04], abs=1e-6)
    # the weight's: E4's -(1 - sigma(0)) (h_w - h_l) = -0.5 (h_w - h_l), centring's 0.01 * 2 (r_w + r_l)(h_w + h_l)
    # = 0.02 (h_w + h_l), each the mean over the 4 pairs, whichever micro-batch a pair was in
    want = (-0.5 * (h_w - h_l) + 0.02 * (h_w + h_l)).mean(0)
    assert torch.allclose(rm.score_head.weight.grad[0], want, atol=1e-6)
    # AdamW's first step moves a weight by lr against the sign of its gradient: the bias 0.5 - 0.1 = 0.4
    expect(rm.score_head.bias.detach(), [0.4], abs=1e-6)
