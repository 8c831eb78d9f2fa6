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

from dataclasses import dataclass

import torch

from .data import left_pad
from .ops import prefill, token_logps
from .runtime.files import NonFiniteError


def check_probabilities(probs: torch.Tensor) -> None:
    """Refuse to sample from NaN probabilities: they come from a model whose weights diverged."""
    if not torch.isfinite(probs).all():
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


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             share_prompt: bool = True) -> Generation:
    """Sample one response per prompt (token-id lists, e.g. ``Tokenizer.prompt``).

    ``temperature=0`` is greedy decoding (its ``logps`` are then at temperature 1).
    ``share_prompt`` (with ``use_cache``): a prompt given several times (GRPO's group) runs once
    (``ops.prefill``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    block_size = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > block_size:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context (block_size={block_size}); nothing is truncated")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, pad_id, device)  # (B, P)
    B, P = ids.shape
    logp_temperature = temperature if temperature > 0 else 1.0

    if use_cache:  # the prompts' keys and values; with share_prompt each distinct prompt runs once
        h_last, cache = prefill(model, ids, mask, P + max_new_tokens, share_prompt)
        logits = model.lm_head(h_last).float()                          # (B, V)
    else:
        logits = model(ids, attention_mask=mask)[:, -1].float()         # (B, V)
    new_tokens, new_logps, new_mask = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            check_probabilities(probs)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            token = logits.argmax(-1)
        logp = token_logps(logits[:, None], token[:, None], logp_temperature)[:, 0]
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        new_tokens.append(token)
        new_logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        new_mask.append(alive.long())
        alive = alive & (token != eos_id)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, new_mask[-1][:, None]], 1)
        if not alive.any() or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(token[:, None], attention_mask=mask, cache=cache)[:, -1].float()
        else:
            logits = model(ids, attention_mask=mask)[:, -1].float()
    model.train(was_training)
    response_ids = torch.stack(new_tokens, 1)  # (B, T)
    return Generation(
        sequences=ids, attention_mask=mask, response_ids=response_ids,
        response_mask=torch.stack(new_mask, 1), logps=torch.stack(new_logps, 1),
        finished=~alive, prompt_len=P)
