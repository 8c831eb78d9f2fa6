"""GPT-2 weights in minialign's own GPT: load a Hugging Face GPT-2 checkpoint folder.

minialign's ``model.GPT`` *is* the GPT-2 architecture (learned positions, pre-norm blocks,
tanh-GELU MLP of width 4C, LayerNorm eps 1e-5, output head tied to the token embedding), so the
released GPT-2 weights run in it unchanged, and every algorithm of minialign can start from them.
Only the names and one layout differ:

    Hugging Face (GPT2LMHeadModel)         minialign (GPT)
    transformer.wte.weight      (V, C)     wte.weight
    transformer.wpe.weight      (N, C)     wpe.weight
    transformer.h.{i}.ln_1.*               blocks.{i}.ln_1.*
    transformer.h.{i}.attn.c_attn.weight   blocks.{i}.attn.c_attn.weight   transposed: (C, 3C) -> (3C, C)
    transformer.h.{i}.attn.c_proj.weight   blocks.{i}.attn.c_proj.weight   transposed
    transformer.h.{i}.mlp.c_fc.weight      blocks.{i}.mlp.c_fc.weight      transposed: (C, 4C) -> (4C, C)
    transformer.h.{i}.mlp.c_proj.weight    blocks.{i}.mlp.c_proj.weight    transposed
    transformer.ln_f.*                     ln_f.*
    lm_head.weight (if saved)              tied to wte.weight (must be equal)

The transposes: GPT-2 was written with a ``Conv1D`` module that stores its matrix as (in, out),
where ``nn.Linear`` stores (out, in). The released checkpoint has no ``transformer.`` prefix and
carries ``attn.bias`` / ``attn.masked_bias`` buffers (the causal mask as a tensor); both are
handled. A folder is ``config.json`` plus ``model.safetensors`` (or a sharded
``model.safetensors.index.json``; ``pytorch_model.bin`` as a fallback, read with
``weights_only=True``).

The safetensors format is simple enough to read without the ``safetensors`` package: 8 bytes,
the little-endian length n of a JSON header; n bytes of JSON mapping each tensor name to its
``dtype``, ``shape`` and ``data_offsets`` [begin, end) in the byte buffer that follows; then the
raw little-endian tensor bytes. ``read_safetensors`` does exactly that.

Usage::

    from minialign.real.gpt2 import load_gpt2
    model = load_gpt2("path/to/gpt2")          # a folder saved by save_pretrained, no network
    # the tokenizer: minialign.real.hf.HFTokenizer.from_pretrained("path/to/gpt2") (needs the hf extra)
    save_gpt2(model, "out/folder")             # the inverse: a folder transformers can load
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from ..model import GPT, GPTConfig

# safetensors dtype codes -> torch dtypes (the ones a language model checkpoint holds)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# weights GPT-2 keeps in Conv1D layout (in, out); nn.Linear wants (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers of the original checkpoint that are not weights (the causal mask, a constant -1e4)
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on the CPU, in their stored dtype."""
    path = Path(path)
    data = bytearray(path.stat().st_size)  # writable, so tensors can view it without a warning
    with path.open("rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])  # little-endian unsigned 64-bit header length
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    buffer = memoryview(data)[8 + n:]  # the tensors' bytes; offsets are relative to here
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"])
        begin, end = info["data_offsets"]
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= len(buffer)) or end - begin != expected:
            raise ValueError(f"{path}: tensor {name} ({info['dtype']} {shape}) has byte range "
                             f"[{begin}, {end}), expected {expected} bytes inside {len(buffer)}")
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer shares memory with `data`; clone so the tensor owns its bytes
        flat = torch.frombuffer(buffer[begin:end], dtype=dtype)
        tensors[name] = flat.reshape(shape).clone()
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """Write ``tensors`` as a ``.safetensors`` file (the inverse of ``read_safetensors``)."""
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the tensor bytes start 8-aligned, as safetensors does
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for raw in chunks:
            f.write(raw)


def read_checkpoint(folder) -> dict[str, torch.Tensor]:
    """The state dict stored in a Hugging Face model folder (safetensors, sharded or single)."""
    folder = Path(folder)
    single, index, bin_ = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                           folder / "pytorch_model.bin")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin")


