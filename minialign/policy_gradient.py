r"""The policy-gradient family, REINFORCE to GSPO: each member a small delta of GRPO's step (E11-E14).

GRPO (``grpo.py``) is one point in a family that differs in two places only: **the advantage**
(which baseline is subtracted from the reward, how it is scaled) and **the loss** (which ratio, which
clip, which aggregation over tokens). This file holds only those deltas; the rest of the step (sampling,
scoring, the optimizer) is GRPO's. Notation as in ``grpo.py``: $G$ answers $y_1..y_G$ per question $x$,
$r_i = r(x, y_i)$, $\hat A_i$ the advantage of answer $i$ (given to every one of its tokens),
$\rho_{i,t} = \pi_\theta(y_{i,t}\mid x, y_{i,<t}) / \pi_{old}(y_{i,t}\mid x, y_{i,<t})$, $|y_i|$ its tokens (EOS included).

| member | advantage | loss | KL | paper |
|---|---|---|---|---|
| REINFORCE | $r_i$, or $r_i$ minus the group / batch mean | $-\hat A_i\log\pi_\theta(y_{i,t}\mid\cdot)$ | in the reward | Williams, 1992 |
| RLOO | $r_i - \frac{1}{G-1}\sum_{j\ne i} r_j$ | REINFORCE's | in the reward | Ahmadian et al., 2024 |
| REINFORCE++ | return-to-go, whitened over the batch | PPO's clip (E5), token mean | in the reward, per token | Hu, 2025 |
| DAPO | E12 | clip $[1-\epsilon_{low}, 1+\epsilon_{high}]$, token mean | none | Yu et al., 2025 |
| GSPO | E12 | clip of the sequence ratio $s_i$ | none | Zheng et al., 2025 |
| CISPO | E12 | $-\mathrm{sg}(\mathrm{clip}(\rho_{i,t}))\hat A_i\log\pi_\theta$, token mean | none | MiniMax, 2025 |

**The API** (what ``grpo.grpo_iteration`` plugs in where GRPO's own E12 and E13 stand):
``MemberOptions``, which member it runs (``minialign grpo``'s flags), refused where they do not fit
(``check_member``); ``advantages(estimator, ...)`` and ``policy_loss(loss, ...)``, one option each (GRPO's
own are ``grpo.group_advantages`` and ``grpo.grpo_loss``, the only loss with a KL term, whose input checks
are ``check_grpo_loss_inputs``); ``MEMBERS``, the table above. The sampling side is ``policy_gradient_sampling.py``.

Every function is pure (tensors in, tensors out), float64 stays float64 (the theory lab and
``gradcheck``), and bad input is a ValueError that names the problem. The exact answers of each
member (where its expected update converges) are in ``theory_policy_gradient.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .runtime.config import Config, check_range, require
from .ops import (check_choice, check_finite, check_groups, check_mask, check_nonempty_rows, check_nonnegative,
                  check_per_sequence, check_positive, check_token_tensors, kl_k1, masked_mean, masked_sum,
                  masked_sum_over, masked_var, rewards_1d, upcast)

# the members' own (GRPO's E12 and E13 are grpo.group_advantages and grpo.grpo_loss)
ADVANTAGE_ESTIMATORS = ("none", "batch_mean", "rloo", "reinforce_pp")
POLICY_LOSSES = ("reinforce", "ppo_clip", "dapo", "gspo", "cispo")
# E13's per-answer mean, DAPO's token mean, Dr. GRPO's constant, and REINFORCE's sum over each answer
AGGREGATIONS = ("answer_mean", "token_mean", "constant", "sequence_sum")
KL_IN = ("loss", "reward")  # where GRPO's KL goes: E13's loss or E14's reward

# member -> (advantage estimator, policy loss, where the KL goes); "grpo": grpo.py's own
MEMBERS = {
    "grpo": ("grpo", "grpo", "loss (k3, E13) or reward"),
    "reinforce": ("none", "reinforce", "reward (k1)"),
    "rloo": ("rloo", "reinforce", "reward (k1)"),
    "reinforce_pp": ("reinforce_pp", "ppo_clip", "reward (k1, per token)"),
    "dapo": ("grpo", "dapo", "none"),
    "gspo": ("grpo", "gspo", "none"),
    "cispo": ("grpo", "cispo", "none"),
}

# each member's paper defaults for (eps_low, eps_high)
CLIP_DEFAULTS = {"dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "cispo": (1.0, 0.28)}


# ----------------------------------------------------------------------------------------------
# REINFORCE, the root: the per-token loss before any aggregation, and the aggregation as its own step
# ----------------------------------------------------------------------------------------------


def reinforce_per_token(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""REINFORCE's per-token loss $-\hat A_i\log\pi_\theta(y_{i,t}\mid x, y_{i,<t})$, (B, T), 0 off the mask.

    Williams (1992): $\nabla_\theta\mathbb{E}_{y\sim\pi_\theta}[r] = \mathbb{E}[r\,\nabla_\theta\log\pi_\theta(y\mid x)]$, and by E1
    $\log\pi_\theta(y\mid x) = \sum_t\log\pi_\theta(y_t\mid x, y_{<t})$. Returned before any aggregation, so
    that summing or averaging over tokens (``aggregate``) is a step a reader sees.
    ``advantages``: (B,) one per answer, or (B, T) one per token (REINFORCE++).

    *Differs from its parent* (GRPO's E13): no ratio, no clip: it is on-policy, the gradient at
    $\pi_\theta = \pi_{old}$ of E13's surrogate. *Where this departs from the paper:* nothing; the
    baseline choice is ``advantages``'s.
    """
    check_token_tensors(logps=logps, mask=mask)
    check_mask(mask)
    A = _token_advantages(advantages, logps)                                 # (B, T)
    per_token = -A * upcast(logps)                                           # (B, T)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token))


