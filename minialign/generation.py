r"""Sampling responses $y\sim\pi_\theta(\cdot\mid x)$ (E1, one token at a time), with a KV cache.

Layout of the result (what PPO and GRPO train on)::

    sequences      <pad> <bos> <user> review the movie <assistant> | the movie was good . <eos> <pad>
    attention_mask   0     1     1      1     1    1       1       |  1    1    1    1  1   1     0
    response_mask                                                   |  1    1    1    1  1   1     0

Prompts are left-padded so that every row's next token goes in the same column; responses are
right-padded after their EOS. The EOS is a response token (mask 1): the policy is trained to emit
it. Tokens after it are ``<pad>``, masked out.

``logps`` are $\log\pi(y_t\mid x, y_{<t})$ of the sampled tokens at the sampling ``temperature``, the
same temperature that training must use when it recomputes them (``ops.token_logps``). top-k and
top-p change which tokens can be drawn, not these log-probs: with them on, the sampler is no
longer $\pi_\theta$, so leave them off (the default) for PPO and GRPO.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .data import left_pad
from .ops import inference, prefill
from .runtime.files import NonFiniteError


def check_sampled_logps(logps: torch.Tensor) -> None:
    """Refuse what was sampled from NaN or inf probabilities: they come from a model whose weights
    diverged. Checked once after the loop (a log-prob of a NaN distribution is NaN), not each step,
    so that decoding waits on no extra sync."""
    if not torch.isfinite(logps).all():
        raise NonFiniteError("the model's next-token probabilities hold NaN or inf while sampling: its weights "
                             "have diverged (a lower --lr?)")


@dataclass
class Generation:
    sequences: torch.Tensor       # (B, P + T) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, P + T) 1 for real tokens
    response_ids: torch.Tensor    # (B, T) sampled tokens, <pad> after EOS
    response_mask: torch.Tensor   # (B, T) 1 up to and including EOS
    logps: torch.Tensor           # (B, T) log-probs of the sampled tokens (0 where masked), float32
    finished: torch.Tensor        # (B,) True if the response ended with EOS within max_new_tokens
    prompt_len: int               # P

    @property
    def full_response_mask(self) -> torch.Tensor:
        """``response_mask`` over the whole sequence (B, P + T), zeros over the prompt."""
        return torch.cat([torch.zeros_like(self.sequences[:, :self.prompt_len]), self.response_mask], 1)

    def responses(self) -> list[list[int]]:
        """The response of each row as a token list, EOS excluded."""
        out = []
        for ids, m, done in zip(self.response_ids.tolist(), self.response_mask.tolist(), self.finished.tolist()):
            n = sum(m)
            out.append(ids[: n - 1] if done else ids[:n])
        return out

    def select(self, rows: torch.Tensor) -> Generation:
        """The rows ``rows`` (indices, or a (B,) bool mask) as a Generation of their own."""
        return Generation(self.sequences[rows], self.attention_mask[rows], self.response_ids[rows],
                          self.response_mask[rows], self.logps[rows], self.finished[rows], self.prompt_len)


def cat_generations(parts: list[Generation], pad_id: int) -> Generation:
    """The rows of several ``generate`` calls as one Generation, in order (DAPO's dynamic sampling).

    The prompts are left-padded and the responses right-padded to the widest part: positions count
    real tokens only (``model.py``), so the added padding changes no log-prob.
    """
    P = max(g.prompt_len for g in parts)
    T = max(g.response_ids.shape[1] for g in parts)

    def pad(x: torch.Tensor, left: int, right: int, value: int | float = 0) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)
    grown = [(P - g.prompt_len, T - g.response_ids.shape[1], g) for g in parts]
    return Generation(
        sequences=torch.cat([pad(g.sequences, left, right, pad_id) for left, right, g in grown]),
        attention_mask=torch.cat([pad(g.attention_mask, left, right) for left, right, g in grown]),
        response_ids=torch.cat([pad(g.response_ids, 0, right, pad_id) for _, right, g in grown]),
        response_mask=torch.cat([pad(g.response_mask, 0, right) for _, right, g in grown]),
        logps=torch.cat([pad(g.logps, 0, right) for _, right, g in grown]),
        finished=torch.cat([g.finished for g in parts]), prompt_len=P)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k tokens and outside the top-p nucleus."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token if the tokens strictly more likely than it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             share_prompt: bool = True, compile_decode: bool = False) -> Generation:
    """Sample one response per prompt (token-id lists, e.g. ``Tokenizer.prompt``).

    ``temperature=0`` is greedy decoding (its ``logps`` are then at temperature 1).
    ``share_prompt`` (with ``use_cache``): a prompt given several times (GRPO's group) runs once
    (``ops.prefill``).

    ``compile_decode`` (minialign's GPT, with the cache; off by default): each new token runs
    through one ``torch.compile``d step with fixed shapes (``KVCache.fix_shapes``): the step's
    small elementwise ops and its one-query attention are fused into a few loops and the Python
    between them is gone; the matmuls stay library calls, and they are most of what is left (the
    gain is in ``docs/measurements.md``). The first call pays for the compilation (once per model
    and batch shape in a process). The compiled kernels fuse and reorder floating-point work, and
    attention runs over every slot of the cache, masked, instead of the slots written so far:
    log-probs differ from the eager path in their last bits, and so a sampled token can differ
    where two are nearly tied. That is why it is an option: a seeded run's numbers are the eager
    path's.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    block_size = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > block_size:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context (block_size={block_size}); nothing is truncated")
    if compile_decode and not (use_cache and hasattr(model, "decode")):
        raise ValueError("compile_decode needs the KV cache (use_cache=True) and minialign's GPT")
    # no gradient flows through sampling: run it in inference mode (the same numbers as no_grad,
    # less bookkeeping per op), its results cloned out as normal tensors
    return inference(_sample, model, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                     use_cache, generator, share_prompt, compile_decode)


def _next_logits(model, idx, positions, bias, cache) -> torch.Tensor:
    """One decode step through a cache with fixed shapes: the next-token logits (B, V), float32."""
    return model.lm_head(model._blocks(idx, positions, bias, cache))[:, -1].float()


@functools.cache
def _compiled_next_logits():
    """``_next_logits`` compiled, made on first use (importing the compiler takes seconds). Fixed
    shapes: a new batch size or cache length compiles again rather than a general kernel for all."""
    return torch.compile(_next_logits, dynamic=False)


def _sample(model, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, use_cache,
            generator, share_prompt, compile_decode) -> Generation:
    """``generate``'s loop (its arguments checked)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, pad_id, device)  # (B, P)
    B, P = ids.shape
    L = P + max_new_tokens
    logp_temperature = temperature if temperature > 0 else 1.0
    # the whole sequence and its mask, preallocated: each step writes one column (a torch.cat per
    # token would copy the prefix every step)
    sequences = torch.full((B, L), pad_id, dtype=ids.dtype, device=device)       # (B, L)
    attention_mask = torch.zeros((B, L), dtype=mask.dtype, device=device)        # (B, L)
    sequences[:, :P], attention_mask[:, :P] = ids, mask

    if use_cache:  # the prompts' keys and values; with share_prompt each distinct prompt runs once
        h_last, cache = prefill(model, ids, mask, L, share_prompt)
        logits = model.lm_head(h_last).float()                          # (B, V)
    else:
        logits = model(ids, attention_mask=mask)[:, -1].float()         # (B, V)
    # minialign's GPT decodes from a positions vector and a mask it is handed (``GPT.decode``):
    # kept here, one column per step, instead of rebuilt from the whole mask by every forward
    decode = use_cache and hasattr(model, "decode")
    if decode:
        # the attention mask as SDPA's additive bias (0 where a key is seen, -inf where not), in
        # the dtype attention computes in: a boolean mask would be turned into this in every
        # layer of every step
        autocasting = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocasting else model.wte.weight.dtype
        bias = torch.full((B, 1, 1, L), float("-inf"), dtype=dtype, device=device)  # (B, 1, 1, L)
        bias[:, 0, 0, :P].masked_fill_(mask.bool(), 0.0)
        count = mask.sum(1, keepdim=True)                               # (B, 1) real tokens so far
        if compile_decode:
            cache.fix_shapes()  # every step attends over all L slots; the bias hides the unwritten ones
    new_tokens, new_logps, new_mask = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        col = P + step
        if temperature > 0:
            scaled = logits / temperature
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            # the exponential race (Gumbel-max with exp applied): argmax_v p_v / q_v with q_v ~ Exp(1)
            # draws v with probability p_v; it is what torch.multinomial(probs, 1) computes, draw for
            # draw, without its validity checks (a sync each): softmax's probabilities are valid
            race = torch.empty_like(probs).exponential_(1.0, generator=generator)
            token = (probs / race).argmax(-1)                            # (B,)
        else:
            scaled = logits  # greedy: log-probs at temperature 1
            token = logits.argmax(-1)
        # E1's factor log pi(y_t | x, y_<t) at the sampling temperature, as ``ops.token_logps``
        # computes it (the same ops, without its checks: the token came from these logits)
        logp = torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None])[:, 0]   # (B,)
        token = token.masked_fill(~alive, pad_id)
        new_tokens.append(token)
        new_logps.append(logp.masked_fill(~alive, 0.0))
        new_mask.append(alive.long())
        sequences[:, col], attention_mask[:, col] = token, new_mask[-1]
        alive = alive & (token != eos_id)
        if not alive.any() or step == max_new_tokens - 1:
            break
        if decode:
            # the new key is seen by every later query of its row: real in live rows; in a finished
            # row it is a pad, read only by that row's own queries, whose outputs are thrown away
            count = count + new_mask[-1][:, None]                       # (B, 1) positions count real tokens
            bias[:, 0, 0, col] = 0.0
            if compile_decode:
                logits = _compiled_next_logits()(model, token[:, None], count - 1, bias, cache)  # (B, V)
                cache.advance(1)
            else:
                h = model.decode(token[:, None], count - 1, bias[..., :col + 1], cache)  # (B, 1, C)
                logits = model.lm_head(h)[:, -1].float()
        elif use_cache:
            logits = model(token[:, None], attention_mask=attention_mask[:, :col + 1], cache=cache)[:, -1].float()
        else:
            logits = model(sequences[:, :col + 1], attention_mask=attention_mask[:, :col + 1])[:, -1].float()
    model.train(was_training)
    logps = torch.stack(new_logps, 1)                                                 # (B, T)
    check_sampled_logps(logps)
    end = P + len(new_tokens)
    return Generation(
        sequences=sequences[:, :end].contiguous(), attention_mask=attention_mask[:, :end].contiguous(),
        response_ids=torch.stack(new_tokens, 1), response_mask=torch.stack(new_mask, 1),  # (B, T)
        logps=logps, finished=~alive, prompt_len=P)
