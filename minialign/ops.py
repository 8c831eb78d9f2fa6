"""The math that several algorithms share: token log-probs (E1), masked reductions, whitening,
KL estimators and entropy.

Every function takes and returns tensors; none knows which algorithm calls it. Log-probs are
computed in float32 whatever the model's dtype: under bf16 a log-softmax over the vocabulary
loses the small differences that ratios such as pi_theta / pi_old are made of.

KL estimators (J. Schulman, "Approximating KL divergence", 2020). For tokens sampled from p
(the policy pi_theta) and q the reference pi_ref, with log r = log q(x) - log p(x):

    k1 = -log r                 unbiased, high variance, can be negative
    k2 = (log r)^2 / 2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0 (0 exactly when p = q at x)

k3 is the estimator of GRPO (DeepSeekMath): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay as they are (gradcheck runs in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | context) of the given ``tokens`` (B, T) from ``logits`` (B, T, V), at ``temperature``.

    One factor of E1: log pi_theta(y | x) = sum_t log pi_theta(y_t | x, y_<t).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not align")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    logp = F.log_softmax(upcast(logits) / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)    # (B, T)


def model_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(input_ids[:, t] | input_ids[:, :t]) for t >= 1: a (B, T-1) tensor.

    Column j holds the log-prob of token j+1, predicted from the logits at position j, so it
    lines up with ``input_ids[:, 1:]`` and with ``response_mask[:, 1:]``.
    """
    logits = model(input_ids, attention_mask=attention_mask)  # (B, T, V)
    return token_logps(logits[:, :-1], input_ids[:, 1:], temperature)


def response_logps(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response column of ``generate``'s sequences: (B, T).

    The prompt fills the first ``prompt_len`` columns (left-padded), so column P-1 of the
    token log-probs predicts the first response token; the result lines up with
    ``Generation.response_mask``.
    """
    logps = model_token_logps(model, sequences, attention_mask, temperature)  # (B, P+T-1)
    return logps[:, prompt_len - 1:]


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   response_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E1: log pi(y | x) = sum_t log pi(y_t | x, y_<t) over each row's response tokens, (B,)."""
    logps = model_token_logps(model, input_ids, attention_mask, temperature)  # (B, T-1)
    return masked_sum(logps, response_mask[:, 1:], dim=1)


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
    (A float mask of 0.5 would silently give a sum of halves and a mean of twice the value.)"""
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        values = mask[(mask != 0) & (mask != 1)].unique()[:4].tolist()
        raise ValueError(f"{name} must hold only 0 and 1 (bool, integer, or float 0./1.), also holds {values}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """No NaN or inf in ``x`` (a reward, say): one would silently poison every mean it enters."""
    bad = ~torch.isfinite(torch.as_tensor(x))
    if bad.any():
        raise ValueError(f"{name} must be finite, got {int(bad.sum())} NaN/inf value(s) at index "
                         f"{bad.nonzero()[0].tolist()}")


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
    """(x - mean) / std over the masked entries; ``shift_mean=False`` keeps the mean (only scales)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x), per sample x ~ p."""
    check_same_shape(logp=logp, logq=logq)
    return logp - logq


def kl_k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k2 = (log p(x) - log q(x))^2 / 2, per sample x ~ p."""
    check_same_shape(logp=logp, logq=logq)
    return 0.5 * (logp - logq) ** 2


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """k3 = q(x)/p(x) - 1 - log(q(x)/p(x)), per sample x ~ p (GRPO's estimator)."""
    check_same_shape(logp=logp, logq=logq)
    log_r = logq - logp
    return torch.exp(log_r) - 1 - log_r


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(pi(. | context)) = -sum_v p_v log p_v for each position: (..., V) -> (...)."""
    logp = F.log_softmax(upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)
