"""The model interface and the Hugging Face adapter (minialign/real/hf.py).

A tiny random ``GPT2LMHeadModel`` on the toy world's vocabulary, saved to a temporary folder
and loaded back through ``HFCausalLM`` / ``HFTokenizer`` (no network), runs one DPO step and one
GRPO step through the same functions the toy GPT uses. Every loss is compared with E9 / E13
computed here, by hand, from log-probs read straight off the Hugging Face model's own forward.
Skips where transformers is not installed (``pip install -e '.[hf]'``).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from minialign.dpo import chosen_rejected_logps, dpo_loss, preference_batch, tokenize_pairs  # noqa: E402
from minialign.generation import generate  # noqa: E402
from minialign.grpo import group_advantages, grpo_iteration, grpo_loss, response_logps  # noqa: E402
from minialign.stages.grpo import GRPOConfig  # noqa: E402
from minialign.runtime.optim import gradient_update  # noqa: E402
from minialign.real.hf import (CausalLM, HFCausalLM, HFTokenizer, check_tokenizer_fits, hf_tokenizer_from_toy,  # noqa: E402
                          load_hf)
from minialign.model import GPT, GPTConfig  # noqa: E402
from minialign.ops import model_token_logps  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(world, tmp_path_factory):
    """A tiny random GPT-2 and the toy tokenizer in Hugging Face form, saved to a local folder."""
    tok = world.tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger weights than GPT-2's init, so log-probs differ from uniform
        model.transformer.wte.weight.normal_(0, 0.15)
    folder = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(str(folder))
    hf_tokenizer_from_toy(tok).save_pretrained(str(folder))
    return folder


@pytest.fixture
def hf_model(hf_folder):
    model, tok = load_hf(hf_folder)
    return model, tok


def _own_sequence_logps(model: HFCausalLM, ids, mask, response_mask):
    """log pi(y|x) (E1) straight from the Hugging Face forward, in float64, no minialign code."""
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return (logp * response_mask[:, 1:]).sum(1)


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------


def test_both_models_have_the_interface(hf_model):
    model, _ = hf_model
    assert isinstance(model, CausalLM)
    assert isinstance(GPT(GPTConfig()), CausalLM)
    assert (model.config.block_size, model.config.vocab_size, model.config.n_embd) == (48, 53, 32)


def test_logits_match_transformers_with_left_padding(hf_model):
    model, _ = hf_model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 53, (2, 10), generator=generator)
    with torch.no_grad():
        plain = model(ids)                                   # (B, T, V)
        assert (plain - model.model(ids).logits).abs().max() < 1e-5
        # the same row after 3 pads: positions from the mask, so the real tokens' logits are unchanged
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        assert (model(padded, mask)[:, 3:] - plain).abs().max() < 1e-5
        # PPO reads lm_head(hidden): the same logits
        assert (model.lm_head(model.hidden(ids)) - plain).abs().max() < 1e-6


def test_generation_through_the_adapter_and_its_cache(hf_model, world):
    model, tok = hf_model
    prompts = [tok.prompt(q["prompt"]) for q in world.arithmetic_questions("train")[:3]]
    prompts.append(tok.prompt(world.review_prompts()[0]))  # a longer prompt: the others are left-padded
    runs = [generate(model, prompts, 6, tok.eos_id, tok.pad_id, use_cache=c,
                     generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    rollout = runs[0]
    # the sampler's log-probs (cached, one token at a time) == a full forward over the sequences
    recomputed = model_token_logps(model, rollout.sequences, rollout.attention_mask)[:, rollout.prompt_len - 1:]
    m = rollout.response_mask.bool()
    assert (recomputed - rollout.logps)[m].abs().max() < 1e-4


def test_adapter_errors_are_clear(hf_model, hf_folder, tmp_path):
    model, tok = hf_model
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.new_cache(1, 49)
    with pytest.raises(FileNotFoundError, match="loads Hugging Face models from disk only"):
        HFCausalLM.from_pretrained(tmp_path / "gpt2")  # a hub name, not a folder: never downloaded
    small = copy.copy(model)
    small.config = type(model.config)(block_size=48, vocab_size=10, n_embd=32)
    with pytest.raises(ValueError, match="do not belong together"):
        check_tokenizer_fits(small, tok)


# ----------------------------------------------------------------------------------------------
# the tokenizer adapter
# ----------------------------------------------------------------------------------------------


def test_tokenizer_adapter_matches_the_toy_tokenizer(hf_model, world):
    _, tok = hf_model
    toy = world.tokenizer
    q = world.arithmetic_questions("train")[7]
    review = world.review_prompts()[0]
    assert tok.use_chat_template  # the converted tokenizer carries the toy chat template
    assert tok.prompt(q["prompt"]) == toy.prompt(q["prompt"])   # <bos> <user> what is ... ? <assistant>
    assert tok.prompt(review) == toy.prompt(review)
    assert tok.response(q["answer"]) == toy.response(q["answer"])  # ends with <eos>
    assert tok.response(q["answer"])[-1] == tok.eos_id == toy.eos_id
    assert (tok.pad_id, tok.bos_id) == (toy.pad_id, toy.bos_id)
    text = "the movie was very good ."
    assert tok.decode(toy.response(text)) == text  # special tokens dropped
    assert tok.decode(toy.encode("12 + 3 = 15")) == "12 + 3 = 15" == toy.decode(toy.encode("12 + 3 = 15"))


def test_toy_hf_tokenizer_decodes_empty_answers(world):
    """An answer that is only <eos> decodes to "" (the tokenizers library's Strip decoder panicked)."""
    hf = hf_tokenizer_from_toy(world.tokenizer)
    assert hf.decode([]) == ""
    assert hf.decode([world.tokenizer.eos_id], skip_special_tokens=True) == ""
    ids = world.tokenizer.encode("what is 9 + 9 ?") + world.tokenizer.encode("18")
    assert hf.decode(ids) == world.tokenizer.decode(ids) == "what is 9 + 9 ? 18"


def test_tokenizer_without_pad_pads_with_eos(world):
    """GPT-2's tokenizer has no pad token: pad_id falls back to EOS (padding is found by masks)."""
    hf = hf_tokenizer_from_toy(world.tokenizer)
    hf.pad_token = None
    hf.chat_template = None
    tok = HFTokenizer(hf)
    assert tok.pad_id == tok.eos_id == world.tokenizer.eos_id
    assert not tok.use_chat_template
    assert tok.prompt("review the movie") == [tok.bos_id] + tok.encode("review the movie")


# ----------------------------------------------------------------------------------------------
# one DPO step and one GRPO step on the Hugging Face model
# ----------------------------------------------------------------------------------------------


def test_one_dpo_step_on_a_transformers_model(hf_model, world):
    policy, tok = hf_model
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pairs = tokenize_pairs(tok, world.preference_dataset(4, seed=0))
    batch = preference_batch(pairs["prompt"], pairs["chosen"], pairs["rejected"], tok.pad_id,
                             policy.config.block_size)
    B, beta = 4, 0.1
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)

    def losses():
        pi_w, pi_l = chosen_rejected_logps(policy, batch)               # (B,) each, via the adapter
        with torch.no_grad():
            ref_w, ref_l = chosen_rejected_logps(reference, batch)
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)       # E9, E10
        # the same loss by hand from the Hugging Face model's own log-probs (float64)
        with torch.no_grad():
            own = _own_sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
            own_ref = _own_sequence_logps(reference, batch["input_ids"], batch["attention_mask"],
                                          batch["response_mask"])
        margin = beta * ((own[:B] - own_ref[:B]) - (own[B:] - own_ref[B:]))  # r_w - r_l
        by_hand = -F.logsigmoid(margin).mean()
        return loss, by_hand

    loss, by_hand = losses()
    # policy == reference: r_w = r_l = 0, loss = -log sigma(0) = log 2 = 0.6931
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    loss, by_hand = losses()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert loss.item() < math.log(2)  # the step moved the margin r_w - r_l up