def gpt2_config(hf_config: dict, source: str = "config.json") -> GPTConfig:
    """A ``GPTConfig`` from a GPT-2 ``config.json``; refuses variants minialign's GPT cannot run."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf_config.get('model_type')!r}, not 'gpt2'; "
                         f"use minialign.real.hf.HFCausalLM for other architectures")
    n_embd = hf_config["n_embd"]
    # each entry: (what the GPT hard-codes, what the config says)
    needs = {
        "n_inner": (None, hf_config.get("n_inner")),  # None means 4 * n_embd
        "activation_function": ("gelu_new", hf_config.get("activation_function", "gelu_new")),
        "layer_norm_epsilon": (1e-5, hf_config.get("layer_norm_epsilon", 1e-5)),
        "scale_attn_weights": (True, hf_config.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, hf_config.get("scale_attn_by_inverse_layer_idx", False)),
        "tie_word_embeddings": (True, hf_config.get("tie_word_embeddings", True)),
    }
    if needs["n_inner"][1] == 4 * n_embd:
        needs["n_inner"] = (None, None)
    if needs["activation_function"][1] == "gelu_pytorch_tanh":  # the same function, another name
        needs["activation_function"] = ("gelu_new", "gelu_new")
    bad = {k: v for k, (want, v) in needs.items() if v != want}
    if bad:
        raise ValueError(f"{source}: minialign's GPT cannot run this GPT-2 variant: "
                         + ", ".join(f"{k}={v!r} (needs {needs[k][0]!r})" for k, v in bad.items()))
    return GPTConfig(vocab_size=hf_config["vocab_size"],
                     block_size=hf_config.get("n_positions", hf_config.get("n_ctx")),
                     n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=n_embd,
                     dropout=0.0)  # alignment wants deterministic log-probs (model.GPTConfig)


def expected_gpt2_shapes(config: GPTConfig) -> dict[str, tuple]:
    """The shape of every GPT-2 tensor (Hugging Face names, Conv1D layout) for ``config``."""
    C, V, N = config.n_embd, config.vocab_size, config.block_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (N, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    return shapes


def convert_gpt2_state(hf_state: dict[str, torch.Tensor], config: GPTConfig,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename and transpose a GPT-2 state dict into ``model.GPT``'s names and layout.

    Every tensor's shape is checked against ``config`` first, so a checkpoint that does not fit
    its own config.json (or a truncated / foreign file) is a ``ValueError`` naming the tensors.
    """
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if IGNORED.match(key):
            continue
        state[key] = tensor
    lm_head = state.pop("lm_head.weight", None)

    expected = expected_gpt2_shapes(config)
    problems = [f"missing {k} {v}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
    if lm_head is not None and lm_head.shape != state.get("wte.weight", lm_head).shape:
        problems.append(f"lm_head.weight: shape {tuple(lm_head.shape)} != wte.weight's")
    if problems:
        raise ValueError(f"{source} does not match a GPT-2 of n_layer={config.n_layer}, "
                         f"n_head={config.n_head}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
                         f"n_positions={config.block_size}: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    if lm_head is not None and not torch.equal(lm_head, state["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but minialign's GPT "
                         f"ties them (the output head is the token embedding)")

    out = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D):
            tensor = tensor.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        out[re.sub(r"^h\.(\d+)\.", r"blocks.\1.", key)] = tensor.contiguous()
    out["lm_head.weight"] = out["wte.weight"]  # tied; state_dict lists it under both names
    return out


def load_gpt2(folder, device="cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """A ``model.GPT`` holding the GPT-2 checkpoint in ``folder`` (config.json + weights).

    Reads local files only. ``dtype`` is the parameters' dtype (float32 by default: train in
    bf16 with autocast, which keeps float32 master weights).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a GPT-2 checkpoint folder "
                                f"with config.json and model.safetensors)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = gpt2_config(json.loads(config_path.read_text()), str(config_path))
    state = convert_gpt2_state(read_checkpoint(folder), config, str(folder))
    model = GPT(config)
    model.load_weights({k: v.to(torch.float32) for k, v in state.items()}, source=str(folder))
    return model.to(device=device, dtype=dtype).eval()


def save_gpt2(model: GPT, folder, **config_extra) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json + model.safetensors).

    The inverse of ``load_gpt2``: ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` then
    computes the same logits, so a model trained here can be run and shared with Hugging Face
    tools. ``config_extra`` goes into config.json (e.g. ``eos_token_id=2``).
    """
    c = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; GPT-2 folders do not store it
        if key.endswith(CONV1D):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state["transformer." + re.sub(r"^blocks\.(\d+)\.", r"h.\1.", key)] = tensor.float().contiguous()
    write_safetensors(state, folder / "model.safetensors")
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                 "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                 "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "initializer_range": 0.02,
                 "bos_token_id": None, "eos_token_id": None, **config_extra}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return folder
