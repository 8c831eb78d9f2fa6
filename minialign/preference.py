r"""The preference family: DPO's relatives, each a small change to E9. Read ``dpo.py`` first.

Every member scores a response with an *implicit reward*, compares the chosen one $y_w$ with the
rejected one $y_l$ of the same prompt $x$, and puts the comparison through a loss. DPO (E9, E10) uses

$$h = \log\frac{\pi_\theta(y_w\mid x)}{\pi_{ref}(y_w\mid x)} - \log\frac{\pi_\theta(y_l\mid x)}{\pi_{ref}(y_l\mid x)},
\qquad \mathcal{L}_{DPO} = -\log\sigma(\beta h) = -\log\sigma(r_w - r_l),$$

$r_w = \beta(\log\pi_\theta(y_w\mid x) - \log\pi_{ref}(y_w\mid x))$ (E10). $h$, the *log-ratio difference*, is the
one name this file adds. Each member changes one thing:

| member | what changes | needs $\pi_{ref}$ | function |
|---|---|---|---|
| ``sigmoid`` (DPO, cDPO) | nothing (E9); with ``label_smoothing`` $\epsilon > 0$ the label is trusted with $1-\epsilon$ | yes | ``dpo.dpo_loss``, ``conservative_dpo_loss`` |
| ``robust`` (rDPO) | the loss is de-biased for labels flipped with probability $\epsilon$ | yes | ``robust_dpo_loss`` |
| ``ipo`` | the link: a squared loss on $h$ instead of $-\log\sigma$ | yes | ``ipo_loss`` |
| ``simpo`` | the reference: $\pi_{ref}$ is gone, the reward is the length-normalised log-prob, plus a margin | **no** | ``simpo_loss`` |
| ``kto`` | the pairing: single responses marked desirable or undesirable, against a reference point | yes | ``kto_loss`` |
| ``orpo`` | the stage: SFT's loss plus an odds-ratio term, from the base model, no reference | **no** | ``orpo_loss`` |

``REFERENCE_FREE`` names the members that need no reference model (``minialign dpo`` loads none for them).

**The dispatcher** (what ``minialign dpo --loss NAME`` calls, through ``dpo.dpo_step``'s ``loss_fn``)::

    result = preference_loss(hp, policy_chosen_logps, policy_rejected_logps,
                             ref_chosen_logps=None, ref_rejected_logps=None,
                             chosen_lengths=None, rejected_lengths=None,
                             kl_policy_logps=None, kl_ref_logps=None)

``hp`` is a ``PreferenceHyperparams`` (``hp.loss`` is the member's name). Every log-prob is (B,),
$\log\pi(y\mid x)$ summed over the response tokens (E1), as ``dpo.dpo_loss`` takes them. It returns
a named tuple whose first three fields are ``loss`` (the scalar to minimise), ``chosen_rewards``
and ``rejected_rewards`` (each member's implicit rewards, so accuracy and margins are logged the
same way for all), then the member's own fields. What each member needs beyond the policy's
log-probs:

- ``ref_*_logps``: every member but ``simpo`` and ``orpo`` (a ValueError if missing).
- ``*_lengths`` (B,): the response lengths $|y|$ in tokens (EOS included): ``simpo``, ``orpo``, and
  ``ipo`` with ``ipo_normalise="mean"``.
- ``kl_*_logps`` (B,): ``kto`` only: log-probs of *mismatched* responses (``kto_mismatched_index``),
  policy and reference, for the reference point $z_0$. ``kto`` given pairs uses them as unpaired
  data, chosen as desirable and rejected as undesirable: the like-for-like comparison with DPO.

KTO on data that is unpaired to begin with (TRL's ``{prompt, completion, label}`` rows, or the pairs
split by ``kto.unpair_preference_rows``) has a step of its own, ``kto.kto_step``, which calls
``kto_loss`` on single examples; ``minialign dpo --loss kto`` runs it for such data.

``loss="sigmoid"`` with ``label_smoothing=0`` calls ``dpo.dpo_loss`` itself, so DPO's runs are
bit-for-bit what they were.

All losses are computed in float32 from bf16/fp16 inputs (float64 stays float64, for gradcheck),
check their inputs (a ValueError naming the problem, never a NaN), and are checked in
``tests/equations/test_preference.py``; where each one converges on the exact toy problems is in
``theory_preference.py`` and ``docs/preference.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .dpo import DPOHyperparams, dpo_loss
from .ops import check_choice, check_finite, check_in_range, check_nonnegative, check_positive, check_sequence_logps, upcast
from .runtime.config import check_range, require

LOSSES = ("sigmoid", "robust", "ipo", "simpo", "kto", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})   # no pi_ref: minialign dpo loads no reference model
NEEDS_LENGTHS = frozenset({"simpo", "orpo"})     # and "ipo" with ipo_normalise="mean"


def needs_reference(loss: str) -> bool:
    """Whether the member ``loss`` reads $\\log\\pi_{ref}$ (False for ``simpo`` and ``orpo``)."""
    check_choice("loss", loss, LOSSES)
    return loss not in REFERENCE_FREE


class PreferenceLossResult(NamedTuple):
    """A pairwise member's loss on B pairs."""
    loss: torch.Tensor              # () the mean of ``losses``: what is minimised
    chosen_rewards: torch.Tensor    # (B,) the member's implicit reward of y_w
    rejected_rewards: torch.Tensor  # (B,) the member's implicit reward of y_l
    losses: torch.Tensor            # (B,) the loss of each pair (the theory lab weights them)


