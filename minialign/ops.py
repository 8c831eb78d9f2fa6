r"""The math that several algorithms share: token log-probs (E1), input checks, masked
reductions, whitening, explained variance, KL estimators and entropy.

Every function takes and returns tensors; none knows which algorithm calls it. Log-probs are
computed in float32 whatever the model's dtype: under bf16 a log-softmax over the vocabulary
loses the small differences that ratios such as $\pi_\theta/\pi_{old}$ are made of.

**KL estimators** (J. Schulman, "Approximating KL divergence", 2020). For tokens $x$ sampled
from $p$ (the policy $\pi_\theta$) and $q$ the reference $\pi_{ref}$, with
$\log\rho = \log q(x) - \log p(x)$:

| estimator | formula | bias, variance |
|---|---|---|
| k1 | $-\log\rho$ | unbiased, high variance, can be negative |
| k2 | $\frac12(\log\rho)^2$ | biased, low variance, $\ge 0$ |
| k3 | $(\rho - 1) - \log\rho$ | unbiased, low variance, $\ge 0$ (0 exactly where $p = q$ at $x$) |

k3 is GRPO's estimator (DeepSeekMath): $\frac{\pi_{ref}}{\pi_\theta} - \log\frac{\pi_{ref}}{\pi_\theta} - 1$.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay as they are (gradcheck runs in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""$\log\pi(y_t\mid\text{context})$ of the given ``tokens`` (B, T) from ``logits`` (B, T, V), at ``temperature``.

    One factor of E1: $\log\pi_\theta(y\mid x) = \sum_t \log\pi_\theta(y_t\mid x, y_{<t})$.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not align")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if tokens.device.type != "meta" and tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= logits.shape[-1]:
            raise ValueError(f"token ids run from {low} to {high}, outside the vocabulary of {logits.shape[-1]} "
                             "(a tokenizer that does not match the model?)")
    # Exercise token_logps (E1): from here to the end of the function.
    logp = F.log_softmax(upcast(logits) / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)    # (B, T)


def inference(fn, *args, **kwargs):
    r"""``fn(*args, **kwargs)`` under ``torch.inference_mode``, its tensors handed back as normal tensors.

    For a pass no gradient flows through: $\pi_{ref}$'s log-probs, $\pi_{old}$'s, a sampler's.
    ``inference_mode`` skips the bookkeeping that ``no_grad`` still does for every op (version
    counters, the metadata of views), with the same kernels, so the same numbers. A tensor made
    under it cannot be saved for a later backward (an embedding lookup of sampled tokens saves
    them), so each tensor of the result (alone, in a tuple or list, or a field of a dataclass
    such as ``generation.Generation``) is cloned out once: a copy of a few (B, T) tensors.
    """
    with torch.inference_mode():
        out = fn(*args, **kwargs)
    return _normal(out)


def _normal(x):
    """``x`` with every inference tensor in it cloned to a normal one (``inference``)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_normal(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _normal(getattr(x, f.name)) for f in dataclasses.fields(x)
                                         if f.init})
    return x


