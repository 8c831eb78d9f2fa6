r"""Theory lab, the policy-gradient family: each member's exact expected update, and where it converges.

The problems, the group enumeration and the gradient flow are ``theory.py``'s (one prompt, K
single-token responses, $\pi_\theta = \mathrm{softmax}(\theta)$ started at $\pi_{ref}$, the natural preconditioner);
each member's own functions (``policy_gradient.py``, imported, not copied) are run with their exact
expected gradient.

**Making a member's expectation exact.** Every member's advantage depends on the whole group, so
(as ``theory.conditional_advantages`` does for GRPO) every group of $G$ samples is enumerated, and for
each response $y$ the advantage mass $w^\pm(y) = \pi_{old}(y)\,\mathbb{E}[\hat A_i^\pm\mid y_i = y]$ is collected,
the positive and negative parts apart ($\hat A^+ = \max(\hat A, 0)$, $\hat A^- = \max(-\hat A, 0)$;
``advantage_mass``). Every member's per-sample loss is positively homogeneous in $\hat A$ with a kink
at 0 only ($\min(\rho\hat A, \mathrm{clip}(\rho)\hat A) = \hat A^+\min(\rho, \mathrm{clip}\,\rho) - \hat A^-\max(\rho, \mathrm{clip}\,\rho)$),
so one call of the member's loss on 2K rows (each response once with advantage $2K\,w^+(y)$,
once with $-2K\,w^-(y)$) is exactly its loss averaged over all groups, also when the clip binds
(``expected_member_loss``). A batch member on one prompt (batch mean, REINFORCE++) is a group of
$N$ = the batch: ``tests/equations/test_policy_gradient.py`` checks those identities.

**What the lab finds** (``python -m minialign.theory_policy_gradient``; ``tests/equations/test_theory_policy_gradient.py``
checks each fixed point against an independent computation):

- A baseline changes no expected gradient unless it depends on $y_i$: in logit coordinates the
  expected gradient is $\pi(y)(a(y) - \mathbb{E}_\pi a)$, blind to any constant. REINFORCE with $\hat A = r$
  and RLOO have $a(y) = r(y) - \mathbb{E}_\pi r$ exactly (unbiased). The group mean includes $r_i$ itself:
  $a(y) = (1 - \frac1G)(r(y) - \mathbb{E}_\pi r)$, the gradient shrunk by $1 - 1/G$ (batch mean: $1 - 1/N$).
- With the KL in the reward (k1, E2's), every member's fixed point is $\pi^*$ (E7): the advantages vanish
  only where $r - \beta\log(\pi/\pi_{ref})$ is constant, whatever the scaling (a shrink, a std, a
  $1/P(\text{signal})$), the clip (it never binds at $\pi_\theta = \pi_{old}$), the ratio (token, sequence or
  stopped weight: all equal the REINFORCE gradient at $\rho = 1$). The scale-free ones (E12's std,
  REINFORCE++'s batch std) only chatter around it with a constant step.
- With k3 in the loss (E13's), the scaling does matter, because it scales the policy gradient and not
  the KL: the fixed point is the forward-KL optimum $\arg\max\ \mathbb{E}_\pi r - \beta'\,\mathrm{KL}(\pi_{ref}\Vert\pi)$ with
  $\beta' = \beta$ for REINFORCE and RLOO, $\beta G/(G-1)$ for the group mean, $\beta N/(N-1)$ for the batch mean.
- Without a KL (DAPO, GSPO, CISPO as published): the advantage of $y$ depends on $y$ only through
  $r(y)$, so under the natural flow responses of equal reward keep their ratio: the landing point is
  $\pi_{ref}$ restricted to the best responses, $\pi^*$'s $\beta\to 0$ end.
- Dynamic sampling (DAPO) divides the expected gradient by $P(\text{signal})$ = 1 - $\sum_v P(r = v)^G$:
  same direction, same fixed points, a larger step where most groups are all-right; each kept
  question costs $1/P(\text{signal})$ drawn.
- Clip-higher changes nothing at $\pi_\theta = \pi_{old}$; with several inner steps per rollout it bounds
  the iteration. On two responses (right with probability $p$) one DAPO iteration run to stationarity moves
  $p$ to exactly $\min(1, \max(p(1+\epsilon_{high}),\ p + \epsilon_{low}(1-p)))$: the *lower* clip of the wrong answer binds
  last while $p < \epsilon_{low}/(\epsilon_{low}+\epsilon_{high})$, so in expectation clip-higher speeds up only
  answers that are already likely; the rare-token effect DAPO reports is a sampling effect (a token
  sampled without its competitors) that the expected update does not show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import policy_gradient as PG
from .policy_gradient_sampling import signal_groups
from .grpo import group_advantages, grpo_loss
from .ops import check_choice, kl_k3
from .theory import (DTYPE, FLOOR, GroupEnumeration, Problem, expected_reward, forward_kl_optimum, graded_problem,
                     kl, objective, pi_star, run_to_convergence, tv, verifiable_problem)

# advantage estimator -> f(rewards (M*G,), G) for the rows of an enumeration, one group (or one batch) per row
ADVANTAGE_FNS = {
    "none": lambda r, G: PG.advantages("none", r, G),
    "group_mean": lambda r, G: group_advantages(r, G, scale_by_std=False),
    "grpo": lambda r, G: group_advantages(r, G),
    "rloo": lambda r, G: PG.advantages("rloo", r, G),
    # one prompt: a batch of N answers is a group of N (tests/equations/test_policy_gradient.py checks both identities)
    "batch_mean": lambda r, N: group_advantages(r, N, scale_by_std=False),
    "reinforce_pp": lambda r, N: group_advantages(r, N),
}


@dataclass
class Member:
    """One member of the family as the lab runs it."""
    name: str
    advantage: str                  # ADVANTAGE_FNS key
    loss: str                       # "grpo" (E13) or policy_gradient.POLICY_LOSSES
    size: int = 4                   # G (or N, the batch, for batch_mean / reinforce_pp)
    kl: str = "reward_k1"           # reward_k1 (E2's KL in the reward) | loss_k3 (E13's) | none
    dynamic: bool = False           # DAPO's dynamic sampling
    loss_options: dict = field(default_factory=dict)
    lr_decay: float = 0.0           # for scale-free advantages (they chatter with a constant step)


def advantage_mass(estimator: str, rewards: torch.Tensor, logp: torch.Tensor, groups: GroupEnumeration,
                   dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$w^\pm(y) = \pi(y)\,\mathbb{E}[\hat A_i^\pm\mid y_i = y]$ over all groups of $G$ samples of $\pi$ = exp(``logp``), (K,) each.

    $\sum_g P(g)\sum_i \hat A^\pm_{g,i}[y_{g,i} = y] = G\,w^\pm(y)$. ``dynamic``: only groups that carry a signal
    (``policy_gradient_sampling.signal_groups``), their probabilities renormalised (DAPO's dynamic sampling);
    where no group carries one (a fixed point) the mass is 0.
    """
    check_choice("estimator", estimator, ADVANTAGE_FNS)
    P = groups.probabilities(logp)                                            # (M,)
    r = rewards.detach()[groups.members]                                      # (M, G)
    A = ADVANTAGE_FNS[estimator](r.reshape(-1), groups.G).view(r.shape)       # (M, G)
    if dynamic:
        P = P * signal_groups(r.reshape(-1), groups.G).to(DTYPE)
        P = P / P.sum() if P.sum() > 0 else P
    index = groups.members.reshape(-1)
    plus = torch.zeros(groups.K, dtype=DTYPE).index_add_(0, index, (P[:, None] * A.clamp_min(0)).reshape(-1))
    minus = torch.zeros(groups.K, dtype=DTYPE).index_add_(0, index, (P[:, None] * (-A).clamp_min(0)).reshape(-1))
    return plus / groups.G, minus / groups.G