def _rewards_and_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """E10's implicit rewards and the log-ratio difference h, after the shared input checks."""
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_positive(beta=beta)
    pi_w, pi_l = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    ref_w, ref_l = upcast(ref_chosen_logps), upcast(ref_rejected_logps)
    h = (pi_w - ref_w) - (pi_l - ref_l)                              # (B,) log-ratio difference
    return beta * (pi_w - ref_w), beta * (pi_l - ref_l), h          # E10: r_w, r_l; and h


def _check_lengths(batch: int, **lengths) -> None:
    for name, n in lengths.items():
        if not isinstance(n, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of response lengths in tokens, got {type(n).__name__}")
        if tuple(n.shape) != (batch,):
            raise ValueError(f"{name} must be (B,) = ({batch},), one length per response, got {tuple(n.shape)}")
        check_finite(n, name)
        if (n < 1).any():
            raise ValueError(f"{name} must be >= 1 (a response holds at least its EOS), "
                             f"got {n[n < 1][:4].tolist()}")


# ----------------------------------------------------------------------------------------------
# Robust and conservative DPO: what to do when some labels are flipped
# ----------------------------------------------------------------------------------------------


def conservative_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                          ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                          beta: float, label_smoothing: float = 0.0) -> PreferenceLossResult:
    r"""cDPO, conservative DPO (Mitchell, "A note on DPO with noisy preferences", 2023; TRL's
    ``loss_type="sigmoid"`` with ``label_smoothing``): the label is right with probability $1-\epsilon$,

    $$\mathcal{L}_{cDPO} = -(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h).$$

    **Differs from DPO:** the target of the logistic regression on $\beta h$ is $1-\epsilon$, not 1 (label
    smoothing); $\epsilon = 0$ is E9. Its optimum (infinitely many pairs) makes $\sigma(\beta h)$ equal to
    the smoothed label probability $(1-\epsilon)q + \epsilon(1-q)$, $q$ the observed one: every margin
    shrinks towards 0, whether or not the labels were noisy (``theory_preference`` measures it).

    **Where this departs from the paper:** nothing; ``label_smoothing`` $\in [0, \frac12]$.
    """
    r_w, r_l, h = _rewards_and_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, beta)
    check_in_range(0.0, 0.5, label_smoothing=label_smoothing)
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # (B,)
    return PreferenceLossResult(losses.mean(), r_w, r_l, losses)


