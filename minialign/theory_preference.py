r"""Theory lab, part 2: where each member of the preference family converges, computed exactly.

The problems, the exact quantities and the optimiser are ``theory.py``'s (read it first): one
prompt, K single-token responses, $\pi_{ref}$ and the true reward $r$ as tables, a softmax policy
started at $\pi_{ref}$ and run with its exact expected gradient (``theory.run_to_convergence``).
The losses are ``preference.py``'s, called on the batch of all K(K-1) ordered pairs and weighted
by each pair's probability, so the lab runs the code that training runs.

**The data, exactly.** Two distinct responses are drawn from $\mu = \pi_{ref}$ and labelled: response
$i$ is chosen over $j$ with probability $Q_{ij}$ (``label_probabilities``): Bradley-Terry with the
true reward, $Q_{ij} = \sigma(r_i - r_j)$, as the toy world labels its pairs; optionally each label is
then flipped with probability $\epsilon_0$ (annotators who err), or the labels are deterministic
($Q_{ij} = 1$ if $r_i > r_j$). The ordered pair (chosen $i$, rejected $j$) has weight
$W_{ij} = 2\mu_i\mu_j Q_{ij}/(1 - \sum_k\mu_k^2)$ (``pair_weights``, as ``theory.dpo_expected_loss``).
KTO's unpaired data are the same pairs split: each chosen response a desirable example, each
rejected one an undesirable example (a like-for-like comparison).

**What each member converges to** (each checked in ``tests/equations/test_theory_preference.py`` by a second,
different computation: a closed form, or the stationarity equations written out by hand and solved
by Newton's method or bisection, never through ``preference.py`` or autograd):

- **IPO**, closed form: the normal equations of the squared loss give
  $\log\frac{\pi(y)}{\pi_{ref}(y)} = \frac{1}{\beta}\bar p(y) + c$, $\bar p(y) = \sum_j \mu_j Q_{yj}$ (the probability that
  $y$ wins against a fresh draw from $\mu$, $Q_{yy} = \frac12$), so

  $$\pi_{IPO}(y) \propto \pi_{ref}(y)\exp\big(\bar p(y)/\beta\big)$$

  (Azar et al.'s $\Psi$PO optimum with $\Psi$ = identity): E7 with the *win rate* in place of $r$. The
  win rate lies in $[0, 1]$, so IPO moves far less than DPO at the same $\beta$, and it stays finite
  under deterministic labels, where DPO has no minimiser.
- **DPO with flipped labels, cDPO, rDPO, SimPO**: pairwise losses $\varphi(s_w - s_l)$ of a score
  $s$ ($\log\pi/\pi_{ref}$, or $\log\pi$ for SimPO); stationary where
  $\sum_j W_{ij}\varphi'(s_i - s_j) = \sum_j W_{ji}\varphi'(s_j - s_i)$ for every $i$ (``pairwise_optimum``). rDPO with
  the true flip rate is E9 on clean labels in expectation: its optimum is $\pi^*$ exactly.
- **KTO** (``kto_optimum``): with $a_y = \lambda_D D_y - \lambda_U U_y$ ($D_y$, $U_y$ the probabilities that $y$ is
  chosen, rejected), every response with $a_y \le 0$ dies ($\pi(y)\to 0$) and the others solve
  $\frac12\beta a_y\,\sigma'(\beta(s_y - z_0)) = \kappa\,\pi(y)$, one $\kappa$ for all (for $\beta \le 1$ each equation has one root),
  with $z_0$ its own fixed point (the exact KL, or the data estimate TRL uses, clamped at 0).
- **ORPO** (``orpo_optimum``): no closed form for $\lambda > 0$; at $\lambda = 0$ it is SFT on the chosen
  responses, $\pi(y) = D_y$.
- **Best-of-N** (``best_of_n.best_of_n_table``): exact, with its law in ``best_of_n.py``; the curve $(\mathrm{KL}, \mathbb{E}\,r)$ for
  N = 1..64 beside E7's frontier and beside $\log N - \frac{N-1}{N}$.

``python -m minialign.theory_preference`` prints every table of ``docs/preference.md``.
Every quantity is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import preference as P
from .best_of_n import best_of_n_table, continuous_limit_table
from .theory import (DTYPE, Problem, expected_reward, frontier_reward_at, graded_problem, kl, pi_star,
                     run_to_convergence, tv, verifiable_problem)

# ----------------------------------------------------------------------------------------------
# the data: label probabilities and the weights of the ordered pairs
# ----------------------------------------------------------------------------------------------


def label_probabilities(problem: Problem, flip_rate: float = 0.0, deterministic: bool = False) -> torch.Tensor:
    r"""$Q_{ij}$ = P(response $i$ is labelled chosen over $j$), (K, K); $Q_{ii} = \frac12$.

    Bradley-Terry with the true reward, $\sigma(r_i - r_j)$ (E3, the toy world's labels), or with
    ``deterministic`` the true order (1, 0, or $\frac12$ for equal rewards); then each label flipped
    with probability ``flip_rate`` $\epsilon_0$: $Q \to (1-\epsilon_0)Q + \epsilon_0(1 - Q)$."""
    if not 0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}")
    r = problem.rewards
    gap = r[:, None] - r[None, :]                                      # (K, K) r_i - r_j
    Q = (torch.sign(gap) + 1) / 2 if deterministic else torch.sigmoid(gap)
    return (1 - flip_rate) * Q + flip_rate * (1 - Q)


def pair_weights(problem: Problem, labels: torch.Tensor, pair_probs: torch.Tensor | None = None) -> torch.Tensor:
    r"""$W_{ij} = 2\mu_i\mu_j Q_{ij}/(1 - \sum_k\mu_k^2)$ for $i \ne j$, 0 on the diagonal: P(chosen $i$, rejected $j$), sums to 1."""
    mu = problem.ref_probs if pair_probs is None else torch.as_tensor(pair_probs, dtype=DTYPE)
    W = 2 * mu[:, None] * mu[None, :] * labels / (1 - (mu ** 2).sum())
    return W.fill_diagonal_(0)


def _ordered_pairs(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) indices of the K(K-1) ordered pairs of distinct responses, (M,) each."""
    idx = torch.tensor([(i, j) for i in range(K) for j in range(K) if i != j])
    return idx[:, 0], idx[:, 1]


# ----------------------------------------------------------------------------------------------
# exact expected losses, through preference.py
# ----------------------------------------------------------------------------------------------


PAIRWISE = ("dpo", "cdpo", "rdpo", "ipo", "simpo")


def pairwise_expected_loss(theta: torch.Tensor, problem: Problem, member: str, W: torch.Tensor,
                           label_smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    r"""$\sum_{i\ne j} W_{ij}\,\ell(i, j)$: a pairwise member's loss over every ordered pair, exactly.

    ``member``: "dpo" (``preference_loss`` with loss "sigmoid", i.e. ``dpo.dpo_loss``), "cdpo"
    (``conservative_dpo_loss``), "rdpo" (``robust_dpo_loss``), "ipo" (``ipo_loss``), "simpo"
    (``simpo_loss``, $|y| = 1$), each called once on the batch of all ordered pairs; its per-pair
    ``losses`` are weighted by $W$."""
    c, l = _ordered_pairs(problem.K)
    logp = torch.log_softmax(theta, 0)                              # (K,) log pi_theta(y)
    logref = torch.log(problem.ref_probs)                           # (K,)
    pi_w, pi_l, ref_w, ref_l = logp[c], logp[l], logref[c], logref[l]
    ones = torch.ones(c.shape[0], dtype=DTYPE)                      # |y| = 1: single-token responses
    beta = problem.beta
    if member == "dpo":
        out = P.preference_loss(P.PreferenceHyperparams(loss="sigmoid", beta=beta), pi_w, pi_l, ref_w, ref_l)
    elif member == "cdpo":
        out = P.conservative_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing)
    elif member == "rdpo":
        out = P.robust_dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing)
    elif member == "ipo":
        out = P.ipo_loss(pi_w, pi_l, ref_w, ref_l, beta)
    elif member == "simpo":
        out = P.simpo_loss(pi_w, pi_l, ones, ones, beta, gamma)
    else:
        raise ValueError(f"member must be one of {PAIRWISE}, got {member!r}")
    return (W[c, l] * out.losses).sum()