def member_rewards(problem: Problem, member: Member, old_logp: torch.Tensor) -> torch.Tensor:
    r"""The rewards the member's advantages see: $r - \beta\log(\pi_{old}/\pi_{ref})$ with the KL in the reward (k1), else $r$."""
    if member.kl == "reward_k1":
        return problem.rewards - problem.beta * (old_logp - torch.log(problem.ref_probs))
    return problem.rewards


def expected_member_loss(theta: torch.Tensor, problem: Problem, member: Member, groups: GroupEnumeration,
                         old_theta: torch.Tensor | None = None) -> torch.Tensor:
    r"""The member's loss in expectation over every group of $\pi_{old}$ = softmax(``old_theta``) (default: theta, detached).

    One call of the member's loss (``grpo.grpo_loss`` or ``policy_gradient.policy_loss``) on 2K one-token
    rows: response $y$ with advantage $2K w^+(y)$ and again with $-2K w^-(y)$ (``advantage_mass``); with ``kl="loss_k3"`` E13's $\beta\,\mathbb{E}_{\pi_{old}}[k_3]$ is added.
    """
    logp = torch.log_softmax(theta, 0)                                        # (K,)
    old_logp = torch.log_softmax((theta if old_theta is None else old_theta).detach(), 0)
    w_plus, w_minus = advantage_mass(member.advantage, member_rewards(problem, member, old_logp), old_logp,
                                     groups, member.dynamic)
    K = problem.K
    rows = torch.cat([logp, logp])[:, None]                                   # (2K, 1)
    old_rows = torch.cat([old_logp, old_logp])[:, None]
    A = 2 * K * torch.cat([w_plus, -w_minus])                                 # (2K,) the row means undo the 2K
    ones = torch.ones(2 * K, 1, dtype=DTYPE)
    if member.loss == "grpo":  # E13's surrogate; its KL term is added below
        loss, _ = grpo_loss(rows, old_rows, None, A, ones, beta=0.0, **member.loss_options)
    else:
        loss, _ = PG.policy_loss(member.loss, rows, old_rows, A, ones, **member.loss_options)
    if member.kl == "loss_k3":  # E13's KL term, pathwise, weighted by pi_old
        loss = loss + problem.beta * (old_logp.exp() * kl_k3(logp, torch.log(problem.ref_probs))).sum()
    return loss