def robust_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0) -> PreferenceLossResult:
    r"""rDPO, provably robust DPO (Chowdhury, Kini, Natarajan, "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback", 2024; TRL's ``loss_type="robust"``): each label is
    flipped with a known probability $\epsilon < \frac12$, and the loss is de-biased for it,

    $$\mathcal{L}_{rDPO} = \frac{(1-\epsilon)\,\ell(h) - \epsilon\,\ell(-h)}{1 - 2\epsilon},\qquad \ell(h) = -\log\sigma(\beta h).$$

    **Differs from DPO:** in expectation over the flips it equals E9 on the clean labels (unbiased),
    so with the right $\epsilon$ its optimum is DPO's on clean data, $\pi^*$. The rejected term enters
    with a *negative* weight: if the observed label probability of a pair falls below $\epsilon$ (a
    wrong, too large $\epsilon$), the expected loss is unbounded below and that margin diverges.

    **Where this departs from the paper:** nothing; the paper's $\epsilon$ is ``label_smoothing``
    (TRL's name), in $[0, \frac12)$. Compare cDPO (``conservative_dpo_loss``): the same two terms, the
    second with the opposite sign and no $1/(1-2\epsilon)$.
    """
    r_w, r_l, h = _rewards_and_h(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (1 - 2 eps divides), got {label_smoothing}")
    # Exercise robust_dpo_loss (rDPO): from here to the end of the function.
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)  # (B,)
    return PreferenceLossResult(losses.mean(), r_w, r_l, losses)