def model_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    r"""$\log\pi$(``input_ids[:, t]`` | ``input_ids[:, :t]``) for t >= 1: a (B, T-1) tensor.

    Column j holds the log-prob of token j+1, predicted from the logits at position j, so it
    lines up with ``input_ids[:, 1:]`` and with ``response_mask[:, 1:]``.
    """
    logits = model(input_ids, attention_mask=attention_mask)  # (B, T, V)
    return token_logps(logits[:, :-1], input_ids[:, 1:], temperature)


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_len: int,
            share_prompt: bool = True):
    """Run prompts (B, P), left-padded, into a new KV cache of ``max_len`` tokens per row.

    Returns ``(h_last, cache)``: the final hidden state (B, C) of each prompt's last column (it
    predicts the first response token) and the cache holding the prompts' keys and values, ready
    for the response tokens (``generate`` samples them, ``response_hidden`` scores them).

    **The shared prompt.** Rows that answer the same prompt (GRPO's G answers to one question,
    DPO's chosen and rejected, PPO's samples of one prompt) start with the same tokens, and a plain
    forward computes those tokens again in every row. With ``share_prompt`` each distinct prompt
    runs once and ``cache.select`` copies its keys and values to every row that answers it; only
    the response tokens then run per row. Causal attention makes this exact: a prompt token never
    attends to the response, so its keys and values are the same in every row. Gradients flow
    back through the copies into the one prompt forward, summed over its rows, as they sum over the
    identical rows of the plain forward.
    """
    P = prompt_ids.shape[1]
    if not share_prompt:
        cache = model.new_cache(prompt_ids.shape[0], max_len)
        return model.hidden(prompt_ids, prompt_mask, cache=cache)[:, -1], cache   # (B, C)
    # each distinct prompt (its ids and its padding) once; row b answers prompt group[b]
    distinct, group = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0,
                                   return_inverse=True)                          # (U, 2P), (B,)
    cache = model.new_cache(distinct.shape[0], max_len)
    h = model.hidden(distinct[:, :P], distinct[:, P:], cache=cache)              # (U, P, C)
    cache.select(group)                                                          # U rows -> B rows
    # index_select, not h[group, -1]: the backward of tensor indexing on the CPU adds the rows that
    # share a prompt with atomic adds, in an order that changes from run to run under load;
    # index_select's backward (index_add) adds them in a fixed order, so seeded runs repeat exactly
    return h[:, -1].index_select(0, group), cache                                # (B, C)


def response_hidden(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    share_prompt: bool = True) -> torch.Tensor:
    """Final hidden states (B, 1 + T, C) at the prompt's last column and at every response column.

    ``sequences`` (B, P + T) in generation's layout: prompts left-padded into the first
    P = ``prompt_len`` columns, responses from column P on. Column j of the result is the state at
    sequence column P - 1 + j: column 0 predicts the first response token, column T is the last.
    ``share_prompt``: each distinct prompt is computed once (``prefill``); the same numbers.
    """
    P = prompt_len
    if not 1 <= P < sequences.shape[1]:
        raise ValueError(f"prompt_len={P} must leave at least one prompt and one response column "
                         f"in sequences of width {sequences.shape[1]}")
    if not share_prompt:
        return model.hidden(sequences, attention_mask)[:, P - 1:]                # (B, 1 + T, C)
    h_last, cache = prefill(model, sequences[:, :P], attention_mask[:, :P], sequences.shape[1])
    h_response = model.hidden(sequences[:, P:], attention_mask, cache=cache)    # (B, T, C)
    return torch.cat([h_last[:, None], h_response], 1)                           # (B, 1 + T, C)


def response_logps(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0, share_prompt: bool = True) -> torch.Tensor:
    r"""$\log\pi(y_t\mid x, y_{<t})$ of every response column of ``generate``'s sequences: (B, T).

    The prompt fills the first ``prompt_len`` columns (left-padded); the result lines up with
    ``Generation.response_mask``. ``share_prompt``: see ``response_hidden`` (the same numbers).
    """
    h = response_hidden(model, sequences, attention_mask, prompt_len, share_prompt)  # (B, 1 + T, C)
    logits = model.lm_head(h[:, :-1])              # (B, T, V): column t predicts response token t
    return token_logps(logits, sequences[:, prompt_len:], temperature)