def test_one_grpo_step_on_a_transformers_model(hf_model, world):
    model, tok = hf_model
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    G, clip_eps, beta = 4, 0.2, 0.04
    questions = world.arithmetic_questions("train")[:2]
    prompts = [tok.prompt(q["prompt"]) for q in questions for _ in range(G)]
    rollout = generate(model, prompts, 4, tok.eos_id, tok.pad_id, generator=torch.Generator().manual_seed(0))
    mask = rollout.response_mask                                                      # (B, T)
    # rewards 1, 0, 1, 0 in each group: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.5774,
    # advantage +-0.5 / 0.5774 = +-0.8660 (E11, E12)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * 2)
    A = group_advantages(rewards, G)
    assert A[:2].tolist() == pytest.approx([0.8660, -0.8660], abs=1e-3)
    with torch.no_grad():
        old_logps = response_logps(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 1.0)
        ref_logps = response_logps(ref_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def losses():
        logps = response_logps(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, 1.0)  # (B, T)
        loss, stats = grpo_loss(logps, old_logps, ref_logps, A, mask, clip_eps, beta, "loss", "answer_mean")
        # E13 by hand from the Hugging Face model's own per-token log-probs (float64)
        with torch.no_grad():
            pos = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
            logits = model.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                                 position_ids=pos).logits.double()
            own = F.log_softmax(logits[:, rollout.prompt_len - 1:-1], -1).gather(
                -1, rollout.response_ids[..., None])[..., 0]                          # (B, T)
            rho = torch.exp(own - old_logps.double())
            surrogate = torch.minimum(rho * A[:, None], rho.clamp(1 - clip_eps, 1 + clip_eps) * A[:, None])
            log_r = ref_logps.double() - own
            k3 = torch.exp(log_r) - log_r - 1
            per_token = (surrogate - beta * k3) * mask
            by_hand = -(per_token.sum(1) / mask.sum(1)).mean()  # 1/|y_i| sum_t, then 1/G sum_i
        return loss, stats, by_hand

    loss, stats, by_hand = losses()
    # pi = pi_old = pi_ref: rho = 1, k3 = 0, loss = -mean(A) = 0 (advantages sum to 0 per group)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    loss, stats, by_hand = losses()
    assert torch.isfinite(loss) and stats["kl"] > 0  # the policy moved away from pi_ref
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_grpo_iteration_runs_unchanged_on_a_transformers_model(hf_model, world):
    """``grpo.grpo_iteration`` itself (sample, score with r*, E11-E13, update) on the adapter."""
    policy, tok = hf_model
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    config = GRPOConfig(group_size=4, questions=2, batch_size=8, inner_updates=1, max_new_tokens=4,
                        lr=1e-3, progress=False, device="cpu")
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.lr)
    before = [p.detach().clone() for p in policy.parameters()]

    class FirstWordReward:
        """A random model never answers right (r* = 0 everywhere, advantage 0, no gradient):
        reward 1 when the answer's first word sorts before "m", so the groups have a spread."""
        def true_reward(self, prompt, text, finished=True):
            return float(bool(text) and text.split()[0] < "m")

    stats = grpo_iteration(policy, reference, tok, FirstWordReward(), world.arithmetic_questions("train")[:2],
                           config, torch.Generator().manual_seed(0),
                           gradient_update(policy, policy, optimizer, config, 0)).metrics
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert stats["zero_spread"] < 1  # some group had different rewards, so a gradient
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("options", [
    dict(advantage="rloo", loss="reinforce", kl_in="reward", kl_estimator="k1"),
    dict(advantage="reinforce_pp", loss="ppo_clip", kl_in="reward"),
    dict(loss="gspo", beta=0.0, dynamic_sampling=True, overlong="penalty", overlong_cache=2)],
    ids=["rloo", "reinforce_pp", "gspo_dynamic"])