# ----------------------------------------------------------------------------------------------
# IPO: a squared loss on h
# ----------------------------------------------------------------------------------------------


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             normalise: str = "sum", chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> PreferenceLossResult:
    r"""IPO (Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", 2023), the empirical loss of $\Psi$PO with $\Psi$ the identity:

    $$\mathcal{L}_{IPO} = \Big(h - \frac{1}{2\beta}\Big)^2.$$

    The paper's $\tau$ is $\beta$ here, its $h_\pi(y_w, y_l)$ is $h$. **Differs from DPO:** the link.
    $-\log\sigma(\beta h)$ keeps falling as $h\to\infty$, so a pair that is always labelled the same way
    (a deterministic preference) is pushed to an infinite margin and the KL to $\pi_{ref}$ is
    unbounded; the square has its minimum at $h^* = \frac{1}{2\beta}$. Over both label outcomes of a
    pair with label probability $p$ the minimiser is $h = (2p - 1)/(2\beta)$: a margin proportional to
    how often the pair is won, bounded by $\pm\frac{1}{2\beta}$.

    ``normalise``: ``"sum"`` (the paper): $h$ from the sequence log-probs $\log\pi(y\mid x)$ (E1).
    ``"mean"`` (TRL's ``loss_type="ipo"``): each log-prob is first divided by its response's length
    (``chosen_lengths``, ``rejected_lengths``, (B,)), the per-token mean, so $h$ does not grow
    with the length. The implicit rewards are $\beta$ times the (normalised) log-ratios, as TRL reports.

    **Where this departs from the paper:** only the ``"mean"`` option, which is TRL's.
    """
    check_choice("normalise", normalise, ("sum", "mean"))
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    logps = [upcast(x) for x in (policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps)]
    if normalise == "mean":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError('ipo_loss with normalise="mean" needs chosen_lengths and rejected_lengths')
        _check_lengths(logps[0].shape[0], chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        n_w, n_l = chosen_lengths.to(logps[0].dtype), rejected_lengths.to(logps[0].dtype)
        logps = [logps[0] / n_w, logps[1] / n_w, logps[2] / n_l, logps[3] / n_l]
    # Exercise ipo_loss (IPO): from here to the end of the function.
    r_w, r_l, h = _rewards_and_h(logps[0], logps[2], logps[1], logps[3], beta)
    losses = (h - 1 / (2 * beta)) ** 2                               # (B,) IPO
    return PreferenceLossResult(losses.mean(), r_w, r_l, losses)


# ----------------------------------------------------------------------------------------------
# SimPO: no reference, a length-normalised reward and a margin
# ----------------------------------------------------------------------------------------------


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
               beta: float, gamma: float = 0.5) -> PreferenceLossResult:
    r"""SimPO (Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", 2024):

    $$r_w = \frac{\beta}{|y_w|}\log\pi_\theta(y_w\mid x),\quad r_l = \frac{\beta}{|y_l|}\log\pi_\theta(y_l\mid x),\qquad
    \mathcal{L}_{SimPO} = -\log\sigma(r_w - r_l - \gamma).$$

    **Differs from DPO:** no $\pi_{ref}$ (the implicit reward is the policy's average log-prob per
    token, the quantity generation ranks by) and a target margin $\gamma \ge 0$. With $|y| = 1$,
    $\gamma = 0$ it is E9 with a reference that gives every response the same log-prob. Without a
    reference nothing ties the policy to the SFT model: on the exact toy problem its optimum is E7's
    tilt of a *uniform* distribution, not of $\pi_{ref}$.

    **Where this departs from the paper:** nothing. TRL (``CPOTrainer``, ``loss_type="simpo"``) takes
    the margin as ``simpo_gamma`` too and subtracts $\gamma/\beta$ inside $\beta(\cdot)$: the same loss.
    """
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma)
    _check_lengths(policy_chosen_logps.shape[0], chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    # Exercise simpo_loss (SimPO): from here to the end of the function.
    pi_w, pi_l = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    r_w = beta * pi_w / chosen_lengths.to(pi_w.dtype)              # (B,) SimPO's reward, no pi_ref
    r_l = beta * pi_l / rejected_lengths.to(pi_l.dtype)            # (B,)
    losses = -F.logsigmoid(r_w - r_l - gamma)                       # (B,)
    return PreferenceLossResult(losses.mean(), r_w, r_l, losses)


# ----------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable responses against a reference point
# ----------------------------------------------------------------------------------------------


class KTOLossResult(NamedTuple):
    """KTO's loss on B unpaired responses."""
    loss: torch.Tensor              # () the mean of ``losses``
    chosen_rewards: torch.Tensor    # (B_D,) beta log(pi/pi_ref) of the desirable responses
    rejected_rewards: torch.Tensor  # (B_U,) likewise of the undesirable ones
    losses: torch.Tensor            # (B,) per response, lambda_y - v(x, y)
    reference_point: torch.Tensor   # () z_0, detached, as used


def kto_mismatched_index(batch: int) -> torch.Tensor:
    r"""Which response each prompt is paired with for the estimate of $z_0$: row $i$ takes the
    response of row $i-1$ (row 0 that of row $B-1$), as TRL's KTO builds its "KL" batch (a shift by
    one). Rows of the same prompt would not give a mismatched pair; the caller keeps those apart."""
    if batch < 2:
        raise ValueError(f"KTO's reference point needs a batch of at least 2 responses (mismatched pairs), got {batch}")
    return torch.roll(torch.arange(batch), 1)


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    r"""$z_0$, KTO's reference point: the batch estimate of $\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$,

    $$z_0 = \max\Big(0,\ \frac{1}{B}\sum_i \big[\log\pi_\theta(y'_i\mid x_i) - \log\pi_{ref}(y'_i\mid x_i)\big]\Big),$$

    $y'_i$ a response of another prompt (``kto_mismatched_index``), clamped at 0 (a KL is never
    negative, the estimate can be) and **detached**: no gradient flows through $z_0$ (the paper:
    it only sets the level that rewards are judged against). As the paper notes, the estimate is
    biased: $y'$ is drawn from the data, not from $\pi_\theta$.
    """
    check_sequence_logps(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    return (upcast(kl_policy_logps) - upcast(kl_ref_logps)).mean().clamp_min(0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> KTOLossResult:
    r"""KTO (Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela, "KTO: Model Alignment as Prospect
    Theoretic Optimization", 2024) on B single responses, each marked desirable or not:

    $$r_\theta(x,y) = \log\frac{\pi_\theta(y\mid x)}{\pi_{ref}(y\mid x)},\qquad
    v(x,y) = \begin{cases}\lambda_D\,\sigma\big(\beta(r_\theta(x,y) - z_0)\big) & y \text{ desirable}\\
    \lambda_U\,\sigma\big(\beta(z_0 - r_\theta(x,y))\big) & y \text{ undesirable}\end{cases},\qquad
    \mathcal{L}_{KTO} = \mathbb{E}_{x,y}\big[\lambda_y - v(x,y)\big].$$

    ``policy_logps``, ``ref_logps`` (B,); ``desirable`` (B,) bool; ``reference_point`` the scalar $z_0$
    (``kto_reference_point``; detached here whatever is passed); ``desirable_weight`` $\lambda_D$,
    ``undesirable_weight`` $\lambda_U$ (the paper: keep $\lambda_D n_D / (\lambda_U n_U)$ in $[1, \frac43]$).
    The implicit rewards are $\beta r_\theta$, as E10.

    **Differs from DPO:** no pairs: each response is judged against the reference point $z_0$
    instead of against the other response of its pair, and the value is a *bounded* sigmoid
    (prospect theory's loss-aversion shape), so a response already far above $z_0$ stops pulling.
    The gradient raises a desirable response's log-prob and lowers an undesirable one's.

    **Where this departs from the paper:** nothing in the loss; $z_0$ is estimated as the paper's
    code and TRL do (mismatched pairs in the batch, clamped, detached), see ``kto_reference_point``.
    The mean is over all B responses (TRL's).
    """
    check_sequence_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    check_positive(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable must be a (B,) = ({policy_logps.shape[0]},) bool tensor, got "
                         f"{getattr(desirable, 'dtype', type(desirable).__name__)} {tuple(getattr(desirable, 'shape', ()))}")
    z0 = torch.as_tensor(reference_point).detach()
    if z0.dim() != 0:
        raise ValueError(f"reference_point must be a scalar (one z_0 for the batch), got shape {tuple(z0.shape)}")
    check_finite(z0, "reference_point")
    logratio = upcast(policy_logps) - upcast(ref_logps)              # (B,) r_theta(x, y)
    z0 = z0.to(logratio.dtype)
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),     # lambda_D - v
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))   # lambda_U - v
    rewards = beta * logratio
    return KTOLossResult(losses.mean(), rewards[desirable], rewards[~desirable], losses, z0)