def align_responses(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shift each row right so that every response starts in one column P: (ids, mask, P).

    A collated batch (``data.collate``: prompt, response, padding) starts each response where
    its own prompt ends; ``response_hidden`` needs generation's layout, prompts left-padded into
    P columns. Positions count real tokens only, so the shift changes no log-prob. Each row's
    response must be one run of real tokens after its prompt, with nothing real after it.
    """
    B, L = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    response = response_mask.bool()
    if response.shape != (B, L) or real.shape != (B, L):
        raise ValueError(f"input_ids {(B, L)}, attention_mask and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    length = response.sum(1)                                               # (B,)
    start = response.long().argmax(1)                                      # (B,) first response column
    col = torch.arange(L, device=input_ids.device)[None]                   # (1, L)
    run = (col >= start[:, None]) & (col < (start + length)[:, None])      # (B, L)
    if (length == 0).any() or (response != run).any() or (response & ~real).any() \
            or (real & (col >= (start + length)[:, None])).any():
        raise ValueError("each row needs its prompt, then its response as one run of real tokens, "
                         "then only padding (response_mask inside attention_mask)")
    P = int(start.max())
    width = P + int(length.max())
    source = torch.arange(width, device=input_ids.device)[None] - (P - start)[:, None]  # (B, W)
    inside = (source >= 0) & (source < L)
    source = source.clamp(0, L - 1)
    ids = input_ids.gather(1, source)                                       # (B, W) pads: any id
    mask = (real.gather(1, source) & inside).long()                         # (B, W)
    return ids, mask, P


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   response_mask: torch.Tensor, temperature: float = 1.0,
                   share_prompt: bool = True) -> torch.Tensor:
    r"""E1: $\log\pi(y\mid x) = \sum_t \log\pi(y_t\mid x, y_{<t})$ over each row's response tokens, (B,).

    ``share_prompt``: rows with the same prompt compute it once (``response_hidden``).
    """
    if share_prompt:
        ids, mask, P = align_responses(input_ids, attention_mask, response_mask)
        logps = response_logps(model, ids, mask, P, temperature, share_prompt=True)  # (B, T)
        return masked_sum(logps, mask[:, P:], dim=1)
    logps = model_token_logps(model, input_ids, attention_mask, temperature)  # (B, L-1)
    return masked_sum(logps, response_mask[:, 1:], dim=1)


# ----------------------------------------------------------------------------------------------
# input checks: each raises a ValueError that names the problem, so that a loss's body can be
# its equation alone
# ----------------------------------------------------------------------------------------------


def check_same_shape(**tensors) -> None:
    """The given tensors (None entries skipped) have exactly the same shape: nothing is broadcast."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensors differ in shape (nothing is broadcast): {shapes}")


def check_token_tensors(**tensors) -> None:
    """Every given per-token tensor is (B, T) and all share that shape (None entries are skipped)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"per-token tensors must be (B, T), got shapes {shapes}")
    check_same_shape(**tensors)


def check_mask(mask: torch.Tensor, name: str = "mask") -> None:
    """A mask selects entries, it does not weight them: bool, or integers / floats that are all 0 or 1.
    (A float mask of 0.5 would silently give a sum of halves and a mean of twice the value.)
    A tensor on the meta device has shapes but no values (memory is counted that way): nothing to check."""
    if mask.dtype != torch.bool and not mask.is_meta and not ((mask == 0) | (mask == 1)).all():
        values = mask[(mask != 0) & (mask != 1)].unique()[:4].tolist()
        raise ValueError(f"{name} must hold only 0 and 1 (bool, integer, or float 0./1.), also holds {values}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """No NaN or inf in ``x`` (a reward, say): one would silently poison every mean it enters."""
    bad = ~torch.isfinite(torch.as_tensor(x))
    if not bad.is_meta and bad.any():
        raise ValueError(f"{name} must be finite, got {int(bad.sum())} NaN/inf value(s) at index "
                         f"{bad.nonzero()[0].tolist()}")


def check_sequence_logps(**tensors) -> None:
    """Every given tensor is a non-empty (B,) tensor of sequence log-probs, all of one shape."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (B,) tensor of sequence log-probs, "
                             f"got shape {tuple(x.shape)}")
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"batch sizes differ: {shapes}")


def check_per_sequence(batch: int, **tensors) -> None:
    """Every given tensor holds one number per sequence of a batch of ``batch``: shape (B,)."""
    for name, x in tensors.items():
        if tuple(x.shape) != (batch,):
            raise ValueError(f"{name} must be (B,) = ({batch},), one per sequence, got {tuple(x.shape)}")


def check_nonempty_rows(mask: torch.Tensor) -> None:
    """A (B, T) response mask is 0/1 and every row holds at least one token (a response has its EOS)."""
    check_mask(mask)
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"response(s) {empty[:8]} are empty: no response tokens in the mask "
                         "(a response holds at least its EOS)")


