"""Checks minialign/generation.py: sampling, EOS and masks, log-probs, the KV cache, top-k/top-p."""

import pytest
import torch

from minialign.generation import cat_generations, filter_logits, generate
from minialign.model import GPT, GPTConfig
from minialign.ops import model_token_logps, response_logps

EOS, PAD = 2, 0


def make():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=10, block_size=32, n_layer=1, n_head=2, n_embd=16))


PROMPTS = [[1, 3, 4], [1, 5], [1, 6, 7, 8, 9]]


def test_greedy_is_deterministic():
    model = make()
    a = generate(model, PROMPTS, 8, EOS, PAD, temperature=0)
    b = generate(model, PROMPTS, 8, EOS, PAD, temperature=0)
    assert torch.equal(a.sequences, b.sequences)


def test_seeded_sampling_reproduces():
    model = make()
    run = lambda: generate(model, PROMPTS * 4, 10, EOS, PAD, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(run().sequences, run().sequences)


def test_eos_stops_and_everything_after_is_masked():
    model = make()
    rollout = generate(model, PROMPTS * 20, 20, EOS, PAD, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert rollout.finished.any() and (~rollout.finished).any()  # both kinds occur with 10 tokens, T=2
    for ids, m, done in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(), rollout.finished.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)          # mask: ones, then zeros
        assert ids[n:] == [PAD] * (len(ids) - n)           # pads after the response
        if done:
            assert ids[n - 1] == EOS and EOS not in ids[:n - 1]  # EOS is the last response token
        else:
            assert EOS not in ids[:n] and n == 20
    assert (rollout.logps[rollout.response_mask == 0] == 0).all()
    # responses() drops the EOS of finished rows
    r = rollout.responses()
    assert all(len(x) == int(m.sum()) - int(d) for x, m, d in zip(r, rollout.response_mask, rollout.finished))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_returned_logps_equal_model_logps_at_sampling_temperature(temperature):
    model = make()
    rollout = generate(model, PROMPTS * 3, 12, EOS, PAD, temperature=temperature, generator=torch.Generator().manual_seed(1))
    full = model_token_logps(model, rollout.sequences, rollout.attention_mask, temperature)  # (B, P+T-1)
    mask = rollout.full_response_mask[:, 1:].bool()
    assert torch.allclose(full[mask], rollout.logps[rollout.response_mask.bool()], atol=1e-5)
    # ops.response_logps is the same slice, aligned with response_mask
    resp = response_logps(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len, temperature)  # (B, T)
    assert resp.shape == rollout.response_mask.shape
    assert torch.allclose(resp[rollout.response_mask.bool()], rollout.logps[rollout.response_mask.bool()], atol=1e-5)


def test_cache_and_no_cache_sample_the_same_tokens():
    model = make()
    a = generate(model, PROMPTS, 12, EOS, PAD, use_cache=True, generator=torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS, 12, EOS, PAD, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.logps, b.logps, atol=1e-5)


def test_prompt_longer_than_context_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [[1] * 30], 5, EOS, PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0, EOS, PAD)


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # top-k = 1 keeps only the most likely token
    assert torch.isinf(filter_logits(logits, top_k=1)).tolist() == [[False, True, True]]
    # top-p = 0.6: keep 0.5 (mass before it 0 < 0.6), keep 0.3 (0.5 < 0.6), drop 0.2 (0.8 >= 0.6)
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True]]
    # top-k = 1 sampling is greedy decoding
    model = make()
    a = generate(model, PROMPTS, 6, EOS, PAD, top_k=1, generator=torch.Generator().manual_seed(0))
    b = generate(model, PROMPTS, 6, EOS, PAD, temperature=0)
    assert torch.equal(a.sequences, b.sequences)


def test_cat_generations_pads_both_sides_and_keeps_every_log_prob():
    """Two draws with other prompt and response widths, joined (DAPO's dynamic sampling): the prompts are
    left-padded, the responses right-padded to the widest, and every response token keeps its log-prob."""
    model = make()
    a = generate(model, [[1, 5]] * 2, 2, EOS, PAD, generator=torch.Generator().manual_seed(0))          # P = 2
    b = generate(model, [[1, 6, 7, 8, 9]] * 2, 8, EOS, PAD, generator=torch.Generator().manual_seed(1))  # P = 5
    both = cat_generations([a, b], PAD)
    P, T = 5, max(a.response_ids.shape[1], b.response_ids.shape[1])
    assert T - a.response_ids.shape[1] not in (0, 3)  # a's rows grow by 3 on the left and by another width on the right
    assert both.prompt_len == P and both.sequences.shape == (4, P + T) and both.response_mask.shape == (4, T)
    assert both.sequences[:2, :3].eq(PAD).all() and both.attention_mask[:2, :3].eq(0).all()  # 3 more pads on the left
    assert torch.equal(both.sequences[:2, 3:P + a.response_ids.shape[1]], a.sequences)
    assert torch.equal(both.finished, torch.cat([a.finished, b.finished]))
    for part, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
        t = part.response_ids.shape[1]
        assert torch.equal(both.response_mask[rows, :t], part.response_mask) and both.response_mask[rows, t:].eq(0).all()
    # positions count real tokens only: the model gives the joined rows the log-probs it sampled them with
    resp = response_logps(model, both.sequences, both.attention_mask, P)
    mask = both.response_mask.bool()
    assert torch.allclose(resp[mask], both.logps[mask], atol=1e-5)
    # select keeps the rows asked for
    assert torch.equal(both.select(torch.tensor([False, True, True, False])).sequences, both.sequences[1:3])


def reference_generate(model, prompts, max_new_tokens, temperature, generator):
    """The plain loop ``generate`` must equal bit for bit: ``torch.multinomial``, ``ops.token_logps``,
    the mask concatenated each step and ``GPT.hidden`` building positions and mask from it."""
    from minialign.data import left_pad
    from minialign.ops import prefill, token_logps
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        h, cache = prefill(model.eval(), ids, mask, ids.shape[1] + max_new_tokens)
        logits, alive, logps = model.lm_head(h), torch.ones(len(prompts), dtype=torch.bool), []
        for step in range(max_new_tokens):
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            logps.append(torch.where(alive, token_logps(logits[:, None], token[:, None], temperature)[:, 0], 0.0))
            token = torch.where(alive, token, PAD)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, alive.long()[:, None]], 1)
            alive = alive & (token != EOS)
            logits = model(token[:, None], attention_mask=mask, cache=cache)[:, -1]
    return ids, mask, torch.stack(logps, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_equals_the_plain_loop_bit_for_bit(temperature):
    """``GPT.decode`` with the positions and additive mask ``generate`` keeps, and the exponential race
    in place of ``torch.multinomial``, change no bit: seeded runs depend on it."""
    model = make()
    prompts = PROMPTS * 4
    rollout = generate(model, prompts, 12, EOS, PAD, temperature=temperature, generator=torch.Generator().manual_seed(2))
    assert rollout.finished.any() and (rollout.response_mask.sum(1) > 3).any()  # left pads, EOS, long rows
    ids, mask, logps = reference_generate(model, prompts, 12, temperature, torch.Generator().manual_seed(2))
    T = rollout.response_ids.shape[1]
    assert torch.equal(rollout.sequences, ids[:, :rollout.prompt_len + T])
    assert torch.equal(rollout.attention_mask, mask[:, :rollout.prompt_len + T])
    assert torch.equal(rollout.logps, logps[:, :T])
    assert not rollout.logps.is_inference() and not rollout.sequences.is_inference()  # usable by autograd
