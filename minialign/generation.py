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

    ``compile_decode`` (minialign's GPT, with the cache; off by default): the tokens run through a
    ``torch.compile``d function of ``DECODE_CHUNK`` decode steps (``_decode_steps``: each step's
    bookkeeping, forward and draw of the next token, no graph break), through a cache with fixed
    buffers (``KVCache.fix_shapes``); the number of slots attention reads is a symbolic size, so
    one compilation serves every position, and Inductor's C++ wrapper calls the kernels without
    Python between them. The elementwise ops, the one-query attention and the sampling are fused
    into a few loops; the matmuls stay library calls (the gain is in ``docs/measurements.md``).
    The first call in a process pays for the compilation, tens of seconds on a CPU (once per model,
    batch size and sampling setting; Inductor's disk cache shortens later processes'). The
    compiled kernels fuse and reorder floating-point work: log-probs differ from the eager path in
    their last bits, and so a sampled token can differ where two are nearly tied. That is why it
    is an option: a seeded run's
    numbers are the eager path's.
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


def _draw(logits: torch.Tensor, temperature: float, top_k, top_p, race: torch.Tensor | None):
    """One token per row from next-token logits (B, V), and its log-prob (B,) at the sampling temperature.

    ``race`` (B, V), Exp(1) noise: the exponential race (Gumbel-max with exp applied),
    argmax_v p_v / q_v with q_v ~ Exp(1), draws v with probability p_v; it is what
    ``torch.multinomial(probs, 1)`` computes, draw for draw, without its validity checks (a sync
    each): softmax's probabilities are valid. ``temperature=0``: greedy (``race`` unused)."""
    if temperature > 0:
        scaled = logits / temperature
        probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
        token = (probs / race).argmax(-1)                                           # (B,)
    else:
        scaled = logits  # greedy: log-probs at temperature 1
        token = logits.argmax(-1)
    # E1's factor log pi(y_t | x, y_<t) at the sampling temperature, as ``ops.token_logps``
    # computes it (the same ops, without its checks: the token came from these logits)
    return token, torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None])[:, 0]  # (B,), (B,)


def _keep(token: torch.Tensor, logp: torch.Tensor, alive: torch.Tensor, eos_id: int, pad_id: int):
    """A drawn token (B,) and its log-prob (B,) as the response keeps them: a row that has finished
    gets ``<pad>`` and log-prob 0. Returns them and the rows still answering after this token (a
    row finishes with its EOS)."""
    done = ~alive
    token = token.masked_fill(done, pad_id)
    return token, logp.masked_fill(done, 0.0), alive & (token != eos_id)


DECODE_CHUNK = 8  # decode steps per compiled call (compile_decode): the call's own cost, paid once for 8 tokens


def _decode_steps(model, token, logp, alive, positions, bias, cache, races, eos_id, pad_id,
                  temperature, top_k, top_p):
    """``compile_decode``'s unit of work: K = ``len(races)`` decode steps in one function, so that the
    compiler sees them whole and Python runs once per K tokens.

    Step i keeps the token drawn last (``_keep``), runs it through the cache (fixed shapes) with
    attention over the slots written so far, the first S - K + 1 + i of ``bias`` (B, 1, 1, S), and
    draws the next token with the noise ``races[i]`` (``_draw``). Returns the K kept tokens, their
    log-probs and the rows answering each (B, K), then the state the next call starts from: the
    token drawn last, its log-prob, the rows still answering, their positions (B, 1)."""
    K, S = len(races), bias.size(-1)
    kept = []
    for i, race in enumerate(races):
        was_alive = alive
        token, logp, alive = _keep(token, logp, alive, eos_id, pad_id)
        kept.append((token, logp, was_alive))
        positions = positions + was_alive[:, None]           # positions count real tokens
        h = model._blocks(token[:, None], positions, bias[..., :S - K + 1 + i], cache)  # (B, 1, C)
        cache.advance(1)                                      # the slot tensor (``KVCache.fix_shapes``)
        token, logp = _draw(model.lm_head(h)[:, -1].float(), temperature, top_k, top_p, race)
    tokens, logps, answering = (torch.stack(column, 1) for column in zip(*kept))  # (B, K) each
    return tokens, logps, answering, token, logp, alive, positions


@functools.cache
def _compiled_decode_steps():
    """``_decode_steps`` compiled, made on first use (importing the compiler takes seconds). The
    number of slots S is a symbolic size (``maybe_mark_dynamic`` in the loop): one compilation serves
    every position; K (``DECODE_CHUNK``, or 1 for the last steps), a new batch size or sampling
    setting compiles again. Inductor's C++ wrapper calls the kernels without Python between them."""
    return torch.compile(_decode_steps, options={"cpp_wrapper": True})