# ----------------------------------------------------------------------------------------------
# fixed points derived by hand, to compare the runs with
# ----------------------------------------------------------------------------------------------


def argmax_restricted_reference(problem: Problem) -> torch.Tensor:
    r"""$\pi_{ref}$ restricted to the responses of the highest reward, renormalised ($\pi^*$ as $\beta\to 0$)."""
    best = problem.rewards == problem.rewards.max()
    p = torch.where(best, problem.ref_probs, torch.zeros_like(problem.ref_probs))
    return p / p.sum()


def shrink_factor(member: Member) -> float:
    r"""$c$ with $a(y) = c\,(r(y) - \mathbb{E}_\pi r)$ for the unscaled baselines: 1 (none, RLOO), $1 - 1/G$ (group or batch mean)."""
    return {"none": 1.0, "rloo": 1.0, "group_mean": 1 - 1 / member.size, "batch_mean": 1 - 1 / member.size}[member.advantage]


def prediction(problem: Problem, member: Member) -> tuple[torch.Tensor, str]:
    """The fixed point derived for the member (the module docstring says why)."""
    if member.kl == "reward_k1":
        return pi_star(problem), "pi* (E7)"
    if member.kl == "none":
        return argmax_restricted_reference(problem), "pi_ref on argmax r"
    beta_prime = problem.beta / shrink_factor(member)
    return forward_kl_optimum(problem, beta_prime), f"argmax E r - {beta_prime:.4g} KL(pi_ref||pi)"


def signal_probability(problem: Problem, p: torch.Tensor, G: int) -> float:
    r"""$P$(a group of $G$ samples of $p$ carries a signal) $= 1 - \sum_v P(r = v)^G$, over the distinct reward values $v$."""
    values = problem.rewards.unique()
    mass = torch.stack([p[problem.rewards == v].sum() for v in values])
    return 1.0 - float((mass ** G).sum())


# ----------------------------------------------------------------------------------------------
# the runs: one step per rollout to convergence; and DAPO's clip with several inner steps
# ----------------------------------------------------------------------------------------------