# ----------------------------------------------------------------------------------------------
# ORPO: SFT's loss plus an odds-ratio term, no reference
# ----------------------------------------------------------------------------------------------


class ORPOLossResult(NamedTuple):
    """ORPO's loss on B pairs."""
    loss: torch.Tensor              # () sft_loss + lambda * odds_ratio_loss
    chosen_rewards: torch.Tensor    # (B,) log odds_theta(y_w | x)
    rejected_rewards: torch.Tensor  # (B,) log odds_theta(y_l | x)
    losses: torch.Tensor            # (B,) the odds-ratio term of each pair, -log sigma(log odds ratio)
    sft_loss: torch.Tensor          # () E0b on the chosen responses: the mean over their tokens
    odds_ratio_loss: torch.Tensor   # () the mean of ``losses``


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""$\log(1 - e^x)$ for $x < 0$, accurate everywhere (Maechler 2012): $\log(-\mathrm{expm1}(x))$ near 0,
    $\mathrm{log1p}(-e^x)$ below $-\log 2$. Each branch sees only inputs it is accurate on, so neither
    gives an inf whose gradient would turn into a NaN."""
    near_zero = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -math.log(2)))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -math.log(2)), x)))
    return torch.where(near_zero, a, b)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    r"""$\log\mathrm{odds} = \log\frac{P}{1-P} = m - \log(1 - e^m)$, for $P = e^m$, $m$ a mean log-prob per token (< 0).

    $m = 0$ (every token has probability 1 in floating point) has infinite odds; it is taken as
    $m = -$``tiny`` (the smallest normal float), so the log-odds are large and finite (87 in float32,
    708 in float64) and that response's odds term passes no gradient; SFT's term still does.
    """
    m = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return m - log1mexp(m)


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
              lam: float = 0.1) -> ORPOLossResult:
    r"""ORPO (Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference
    Model", 2024):

    $$P_\theta(y\mid x) = \exp\Big(\frac{1}{|y|}\log\pi_\theta(y\mid x)\Big),\qquad
    \mathrm{odds}_\theta(y\mid x) = \frac{P_\theta(y\mid x)}{1 - P_\theta(y\mid x)},$$
    $$\mathcal{L}_{ORPO} = \mathcal{L}_{SFT} + \lambda\,\mathcal{L}_{OR},\qquad
    \mathcal{L}_{OR} = -\log\sigma\Big(\log\frac{\mathrm{odds}_\theta(y_w\mid x)}{\mathrm{odds}_\theta(y_l\mid x)}\Big).$$

    $\mathcal{L}_{SFT}$ is E0b on the chosen responses: $-\sum\log\pi_\theta(y_w\mid x) / \sum|y_w|$, the mean
    over the batch's chosen tokens, exactly ``pretrain.lm_loss`` on them (and TRL's NLL term).
    The implicit rewards are the log-odds, so $\mathcal{L}_{OR} = -\log\sigma(r_w - r_l)$.

    **Differs from SFT:** the odds-ratio term, which lowers the rejected response while SFT raises
    the chosen one; $\lambda = 0$ is SFT. There is no reference model and no separate SFT stage: it
    is trained from the base model. Like SimPO it is not tied to any $\pi_{ref}$.

    **Where this departs from the paper:** the log-odds are computed in a stable form
    (``log_odds``); TRL calls $\lambda$ ``beta`` and reports $\beta$ times the mean log-prob as the
    reward, which orders the responses as the log-odds do.
    """
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_nonnegative(lam=lam)
    _check_lengths(policy_chosen_logps.shape[0], chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    pi_w, pi_l = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    for name, x in (("policy_chosen_logps", pi_w), ("policy_rejected_logps", pi_l)):
        check_finite(x, name)
        if (x > 0).any():
            raise ValueError(f"{name} must be <= 0 (log-probabilities), got {x[x > 0][:4].tolist()}")
    n_w, n_l = chosen_lengths.to(pi_w.dtype), rejected_lengths.to(pi_l.dtype)
    sft = -pi_w.sum() / n_w.sum()                                    # E0b over the chosen tokens
    r_w, r_l = log_odds(pi_w / n_w), log_odds(pi_l / n_l)            # (B,) log odds of P = exp(mean log-prob)
    losses = -F.logsigmoid(r_w - r_l)                                # (B,) L_OR per pair
    odds_ratio = losses.mean()
    return ORPOLossResult(sft + lam * odds_ratio, r_w, r_l, losses, sft, odds_ratio)


# ----------------------------------------------------------------------------------------------
# the dispatcher
# ----------------------------------------------------------------------------------------------


@dataclass
class PreferenceHyperparams(DPOHyperparams):
    """E9's hyperparameters, which member, and its settings (each is a ``minialign dpo`` flag:
    ``stages.dpo.DPOConfig``). Checked once, when made: ``preference_loss`` trusts them."""
    loss: Literal["sigmoid", "robust", "ipo", "simpo", "kto", "orpo"] = "sigmoid"  # which member: DPO (sigmoid) or a relative (see above)
    # beta (DPOHyperparams): E2's KL strength (DPO, cDPO, rDPO, IPO's tau, KTO); SimPO's reward scale
    label_smoothing: float = 0.0      # epsilon, the labels' flip rate, in [0, 0.5): cDPO (loss sigmoid) and rDPO (robust)
    ipo_normalise: Literal["sum", "mean"] = "sum"  # IPO's h from summed log-probs (sum, the paper) or per-token means (mean, TRL)
    simpo_gamma: float = 0.5          # SimPO's target margin gamma
    desirable_weight: float = 1.0     # KTO's lambda_D, the weight of desirable (chosen) responses
    undesirable_weight: float = 1.0   # KTO's lambda_U, the weight of undesirable (rejected) responses
    orpo_lambda: float = 0.1          # ORPO's lambda, the odds-ratio term's weight beside SFT's loss

    def validate(self) -> None:
        super().validate()  # beta; loss and ipo_normalise are among their choices (their Literal types)
        check_range(self, "label_smoothing", 0, 0.5, high_open=True)
        require(self, "label_smoothing", not self.label_smoothing or self.loss in ("sigmoid", "robust"),
                f"0 with --loss {self.loss} (label smoothing applies to loss sigmoid or robust: "
                "the flip rate of their labels)")
        for name in ("desirable_weight", "undesirable_weight"):
            check_range(self, name, 0, low_open=True)
        for name in ("simpo_gamma", "orpo_lambda"):
            check_range(self, name, 0)


def preference_loss(hp: PreferenceHyperparams, policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None, kl_policy_logps: torch.Tensor | None = None,
                    kl_ref_logps: torch.Tensor | None = None):
    """The member ``hp.loss`` on B pairs (the file's docstring has the API). Returns its named result;
    the first three fields are always ``loss, chosen_rewards, rejected_rewards``."""
    name = hp.loss
    if name not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss {name!r} needs the reference's log-probs (ref_chosen_logps, ref_rejected_logps)")
    needs_lengths = name in NEEDS_LENGTHS or (name == "ipo" and hp.ipo_normalise == "mean")
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss {name!r} needs chosen_lengths and rejected_lengths (response lengths in tokens)")
    if name == "sigmoid":
        if hp.label_smoothing == 0:  # E9 itself: the same numbers as before this family existed
            loss, r_w, r_l = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps, hp.beta)
            return PreferenceLossResult(loss, r_w, r_l, -F.logsigmoid(r_w - r_l))
        return conservative_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, hp.beta, hp.label_smoothing)
    if name == "robust":
        return robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               hp.beta, hp.label_smoothing)
    if name == "ipo":
        return ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, hp.beta,
                        hp.ipo_normalise, chosen_lengths, rejected_lengths)
    if name == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                          hp.beta, hp.simpo_gamma)
    if name == "orpo":
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                         hp.orpo_lambda)
    # kto on pairs: the chosen responses are the desirable examples, the rejected ones the undesirable
    if kl_policy_logps is None or kl_ref_logps is None:
        raise ValueError("loss 'kto' needs kl_policy_logps and kl_ref_logps (mismatched responses, "
                         "kto_mismatched_index) for its reference point z_0")
    B = policy_chosen_logps.shape[0] if isinstance(policy_chosen_logps, torch.Tensor) else 0
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    desirable = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(
        policy_chosen_logps.device)
    return kto_loss(torch.cat([policy_chosen_logps, policy_rejected_logps]),
                    torch.cat([ref_chosen_logps, ref_rejected_logps]), desirable,
                    kto_reference_point(kl_policy_logps, kl_ref_logps), hp.beta,
                    hp.desirable_weight, hp.undesirable_weight)