def _sample(model, prompts, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, use_cache,
            generator, share_prompt, compile_decode) -> Generation:
    """``generate``'s loop (its arguments checked)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, pad_id, device)  # (B, P)
    B, P = ids.shape
    L = P + max_new_tokens
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
    # kept here instead of rebuilt from the whole mask by every forward
    decode = use_cache and hasattr(model, "decode")
    if decode:
        # the attention mask as SDPA's additive bias (0 where a key is seen, -inf where not), in
        # the dtype attention computes in: a boolean mask would be turned into this in every
        # layer of every step. Every response slot is 0: a new key is seen by every later query
        # of its row (real in live rows; in a finished row a pad read only by that row's own
        # queries, whose outputs are thrown away), and step t reads the first P + t + 1 slots only
        autocasting = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocasting else model.wte.weight.dtype
        bias = torch.zeros((B, 1, 1, L), dtype=dtype, device=device)    # (B, 1, 1, L)
        bias[:, 0, 0, :P].masked_fill_(~mask.bool(), float("-inf"))
        positions = mask.sum(1, keepdim=True) - 1                       # (B, 1) real tokens so far, less one
    V = logits.shape[-1]

    def race():  # the Exp(1) noise (B, V) of one draw (``_draw``), from the caller's generator
        if temperature <= 0:
            return None  # greedy (``_draw``): no noise drawn
        return torch.empty((B, V), dtype=torch.float32, device=device).exponential_(1.0, generator=generator)

    alive = torch.ones(B, dtype=torch.bool, device=device)
    token, logp = _draw(logits, temperature, top_k, top_p, race())
    if compile_decode:
        response_ids, logps, response_mask, alive = _decode_compiled(
            model, token, logp, alive, positions, bias, cache, race, max_new_tokens, eos_id, pad_id,
            temperature, top_k, top_p, generator)
        T = response_ids.shape[1]
        sequences[:, P:P + T], attention_mask[:, P:P + T] = response_ids, response_mask
    else:
        new_tokens, new_logps, new_mask = [], [], []  # new_mask: the rows still answering, per step (bool)
        for step in range(max_new_tokens):
            col = P + step
            new_mask.append(alive)
            token, logp, alive = _keep(token, logp, alive, eos_id, pad_id)
            new_tokens.append(token)
            new_logps.append(logp)
            sequences[:, col], attention_mask[:, col] = token, new_mask[-1]
            if not alive.any() or step == max_new_tokens - 1:
                break
            if decode:
                positions = positions + new_mask[-1][:, None]               # (B, 1) positions count real tokens
                h = model.decode(token[:, None], positions, bias[..., :col + 1], cache)  # (B, 1, C)
                logits = model.lm_head(h)[:, -1].float()
            elif use_cache:
                logits = model(token[:, None], attention_mask=attention_mask[:, :col + 1], cache=cache)[:, -1].float()
            else:
                logits = model(sequences[:, :col + 1], attention_mask=attention_mask[:, :col + 1])[:, -1].float()
            token, logp = _draw(logits, temperature, top_k, top_p, race())
        response_ids, logps = torch.stack(new_tokens, 1), torch.stack(new_logps, 1)   # (B, T)
        response_mask = torch.stack(new_mask, 1)                                         # (B, T)
    model.train(was_training)
    check_sampled_logps(logps)
    end = P + response_ids.shape[1]
    return Generation(
        sequences=sequences[:, :end].contiguous(), attention_mask=attention_mask[:, :end].contiguous(),
        response_ids=response_ids, response_mask=response_mask.long(), logps=logps, finished=~alive,
        prompt_len=P)


def _decode_compiled(model, token, logp, alive, positions, bias, cache, race, max_new_tokens, eos_id,
                     pad_id, temperature, top_k, top_p, generator):
    """The eager loop's tokens through ``_decode_steps`` compiled, ``DECODE_CHUNK`` steps per call
    (the last few one per call): (response_ids, logps, response_mask, alive), (B, T) each but
    ``alive`` (B,).

    As the eager loop, it stops once every row has finished, and it leaves ``generator`` where the
    eager loop leaves it: a call draws the noise of K steps up front, so when every row finishes
    inside a call the generator is put back and only the draws the eager loop makes are made
    again (the next ``generate`` then samples what the eager path would)."""
    P, steps = cache.length, max_new_tokens - 1  # steps: forwards after the first token (the last one is kept only)
    cache.fix_shapes()  # each step writes one slot; attention reads the slots the bias covers
    if generator is None:  # the noise comes from torch's own generator of the device
        device = token.device
        generator = torch.cuda.default_generators[device.index if device.index is not None else
                                                  torch.cuda.current_device()] \
            if device.type == "cuda" else torch.default_generator
    chunks, ran = [], 0
    while ran < steps:
        K = DECODE_CHUNK if steps - ran >= DECODE_CHUNK else 1
        state = generator.get_state()
        races = [race() for _ in range(K)]
        seen = bias[..., :P + ran + K]  # (B, 1, 1, S): step i of the call reads the first S - K + 1 + i
        torch._dynamo.maybe_mark_dynamic(seen, 3)  # S symbolic: one compilation for every position
        *chunk, token, logp, alive_after, positions = _compiled_decode_steps()(
            model, token, logp, alive, positions, seen, cache, races, eos_id, pad_id, temperature, top_k, top_p)
        # the rows answering after each step of the call: the next step's, then the last's
        after = torch.cat([chunk[2][:, 1:], alive_after[:, None]], 1)     # (B, K)
        ended = (~after.any(0)).nonzero()
        if len(ended):  # every row finished at step i of this call: keep steps 0..i, as the eager loop
            i = int(ended[0])
            generator.set_state(state)
            for _ in range(i):
                race()
            chunks.append([c[:, :i + 1] for c in chunk])
            return (*(torch.cat(c, 1) for c in zip(*chunks)), after[:, i])
        chunks.append(chunk)
        alive, ran = alive_after, ran + K
    was_alive = alive  # the last token: kept, not run (the eager loop's step max_new_tokens - 1)
    token, logp, alive = _keep(token, logp, alive, eos_id, pad_id)
    chunks.append([token[:, None], logp[:, None], was_alive[:, None]])
    return (*(torch.cat(c, 1) for c in zip(*chunks)), alive)