def family(G: int = 4, N: int = 8) -> list[Member]:
    """Every member, with the KL where its paper puts it and where E2 and E13 put it."""
    dapo = {"eps_low": 0.2, "eps_high": 0.28}
    return [
        Member("REINFORCE, A = r", "none", "reinforce", G),
        Member(f"REINFORCE, group mean (G={G})", "group_mean", "reinforce", G),
        Member(f"REINFORCE, batch mean (N={N})", "batch_mean", "reinforce", N),
        Member(f"RLOO (G={G})", "rloo", "reinforce", G),
        Member(f"REINFORCE++ (N={N})", "reinforce_pp", "ppo_clip", N, lr_decay=0.1),
        Member(f"DAPO (G={G})", "grpo", "dapo", G, loss_options=dapo, lr_decay=0.1),
        Member(f"DAPO + dynamic sampling (G={G})", "grpo", "dapo", G, dynamic=True, loss_options=dapo, lr_decay=0.1),
        Member(f"GSPO (G={G})", "grpo", "gspo", G, lr_decay=0.1),
        Member(f"CISPO (G={G})", "grpo", "cispo", G, lr_decay=0.1),
        Member("REINFORCE, A = r", "none", "reinforce", G, kl="loss_k3"),
        Member(f"REINFORCE, group mean (G={G})", "group_mean", "reinforce", G, kl="loss_k3"),
        Member(f"REINFORCE, batch mean (N={N})", "batch_mean", "reinforce", N, kl="loss_k3"),
        Member(f"RLOO (G={G})", "rloo", "reinforce", G, kl="loss_k3"),
        Member(f"DAPO (G={G})", "grpo", "dapo", G, kl="none", loss_options=dapo),
        Member(f"DAPO + dynamic sampling (G={G})", "grpo", "dapo", G, kl="none", dynamic=True, loss_options=dapo),
        Member(f"GSPO (G={G})", "grpo", "gspo", G, kl="none"),
        Member(f"CISPO (G={G})", "grpo", "cispo", G, kl="none"),
    ]


def land(problem: Problem, member: Member, max_steps: int = 800, lr: float = 0.5, tol: float = 1e-10):
    """Run the member's exact expected gradient (one step per rollout) to convergence; (ExactRun, predicted, label)."""
    groups = GroupEnumeration(problem.K, member.size)
    run = run_to_convergence(lambda th: expected_member_loss(th, problem, member, groups), torch.log(problem.ref_probs),
                             problem, member.name, lr=lr, max_steps=max_steps, tol=tol, lr_decay=member.lr_decay)
    predicted, label = prediction(problem, member)
    return run, predicted, label


def landing_table(problem: Problem, members: list[Member] | None = None, max_steps: int = 800) -> list[dict]:
    """One row per member: where it lands, E2 there, its distance to pi* and to its predicted fixed point."""
    star = pi_star(problem)
    rows = []
    for member in members or family():
        run, predicted, label = land(problem, member, max_steps)
        p = run.policy
        rows.append({"member": member.name, "kl_in": member.kl, "reward": float(expected_reward(p, problem.rewards)),
                     "kl": float(kl(p, problem.ref_probs)), "objective": float(objective(p, problem)),
                     "tv_to_pi_star": float(tv(p, star)), "steps": run.steps, "prediction": label,
                     "tv_to_prediction": float(tv(p, predicted)), "policy": [round(float(x), 4) for x in p]})
    return rows


def entropy(p: torch.Tensor) -> float:
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum())


def iterate(problem: Problem, member: Member, iterations: int, inner_steps: int = 200, lr: float = 0.02,
            theta0: torch.Tensor | None = None) -> list[dict]:
    r"""Several gradient steps per rollout, as PPO/GRPO/DAPO train: per iteration $\pi_{old} \leftarrow \pi_\theta$, then
    ``inner_steps`` natural-gradient steps on the expected loss against that $\pi_{old}$ (there the clip binds).
    One row per iteration: E[r], KL(pi || pi_ref), the entropy, the policy."""
    groups = GroupEnumeration(problem.K, member.size)
    theta = (torch.log(problem.ref_probs) if theta0 is None else theta0).detach().clone().to(DTYPE)
    rows = []
    for it in range(1, iterations + 1):
        old = theta.clone()
        for _ in range(inner_steps):
            th = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(expected_member_loss(th, problem, member, groups, old_theta=old), th)
            theta = theta - lr * g / torch.softmax(theta, 0).clamp_min(1e-12)
            theta = (theta - theta.max()).clamp_min(FLOOR)
        p = torch.softmax(theta, 0)
        rows.append({"iteration": it, "reward": float(expected_reward(p, problem.rewards)),
                     "kl": float(kl(p, problem.ref_probs)), "entropy": entropy(p), "policy": p})
    return rows


def two_response_dapo_step(p: float, eps_low: float, eps_high: float) -> float:
    r"""One DAPO iteration run to stationarity on two responses (right with probability $p$, wrong otherwise):
    the right one rises until its ratio passes $1+\epsilon_{high}$ and the wrong one's falls below $1-\epsilon_{low}$:
    $p' = \min(1, \max(p(1+\epsilon_{high}),\ 1 - (1-p)(1-\epsilon_{low})))$ (where $p(1+\epsilon_{high}) > 1$ the
    right answer never reaches its clip and takes all the mass)."""
    return min(1.0, max(p * (1 + eps_high), 1 - (1 - p) * (1 - eps_low)))