def check_positive(**values) -> None:
    """Each given number is > 0 (NaN is refused too)."""
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def check_nonnegative(**values) -> None:
    """Each given number is >= 0 (NaN is refused too)."""
    for name, v in values.items():
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def check_in_range(low: float, high: float, **values) -> None:
    """Each given number lies in [low, high] (NaN is refused too)."""
    for name, v in values.items():
        if not low <= v <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {v}")


def check_choice(name: str, value, choices) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_groups(B: int, group_size: int) -> None:
    """B answers split into whole groups of ``group_size`` >= 2 (a group of one has no baseline)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one answer has no baseline), got {group_size}")
    if B == 0 or B % group_size != 0:
        raise ValueError(f"{B} answers is not a (positive) multiple of group_size={group_size}")


def rewards_1d(rewards) -> torch.Tensor:
    """(B,) float rewards (float64 stays), finite."""
    rewards = torch.as_tensor(rewards)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D (B,) tensor, got shape {tuple(rewards.shape)}")
    check_finite(rewards, "rewards")
    return rewards


# ----------------------------------------------------------------------------------------------
# masked reductions
# ----------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1 (masked entries contribute exactly 0, even if NaN/inf)."""
    if x.shape != mask.shape:
        raise ValueError(f"values {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    check_mask(mask)
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1; an empty mask is an error, not NaN."""
    check_mask(mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    if (count == 0).any():
        raise ValueError("masked_mean over an empty mask (a sequence with no tokens to count)")
    return masked_sum(x, mask, dim) / count


def masked_sum_over(x: torch.Tensor, mask: torch.Tensor, constant: float, dim=None) -> torch.Tensor:
    r"""$\frac{1}{C}\sum$ of ``x`` where ``mask`` is 1, for a constant $C$ = ``constant`` that does not depend on the mask.

    Dr. GRPO's normaliser ($C = B\cdot$max_new_tokens): unlike ``masked_mean``, a token's weight in the
    gradient does not depend on how many tokens its answer or its batch happen to have. It equals
    ``masked_mean`` when $C$ is the number of masked entries.
    """
    if not bool((torch.as_tensor(constant) > 0).all()):  # a number, or one per row with dim (NaN refused)
        raise ValueError(f"constant must be > 0 (it divides the masked sum), got {constant}")
    return masked_sum(x, mask, dim) / constant


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (over all of them)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("unbiased variance needs at least two masked entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    r"""$(x - \text{mean})/\text{std}$ over the masked entries; ``shift_mean=False`` keeps the mean (only scales)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    r"""How much of the variance of the returns a critic's values explain, over the masked entries:
    $1 - \mathrm{Var}(\hat R - V)/\mathrm{Var}(\hat R)$, 1 for a perfect critic, 0 for a constant one."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# KL estimators and entropy
# ----------------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    r"""k1 $= \log p(x) - \log q(x)$, per sample $x\sim p$."""
    check_same_shape(logp=logp, logq=logq)
    # Exercise kl_estimators (k1, k2, k3): from here to the end of the function.
    return logp - logq


def kl_k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    r"""k2 $= \frac12(\log p(x) - \log q(x))^2$, per sample $x\sim p$."""
    check_same_shape(logp=logp, logq=logq)
    # Exercise kl_estimators (k1, k2, k3): from here to the end of the function.
    return 0.5 * (logp - logq) ** 2


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    r"""k3 $= \frac{q(x)}{p(x)} - 1 - \log\frac{q(x)}{p(x)}$, per sample $x\sim p$ (GRPO's estimator)."""
    check_same_shape(logp=logp, logq=logq)
    # Exercise kl_estimators (k1, k2, k3): from here to the end of the function.
    log_r = logq - logp
    return torch.exp(log_r) - 1 - log_r


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    r"""$H(\pi(\cdot\mid\text{context})) = -\sum_v p_v\log p_v$ for each position: (..., V) -> (...)."""
    logp = F.log_softmax(upcast(logits), dim=-1)
    p = logp.exp()
    # a masked-out logit (-inf: top-k, a forbidden token) has p = 0 and adds 0 (not 0 * -inf = NaN)
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)
