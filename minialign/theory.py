r"""Theory lab: what each alignment objective converges to, computed exactly on a small problem.

Sampling noise hides what an objective really optimises. Here the problem is small enough to
enumerate: one prompt, K possible responses (single-token "responses", so a response is one
token and the per-token losses of ``ppo.py`` / ``grpo.py`` apply with a (B, 1) mask), a reference
policy $\pi_{ref}$ and a true reward $r$ given as tables. Every expectation over samples is a
weighted sum over all possible samples, so each algorithm's expected gradient is computed exactly
and its loss functions (imported from the algorithm files, not copied) are run to convergence
with a softmax policy $\pi_\theta = \mathrm{softmax}(\theta)$, started at $\pi_{ref}$.

**E7, the target.** The maximiser of E2, $J(\pi) = \mathbb{E}_\pi[r] - \beta\,\mathrm{KL}(\pi\Vert\pi_{ref})$, is

$$\pi^*(y) = \pi_{ref}(y)\, e^{r(y)/\beta} / Z$$

(``dpo.optimal_policy``). As $\beta$ runs from $\infty$ to 0, $(\mathrm{KL}(\pi^*\Vert\pi_{ref}), \mathbb{E}_{\pi^*}[r])$
traces the **reward-KL frontier**: no policy has more reward at the same KL ($\pi^*$ maximises
$\mathbb{E}\,r - \beta\,\mathrm{KL}$), so every algorithm's landing point lies on or below it. End points:
$\beta\to\infty$ gives $\pi_{ref}$ (KL 0, reward $\mathbb{E}_{\pi_{ref}}[r]$); $\beta\to 0$ gives the
argmax of $r$ (KL $-\log\pi_{ref}(\arg\max r)$).

**KL estimators** (``ops.kl_k1/k2/k3``; samples $x\sim\pi$, $\log\rho = \log\pi_{ref}(x) - \log\pi(x)$):
k1 $= -\log\rho$ and k3 $= \rho - 1 - \log\rho$ are unbiased for $\mathrm{KL}(\pi\Vert\pi_{ref})$,
k2 $= \frac12(\log\rho)^2$ is biased. Used as a loss (the sample held fixed, the gradient through
$\log\pi(x)$) their expected gradients w.r.t. the logits are, exactly:

$$\mathbb{E}[\nabla k_1] = \mathbb{E}_\pi[\nabla\log\pi] = 0$$
$$\mathbb{E}[\nabla k_2] = \mathbb{E}_\pi[\log(\pi/\pi_{ref})\,\nabla\log\pi] = \nabla\mathrm{KL}(\pi\Vert\pi_{ref})$$
$$\mathbb{E}[\nabla k_3] = \mathbb{E}_\pi[(1 - \pi_{ref}/\pi)\,\nabla\log\pi] = -\mathbb{E}_{\pi_{ref}}[\nabla\log\pi] = \nabla\mathrm{KL}(\pi_{ref}\Vert\pi)\quad(= \pi - \pi_{ref}\text{ in logit coordinates})$$

so k3 in the loss (E13, DeepSeekMath) regularises the other direction, $\mathrm{KL}(\pi_{ref}\Vert\pi)$.
Used in the reward (detached, times the score $\nabla\log\pi$) k1 gives $\nabla\mathrm{KL}(\pi\Vert\pi_{ref})$
exactly (E2/E6), while k3 gives $\nabla\mathrm{KL}(\pi\Vert\pi_{ref}) - \nabla\mathrm{KL}(\pi_{ref}\Vert\pi)$:
only the sum of both paths is the gradient of $\mathbb{E}[k_3] = \mathrm{KL}$.

**Where each algorithm lands** (derived in ``docs/theory.md``, checked in ``tests/equations/test_theory.py``):

- DPO (E9) on infinitely many Bradley-Terry pairs drawn from $\pi_{ref}$: the expected loss is a
  cross-entropy between the label probability $\sigma(r_i - r_j)$ and $\sigma(\beta(h_i - h_j))$,
  $h = \log\pi/\pi_{ref}$; it is minimised exactly when $\beta(h_i - h_j) = r_i - r_j$ for every pair,
  i.e. at $\pi^*$. A response that never appears in a pair keeps its logit (the loss does not
  depend on it), so with incomplete coverage the fixed point depends on the initialisation.
- Policy gradient with the KL in the reward (E2/E6, ``ppo.per_token_rewards``, ``ppo.gae``,
  ``ppo.clipped_surrogate_loss``): the expected gradient is $\nabla J$ exactly, fixed point $\pi^*$.
- GRPO with k1 in the reward: the group advantage of response $y$ is 0 for all $y$ only when
  $r(y) - \beta\log(\pi/\pi_{ref})(y)$ is constant, i.e. at $\pi^*$, whether or not E12 divides by
  the std. With the std the advantages are scale-free (they do not shrink as the penalised rewards
  become equal), so a constant step chatters around $\pi^*$ at a distance set by the step size.
- GRPO with k3 in the loss (E13): stationary when $\pi(y)\,a(y) = \beta(\pi(y) - \pi_{ref}(y))$,
  where $a(y) = \mathbb{E}[A_i\mid y_i = y]$ is the group advantage of $y$ averaged over the rest of
  the group:

  $$\pi(y) = \frac{\pi_{ref}(y)}{1 - a(y)/\beta}.$$

  Without the std (``scale_by_std=False``) $a(y) = (1 - 1/G)(r(y) - \mathbb{E}_\pi r)$ and this is the
  maximiser of $\mathbb{E}_\pi[r] - \beta'\,\mathrm{KL}(\pi_{ref}\Vert\pi)$ with $\beta' = \beta G/(G-1)$:
  $\pi(y) = \beta'\pi_{ref}(y)/(\lambda - r(y))$ (``forward_kl_optimum``). With the std,
  $a(y) \approx (r(y) - \mathbb{E}_\pi r)/\mathrm{std}_\pi(r)$: roughly the same optimum at
  $\beta' \approx \beta\,\mathrm{std}_\pi(r)\,G/(G-1)$ (an approximation; the equation above is exact).
- GRPO with k3 in the reward (E14 with GRPO's estimator): stationary when $r(y) - \beta\,k_3(y)$ is
  the same on the support; $k_3(y) = u - 1 - \log u$ with $u = \pi_{ref}(y)/\pi(y)$ grows as
  $\pi(y)\to 0$, so an under-sampled response is penalised more and dies: a response whose $\pi(y)$
  falls below $\pi_{ref}(y)$ is on the unstable branch. On the surviving set $S$, $\pi(y) > \pi_{ref}(y)$
  solves $r(y) - \beta\,k_3(y) = c$ (``grpo_k3_reward_fixed_point``); which responses survive is
  decided by the path, not by $\pi_{ref}$.

Every exact quantity is computed in float64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from .ops import kl_k1, kl_k2, kl_k3

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# the problem: one prompt, K responses, a reference policy and a true reward given as tables
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    r"""$\pi_{ref}$ and $r$ over K responses of one prompt, and the KL coefficient $\beta$ of E2/E7."""
    ref_probs: torch.Tensor      # (K,) pi_ref(y), > 0, sums to 1
    rewards: torch.Tensor        # (K,) r(y)
    beta: float = 0.5
    name: str = "problem"

    def __post_init__(self):
        self.ref_probs = torch.as_tensor(self.ref_probs, dtype=DTYPE)
        self.rewards = torch.as_tensor(self.rewards, dtype=DTYPE)
        if self.ref_probs.dim() != 1 or self.ref_probs.numel() < 2:
            raise ValueError(f"ref_probs must be 1-D with at least 2 responses, got shape {tuple(self.ref_probs.shape)}")
        if self.rewards.shape != self.ref_probs.shape:
            raise ValueError(f"rewards {tuple(self.rewards.shape)} and ref_probs {tuple(self.ref_probs.shape)} differ")
        if (self.ref_probs <= 0).any() or abs(float(self.ref_probs.sum()) - 1) > 1e-9:
            raise ValueError("ref_probs must be > 0 everywhere and sum to 1 (every response reachable)")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    @property
    def K(self) -> int:
        return self.ref_probs.numel()


def graded_problem(beta: float = 0.5) -> Problem:
    r"""Six responses with graded rewards (like review sentiment); the best one is rare under $\pi_{ref}$."""
    return Problem(ref_probs=[0.30, 0.25, 0.20, 0.12, 0.08, 0.05],
                   rewards=[0.0, -0.5, 0.5, 1.0, -1.0, 2.0], beta=beta, name="graded")


def verifiable_problem(beta: float = 0.1) -> Problem:
    """Four answers scored 0/1 (like arithmetic): two right answers, the likelier one wrong."""
    return Problem(ref_probs=[0.45, 0.30, 0.15, 0.10], rewards=[0.0, 1.0, 0.0, 1.0],
                   beta=beta, name="verifiable")


# ----------------------------------------------------------------------------------------------
# exact quantities of a distribution over K responses
# ----------------------------------------------------------------------------------------------


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""$\mathrm{KL}(p\Vert q) = \sum_y p(y)\log\frac{p(y)}{q(y)}$, with $0\log 0 = 0$ ($\infty$ where $p > 0 = q$)."""
    p, q = torch.as_tensor(p, dtype=DTYPE), torch.as_tensor(q, dtype=DTYPE)
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation distance: half the L1 distance."""
    return 0.5 * (torch.as_tensor(p, dtype=DTYPE) - torch.as_tensor(q, dtype=DTYPE)).abs().sum(-1)


def expected_reward(p: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return (torch.as_tensor(p, dtype=DTYPE) * rewards).sum(-1)


def pi_star(problem: Problem, beta: float | None = None) -> torch.Tensor:
    """E7 for the problem (at ``beta``, default the problem's): ``dpo.optimal_policy``."""
    from .dpo import optimal_policy
    return optimal_policy(problem.ref_probs, problem.rewards, problem.beta if beta is None else beta)


def objective(p: torch.Tensor, problem: Problem) -> torch.Tensor:
    r"""E2 exactly: $\mathbb{E}_\pi[r] - \beta\,\mathrm{KL}(\pi\Vert\pi_{ref})$."""
    return expected_reward(p, problem.rewards) - problem.beta * kl(p, problem.ref_probs)


def frontier(problem: Problem, betas) -> dict[str, torch.Tensor]:
    r"""The reward-KL frontier: $\pi^*(\beta)$ of E7 for each $\beta$, its $\mathbb{E}[r]$ and $\mathrm{KL}(\pi^*\Vert\pi_{ref})$."""
    betas = torch.as_tensor(betas, dtype=DTYPE)
    policies = torch.stack([pi_star(problem, float(b)) for b in betas])  # (N, K)
    return {"beta": betas, "policy": policies,
            "reward": expected_reward(policies, problem.rewards),
            "kl": kl(policies, problem.ref_probs)}


def frontier_reward_at(problem: Problem, kl_value: float, tol: float = 1e-12) -> float:
    r"""The frontier's reward at a given KL (bisection on $\log\beta$: $\mathrm{KL}(\pi^*(\beta))$ falls as $\beta$ grows)."""
    kl_max = float(-torch.log(problem.ref_probs[problem.rewards == problem.rewards.max()].sum()))
    if kl_value >= kl_max:
        return float(problem.rewards.max())
    if kl_value <= 0:
        return float(expected_reward(problem.ref_probs, problem.rewards))
    lo, hi = -12.0, 12.0  # log beta
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(kl(pi_star(problem, math.exp(mid)), problem.ref_probs)) > kl_value:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return float(expected_reward(pi_star(problem, math.exp(0.5 * (lo + hi))), problem.rewards))


# ----------------------------------------------------------------------------------------------
# KL estimators k1, k2, k3: exact bias and spread, and the expected gradient when used as a loss
# ----------------------------------------------------------------------------------------------

ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def estimator_moments(logp: torch.Tensor, logq: torch.Tensor) -> dict[str, dict[str, float]]:
    r"""Exact mean, bias and std of one sample of k1, k2, k3 for $x\sim p$, estimating $\mathrm{KL}(p\Vert q)$.

    ``logp``, ``logq`` (N,): log-probabilities of p (the sampling policy) and q (the reference)
    over the N outcomes. Returns {"kl": ..., "k1": {"mean", "bias", "std"}, ...}.
    """
    p = logp.exp()
    true_kl = float((p * (logp - logq)).sum())
    out: dict = {"kl": true_kl}
    for name, k in ESTIMATORS.items():
        values = k(logp, logq)                                 # (N,) the estimate at each outcome
        mean = float((p * values).sum())                       # E_p[k]
        var = float((p * (values - mean) ** 2).sum())          # Var_p[k] of one sample
        out[name] = {"mean": mean, "bias": mean - true_kl, "std": math.sqrt(max(var, 0.0))}
    return out


def discretised_gaussian(mu: float, grid: torch.Tensor) -> torch.Tensor:
    r"""log-probabilities of $N(\mu, 1)$ restricted to the points of ``grid`` (a categorical)."""
    return torch.log_softmax(-0.5 * (grid - mu) ** 2, dim=0)


def gaussian_estimator_table(mus=(0.1, 0.5, 1.0, 2.0), n_grid: int = 8001) -> list[dict]:
    r"""Schulman's (2020) experiment, exactly: samples from $p = N(0,1)$, reference $q = N(\mu,1)$,
    $\mathrm{KL} = \mu^2/2$, both discretised on a fine grid. One row per $\mu$, bias and std relative to KL."""
    grid = torch.linspace(-14.0, 16.0, n_grid, dtype=DTYPE)
    logp = discretised_gaussian(0.0, grid)
    rows = []
    for mu in mus:
        m = estimator_moments(logp, discretised_gaussian(mu, grid))
        row = {"pair": f"N(0,1) vs N({mu:g},1)", "kl": m["kl"]}
        for name in ESTIMATORS:
            row[f"{name}_bias"] = m[name]["bias"] / m["kl"]
            row[f"{name}_std"] = m[name]["std"] / m["kl"]
        rows.append(row)
    return rows


def tilted_policy(problem: Problem, t: float) -> torch.Tensor:
    r"""$\pi_t = \mathrm{softmax}(\log\pi_{ref} + t\,r)$: a policy at a controllable distance from $\pi_{ref}$ ($= \pi^*$ at $\beta = 1/t$)."""
    return torch.softmax(torch.log(problem.ref_probs) + t * problem.rewards, dim=0)


def estimator_gradients(logits: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Expected gradient w.r.t. the logits of $p = \mathrm{softmax}(\text{logits})$, for samples $x\sim p$, of:

    - "true": $\mathrm{KL}(p\Vert q)$ itself;
    - "k1_loss", "k2_loss", "k3_loss": the estimator used as a loss, $\sum_x p(x)\,\nabla k(\log p(x), \log q(x))$
      (the sample held fixed, the gradient through $\log p(x)$: what a per-token KL term in a loss does);
    - "k1_reward", "k3_reward": the estimator put in the reward, detached, as a score-function term
      $\sum_x p(x)\,k(x)\,\nabla\log p(x)$ (what a KL penalty in the reward does, E6 / E14);
    - "k3_both": both paths of $\mathbb{E}[k_3]$, the full gradient of the unbiased estimate.
    """
    theta = logits.detach().to(DTYPE)
    logq = logq.detach().to(DTYPE)
    out = {}

    def grad(fn) -> torch.Tensor:
        th = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(th, dim=0)
        (g,) = torch.autograd.grad(fn(logp), th)
        return g

    p = torch.softmax(theta, 0)  # the sampling distribution: a weight, no gradient through it
    out["true"] = grad(lambda logp: (logp.exp() * (logp - logq)).sum())
    for name, k in ESTIMATORS.items():
        out[f"{name}_loss"] = grad(lambda logp, k=k: (p * k(logp, logq)).sum())
    for name in ("k1", "k3"):
        k = ESTIMATORS[name]
        out[f"{name}_reward"] = grad(lambda logp, k=k: (p * k(logp, logq).detach() * logp).sum())
    out["k3_both"] = out["k3_loss"] + out["k3_reward"]
    return out


def estimator_gradient_table(problem: Problem, ts=(0.25, 0.5, 1.0, 2.0)) -> list[dict]:
    r"""For policies $\pi_t$ (``tilted_policy``) at several distances from $\pi_{ref}$: the exact KL, the
    bias/std of each estimator, and for each expected gradient its cosine with $\nabla\mathrm{KL}(\pi\Vert\pi_{ref})$
    and its norm relative to it."""
    rows = []
    logq = torch.log(problem.ref_probs)
    for t in ts:
        logits = torch.log(tilted_policy(problem, t))
        m = estimator_moments(torch.log_softmax(logits, 0), logq)
        grads = estimator_gradients(logits, logq)
        g_true = grads["true"]
        row = {"t": t, "kl": m["kl"]}
        for name in ESTIMATORS:
            row[f"{name}_bias"], row[f"{name}_std"] = m[name]["bias"], m[name]["std"]
        for name, g in grads.items():
            if name == "true":
                continue
            norm = float(g.norm())
            row[f"{name}_cos"] = float(g @ g_true) / (norm * float(g_true.norm())) if norm > 1e-15 else 0.0
            row[f"{name}_norm"] = norm / float(g_true.norm())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# exact expected losses: every sample weighted by its probability, through the algorithm files
# ----------------------------------------------------------------------------------------------


def _one_token(x: torch.Tensor) -> torch.Tensor:
    """(K,) per-response values -> (K, 1): a single-token response is a sequence of length T = 1."""
    return x.reshape(-1, 1)


def dpo_expected_loss(theta: torch.Tensor, problem: Problem, pair_probs: torch.Tensor | None = None
                      ) -> torch.Tensor:
    r"""E9 in expectation over infinitely many Bradley-Terry pairs (``dpo.dpo_loss``, one call per pair).

    Two responses $y_i \ne y_j$ are drawn independently from ``pair_probs`` (default $\pi_{ref}$, as the
    DPO paper's preference data come from the SFT model) and labelled with the true reward through
    E3: $y_i$ wins with probability $\sigma(r_i - r_j)$. Either draw order can give (chosen $i$, rejected
    $j$), so it has weight $2\mu_i\mu_j\sigma(r_i - r_j) / (1 - \sum_k \mu_k^2)$ with $\mu$ = ``pair_probs``
    (the weights sum to 1).
    """
    from .dpo import dpo_loss, preference_probability
    mu = problem.ref_probs if pair_probs is None else torch.as_tensor(pair_probs, dtype=DTYPE)
    logp = torch.log_softmax(theta, 0)                   # (K,) log pi_theta(y)
    logref = torch.log(problem.ref_probs)                # (K,)
    r = problem.rewards
    norm = 1 - (mu ** 2).sum()                           # P(y_i != y_j)
    total = theta.new_zeros(())
    for i in range(problem.K):
        for j in range(problem.K):
            weight = 2 * mu[i] * mu[j] * preference_probability(r[i], r[j]) / norm  # E3 label probability
            if i == j or weight == 0:
                continue
            loss, _, _ = dpo_loss(logp[i:i + 1], logp[j:j + 1], logref[i:i + 1], logref[j:j + 1],
                                  problem.beta)
            total = total + weight * loss
    return total


def pg_expected_loss(theta: torch.Tensor, problem: Problem, old_theta: torch.Tensor | None = None,
                     clip_eps: float = 0.2) -> torch.Tensor:
    r"""E2/E6: the PPO surrogate with the KL in the reward, in expectation over $y\sim\pi_{old}$.

    ``ppo.per_token_rewards`` gives $r(y) - \beta(\log\pi_{old}(y) - \log\pi_{ref}(y))$ on the one token;
    the critic is exact, $V = \mathbb{E}_{\pi_{old}}$[that reward]; ``ppo.gae`` ($\gamma = \lambda = 1$) gives
    $A(y)$ = reward $- V$; ``ppo.clipped_surrogate_loss`` is called once per response and weighted
    by $\pi_{old}(y)$. With ``old_theta`` = theta (the default, one step per rollout) its gradient is
    $\mathbb{E}_\pi[A\,\nabla\log\pi] = \nabla J(\pi)$ of E2 exactly.
    """
    from .ppo import clipped_surrogate_loss, gae, per_token_rewards
    old_theta = theta.detach() if old_theta is None else old_theta.detach()
    logp = torch.log_softmax(theta, 0)                   # (K,)
    old_logp = torch.log_softmax(old_theta, 0)           # (K,)
    p_old = old_logp.exp()
    mask = torch.ones(problem.K, 1, dtype=DTYPE)         # (K, 1): each response is one token
    rewards = per_token_rewards(problem.rewards, _one_token(old_logp), _one_token(torch.log(problem.ref_probs)),
                                mask, problem.beta)      # (K, 1)  E2: r - beta (log pi - log pi_ref)
    value = (p_old * rewards[:, 0]).sum()                # V(x) = E_{pi_old}[r - beta log(pi/pi_ref)], exact
    advantages, _ = gae(rewards, value.expand(problem.K, 1).clone(), mask, gamma=1.0, lam=1.0)  # E6: r - V
    total = theta.new_zeros(())
    for y in range(problem.K):
        loss, _ = clipped_surrogate_loss(logp[y:y + 1, None], old_logp[y:y + 1, None],
                                         advantages[y:y + 1], mask[y:y + 1], clip_eps)  # E5
        total = total + p_old[y] * loss
    return total


class GroupEnumeration:
    """Every group of G responses out of K, as multisets (the order inside a group changes no
    advantage), with their multinomial coefficients: C(K+G-1, G) groups instead of K^G."""

    def __init__(self, K: int, G: int):
        if G < 2:
            raise ValueError(f"group size must be >= 2, got {G}")
        self.K, self.G = K, G
        groups = list(itertools.combinations_with_replacement(range(K), G))
        self.members = torch.tensor(groups, dtype=torch.long)                          # (M, G)
        counts = torch.zeros(len(groups), K, dtype=DTYPE)                              # (M, K)
        counts.scatter_add_(1, self.members, torch.ones(len(groups), G, dtype=DTYPE))
        self.counts = counts
        # log of the multinomial coefficient G! / prod_y n_y!: the number of orderings of a multiset
        self.log_coef = math.lgamma(G + 1) - torch.lgamma(counts + 1).sum(1)           # (M,)

    def probabilities(self, logp: torch.Tensor) -> torch.Tensor:
        """P(group) for groups of G independent samples of pi (logp (K,)): (M,), sums to 1."""
        return torch.exp(self.log_coef + (self.counts * logp.detach()).sum(1))


def conditional_advantages(rewards: torch.Tensor, logp: torch.Tensor, groups: GroupEnumeration,
                           eps: float = 1e-4, scale_by_std: bool = True) -> torch.Tensor:
    r"""$a(y) = \mathbb{E}[A_i\mid y_i = y]$: E12's advantage of response $y$ averaged over the rest of its group.

    Exact: ``grpo.group_advantages`` on every group (E11-E12), each weighted by its probability.
    The expected GRPO policy gradient is then $\sum_y \pi(y)\,a(y)\,\nabla\log\pi(y)$, because E13's
    surrogate at $\rho = 1$ is linear in the advantage.
    """
    from .grpo import group_advantages
    P = groups.probabilities(logp)                                           # (M,)
    r = rewards.detach()[groups.members]                                     # (M, G) each member's reward
    A = group_advantages(r.reshape(-1), groups.G, eps=eps, scale_by_std=scale_by_std).view(r.shape)  # (M, G)
    # sum over groups and members of P(g) A_{g,i} [y_{g,i} = y]  =  G pi(y) a(y)
    mass = torch.zeros(groups.K, dtype=DTYPE).index_add_(0, groups.members.reshape(-1),
                                                        (P[:, None] * A).reshape(-1))
    p = logp.detach().exp()
    return mass / (groups.G * p.clamp_min(1e-300))


def grpo_expected_loss(theta: torch.Tensor, problem: Problem, groups: GroupEnumeration,
                       kl_in: str = "loss", scale_by_std: bool = True, estimator: str = "k3",
                       eps: float = 1e-4, clip_eps: float = 0.2,
                       old_theta: torch.Tensor | None = None) -> torch.Tensor:
    r"""E13 / E14 in expectation over groups of G samples of $\pi_{old} = \pi_\theta$ (detached).

    ``kl_in="loss"`` (E13): the loss holds $\beta\,k_3$ per token; the reward is $r$. ``kl_in="reward"``
    (E14): ``grpo.kl_penalised_rewards`` subtracts $\beta\cdot$ a KL estimate (k3 by default,
    ``estimator``) from $r$ before E11-E12, and the loss has no KL term. The per-response losses of
    ``grpo.grpo_loss`` are weighted by $\pi_{old}(y)$ with the conditional advantage $a(y)$
    (``conditional_advantages``). E13's surrogate $\min(\rho A, \mathrm{clip}(\rho) A)$ is $\rho A$, linear in
    $A$, while every ratio is inside $[1-\epsilon, 1+\epsilon]$ (always at $\pi_\theta = \pi_{old}$), so there this
    has exactly the value and gradient of the GRPO loss averaged over all groups
    (``tests/equations/test_theory.py`` checks it against a brute-force sum over every ordered group).
    ``old_theta`` (default: theta, detached) is $\pi_{old}$, which samples the groups.
    """
    from .grpo import grpo_loss, kl_penalised_rewards
    logp = torch.log_softmax(theta, 0)                   # (K,)
    old_logp = torch.log_softmax((theta if old_theta is None else old_theta).detach(), 0)
    ref_logp = torch.log(problem.ref_probs)
    mask = torch.ones(problem.K, 1, dtype=DTYPE)
    if kl_in == "reward":
        rewards = kl_penalised_rewards(problem.rewards, _one_token(old_logp), _one_token(ref_logp), mask,
                                       problem.beta, estimator=estimator).to(DTYPE)  # E14: r - beta KL
        loss_beta = 0.0
    elif kl_in == "loss":
        rewards, loss_beta = problem.rewards, problem.beta
    else:
        raise ValueError(f"kl_in must be 'loss' or 'reward', got {kl_in!r}")
    a = conditional_advantages(rewards, old_logp, groups, eps=eps, scale_by_std=scale_by_std)  # (K,)
    p_old = old_logp.exp()
    total = theta.new_zeros(())
    for y in range(problem.K):
        loss, _ = grpo_loss(logp[y:y + 1, None], old_logp[y:y + 1, None], ref_logp[y:y + 1, None],
                            a[y:y + 1], mask[y:y + 1], clip_eps=clip_eps, beta=loss_beta, kl_in=kl_in)
        total = total + p_old[y] * loss
    return total


# ----------------------------------------------------------------------------------------------
# running an expected loss to convergence
# ----------------------------------------------------------------------------------------------


FLOOR = -60.0  # logits are kept >= FLOOR below the largest one: pi(y) < 1e-26 counts as dead


@dataclass
class ExactRun:
    """Where one algorithm's exact gradient flow ends."""
    name: str
    policy: torch.Tensor          # (K,) the converged pi_theta
    steps: int                    # gradient steps taken
    grad_norm: float              # max |grad| over the live responses at the end (0 at a fixed point)
    history: list = field(default_factory=list)   # (step, E[r], KL(pi||pi_ref)) every log_every steps


def run_to_convergence(loss_fn, theta0: torch.Tensor, problem: Problem, name: str = "run",
                       lr: float = 1.0, max_steps: int = 20000, tol: float = 1e-9,
                       log_every: int = 10, precondition="natural", lr_decay: float = 0.0) -> ExactRun:
    """Gradient descent on the logits with the exact expected gradient of ``loss_fn(theta)``.

    ``precondition``: ``"natural"`` divides each logit's gradient by pi(y) (a diagonal
    preconditioner, mirror descent's step on the simplex) so rare responses move as fast as common
    ones; a (K,) tensor divides by that tensor (``dpo_curvature`` for DPO); None is plain gradient
    descent. A diagonal preconditioner changes the path, not the fixed points (grad = 0 is the same
    set of points). ``lr_decay``: step lr / (1 + lr_decay * step), for gradients that do not shrink
    near the fixed point (GRPO's std-normalised advantages). Stops when the gradient over the
    live responses (``ExactRun.grad_norm``) is below ``tol``.
    """
    theta = theta0.detach().clone().to(DTYPE)
    history = []
    g_max = float("inf")
    step = 0
    for step in range(1, max_steps + 1):
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(th), th)
        p = torch.softmax(theta, 0)
        # stationarity: the gradient over the live responses. A response that has died (its logit
        # at the floor below) keeps a gradient pushing it further down, and the softmax returns
        # that gradient on the live logits as a push proportional to pi(y), which moves no
        # probability among them; so measure g(y) - pi(y) * sum_live(g) / sum_live(pi).
        live = theta > FLOOR
        g_max = float((g - p * g[live].sum() / p[live].sum())[live].abs().max())
        if step <= 20 or step % log_every == 1:  # the first steps move most: log each of them
            history.append((step, float(expected_reward(p, problem.rewards)), float(kl(p, problem.ref_probs))))
        if g_max < tol:
            break
        if isinstance(precondition, str) and precondition == "natural":
            g = g / p.clamp_min(1e-12)
        elif precondition is not None:
            g = g / precondition
        theta = theta - lr / (1 + lr_decay * step) * g
        # softmax is shift-invariant: keep the largest logit at 0, and floor the others
        # (pi < 1e-26: a response that has died) so that log pi stays finite
        theta = (theta - theta.max()).clamp_min(FLOOR)
    p = torch.softmax(theta, 0)
    history.append((step, float(expected_reward(p, problem.rewards)), float(kl(p, problem.ref_probs))))
    return ExactRun(name, torch.softmax(theta, 0), step, g_max, history)


def dpo_curvature(problem: Problem, pair_probs: torch.Tensor | None = None) -> torch.Tensor:
    r"""The diagonal of the expected DPO loss's Hessian at $\pi^*$ (w.r.t. the logits), a preconditioner:
    $\beta^2\sum_j (w_{ij} + w_{ji})\,\sigma(r_i - r_j)\,\sigma(r_j - r_i)$, $w$ the pair weights of
    ``dpo_expected_loss``. Plain gradient descent is slow on it: rare pairs have tiny weights."""
    mu = problem.ref_probs if pair_probs is None else torch.as_tensor(pair_probs, dtype=DTYPE)
    r = problem.rewards
    s = torch.sigmoid(r[:, None] - r[None, :])                     # (K, K) sigma(r_i - r_j)
    w = 2 * mu[:, None] * mu[None, :] * s / (1 - (mu ** 2).sum())  # (K, K) weight of (chosen i, rejected j)
    w.fill_diagonal_(0)
    return problem.beta ** 2 * ((w + w.T) * s * s.T).sum(1)


# ----------------------------------------------------------------------------------------------
# fixed points derived by hand, to check the runs against
# ----------------------------------------------------------------------------------------------


def forward_kl_optimum(problem: Problem, beta: float) -> torch.Tensor:
    r"""$\arg\max_\pi \mathbb{E}_\pi[r] - \beta\,\mathrm{KL}(\pi_{ref}\Vert\pi)$: $\pi(y) = \beta\pi_{ref}(y)/(\lambda - r(y))$, with
    $\lambda > \max r$ chosen by bisection so that $\pi$ sums to 1 (the sum falls from $\infty$ to 0)."""
    q, r = problem.ref_probs, problem.rewards
    lo, hi = float(r.max()), float(r.max()) + beta + 1.0
    while float((beta * q / (hi - r)).sum()) > 1:
        hi += 2 * (hi - lo)
    for _ in range(300):
        lam = 0.5 * (lo + hi)
        if float((beta * q / (lam - r)).sum()) > 1:
            lo = lam
        else:
            hi = lam
    p = beta * q / (0.5 * (lo + hi) - r)
    return p / p.sum()


def grpo_k3_loss_fixed_point_residual(p: torch.Tensor, problem: Problem, groups: GroupEnumeration,
                                      scale_by_std: bool = True, eps: float = 1e-4) -> float:
    r"""$\max_y |\pi(y) - \pi_{ref}(y)/(1 - a(y)/\beta)|$: 0 at a fixed point of GRPO with k3 in the loss."""
    a = conditional_advantages(problem.rewards, torch.log(p), groups, eps=eps, scale_by_std=scale_by_std)
    return float((p - problem.ref_probs / (1 - a / problem.beta)).abs().max())


def grpo_k3_loss_effective_beta(p: torch.Tensor, problem: Problem, G: int, scale_by_std: bool = True) -> float:
    r"""The $\beta'$ of ``forward_kl_optimum`` that GRPO-k3-in-the-loss behaves as: $\beta G/(G-1)$,
    times $\mathrm{std}_\pi(r)$ when E12 divides by the std (a large-G approximation: $a(y) \approx (r - \text{mean})/\text{std}$)."""
    b = problem.beta * G / (G - 1)
    if scale_by_std:
        mean = expected_reward(p, problem.rewards)
        b = b * float(torch.sqrt((p * (problem.rewards - mean) ** 2).sum()))
    return b


def grpo_k3_reward_fixed_point(problem: Problem, support: torch.Tensor) -> tuple[torch.Tensor, float]:
    r"""The fixed point of GRPO with k3 in the reward (E14) whose surviving responses are ``support``.

    Off the support $\pi = 0$ (a response with $\pi\to 0$ has $k_3 = \pi_{ref}/\pi - 1 - \log(\pi_{ref}/\pi)\to\infty$,
    so it is always the worst of its group and keeps falling). On the support every group advantage
    vanishes only if the penalised reward is the same: $r(y) - \beta k_3(y) = c$. With
    $v = \pi(y)/\pi_{ref}(y)$, $k_3 = 1/v - 1 + \log v$, which has two branches; the stable one is $v \ge 1$ (more
    $\pi$, more penalty, pushed back), so $\pi(y) = \pi_{ref}(y)\,v(y)$ with $1/v - 1 + \log v = (r(y) - c)/\beta$, and
    $c$ is found by bisection so that $\pi$ sums to 1. ``support`` (K,) bool. Returns ($\pi$, c).
    """
    q, r, beta = problem.ref_probs, problem.rewards, problem.beta
    support = torch.as_tensor(support, dtype=torch.bool)
    if support.shape != q.shape or not support.any():
        raise ValueError(f"support must be a (K,) = ({problem.K},) bool tensor with at least one response")

    def policy(c: float) -> torch.Tensor:
        p = torch.zeros_like(q)
        for y in support.nonzero().flatten().tolist():
            p[y] = q[y] * _k3_inverse_v(max((float(r[y]) - c) / beta, 0.0))
        return p

    # at c = min_S r every v >= 1, and the sum grows without bound as c falls
    lo, hi = float(r.min()) - 1.0, float(r[support].min())
    while float(policy(lo).sum()) < 1:
        lo -= 2 * (hi - lo)
    if float(policy(hi).sum()) >= 1:
        raise ValueError("no fixed point with this support: its responses at v = 1 already hold all the mass")
    for _ in range(200):
        c = 0.5 * (lo + hi)
        if float(policy(c).sum()) > 1:
            lo = c
        else:
            hi = c
    c = 0.5 * (lo + hi)
    return policy(c), c


def k3_penalised_spread(p: torch.Tensor, problem: Problem, threshold: float = 1e-6) -> float:
    r"""max - min of $r(y) - \beta k_3(y)$ over the responses with $\pi(y)$ > threshold: 0 at a fixed point of
    GRPO with k3 in the reward."""
    logp = torch.log(p)
    penalised = problem.rewards - problem.beta * kl_k3(logp, torch.log(problem.ref_probs))
    alive = p > threshold
    return float(penalised[alive].max() - penalised[alive].min())


def _k3_inverse_v(level: float) -> float:
    r"""The $v \ge 1$ with $1/v - 1 + \log v$ = level ($k_3$ at $\pi/\pi_{ref} = v$; increasing in $v$ for $v > 1$)."""
    lo, hi = 1.0, 2.0
    while 1 / hi - 1 + math.log(hi) < level:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1 / mid - 1 + math.log(mid) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# the landing table: every algorithm on one problem
# ----------------------------------------------------------------------------------------------


@dataclass
class Landing:
    """One algorithm's exact run and the fixed point derived for it."""
    algorithm: str
    run: ExactRun
    predicted: torch.Tensor       # (K,) the derived fixed point
    prediction: str               # what the derived fixed point is
    residual: float               # how far the run is from satisfying the derived fixed-point condition


def landings(problem: Problem, G: int = 4, max_steps: int = 3000, lr: float = 0.5,
             tol: float = 1e-10) -> list[Landing]:
    """Run every algorithm variant to convergence on ``problem`` (groups of ``G`` for GRPO) and
    compare each landing point with its derived fixed point.

    GRPO with E12's std and the KL in the *reward* gets a decaying step: its advantages are
    scale-free (they do not shrink as the penalised rewards become equal), so a constant step
    chatters around the fixed point at a distance set by the step size.
    """
    star = pi_star(problem)
    groups = GroupEnumeration(problem.K, G)
    theta0 = torch.log(problem.ref_probs)             # every run starts at pi_theta = pi_ref
    beta_prime = problem.beta * G / (G - 1)

    def grpo(kl_in, std, estimator="k3"):
        return lambda th: grpo_expected_loss(th, problem, groups, kl_in, scale_by_std=std, estimator=estimator)

    specs = [
        # name, loss, run settings, prediction(p) -> (predicted, label, residual)
        ("DPO, pairs ~ pi_ref (E9)", lambda th: dpo_expected_loss(th, problem),
         dict(precondition=dpo_curvature(problem), lr=1.0), "pi*"),
        ("PG, k1 in reward (E2/E6)", lambda th: pg_expected_loss(th, problem), {}, "pi*"),
        (f"GRPO G={G}, k1 in reward, no std", grpo("reward", False, "k1"), {}, "pi*"),
        (f"GRPO G={G}, k1 in reward", grpo("reward", True, "k1"), dict(lr_decay=0.1), "pi*"),
        (f"GRPO G={G}, k3 in loss, no std", grpo("loss", False), {}, "forward"),
        (f"GRPO G={G}, k3 in loss (E13)", grpo("loss", True), {}, "self-consistent"),
        (f"GRPO G={G}, k3 in reward, no std", grpo("reward", False), {}, "k3-reward"),
        (f"GRPO G={G}, k3 in reward (E14)", grpo("reward", True), dict(lr_decay=0.1), "k3-reward"),
    ]
    out = []
    for name, loss_fn, settings, kind in specs:
        settings = {"lr": lr, **settings}
        run = run_to_convergence(loss_fn, theta0, problem, name, max_steps=max_steps, tol=tol, **settings)
        p = run.policy
        if kind == "pi*":
            predicted, label = star, "pi* (E7)"
            residual = float(tv(p, star))
        elif kind == "forward":
            predicted = forward_kl_optimum(problem, beta_prime)
            label = f"argmax E r - {beta_prime:.3g} KL(pi_ref||pi)"
            residual = float(tv(p, predicted))
        elif kind == "self-consistent":
            predicted = forward_kl_optimum(problem, grpo_k3_loss_effective_beta(p, problem, G, True))
            label = "pi = pi_ref/(1 - a(y)/beta); ~ forward-KL optimum at beta*std*G/(G-1)"
            residual = grpo_k3_loss_fixed_point_residual(p, problem, groups, scale_by_std=True)
        else:
            support = p > 1e-6
            try:
                predicted, c = grpo_k3_reward_fixed_point(problem, support)
                label = f"r - beta k3 = {c:.3f} on the {int(support.sum())} surviving responses"
                residual = float(tv(p, predicted))
            except ValueError:  # a dying response still above 1e-6: the run has not converged
                predicted = torch.full_like(p, float("nan"))
                label = "no k3 fixed point on the responses still alive (not converged)"
                residual = float("nan")
        out.append(Landing(name, run, predicted, label, residual))
    return out


def landing_row(landing: Landing, problem: Problem) -> dict:
    r"""The table row of a landing: where it is, how good it is, how far from $\pi^*$ and from its prediction."""
    p, star = landing.run.policy, pi_star(problem)
    return {"algorithm": landing.algorithm, "reward": float(expected_reward(p, problem.rewards)),
            "kl": float(kl(p, problem.ref_probs)), "objective": float(objective(p, problem)),
            "tv_to_pi_star": float(tv(p, star)), "kl_to_pi_star": max(0.0, float(kl(p, star))),  # >= 0 up to rounding
            "steps": landing.run.steps, "grad": landing.run.grad_norm,
            "prediction": landing.prediction, "residual": landing.residual,
            "tv_to_prediction": float(tv(p, landing.predicted)),
            "policy": [round(float(x), 4) for x in p]}
