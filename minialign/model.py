"""A tiny GPT, written from scratch: the policy pi_theta of every stage.

E1, the autoregressive policy: pi_theta(y | x) = prod_t pi_theta(y_t | x, y_<t). The model below
gives, for every position t, the logits of pi_theta(. | tokens_<=t); ``ops.token_logps`` turns
them into log pi_theta(y_t | ...), and a masked sum of those is log pi_theta(y | x).

Architecture (as GPT-2): token + learned position embeddings, ``n_layer`` pre-norm blocks of
causal self-attention and an MLP, a final LayerNorm, and an output head tied to the token
embedding. Two things beyond nanoGPT, both needed by alignment:

- ``attention_mask`` (B, S): 1 for real tokens, 0 for padding. Prompts of different lengths are
  left-padded for generation, so positions are counted over real tokens only
  (``cumsum(mask) - 1``) and no query attends to a pad key. Without a mask every token is real
  and the fast causal kernel is used.
- a KV cache, so generating T tokens costs O(T) forwards of one token instead of T forwards of
  the whole prefix.

``hidden`` returns the final hidden states (B, T, C); reward and value heads read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import files


@dataclass
class GPTConfig:
    vocab_size: int = 64   # set from the tokenizer
    block_size: int = 64   # longest sequence (prompt + response) the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0   # RL needs log-probs that do not change between two calls: keep 0 there


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``max_len``.

    Two uses. Generation (no gradient): one forward of the prompt, then one token at a time, each
    written into the preallocated buffer. The shared-prompt forward (``ops.prefill``): the distinct
    prompts of a batch fill the cache once, ``select`` copies each prompt's keys and values to
    every row that answers it, and one forward of the responses extends it. When gradients are
    recorded ``update`` concatenates instead of writing in place: autograd keeps the tensors it
    saved unmodified, and gradients flow back through the cached keys and values into the prompt.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        # empty, not zeros: a slot is always written before it is read (``update`` returns [:end])
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens already stored (the same for every row); None with fixed shapes
        self.max_len = max_len
        self.slot = None  # fixed shapes (``fix_shapes``): the next token's slot, as a (1,) tensor

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) after the cached ones; return all keys and values so far
        (with fixed shapes: every ``max_len`` slot, the ones not yet written zero; attention reads
        the first S, S the width of its bias)."""
        if self.slot is not None:  # a compiled decode step: the same shapes at every position
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]                         # (B, nh, max_len, hs)
        end = self.length + k.size(2)
        if torch.is_grad_enabled() or self.k[layer].size(2) < end:  # training through the cache
            self.k[layer] = torch.cat([self.k[layer][:, :, :self.length], k.to(self.k[layer].dtype)], 2)
            self.v[layer] = torch.cat([self.v[layer][:, :, :self.length], v.to(self.v[layer].dtype)], 2)
        else:                                                        # generation: write in place
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, S, hs)

    def advance(self, n: int) -> None:
        """``n`` more tokens are stored (each row's): counted by ``length``, or with fixed shapes by the
        slot tensor alone (``fix_shapes``)."""
        if self.slot is not None:
            self.slot += n
        else:
            self.length += n

    def fix_shapes(self) -> "KVCache":
        """From here on, ``update`` writes one token at a time into the slot ``self.slot`` and returns
        all ``max_len`` slots: the buffers' shapes no longer depend on how many tokens came before,
        and the slot is a tensor, not a Python int that a compiled decode step
        (``generation.generate(compile_decode=True)``) would be specialised on. Attention reads
        the first S slots, S the width of the bias it is given (``_attend_one``: the compiled step
        gives the written ones, a symbolic size) and must mask any not yet written (-inf); those
        are zeroed, since the buffer is uninitialised memory and a NaN there would survive its zero
        attention weight (0 x NaN = NaN). In place; no gradient flows through a cache with fixed
        shapes. From here on ``length`` is None: the slot tensor counts the tokens, since a Python int
        that changes every step would make the compiled decode compile again at every call."""
        if any(buffer.size(2) != self.max_len for buffer in self.k + self.v):
            raise ValueError("fixed shapes need the preallocated buffers: fill the cache without gradient "
                             "(with gradient, update concatenates)")
        for buffer in self.k + self.v:
            buffer[:, :, self.length:].zero_()
        self.slot = torch.tensor([self.length], device=self.k[0].device)
        self.length = None
        return self

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep the rows ``rows`` (B',), repeats allowed: new row i is old row ``rows[i]``. In place."""
        # gradients flow back to the selected rows; index_select's backward sums repeated rows in
        # a fixed order (tensor indexing's backward uses atomic adds on the CPU: not reproducible)
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, cache):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
        if cache is not None and cache.slot is not None:  # a compiled decode step: one query per row
            y = _attend_one(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _attend_one(q, k, v, bias):
    """softmax(q k^T / sqrt(hs) + bias) v for one query (T = 1) per row and head, as sums of products,
    over the first S slots of k and v (B, nh, >= S, hs), S the width of ``bias`` (B, 1, 1, S).

    What SDPA computes, written so that ``torch.compile`` fuses it into a few loops over the
    cache: SDPA's CPU kernel is built for many queries and costs far more than the arithmetic of
    one. Its own float sums, in another order than SDPA's: used by the compiled decode step only.
    """
    k, v = k[:, :, :bias.size(-1)], v[:, :, :bias.size(-1)]  # (B, nh, S, hs) the slots the bias covers
    scores = (q * k).sum(-1, keepdim=True) / math.sqrt(q.size(-1)) + bias.transpose(-1, -2)  # (B, nh, S, 1)
    return (torch.softmax(scores, dim=2) * v).sum(2, keepdim=True)                          # (B, nh, 1, hs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x)); the residual stream is never normalised."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the same vectors read and write tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.block_size:
            raise ValueError(f"a cache of {max_len} tokens exceeds block_size={self.config.block_size}")
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of tokens ``idx`` (B, T).

        ``attention_mask`` (B, S) covers every token the model has seen, the cached ones included
        (S = cache.length + T), as in Hugging Face; None means every token is real.
        """
        B, T = idx.shape
        if cache is not None and cache.slot is not None:
            raise ValueError("a KV cache with fixed shapes is read by the compiled decode step only (GPT.decode)")
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context "
                             f"(block_size={self.config.block_size})")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {(B, past + T)} (cached + new tokens)")
        if past == 0 and (attention_mask is None or _right_padded(attention_mask)):
            # no pad before a real token: plain causal attention (the fast kernel) is exact for
            # every real token, and the outputs at trailing pads are never read
            pos = torch.arange(T, device=idx.device).expand(B, T)
            attn_mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
            real = attention_mask.bool()
            # positions count real tokens only, so a left-padded prompt starts at position 0
            pos = (real.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
            q_slot = torch.arange(past, past + T, device=idx.device)[:, None]  # (T, 1)
            k_slot = torch.arange(past + T, device=idx.device)[None, :]        # (1, S)
            allowed = (k_slot <= q_slot)[None] & real[:, None, :]              # (B, T, S)
            # a pad query with no real key before it would give a softmax over nothing (NaN):
            # let every query see itself; real queries are unaffected, pad outputs are ignored
            allowed = allowed | (k_slot == q_slot)[None]
            attn_mask = allowed[:, None]                                       # (B, 1, T, S)
        x = self._blocks(idx, pos, attn_mask, cache)
        if cache is not None:
            cache.advance(T)
        return x

    def decode(self, idx: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
               cache: KVCache) -> torch.Tensor:
        """``hidden`` for the next tokens ``idx`` (B, T) after the cached ones, when the caller keeps
        their ``positions`` (B, T) and ``attn_mask`` (B, 1, T, S) up to date itself: boolean, or
        SDPA's additive bias (0 where a key is seen, -inf where not), which is what SDPA turns a
        boolean mask into (``generation.generate`` keeps the bias).

        Generation calls it once per new token: ``hidden`` would rebuild both from the whole
        attention mask every step (a cumsum and comparisons over all S columns) and check the
        shapes; here they are given, so a step runs the blocks and nothing else. The numbers are
        ``hidden``'s, bit for bit, for the same positions and mask (``tests/equations/test_generation.py``).
        """
        x = self._blocks(idx, positions, attn_mask, cache)
        cache.advance(idx.shape[1])
        return x

    def _blocks(self, idx, pos, attn_mask, cache) -> torch.Tensor:
        """Embeddings, every block, the final LayerNorm: (B, T) -> (B, T, C). The cache's keys and
        values are written; its length is the caller's to advance (kept out of here so that a
        compiled decode step holds no Python int that changes every step)."""
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, attn_mask, cache)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V): row t gives pi_theta(. | idx[:, :t+1]) (E1, one factor per t)."""
        return self.lm_head(self.hidden(idx, attention_mask, cache))

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, path, **extra) -> None:
        """Write config, weights and any ``extra`` (e.g. the tokenizer's state) to ``path``."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        files.torch_save({"config": asdict(self.config), "model": state, **extra}, path)  # atomic

    @classmethod
    def load(cls, path, map_location="cpu", config: GPTConfig | None = None) -> "GPT":
        """Build a GPT from ``path``; if ``config`` is given it must match the checkpoint's."""
        return cls.from_checkpoint(load_checkpoint(path, map_location), config, source=str(path))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, config: GPTConfig | None = None, source: str = "checkpoint") -> "GPT":
        """Build a GPT from a loaded checkpoint dict (see ``load``)."""
        saved = GPTConfig(**ckpt["config"])
        if config is not None and config != saved:
            diff = {f.name: (getattr(saved, f.name), getattr(config, f.name)) for f in fields(GPTConfig)
                    if getattr(saved, f.name) != getattr(config, f.name)}
            raise ValueError(f"{source} was saved with another config: "
                             + ", ".join(f"{k}: saved {a}, asked {b}" for k, (a, b) in diff.items()))
        model = cls(saved)
        model.load_weights(ckpt["model"], source=source)
        return model

    def load_weights(self, state: dict, source: str = "state dict") -> None:
        """``load_state_dict`` with an error that names every mismatched tensor."""
        own = self.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [f"{k}: shape {tuple(state[k].shape)} != model's {tuple(own[k].shape)}"
                     for k in own if k in state and state[k].shape != own[k].shape]
        if problems:
            raise ValueError(f"{source} does not match the model: " + "; ".join(problems[:8]))
        self.load_state_dict(state)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True if every row is ones then zeros (padding only after the real tokens)."""
    m = attention_mask.long()
    return bool((m.cummin(dim=1).values == m).all())


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` (no code runs from a checkpoint file); a missing,
    truncated, garbage or foreign file is a ``CheckpointError`` that names it (``files.torch_load``)."""
    ckpt = files.torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise files.CheckpointError(f"{path} is not a minialign checkpoint (needs 'config' and 'model'); "
                                    f"{files.recreate_hint(path)}")
    return ckpt
