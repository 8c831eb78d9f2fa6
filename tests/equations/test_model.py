"""Checks minialign/model.py: causality, padding, the KV cache, checkpoints and bad input."""

import pytest
import torch

from minialign.model import GPT, GPTConfig, load_checkpoint


def make(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = make()
    x = torch.randint(0, 20, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 7) % 20  # change tokens 6..9
    a, b = model(x), model(y)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_tied_head_and_shapes():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    x = torch.randint(0, 20, (3, 7))
    assert model(x).shape == (3, 7, 20) and model.hidden(x).shape == (3, 7, 16)


def test_left_padding_changes_nothing():
    """A left-padded row gives the same logits on its real tokens as the unpadded sequence."""
    model = make()
    seq = torch.tensor([[1, 4, 5, 6, 7]])
    padded = torch.tensor([[0, 0, 0, 1, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    assert torch.allclose(model(padded, mask)[:, 3:], model(seq), atol=1e-5)
    assert torch.isfinite(model(padded, mask)).all()  # pad queries see only themselves: no NaN


def test_right_padding_changes_nothing():
    model = make()
    x = torch.randint(1, 20, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    fast = model(x, right)  # right-padded: takes the is_causal kernel
    for i in range(2):  # each row's real tokens equal the row run alone

        n = int(right[i].sum())
        assert torch.allclose(fast[i, :n], model(x[i:i + 1, :n])[0], atol=1e-5)


def test_kv_cache_matches_full_forward():
    """Prefill a left-padded prompt, then feed tokens one at a time: logits equal a full pass to 1e-5."""
    model = make()
    ids = torch.tensor([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new = torch.tensor([[11, 12, 13], [14, 15, 16]])
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    full = model(full_ids, full_mask)
    cache = model.new_cache(2, 8)
    step_logits = [model(ids, mask, cache)[:, -1]]
    for t in range(3):
        step_logits.append(model(new[:, t:t + 1], full_mask[:, :6 + t], cache)[:, -1])
    assert cache.length == 8
    cached = torch.stack(step_logits, 1)  # predictions after positions 4, 5, 6, 7
    assert torch.allclose(cached, full[:, 4:8], atol=1e-5)


def test_context_overflow_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.new_cache(1, 17)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))


def test_save_load_roundtrip(tmp_path):
    model = make()
    model.save(tmp_path / "m.pt", note="hello")
    again = GPT.load(tmp_path / "m.pt")
    x = torch.randint(0, 20, (1, 5))
    assert torch.equal(again(x), model(x))
    assert load_checkpoint(tmp_path / "m.pt")["note"] == "hello"


def test_checkpoint_of_another_config_is_a_clear_error(tmp_path):
    make().save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="n_embd: saved 16, asked 32"):
        GPT.load(tmp_path / "m.pt", config=GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
    other = make(n_embd=32)
    with pytest.raises(ValueError, match="shape"):
        other.load_weights(make().state_dict())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        GPT.load(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a minialign checkpoint"):
        GPT.load(tmp_path / "bad.pt")


def test_dtype_and_bf16_autocast():
    model = make()
    x = torch.randint(0, 20, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    m64 = make().double()
    assert m64(x).dtype == torch.float64
