"""GPT-2 checkpoints in minialign's GPT (minialign/real/gpt2.py).

The safetensors reader/writer and the round trip run everywhere; the comparisons with
``transformers.GPT2LMHeadModel`` skip where the ``hf`` extra is not installed.
"""

import json
import struct

import pytest
import torch

from minialign.generation import generate
from minialign.model import GPT, GPTConfig
from minialign.real.gpt2 import load_gpt2, read_safetensors, save_gpt2, write_safetensors

TINY = dict(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=16)


def _scramble(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every tensor (biases and LayerNorms too), so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _left_padded_batch(vocab: int):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0: 4 pads, then 8 real tokens
    mask[1, :1] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------
# safetensors without the safetensors package
# ----------------------------------------------------------------------------------------------


def test_safetensors_round_trip_by_hand(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
               "c": torch.tensor([7, 8, 9], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    write_safetensors(tensors, path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]           # 8-byte little-endian header length
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}  # 6 floats x 4 bytes
    assert header["b"]["data_offsets"] == [24, 28]                                   # 2 bf16 x 2 bytes
    assert (8 + n) % 8 == 0                                                          # data starts aligned
    back = read_safetensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


def test_safetensors_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors({"w": torch.ones(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:-8])  # lose the last two floats
    with pytest.raises(ValueError, match="tensor w .* byte range"):
        read_safetensors(path)
    path.write_bytes(b"\x03\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(path)


def test_matches_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"x": torch.randn(3, 5), "y": torch.randn(4).half(), "z": torch.arange(3)}
    st.save_file(tensors, str(tmp_path / "a.safetensors"))
    back = read_safetensors(tmp_path / "a.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    write_safetensors(tensors, tmp_path / "b.safetensors")
    theirs = st.load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(theirs[k], tensors[k]) for k in tensors)


# ----------------------------------------------------------------------------------------------
# minialign GPT <-> GPT-2 folder
# ----------------------------------------------------------------------------------------------


def test_save_then_load_is_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    _scramble(model)
    save_gpt2(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    loaded = load_gpt2(tmp_path)
    assert loaded.config == model.config
    ids, mask = _left_padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_wrong_checkpoint_shape_is_a_clear_error(tmp_path):
    model = GPT(GPTConfig(**TINY))
    save_gpt2(model, tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_positions"] = 32  # the file's wpe has 24 rows
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wpe.weight: shape \(24, 16\) != \(32, 16\)"):
        load_gpt2(tmp_path)
    cfg["n_positions"], cfg["n_layer"] = 24, 3  # the file has two layers
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing h.2.ln_1.weight"):
        load_gpt2(tmp_path)
    cfg["n_layer"], cfg["activation_function"] = 2, "relu"  # not the GPT's tanh-GELU
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        load_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_gpt2(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# against transformers' own GPT-2 (skips without the hf extra)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random ``GPT2LMHeadModel`` saved to a temporary folder (save_pretrained)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=TINY["vocab_size"], n_positions=TINY["block_size"],
                                     n_embd=TINY["n_embd"], n_layer=TINY["n_layer"], n_head=TINY["n_head"],
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    _scramble(model.transformer)
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(str(folder))
    return model, folder


def test_gpt2_logits_match_transformers(hf_gpt2):
    hf, folder = hf_gpt2
    model = load_gpt2(folder)
    ids, mask = _left_padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        ours = model(ids)                                  # (B, T, V), no padding
        theirs = hf(ids).logits
        assert (ours - theirs).abs().max() < 1e-4
        # left padding: Hugging Face needs the positions passed; minialign counts real tokens itself
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ours = model(ids, mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (ours - theirs)[real].abs().max() < 1e-4


def test_gpt2_generates_with_the_kv_cache(hf_gpt2):
    """The loaded weights run through minialign's sampler; cache and no-cache agree."""
    _, folder = hf_gpt2
    model = load_gpt2(folder)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    runs = [generate(model, prompts, 8, eos_id=0, pad_id=0, use_cache=c,
                     generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert (runs[0].logps - runs[1].logps).abs().max() < 1e-4


def test_saved_minialign_gpt_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    _scramble(model)
    save_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids, _ = _left_padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