def orpo_expected_loss(theta: torch.Tensor, problem: Problem, W: torch.Tensor, lam: float) -> torch.Tensor:
    r"""ORPO over every ordered pair: ``preference.orpo_loss`` called once per pair (B = 1, so its SFT
    term is that pair's $-\log\pi(y_w)$), weighted by $W$."""
    logp = torch.log_softmax(theta, 0)
    one = torch.ones(1, dtype=DTYPE)
    total = theta.new_zeros(())
    for i, j in zip(*_ordered_pairs(problem.K)):
        if W[i, j] > 0:
            total = total + W[i, j] * P.orpo_loss(logp[i:i + 1], logp[j:j + 1], one, one, lam).loss
    return total


def kto_data(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""KTO's unpaired examples from the pairs: $\frac12 D_y$ and $\frac12 U_y$, the probabilities of $y$ as a
    desirable and as an undesirable example ($D_y = \sum_j W_{yj}$, $U_y = \sum_i W_{iy}$; half the examples
    are desirable)."""
    return W.sum(1) / 2, W.sum(0) / 2


def kto_z0(logp: torch.Tensor, problem: Problem, W: torch.Tensor, z0: str) -> torch.Tensor:
    r"""KTO's reference point at the policy ``logp`` (detached). ``"kl"``: the paper's definition,
    $\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ exactly. ``"data"``: what its batch estimate (``preference.kto_reference_point``,
    mismatched responses from the data, TRL's) tends to with an infinite batch: $\max(0, \mathbb{E}_{y\sim data}[\log\pi/\pi_{ref}])$,
    the data being the examples' responses (one prompt: a mismatched response is another draw)."""
    logp = logp.detach()
    if z0 == "kl":
        return kl(logp.exp(), problem.ref_probs)
    if z0 == "data":
        d, u = kto_data(W)
        return ((d + u) * (logp - torch.log(problem.ref_probs))).sum().clamp_min(0)
    raise ValueError(f"z0 must be 'kl' or 'data', got {z0!r}")


def kto_expected_loss(theta: torch.Tensor, problem: Problem, W: torch.Tensor, z0: str = "kl",
                      desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    r"""KTO over every example exactly: ``preference.kto_loss`` on 2K rows (each response once as a
    desirable and once as an undesirable example), weighted by $\frac12 D_y$, $\frac12 U_y$; $z_0$ from ``kto_z0``."""
    logp = torch.log_softmax(theta, 0)
    logref = torch.log(problem.ref_probs)
    K = problem.K
    desirable = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(K, dtype=torch.bool)])
    out = P.kto_loss(torch.cat([logp, logp]), torch.cat([logref, logref]), desirable,
                     kto_z0(logp, problem, W, z0), problem.beta, desirable_weight, undesirable_weight)
    d, u = kto_data(W)
    return (torch.cat([d, u]) * out.losses).sum()


# ----------------------------------------------------------------------------------------------
# the independent solutions: closed forms and the stationarity equations, by hand
# ----------------------------------------------------------------------------------------------


def ipo_optimum(problem: Problem, labels: torch.Tensor, pair_probs: torch.Tensor | None = None) -> torch.Tensor:
    r"""IPO's exact optimum: $\pi(y) \propto \pi_{ref}(y)\exp(\bar p(y)/\beta)$, $\bar p(y) = \sum_j \mu_j Q_{yj}$ (``labels`` = Q)."""
    mu = problem.ref_probs if pair_probs is None else torch.as_tensor(pair_probs, dtype=DTYPE)
    win_rate = labels @ mu                                              # (K,) P(y beats y' ~ mu)
    return torch.softmax(torch.log(problem.ref_probs) + win_rate / problem.beta, 0)


def _dphi(member: str, beta: float, eps: float, gamma: float):
    r"""$\varphi'(u)$ of a pairwise member as a function of $u = s_w - s_l$, written out by hand."""
    s = torch.sigmoid
    if member == "dpo":
        return lambda u: -beta * s(-beta * u)
    if member == "cdpo":    # d/du [-(1-e) log s(bu) - e log s(-bu)] = b (s(bu) - (1 - e))
        return lambda u: beta * (s(beta * u) - (1 - eps))
    if member == "rdpo":    # [(1-e)(-b s(-bu)) - e b s(bu)] / (1 - 2e)
        return lambda u: -beta * ((1 - eps) * s(-beta * u) + eps * s(beta * u)) / (1 - 2 * eps)
    if member == "simpo":   # d/du [-log s(bu - g)] = -b s(g - bu)
        return lambda u: -beta * s(gamma - beta * u)
    raise ValueError(f"no hand-written derivative for member {member!r}")


def _newton(grad_fn, x0: torch.Tensor, tol: float = 1e-13, max_iter: int = 200, h: float = 1e-6) -> torch.Tensor:
    """Newton's method on grad_fn(x) = 0 with a central-difference Jacobian (no autograd), damped by halving."""
    x = x0.clone()
    for _ in range(max_iter):
        g = grad_fn(x)
        if float(g.abs().max()) < tol:
            return x
        J = torch.stack([(grad_fn(x + h * e) - grad_fn(x - h * e)) / (2 * h) for e in torch.eye(x.numel(), dtype=DTYPE)], 1)
        step = torch.linalg.solve(J, g)
        t = 1.0
        while t > 1e-6 and float(grad_fn(x - t * step).abs().max()) >= float(g.abs().max()):
            t /= 2
        x = x - t * step
    raise ValueError(f"Newton's method did not converge (|grad| = {float(grad_fn(x).abs().max()):.3g})")


def pairwise_optimum(problem: Problem, member: str, W: torch.Tensor, label_smoothing: float = 0.0,
                     gamma: float = 0.0) -> torch.Tensor:
    r"""The optimum of a pairwise member from its stationarity equations, by Newton's method:

    $G_i(s) = \sum_j W_{ij}\varphi'(s_i - s_j) - \sum_j W_{ji}\varphi'(s_j - s_i) = 0$, $s_0 = 0$ pinned (only differences
    matter); $\pi \propto \pi_{ref}e^{s}$ ($\pi \propto e^{s}$ for SimPO). For rDPO a target outside $(0, 1)$ has no finite
    optimum: a ValueError says so."""
    if member == "rdpo":
        label = W / (W + W.T).clamp_min(1e-300)                         # observed Q on the pairs drawn
        target = (label - label_smoothing) / (1 - 2 * label_smoothing)
        off = ~torch.eye(problem.K, dtype=torch.bool)
        if ((target[off] <= 0) | (target[off] >= 1)).any():
            raise ValueError(f"rDPO with label_smoothing {label_smoothing}: a pair's observed label probability "
                             f"is <= epsilon (min {float(label[off].min()):.4f}): the expected loss is unbounded "
                             f"below, the margin diverges")
    dphi = _dphi(member, problem.beta, label_smoothing, gamma)

    def grad(s_free: torch.Tensor) -> torch.Tensor:
        s = torch.cat([torch.zeros(1, dtype=DTYPE), s_free])
        u = s[:, None] - s[None, :]                                     # (K, K) s_i - s_j
        G = (W * dphi(u)).sum(1) - (W.T * dphi(-u)).sum(1)              # (K,)
        return G[1:]

    s = torch.cat([torch.zeros(1, dtype=DTYPE), _newton(grad, torch.zeros(problem.K - 1, dtype=DTYPE))])
    base = torch.zeros(problem.K, dtype=DTYPE) if member == "simpo" else torch.log(problem.ref_probs)
    return torch.softmax(base + s, 0)


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """The root of an increasing f on [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def kto_optimum(problem: Problem, W: torch.Tensor, z0: str = "kl", desirable_weight: float = 1.0,
                undesirable_weight: float = 1.0, iters: int = 200) -> tuple[torch.Tensor, float]:
    r"""KTO's fixed point from its stationarity equations, by bisection (``beta`` <= 1). Returns ($\pi$, $z_0$).

    With $\phi_y(s) = \frac12 D_y\lambda_D(1 - \sigma(\beta(s - z_0))) + \frac12 U_y\lambda_U(1 - \sigma(\beta(z_0 - s)))$, $s_y = \log\pi(y)/\pi_{ref}(y)$,
    the logit gradient is $\phi'_y - \pi(y)\sum_k\phi'_k$ and $\phi'_y = -\frac12\beta\,\sigma'(\beta(s_y - z_0))\,a_y$,
    $a_y = \lambda_D D_y - \lambda_U U_y$. A response with $a_y \le 0$ is pushed down for ever (it dies); on the rest
    $\frac12\beta a_y\sigma'(\beta(s_y - z_0)) = \kappa\,\pi_{ref}(y)e^{s_y}$: for $\beta \le 1$ the left side over $e^{s_y}$ falls
    in $s_y$, one root each; $\kappa$ by bisection so that $\pi$ sums to 1; $z_0$ iterated to its own value."""
    beta = problem.beta
    if beta > 1:
        raise ValueError(f"kto_optimum's one-root argument needs beta <= 1, got {beta}")
    d, u = kto_data(W)
    a = 2 * (desirable_weight * d - undesirable_weight * u)             # lambda_D D_y - lambda_U U_y
    alive = a > 0
    q = problem.ref_probs

    def sigma_prime(x):
        return math.exp(-abs(x)) / (1 + math.exp(-abs(x))) ** 2

    def policy(log_kappa: float, z: float) -> torch.Tensor:
        p = torch.zeros(problem.K, dtype=DTYPE)
        for y in alive.nonzero().flatten().tolist():
            # root in s of log(0.5 beta a_y sigma'(beta (s - z))) - log(kappa q_y) - s (decreasing in s)
            def f(s, y=y):
                return -(math.log(0.5 * beta * float(a[y]) * sigma_prime(beta * (s - z)) + 1e-300)
                         - log_kappa - math.log(float(q[y])) - s)
            s = _bisect(f, -800.0, -math.log(float(q[y])) + 50.0)
            p[y] = q[y] * math.exp(s)
        return p

    z = 0.0
    for _ in range(iters):
        log_kappa = _bisect(lambda lk: 1 - float(policy(lk, z).sum()), -700.0, 700.0, iters=120)
        p = policy(log_kappa, z)
        p = p / p.sum()
        logp = torch.where(p > 0, torch.log(p), torch.full_like(p, -math.inf))
        if z0 == "kl":
            z_new = float(kl(p, q))
        else:  # the data estimate: E_data[log pi/pi_ref], -inf if a dead response is in the data
            w = (d + u)
            z_new = max(0.0, float((w * (logp - torch.log(q))).sum())) if not ((w > 0) & (p == 0)).any() else 0.0
        if abs(z_new - z) < 1e-13:
            return p, z_new
        z = z_new
    raise ValueError("kto_optimum: the reference point did not settle")


def orpo_optimum(problem: Problem, W: torch.Tensor, lam: float) -> torch.Tensor:
    r"""ORPO's optimum from its gradient written out by hand, by Newton's method.

    $F(\pi) = -\sum_i D_i\log\pi_i + \lambda\sum_{i\ne j}W_{ij}\,\mathrm{softplus}(\ell_j - \ell_i)$, $\ell = \log\frac{\pi}{1-\pi}$;
    $\partial F/\partial\pi_i = -D_i/\pi_i + \lambda\,\ell'(\pi_i)\sum_j[W_{ji}\sigma(\ell_i - \ell_j) - W_{ij}\sigma(\ell_j - \ell_i)]$,
    $\ell'(p) = \frac{1}{p(1-p)}$, and the logit gradient is $\pi_i(\partial_i F - \sum_k\pi_k\partial_k F)$; $\theta_0 = 0$ pinned."""
    D = W.sum(1)

    def grad(theta_free: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(torch.cat([torch.zeros(1, dtype=DTYPE), theta_free]), 0)
        ell = torch.log(p) - torch.log1p(-p)
        diff = ell[:, None] - ell[None, :]                              # (K, K) ell_i - ell_j
        dF = -D / p + lam / (p * (1 - p)) * ((W.T * torch.sigmoid(diff)).sum(1) - (W * torch.sigmoid(-diff)).sum(1))
        return (p * (dF - (p * dF).sum()))[1:]

    theta0 = torch.log(problem.ref_probs)
    theta = _newton(grad, (theta0 - theta0[0])[1:])
    return torch.softmax(torch.cat([torch.zeros(1, dtype=DTYPE), theta]), 0)


# ----------------------------------------------------------------------------------------------
# the runs and the tables
# ----------------------------------------------------------------------------------------------


@dataclass
class MemberLanding:
    """A member's exact gradient-flow landing, the independent solution, and its distances."""
    member: str
    data: str
    policy: torch.Tensor          # (K,) where the gradient flow of the expected loss ends
    solution: torch.Tensor        # (K,) the independent solution (closed form / stationarity equations)
    steps: int
    grad_norm: float


def pair_curvature(problem: Problem, member: str, W: torch.Tensor) -> torch.Tensor:
    r"""A diagonal preconditioner for an offline pairwise loss: the data's share of each response,
    $\sum_j (W_{ij} + W_{ji})$, times the loss's curvature in $u$ at $u = 0$ ($eta^2/4$ for the logistic
    members, 2 for IPO's square). The gradient of a response scales with how often the *data* show
    it, not with $\pi(y)$, so the "natural" $1/\pi(y)$ would take huge steps on a response pushed down.
    A preconditioner changes the path, not the fixed points."""
    share = (W + W.T).sum(1)
    return share * (2.0 if member == "ipo" else problem.beta ** 2 / 4)


def run_member(problem: Problem, member: str, W: torch.Tensor, max_steps: int = 20000, tol: float = 1e-10,
               lr: float | None = None, **settings) -> tuple[torch.Tensor, int, float]:
    """Run a member's exact expected loss to convergence from pi_ref (``theory.run_to_convergence``).

    The pairwise members step with ``pair_curvature`` (lr 1); KTO and ORPO with the natural
    preconditioner (lr 0.5): KTO's undesirable responses die, and ORPO's SFT term is on-policy-like."""
    precondition = pair_curvature(problem, member, W) if member in PAIRWISE else "natural"
    lr = (1.0 if member in PAIRWISE else 0.5) if lr is None else lr
    if member in PAIRWISE:
        def loss_fn(th):
            return pairwise_expected_loss(th, problem, member, W, **settings)
    elif member == "kto":
        def loss_fn(th):
            return kto_expected_loss(th, problem, W, **settings)
    elif member == "orpo":
        def loss_fn(th):
            return orpo_expected_loss(th, problem, W, **settings)
    else:
        raise ValueError(f"unknown member {member!r}")
    run = run_to_convergence(loss_fn, torch.log(problem.ref_probs), problem, member, lr=lr,
                             max_steps=max_steps, tol=tol, precondition=precondition)
    return run.policy, run.steps, run.grad_norm


def landing_row(name: str, p: torch.Tensor, problem: Problem, solution: torch.Tensor | None = None) -> dict:
    r"""Where a policy is: $\mathbb{E}[r]$, KL to $\pi_{ref}$, its distance to $\pi^*$, and how far below E7's frontier it lies."""
    star = pi_star(problem)
    reward, k = float(expected_reward(p, problem.rewards)), float(kl(p, problem.ref_probs))
    row = {"member": name, "reward": reward, "kl": k, "kl_to_pi_star": max(0.0, float(kl(p, star))),
           "tv_to_pi_star": float(tv(p, star)), "below_frontier": frontier_reward_at(problem, k) - reward,
           "policy": [round(float(x), 4) for x in p]}
    if solution is not None:
        row["tv_to_solution"] = float(tv(p, solution))
    return row


def family_table(problem: Problem, max_steps: int = 20000) -> list[dict]:
    """Every member on Bradley-Terry labels of r (the toy world's): gradient flow and independent solution."""
    Q = label_probabilities(problem)
    W = pair_weights(problem, Q)
    specs = [
        ("DPO (E9)", "dpo", {}, pi_star(problem)),
        ("IPO", "ipo", {}, ipo_optimum(problem, Q)),
        ("cDPO eps=0.1", "cdpo", dict(label_smoothing=0.1), pairwise_optimum(problem, "cdpo", W, 0.1)),
        ("SimPO gamma=0", "simpo", dict(gamma=0.0), pairwise_optimum(problem, "simpo", W, gamma=0.0)),
        ("SimPO gamma=0.5", "simpo", dict(gamma=0.5), pairwise_optimum(problem, "simpo", W, gamma=0.5)),
        ("KTO, z0 = KL", "kto", dict(z0="kl"), kto_optimum(problem, W, "kl")[0]),
        ("KTO, z0 = data (TRL)", "kto", dict(z0="data"), kto_optimum(problem, W, "data")[0]),
        ("ORPO lambda=0 (SFT on y_w)", "orpo", dict(lam=0.0), W.sum(1)),
        ("ORPO lambda=0.1", "orpo", dict(lam=0.1), orpo_optimum(problem, W, 0.1)),
        ("ORPO lambda=1", "orpo", dict(lam=1.0), orpo_optimum(problem, W, 1.0)),
    ]
    rows = [landing_row("pi* (E7), the target", pi_star(problem), problem)]
    for name, member, settings, solution in specs:
        p, steps, g = run_member(problem, member, W, max_steps=max_steps, **settings)
        row = landing_row(name, p, problem, solution)
        row.update(steps=steps, grad=g)
        rows.append(row)
    return rows


def noise_table(problem: Problem, flip_rate: float = 0.2, epsilons=(0.0, 0.1, 0.2, 0.3)) -> list[dict]:
    r"""Labels flipped with probability ``flip_rate`` on top of Bradley-Terry: DPO, cDPO and rDPO at each
    $\epsilon$, from the stationarity equations (``pairwise_optimum``; the tests check them against the
    gradient flow). rDPO at $\epsilon = \epsilon_0$ lands on $\pi^*$; an $\epsilon$ above a pair's label probability has no optimum."""
    W = pair_weights(problem, label_probabilities(problem, flip_rate))
    rows = []
    for member in ("cdpo", "rdpo"):
        for eps in epsilons:
            name = f"{'cDPO' if member == 'cdpo' else 'rDPO'} eps={eps:g}" + (" (= DPO)" if eps == 0 else "")
            try:
                rows.append(landing_row(name, pairwise_optimum(problem, member, W, eps), problem))
            except ValueError as e:
                rows.append({"member": name, "unbounded": str(e)})
    return rows


def best_rdpo_epsilon(problem: Problem, flip_rate: float, grid=None) -> tuple[float, list[tuple[float, float]]]:
    r"""The $\epsilon$ of rDPO whose optimum is closest to $\pi^*$ (KL), over a grid; returns (best, [(eps, KL to pi*)])."""
    W = pair_weights(problem, label_probabilities(problem, flip_rate))
    grid = [round(0.01 * i, 2) for i in range(0, 50)] if grid is None else grid
    out = []
    for eps in grid:
        try:
            out.append((eps, max(0.0, float(kl(pairwise_optimum(problem, "rdpo", W, eps), pi_star(problem))))))
        except ValueError:
            continue
    return min(out, key=lambda t: t[1])[0], out


def deterministic_labels_table(problem: Problem, ts=(1.0, 10.0, 100.0)) -> dict:
    r"""Deterministic labels (always the truly better response): IPO's optimum is finite (closed form);
    DPO's expected loss keeps falling along $\theta = \log\pi_{ref} + t\,r$ (no finite minimiser): its values."""
    Q = label_probabilities(problem, deterministic=True)
    W = pair_weights(problem, Q)
    p_ipo = ipo_optimum(problem, Q)
    dpo_losses = [(t, float(pairwise_expected_loss(torch.log(problem.ref_probs) + t * problem.rewards, problem,
                                                   "dpo", W))) for t in ts]
    return {"ipo": landing_row("IPO, deterministic labels", p_ipo, problem), "dpo_loss_along_ray": dpo_losses}


def _print(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    cols = ["member", "reward", "kl", "kl_to_pi_star", "below_frontier", "tv_to_solution", "steps", "policy"]
    for problem in (graded_problem(), verifiable_problem()):
        print(f"\n## {problem.name}: pi_ref = {[round(float(x), 3) for x in problem.ref_probs]}, "
              f"r = {[float(x) for x in problem.rewards]}, beta = {problem.beta}\n")
        _print(family_table(problem), cols)
        print(f"\n### best-of-N ({problem.name})\n")
        _print(best_of_n_table(problem), ["N", "kl", "bound", "bound_minus_kl", "reward", "frontier_reward",
                                          "below_frontier"])
    problem = graded_problem()
    print("\n## label noise (graded): Bradley-Terry labels flipped with probability 0.2\n")
    _print(noise_table(problem, 0.2), ["member", "reward", "kl", "kl_to_pi_star", "below_frontier", "unbounded"])
    best, _ = best_rdpo_epsilon(problem, 0.2)
    print(f"\nrDPO's best epsilon on a grid of 0.01 (flip rate 0.2): {best}")
    print("\n## clean labels (graded, the toy world's): any epsilon > 0 is wrong\n")
    _print(noise_table(problem, 0.0, (0.0, 0.03, 0.1)), ["member", "reward", "kl", "kl_to_pi_star", "unbounded"])
    det = deterministic_labels_table(problem)
    print("\n## deterministic labels (graded)\n")
    _print([det["ipo"]], ["member", "reward", "kl", "kl_to_pi_star", "policy"])
    print("DPO's expected loss along theta = log pi_ref + t r:",
          ", ".join(f"t={t:g}: {v:.3g}" for t, v in det["dpo_loss_along_ray"]))
    print("\n## best-of-N in the continuous limit (uniform pi_ref, K distinct rewards)\n")
    _print(continuous_limit_table(), ["K", "N", "kl", "bound", "bound_minus_kl"])


if __name__ == "__main__":
    main()
