"""Checks generation's ``compile_decode`` option: a ``torch.compile``d decode step through a KV cache
with fixed shapes (``KVCache.fix_shapes``), off by default because its last bits differ."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from minialign.generation import generate
from minialign.model import GPT, GPTConfig, _attend_one

EOS, PAD = 2, 0
PROMPTS = [[1, 3, 4], [1, 5], [1, 6, 7, 8, 9]] * 4  # left padding, rows that stop at EOS and rows that do not


def make():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=10, block_size=32, n_layer=2, n_head=2, n_embd=16))


def test_attend_one_is_sdpa_for_one_query_with_a_bias():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    bias = torch.zeros(3, 1, 1, 7)
    bias[0, ..., 4:] = bias[1, ..., :2] = float("-inf")  # unwritten slots, left pads
    k[0, :, 4:] = v[0, :, 4:] = 0.0                     # what fix_shapes leaves in unwritten slots
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(_attend_one(q, k, v, bias), expected, rtol=0, atol=1e-6)
    # by hand for row 2, head 0: softmax(q k^T / sqrt(8)) v over all 7 keys
    w = torch.softmax(k[2, 0] @ q[2, 0, 0] / math.sqrt(8), 0)
    torch.testing.assert_close(_attend_one(q, k, v, bias)[2, 0, 0], w @ v[2, 0], rtol=0, atol=1e-6)
    # a bias over the first S = 3 slots: the slots past it are not read, whatever they hold
    k[:, :, 3:], v[:, :, 3:] = float("nan"), float("nan")
    expected = F.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3], attn_mask=bias[..., :3])
    torch.testing.assert_close(_attend_one(q, k, v, bias[..., :3]), expected, rtol=0, atol=1e-6)


def test_fixed_shapes_write_one_slot_and_return_every_slot():
    model = make()
    cache = model.new_cache(2, 6)
    with torch.no_grad():  # with gradient the cache concatenates: no fixed shapes
        model.hidden(torch.tensor([[1, 3], [1, 4]]), cache=cache)  # two tokens stored, slots 2.. unwritten
    cache.fix_shapes()
    assert cache.slot.tolist() == [2] and (cache.k[0][:, :, 2:] == 0).all() and (cache.v[1][:, :, 2:] == 0).all()
    before = cache.k[0][:, :, :2].clone()
    k = torch.ones(2, 2, 1, 8)
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (2, 2, 6, 8)                        # all max_len slots, whatever the position
    assert (keys[:, :, 2] == 1).all() and (keys[:, :, 3:] == 0).all() and torch.equal(keys[:, :, :2], before)
    cache.advance(1)
    assert cache.length is None and cache.slot.tolist() == [3]  # with fixed shapes the slot counts
    with pytest.raises(ValueError, match="fixed shapes is read by the compiled decode step only"):
        model.hidden(torch.tensor([[1], [1]]), cache=cache)
    grown = model.new_cache(2, 6)
    model.hidden(torch.tensor([[1, 3]]).expand(2, 2), cache=grown)  # with gradient: buffers of 2 slots
    with pytest.raises(ValueError, match="preallocated buffers"):
        grown.fix_shapes()


@pytest.mark.slow  # torch.compile builds C++ kernels on the CPU
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_samples_what_the_eager_step_samples():
    """Greedy and seeded sampling, with and without top-k / top-p (drawn inside the compiled step):
    the same tokens, log-probs within float rounding; and after an optimizer-like in-place change of the
    weights, the compiled step reads the new weights (RL samples from the policy it trains)."""
    model = make()
    for temperature, filters in ((0.0, {}), (2.0, {}), (1.5, dict(top_k=4, top_p=0.8)), (1.0, {})):
        if temperature == 1.0:  # the weights move in place, as AdamW moves them
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=0.5)
        eager = generate(model, PROMPTS, 12, EOS, PAD, temperature=temperature, **filters,
                         generator=torch.Generator().manual_seed(0))
        compiled = generate(model, PROMPTS, 12, EOS, PAD, temperature=temperature, **filters,
                            generator=torch.Generator().manual_seed(0), compile_decode=True)
        if temperature:
            assert eager.finished.any() and (~eager.finished).any()  # rows that stopped, rows that ran on
        assert torch.equal(compiled.sequences, eager.sequences)
        assert torch.equal(compiled.response_mask, eager.response_mask)
        torch.testing.assert_close(compiled.logps, eager.logps, rtol=0, atol=1e-5)
        assert not compiled.logps.is_inference()


@pytest.mark.slow  # torch.compile builds C++ kernels on the CPU
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_stops_where_the_eager_loop_stops_and_leaves_the_generator_there():
    """Every row ends at step 13, inside the second call of DECODE_CHUNK = 8 steps, which drew the
    noise of 8 steps up front: the same tokens, and the generator (the caller's, or torch's own)
    left where the eager loop leaves it, so the next call samples the same."""
    model = make()
    prompts = PROMPTS[:3]
    generators = [torch.Generator().manual_seed(1) for _ in range(2)]
    eager = generate(model, prompts, 27, EOS, PAD, generator=generators[0])
    compiled = generate(model, prompts, 27, EOS, PAD, generator=generators[1], compile_decode=True)
    assert eager.finished.all() and eager.response_ids.shape[1] == 14
    for field in ("sequences", "attention_mask", "response_mask", "finished"):
        assert torch.equal(getattr(compiled, field), getattr(eager, field)), field
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    states = []
    for compile_decode in (False, True):  # no generator: torch's default one
        torch.manual_seed(1)
        generate(model, prompts, 27, EOS, PAD, compile_decode=compile_decode)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


def test_compiled_decode_needs_the_cache_and_a_minialign_gpt():
    with pytest.raises(ValueError, match="compile_decode needs the KV cache"):
        generate(make(), PROMPTS, 4, EOS, PAD, use_cache=False, compile_decode=True)