def test_family_members_in_grpo_iteration_on_a_transformers_model(hf_model, world, options):
    """The family's members (policy_gradient.py) through the same step on the adapter: RLOO, REINFORCE++,
    GSPO with dynamic sampling (its draws joined by generation.cat_generations) and the length penalty."""
    policy, tok = hf_model
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    config = GRPOConfig(group_size=4, questions=2, batch_size=8, inner_updates=1, max_new_tokens=4,
                        lr=1e-3, progress=False, device="cpu", **options)
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.lr)
    before = [p.detach().clone() for p in policy.parameters()]

    class FirstWordReward:  # as in test_grpo_iteration_runs_unchanged_on_a_transformers_model
        def true_reward(self, prompt, text, finished=True):
            return float(bool(text) and text.split()[0] < "m")

    questions = world.arithmetic_questions("train")
    result = grpo_iteration(policy, reference, tok, FirstWordReward(), questions[:2], config,
                            torch.Generator().manual_seed(0), gradient_update(policy, policy, optimizer, config, 0),
                            member=config, draw=lambda n: questions[2:2 + n])
    stats = result.metrics
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["tokens"] >= 8
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    if config.dynamic_sampling:  # only groups with a signal were trained on
        assert stats["questions_drawn"] >= 2 and result.rewards.view(-1, 4).std(1).min() > 0