def _token_advantages(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, T) advantages -> (B, T), detached, in the loss's dtype."""
    B, T = logps.shape
    if advantages.shape == (B,):
        advantages = advantages[:, None].expand(B, T)
    elif advantages.shape != (B, T):
        raise ValueError(f"advantages must be (B,) = ({B},) or (B, T) = {(B, T)}, got {tuple(advantages.shape)}")
    check_finite(advantages, "advantages")
    return advantages.detach().to(upcast(logps).dtype)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_len: int | None = None
              ) -> torch.Tensor:
    r"""A per-token loss (B, T) -> one number, four ways (``AGGREGATIONS``):

    - ``"answer_mean"`` (E13): $\frac1B\sum_i\frac{1}{|y_i|}\sum_t$: a token of a short answer weighs more;
    - ``"token_mean"`` (DAPO): $\frac{1}{\sum_i|y_i|}\sum_i\sum_t$: every token of the batch alike;
    - ``"constant"`` (Dr. GRPO): $\frac{1}{B\cdot L}\sum_i\sum_t$ with $L$ = ``max_len``: no length in the weights;
    - ``"sequence_sum"`` (REINFORCE): $\frac1B\sum_i\sum_t$: each answer's $\log\pi_\theta(y_i\mid x)$ (E1),
      the score-function estimator of $\nabla\mathbb{E}[r]$ as written. It is ``"constant"`` times $L$.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    B, T = per_token.shape
    if aggregation == "answer_mean":
        check_nonempty_rows(mask)
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "token_mean":
        if not mask.sum() > 0:
            raise ValueError("token_mean over a batch with no tokens in the mask")
        return masked_sum(per_token, mask) / mask.sum()
    if aggregation == "constant":
        if max_len is None or max_len < T:
            raise ValueError(f"aggregation='constant' needs max_len >= the {T} response columns, got {max_len}")
        return masked_sum_over(per_token, mask, B * max_len)
    return masked_sum_over(per_token, mask, B)                            # sequence_sum


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   aggregation: str = "sequence_sum", max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    r"""REINFORCE: $L = \frac1B\sum_i -\hat A_i\log\pi_\theta(y_i\mid x)$ (``reinforce_per_token``, then ``aggregate``)."""
    per_token = reinforce_per_token(logps, advantages, mask)
    loss = aggregate(per_token, mask, aggregation, max_len)
    return loss, {"loss": loss.item()}


def batch_mean_advantages(rewards) -> torch.Tensor:
    r"""REINFORCE with the batch baseline: $\hat A_i = r_i - \frac1B\sum_j r_j$ over the whole batch, (B,).

    *Differs from its parent* (GRPO's E11): the mean over every answer of the batch, of every question,
    not over the question's group; no std. Like the group mean, it includes $r_i$ itself, so in
    expectation it shrinks the gradient by $1 - 1/B$ (``theory_policy_gradient``).
    """
    r = rewards_1d(rewards)
    return r - r.mean()


# ----------------------------------------------------------------------------------------------
# RLOO (Ahmadian et al., 2024): the leave-one-out baseline
# ----------------------------------------------------------------------------------------------


def rloo_advantages(rewards, group_size: int) -> torch.Tensor:
    r"""RLOO: $\hat A_i = r_i - \frac{1}{G-1}\sum_{j\ne i} r_j$, the mean of the *other* answers to the question, (B,).

    Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", eq. (6) with $k = G$ samples. The baseline does not depend on $y_i$, so
    $\hat A_i\nabla\log\pi(y_i)$ is an unbiased estimate of $\nabla\mathbb{E}[r]$; algebraically
    $\hat A_i = \frac{G}{G-1}(r_i - \bar R)$.

    *Differs from its parent* (GRPO's E11-E12): leave-one-out mean, no division by the std.
    *Where this departs from the paper:* nothing; the paper's reward holds the KL
    ($r - \beta\log\frac{\pi_\theta}{\pi_{ref}}$ summed over the answer): pass ``grpo.kl_penalised_rewards(..., estimator="k1")``.
    A group of one answer has no other answer: ``group_size`` must be >= 2.
    """
    r = rewards_1d(rewards)
    check_groups(r.numel(), group_size)
    G = group_size
    # Exercise rloo_advantages (RLOO): from here to the end of the function.
    groups = r.view(-1, G)                                                   # (Q, G)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (G - 1)            # (Q, G) mean of the other G - 1
    return (groups - others).reshape(-1)                                     # (B,)


# ----------------------------------------------------------------------------------------------
# REINFORCE++ (Hu, 2025): the KL in the reward per token, advantages whitened over the global batch
# ----------------------------------------------------------------------------------------------


def reinforce_pp_advantages(rewards, mask: torch.Tensor, old_logps: torch.Tensor | None = None,
                            ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                            eps: float = 1e-4) -> torch.Tensor:
    r"""REINFORCE++: per-token advantages, the return-to-go whitened over every token of the batch, (B, T).

    Hu (2025), "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models":
    the per-token reward is $-\beta\,\mathrm{KL}_t$ (k1, $\log\pi_{old}/\pi_{ref}$), plus $r_i$ at the last
    token; with $\gamma = 1$ the advantage of token $t$ is its return

    $$A_{i,t} = r_i - \beta\sum_{s\ge t}\log\frac{\pi_{old}(y_{i,s}\mid\cdot)}{\pi_{ref}(y_{i,s}\mid\cdot)},\qquad
    \hat A_{i,t} = \frac{A_{i,t} - \mathrm{mean}_{batch}(A)}{\mathrm{std}_{batch}(A) + \epsilon}$$

    mean and (sample) std over every response token of the batch. The loss is PPO's token-mean clip
    (E5, ``ppo.clipped_surrogate_loss``). A batch whose returns are all equal gets 0, never NaN.

    *Differs from its parent* (GRPO): the baseline is the batch's, not the question's group (no group
    is needed: G = 1 works), the KL is in the reward per token, not in the loss.
    *Where this departs from the paper:* the "global batch" is the batch passed in (under torchrun
    each rank's; gather the ranks' advantages first for the paper's); $\epsilon = 10^{-4}$ as E12's.
    """
    r = rewards_1d(rewards)
    check_token_tensors(mask=mask, old_logps=old_logps, ref_logps=ref_logps)
    check_per_sequence(mask.shape[0], rewards=r)
    check_nonempty_rows(mask)
    check_positive(eps=eps)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    returns = r.to(dtype)[:, None].expand(mask.shape).clone()               # (B, T)
    if beta > 0:
        if old_logps is None or ref_logps is None:
            raise ValueError("reinforce_pp with beta > 0 needs old_logps and ref_logps (its KL is in the reward)")
        k1 = torch.where(mask.bool(), kl_k1(old_logps.detach().to(dtype), ref_logps.detach().to(dtype)),
                         torch.zeros((), dtype=dtype))                      # (B, T)
        kl_to_go = k1.flip(1).cumsum(1).flip(1)                              # (B, T) sum over s >= t
        returns = returns - beta * kl_to_go
    if mask.sum() < 2:
        raise ValueError("reinforce_pp whitens over the batch: it needs at least two response tokens")
    mean, std = masked_mean(returns, mask), masked_var(returns, mask).sqrt()
    values = returns[mask.bool()]
    if values.max() == values.min():  # all equal: 0 explicitly (the float mean may differ in the last bit)
        return torch.zeros_like(returns)
    whitened = (returns - mean) / (std + eps)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ----------------------------------------------------------------------------------------------
# DAPO (Yu et al., 2025): clip-higher, token mean (dynamic sampling, overlong: policy_gradient_sampling.py)
# ----------------------------------------------------------------------------------------------


def check_clip_range(eps_low: float, eps_high: float, low_may_be_one: bool = False) -> None:
    r"""$1 - \epsilon_{low}$ must stay a positive ratio ($0 < \epsilon_{low} < 1$; CISPO allows 1: no lower bound) and $\epsilon_{high} > 0$."""
    if low_may_be_one:
        if not 0 < eps_low <= 1:
            raise ValueError(f"eps_low must be in (0, 1] (1 - eps_low is the lowest weight), got {eps_low}")
    elif not 0 < eps_low < 1:
        raise ValueError(f"eps_low must be in (0, 1) (1 - eps_low is the lowest ratio, > 0), got {eps_low}")
    check_positive(eps_high=eps_high)


def decoupled_clip_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
                             ) -> torch.Tensor:
    r"""$\min(\rho\hat A,\ \mathrm{clip}(\rho, 1-\epsilon_{low}, 1+\epsilon_{high})\,\hat A)$ elementwise: E5 with two clip widths."""
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.minimum(ratio * advantages, clipped * advantages)


def dapo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.28) -> tuple[torch.Tensor, dict]:
    r"""DAPO's loss: the decoupled clip ("clip-higher"), averaged over every token of the batch.

    Yu et al. (2025), "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. (8):

    $$L_{DAPO} = -\frac{1}{\sum_i|y_i|}\sum_{i}\sum_{t=1}^{|y_i|}\min\big(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high})\,\hat A_i\big)$$

    with E12's advantages and no KL term. $\epsilon_{high} > \epsilon_{low}$ lets a token with $\hat A > 0$ rise
    further in one iteration than E13's symmetric clip allows (paper: 0.2 and 0.28).
    Rows whose mask is empty (answers removed by ``overlong_filter``) add nothing; a batch with no
    token left is an error.

    *Differs from its parent* (GRPO's E13): $\epsilon_{low} \ne \epsilon_{high}$, token mean, no KL.
    *Where this departs from the paper:* nothing in the loss; dynamic sampling and the overlong
    handling are ``dynamic_sampling`` and ``overlong_*``, applied before it.
    """
    check_token_tensors(logps=logps, old_logps=old_logps, mask=mask)
    check_per_sequence(logps.shape[0], advantages=advantages)
    check_clip_range(eps_low, eps_high)
    dtype = upcast(logps).dtype
    A = _token_advantages(advantages, logps)                                # (B, T)
    ratio = torch.exp(logps.to(dtype) - old_logps.to(dtype).detach())      # (B, T) rho_{i,t}
    per_token = decoupled_clip_surrogate(ratio, A, eps_low, eps_high)      # (B, T)
    loss = -aggregate(per_token, mask, "token_mean")
    with torch.no_grad():
        stats = {"loss": loss.item(), "ratio": masked_mean(ratio, mask).item(),
                 "clip_frac": masked_mean((per_token < ratio * A).float(), mask).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# GSPO (Zheng et al., 2025): one ratio per sequence
# ----------------------------------------------------------------------------------------------


def gspo_sequence_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""$s_i = \big(\pi_\theta(y_i\mid x)/\pi_{old}(y_i\mid x)\big)^{1/|y_i|} = \exp\big(\frac{1}{|y_i|}\sum_t(\log\pi_\theta - \log\pi_{old})\big)$, (B,).

    In log space: the product of $|y_i|$ token ratios would overflow or vanish for long answers; the
    geometric mean of the token ratios is their log-mean, exponentiated. An empty answer has no ratio.
    """
    check_token_tensors(logps=logps, old_logps=old_logps, mask=mask)
    check_nonempty_rows(mask)
    # Exercise gspo_sequence_ratio (GSPO): from here to the end of the function.
    dtype = upcast(logps).dtype
    log_ratio = logps.to(dtype) - old_logps.to(dtype).detach()              # (B, T)
    return torch.exp(masked_mean(log_ratio, mask, dim=1))                  # (B,)


def gspo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    r"""GSPO's loss: the clipped surrogate of the sequence ratio $s_i$, one term per answer.

    Zheng et al. (2025), "Group Sequence Policy Optimization", eq. (5)-(7):

    $$L_{GSPO} = -\frac1B\sum_i\min\big(s_i\hat A_i,\ \mathrm{clip}(s_i, 1-\epsilon_{low}, 1+\epsilon_{high})\,\hat A_i\big)$$

    with E12's advantages. The whole answer is kept or clipped together, so one unusual token cannot
    make its answer's update noisy; the clip range is small because $s_i$ moves little (paper: 3e-4, 4e-4).

    *Differs from its parent* (GRPO's E13): $s_i$ for $\rho_{i,t}$, the clip per answer, no KL; with one-token
    answers it is E13. *Where this departs from the paper:* nothing (GSPO-token, the per-token variant, is not here).
    """
    check_per_sequence(logps.shape[0], advantages=advantages)
    check_clip_range(eps_low, eps_high)
    s = gspo_sequence_ratio(logps, old_logps, mask)                         # (B,)
    check_finite(advantages, "advantages")
    A = advantages.detach().to(s.dtype)
    per_answer = decoupled_clip_surrogate(s, A, eps_low, eps_high)          # (B,)
    loss = -per_answer.mean()
    with torch.no_grad():
        stats = {"loss": loss.item(), "ratio": s.mean().item(),
                 "clip_frac": (per_answer < s * A).float().mean().item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# CISPO (MiniMax, 2025): the clipped importance weight, gradient stopped
# ----------------------------------------------------------------------------------------------


def cispo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               eps_low: float = 1.0, eps_high: float = 0.28) -> tuple[torch.Tensor, dict]:
    r"""CISPO's loss: REINFORCE weighted by the clipped, stopped importance ratio, token mean.

    MiniMax (2025), "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", eq. (4)-(5):

    $$L_{CISPO} = -\frac{1}{\sum_i|y_i|}\sum_i\sum_t \mathrm{sg}\big(\mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high})\big)\,\hat A_i\,\log\pi_\theta(y_{i,t}\mid x, y_{i,<t})$$

    E13's clip sets the gradient of a token whose ratio left the range to 0; here the ratio only
    *weights* the token's gradient, so every token keeps one (the paper's point: rare "fork" tokens
    are not dropped after the first update). Its gradient is $-\mathrm{clip}(\rho)\hat A\nabla\log\pi/N$, which
    at $\rho = 1$ is REINFORCE's. The loss's value is not a surrogate objective (it holds $\log\pi$);
    only its gradient means anything.

    *Differs from its parent* (REINFORCE, token mean): the weight $\mathrm{sg}(\mathrm{clip}(\rho))$.
    *Where this departs from the paper:* the paper sets no lower bound ($\epsilon_{low}$ large) and does not
    publish $\epsilon_{high}$; defaults here: $\epsilon_{low} = 1$ (the weight's floor is 0) and $\epsilon_{high} = 0.28$ (DAPO's).
    """
    check_token_tensors(logps=logps, old_logps=old_logps, mask=mask)
    check_per_sequence(logps.shape[0], advantages=advantages)
    check_clip_range(eps_low, eps_high, low_may_be_one=True)
    # Exercise cispo_loss (CISPO): from here to "End of exercise cispo_loss".
    dtype = upcast(logps).dtype
    logps = logps.to(dtype)
    ratio = torch.exp(logps - old_logps.to(dtype).detach())                # (B, T)
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()        # sg(clip(rho))
    A = _token_advantages(advantages, logps)                                # (B, T)
    loss = aggregate(-weight * A * logps, mask, "token_mean")
    # End of exercise cispo_loss.
    with torch.no_grad():
        stats = {"loss": loss.item(), "ratio": masked_mean(ratio, mask).item(),
                 "clip_frac": masked_mean((weight != ratio).float(), mask).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# which member grpo_iteration runs (minialign grpo's flags), the checks, and the two dispatchers: one option each
# ----------------------------------------------------------------------------------------------


@dataclass
class MemberOptions(Config):
    """The member of the family that ``grpo.grpo_iteration`` runs: GRPO itself by default; each option
    replaces one piece of GRPO's step (``grpo.GRPOHyperparams`` holds GRPO's own hyperparameters)."""
    advantage: Literal["grpo", "none", "batch_mean", "rloo", "reinforce_pp"] = "grpo"  # E12, or none (A = r) | batch_mean | rloo (leave-one-out) | reinforce_pp
    loss: Literal["grpo", "reinforce", "ppo_clip", "dapo", "gspo", "cispo"] = "grpo"  # E13, or reinforce | ppo_clip (E5) | dapo | gspo | cispo
    clip_eps_low: float = 0.0       # dapo/gspo/cispo: the lowest ratio is 1 - this (0: the paper's)
    clip_eps_high: float = 0.0      # dapo/gspo/cispo: the highest ratio is 1 + this, clip-higher (0: the paper's)
    kl_estimator: Literal["k3", "k1"] = "k3"  # the KL in the reward (--kl-in reward): k3 | k1 (E2's; reinforce_pp's)
    dynamic_sampling: bool = False  # DAPO: only groups that carry a signal, more questions drawn to fill the batch
    max_draws: int = 4              # dynamic sampling: at most this many more draws of --questions per iteration
    overlong: Literal["none", "filter", "penalty"] = "none"  # DAPO: truncated answers out of the loss, or a length penalty
    overlong_cache: int = 1         # --overlong penalty: L_cache, the last tokens in which the penalty falls to -1


def check_member(member: MemberOptions, hp) -> None:
    """The member's options against GRPO's hyperparameters ``hp``: each refused where the member does not read it."""
    own_clip = member.loss in CLIP_DEFAULTS  # dapo, gspo, cispo
    check_range(member, "max_draws", 0)
    require(hp, "kl_in", member.loss == "grpo" or hp.kl_in == "reward" or hp.beta == 0,
            f"reward (or --beta 0) with --loss {member.loss}: only E13 has a KL term in the loss")
    require(member, "kl_estimator", member.kl_estimator == "k3" or hp.kl_in == "reward", "k3 unless --kl-in reward")
    aggregations = (("answer_mean",) if own_clip or member.loss == "ppo_clip" else  # they fix their own
                    AGGREGATIONS if member.loss == "reinforce" else AGGREGATIONS[:3])  # sequence_sum: REINFORCE's
    require(hp, "aggregation", hp.aggregation in aggregations, f"one of {aggregations} with --loss {member.loss}")
    per_token_ok = ("reinforce", "ppo_clip", "dapo", "cispo")  # the losses that take (B, T) advantages
    require(member, "advantage", member.advantage != "reinforce_pp" or member.loss in per_token_ok,
            f"one advantage per answer for --loss {member.loss} (reinforce_pp gives one per token)")
    require(hp, "scale_by_std", hp.scale_by_std or member.advantage == "grpo", "true unless --advantage grpo")
    for name in ("clip_eps_low", "clip_eps_high"):
        require(member, name, getattr(member, name) == 0 or own_clip, f"0 with --loss {member.loss} (it uses --clip-eps)")
    check_range(member, "clip_eps_low", 0, 1, high_open=member.loss != "cispo")  # 1 - eps_low > 0 (CISPO: >= 0)
    check_range(member, "clip_eps_high", 0)
    check_range(member, "overlong_cache", 1, hp.max_new_tokens)


def check_grpo_loss_inputs(logps, old_logps, ref_logps, advantages, mask, clip_eps, beta, kl_in,
                           aggregation, group_size, max_len) -> None:
    """``grpo.grpo_loss``'s input checks, each a ValueError that names the problem (its body is then E13 alone)."""
    check_token_tensors(logps=logps, old_logps=old_logps, ref_logps=ref_logps, mask=mask)
    B, T = logps.shape
    check_per_sequence(B, advantages=advantages)
    check_nonempty_rows(mask)
    check_choice("kl_in", kl_in, KL_IN)
    check_choice("aggregation", aggregation, AGGREGATIONS[:3])  # sequence_sum is REINFORCE's
    check_positive(clip_eps=clip_eps)
    check_nonnegative(beta=beta)
    if kl_in == "loss" and beta > 0 and ref_logps is None:
        raise ValueError("kl_in='loss' with beta > 0 needs ref_logps")
    if group_size is not None:
        check_groups(B, group_size)
    if aggregation == "constant" and (max_len is None or max_len < T):
        raise ValueError(f"aggregation='constant' needs max_len >= the {T} response columns, got {max_len}")


def advantages(estimator: str, rewards, group_size: int, *, eps: float = 1e-4, mask: torch.Tensor | None = None,
               old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
               beta: float = 0.0) -> torch.Tensor:
    """The advantage of each answer by ``estimator`` (``ADVANTAGE_ESTIMATORS``): (B,), or (B, T) for reinforce_pp.

    ``eps``, ``mask``, ``old_logps``, ``ref_logps`` and ``beta`` are reinforce_pp's (its KL is in its per-token
    reward); the others take rewards that already hold any KL. batch_mean and reinforce_pp ignore ``group_size``.
    """
    check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    if estimator != "reinforce_pp" and (beta != 0 or old_logps is not None or ref_logps is not None):
        raise ValueError(f"estimator {estimator!r} takes rewards that already hold the KL "
                         "(grpo.kl_penalised_rewards); beta, old_logps and ref_logps are reinforce_pp's")
    if estimator == "none":
        return rewards_1d(rewards).clone()                                       # REINFORCE: A = r
    if estimator == "batch_mean":
        return batch_mean_advantages(rewards)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size)
    if mask is None:
        raise ValueError("estimator 'reinforce_pp' needs the response mask (its advantages are per token)")
    return reinforce_pp_advantages(rewards, mask, old_logps, ref_logps, beta, eps)


def effective_aggregation(loss: str, aggregation: str | None = None) -> str:
    """What ``loss`` averages over: dapo, cispo and ppo_clip fix the token mean, gspo the mean over answers."""
    fixed = {"dapo": "token_mean", "cispo": "token_mean", "ppo_clip": "token_mean", "gspo": "answer_mean"}
    return fixed.get(loss) or aggregation or "sequence_sum"


def policy_loss(loss: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_eps: float = 0.2, eps_low: float | None = None,
                eps_high: float | None = None, aggregation: str | None = None,
                max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """The policy loss ``loss`` (``POLICY_LOSSES``) and its stats.

    ``ppo_clip`` takes ``clip_eps``; ``reinforce`` takes ``aggregation`` (default sequence_sum) and
    ``max_len``; ``dapo``, ``gspo``, ``cispo`` take ``eps_low`` / ``eps_high`` (None: the paper's,
    ``CLIP_DEFAULTS``) and fix their own aggregation. None has a KL term (put it in the reward,
    ``grpo.kl_penalised_rewards``); a setting a member does not read is refused rather than ignored.
    """
    check_choice("loss", loss, POLICY_LOSSES)
    if loss not in CLIP_DEFAULTS and (eps_low is not None or eps_high is not None):
        raise ValueError(f"eps_low / eps_high are dapo's, gspo's and cispo's; loss {loss!r} uses clip_eps")
    if loss in CLIP_DEFAULTS and aggregation is not None:
        raise ValueError(f"loss {loss!r} fixes its own aggregation; got aggregation={aggregation!r}")
    if loss == "reinforce":
        return reinforce_loss(logps, advantages, mask, aggregation or "sequence_sum", max_len)
    if loss == "ppo_clip":
        from .ppo import clipped_surrogate_loss
        if aggregation not in (None, "token_mean"):
            raise ValueError(f"ppo_clip is E5's token mean; got aggregation={aggregation!r}")
        value, stats = clipped_surrogate_loss(logps, old_logps, _token_advantages(advantages, logps), mask, clip_eps)
        return value, {"loss": value.item(), **stats}
    low, high = CLIP_DEFAULTS[loss]
    low, high = low if eps_low is None else eps_low, high if eps_high is None else eps_high
    fn = {"dapo": dapo_loss, "gspo": gspo_loss, "cispo": cispo_loss}[loss]
    return fn(logps, old_logps, advantages, mask, low, high)