def clip_higher_table(problem: Problem | None = None, eps_highs=(0.2, 0.28), G: int = 4, target: float = 0.99,
                      max_iterations: int = 30, inner_steps: int = 50, lr: float = 0.05) -> list[dict]:
    """DAPO without a KL, several inner steps per rollout: iterations until E[r] >= target, for each eps_high."""
    problem = problem or verifiable_problem()
    rows = []
    for eps_high in eps_highs:
        member = Member(f"DAPO eps_high={eps_high}", "grpo", "dapo", G, kl="none",
                        loss_options={"eps_low": 0.2, "eps_high": eps_high})
        history = iterate(problem, member, max_iterations, inner_steps, lr)
        reached = next((h["iteration"] for h in history if h["reward"] >= target), None)
        rows.append({"eps_high": eps_high, "iterations_to_target": reached,
                     "reward_after_1": history[0]["reward"], "reward_after_3": history[2]["reward"],
                     "entropy_after_3": history[2]["entropy"],
                     "policy_final": [round(float(x), 4) for x in history[-1]["policy"]]})
    return rows


def dynamic_sampling_table(problem: Problem | None = None, G: int = 4, ts=(0.0, 1.0, 2.0, 4.0)) -> list[dict]:
    """Along a path towards the right answers: P(signal), the draws per kept question, and the gradient gain."""
    problem = problem or verifiable_problem()
    groups = GroupEnumeration(problem.K, G)
    plain = Member("DAPO", "grpo", "dapo", G, kl="none", loss_options={"eps_low": 0.2, "eps_high": 0.28})
    dynamic = Member("DAPO, dynamic", "grpo", "dapo", G, kl="none", dynamic=True, loss_options=plain.loss_options)
    rows = []
    for t in ts:
        theta = torch.log(problem.ref_probs) + t * problem.rewards
        g = {m.name: _grad(lambda th, m=m: expected_member_loss(th, problem, m, groups), theta) for m in (plain, dynamic)}
        p = torch.softmax(theta, 0)
        signal = signal_probability(problem, p, G)
        rows.append({"accuracy": float(expected_reward(p, problem.rewards)), "p_signal": signal,
                     "draws_per_question": 1 / signal, "gradient_gain": float(g["DAPO, dynamic"].norm() / g["DAPO"].norm())})
    return rows


def _grad(fn, theta: torch.Tensor) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(th), th)
    return g


def _print_table(rows: list[dict], keys: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return str(v)
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r[k]) for k in keys) + " |")


def main() -> None:
    for problem in (graded_problem(), verifiable_problem()):
        star = pi_star(problem)
        print(f"\n## {problem.name} problem: beta = {problem.beta}, pi_ref = {problem.ref_probs.tolist()}, "
              f"r = {problem.rewards.tolist()}")
        print(f"pi* = {[round(float(x), 4) for x in star]}, E2(pi*) = {float(objective(star, problem)):.4f}\n")
        _print_table(landing_table(problem), ["member", "kl_in", "reward", "kl", "objective", "tv_to_pi_star",
                                              "steps", "prediction", "tv_to_prediction", "policy"])
    print("\n## clip-higher: DAPO without a KL, 50 inner steps per rollout (verifiable problem, G = 4)\n")
    _print_table(clip_higher_table(), ["eps_high", "iterations_to_target", "reward_after_1", "reward_after_3",
                                       "entropy_after_3", "policy_final"])
    print("\n## two responses, one DAPO iteration to stationarity: p' = min(1, max(p (1 + eps_high), p + eps_low (1 - p)))\n")
    for p in (0.05, 0.3, 0.5, 0.8):
        print(f"p = {p}: eps_high 0.2 -> {two_response_dapo_step(p, 0.2, 0.2):.4f}, "
              f"0.28 -> {two_response_dapo_step(p, 0.2, 0.28):.4f}")
    print("\n## dynamic sampling (verifiable problem, G = 4): the expected gradient divided by P(signal)\n")
    _print_table(dynamic_sampling_table(), ["accuracy", "p_signal", "draws_per_question", "gradient_gain"])


if __name__ == "__main__":
    main()
