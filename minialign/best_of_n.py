r"""Best-of-N: the simplest alignment baseline, at sampling time and as training data.

**Best-of-N sampling.** Draw $N$ responses $y_1..y_N \sim \pi_{ref}(\cdot\mid x)$, score each with a
reward $r(x, y)$ (a reward model's $r_\phi$, or the verifiable reward), answer with the best one.
No parameter changes; the cost is $N$ samples per answer. It defines a policy $\pi_{BoN}$, and every
comparison of RLHF methods starts from it: a trained policy should beat best-of-N at the same
$\mathrm{KL}(\pi\Vert\pi_{ref})$ (``best_of_n_table`` sets it beside E7's frontier).

**Ties** (``best_of_n``): among samples with the same, largest reward the *first* (lowest sample
index) is chosen. The samples are exchangeable, so the chosen response is then distributed as
$\pi_{ref}$ restricted to the responses of that reward: the exact theory below accounts for it.

**Rejection-sampling fine-tuning** (``select_for_sft``; RAFT, Dong et al. 2023; RFT, Yuan et al.
2023; repeated with the new model as sampler it is expert iteration): sample $N$ per prompt, keep
the best ``keep_per_prompt`` by the reward (optionally only those with reward $\ge$ ``min_reward``,
e.g. 1 for a verifiable reward: only correct answers), and fine-tune on them with E0b (``sft.py``).
Its fixed point on an exact problem is best-of-N's distribution, for one round.

**The exact best-of-N distribution** (one prompt, $K$ responses, ``best_of_n_distribution``). Let the
distinct reward values be $v_1 < \dots < v_m$, $q_v = \pi_{ref}(r(Y) = v)$, $F(v) = \pi_{ref}(r(Y) \le v)$ and
$F^-(v) = \pi_{ref}(r(Y) < v)$. The best of $N$ has reward $v$ with probability $F(v)^N - F^-(v)^N$ (all
$N$ at most $v$, not all below), and within that level the tie rule picks $y$ with $\pi_{ref}(y)/q_v$:

$$\pi_{BoN}(y) = \pi_{ref}(y)\,\frac{F(v)^N - F^-(v)^N}{q_v},\qquad v = r(y),$$
$$\mathrm{KL}(\pi_{BoN}\Vert\pi_{ref}) = \sum_v \big(F(v)^N - F^-(v)^N\big)\log\frac{F(v)^N - F^-(v)^N}{F(v) - F^-(v)}.$$

**The often-quoted formula** $\log N - \frac{N-1}{N}$ (e.g. Stiennon et al. 2020; Hilton & Gao 2022) is
this KL when the reward has no ties at all (a continuous distribution of $r(Y)$): with
$U = F(r(Y))$ uniform, the best of $N$ has density $N u^{N-1}$ and
$\int_0^1 N u^{N-1}\log(N u^{N-1})\,du = \log N - \frac{N-1}{N}$. For any discrete $\pi_{ref}$ it is only an
upper bound (Beirami et al., "Theoretical guarantees on the best-of-n alignment policy", 2024),
and the gap can be large: the exact KL never exceeds $-\log q_{v_m}$ (best-of-$\infty$ always returns
the top level), while the formula grows as $\log N$. ``best_of_n_kl_bound`` is the formula; the
theory lab measures the gap (``docs/preference.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .generation import generate
from .ops import check_finite, check_positive
from .theory import Problem, frontier_reward_at

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# best-of-N at sampling time, and rejection sampling's data selection (pure functions)
# ----------------------------------------------------------------------------------------------


class BestOfNResult(NamedTuple):
    index: torch.Tensor    # (...,) which of the N samples is chosen: the first of the largest reward
    reward: torch.Tensor   # (...,) its reward


def best_of_n(rewards: torch.Tensor) -> BestOfNResult:
    """The best of N samples: ``rewards`` (..., N), the last dimension the N samples of one prompt.

    Ties: the first sample (lowest index) with the largest reward. NaN or inf rewards are refused.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards must be a (..., N) tensor with N >= 1 samples, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    check_finite(rewards, "rewards")
    best = rewards.max(-1, keepdim=True).values                      # (..., 1)
    # argmax of the 0/1 "is a maximum" mask is the first maximum (documented for torch.argmax)
    index = (rewards == best).to(torch.uint8).argmax(-1)             # (...,)
    return BestOfNResult(index, best.squeeze(-1))


@dataclass
class RejectionSamplingHyperparams:
    """Rejection-sampling fine-tuning's data selection (each becomes a flag in phase 2)."""
    samples_per_prompt: int = 8          # N responses drawn per prompt
    keep_per_prompt: int = 1             # the best k of them are kept (1: best-of-N)
    min_reward: float | None = None      # keep only responses with reward >= this (None: keep the best anyway)
    distinct: bool = False               # count a response sampled twice once (RFT keeps distinct paths)

    def validate(self) -> None:
        if not (isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 1):
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got {self.samples_per_prompt}")
        if not (isinstance(self.keep_per_prompt, int) and 1 <= self.keep_per_prompt <= self.samples_per_prompt):
            raise ValueError(f"keep_per_prompt must be an integer in [1, samples_per_prompt = "
                             f"{self.samples_per_prompt}], got {self.keep_per_prompt}")
        if self.min_reward is not None and not math.isfinite(self.min_reward):
            raise ValueError(f"min_reward must be a finite number or None, got {self.min_reward}")


@dataclass
class RejectionSamplingResult:
    rows: list[dict]           # {"prompt", "completion", "reward"}: SFT rows (TRL's prompt/completion format)
    prompts_kept: int          # prompts with at least one row
    prompts_dropped: int       # prompts whose every sample fell below min_reward
    mean_reward_kept: float    # mean reward of the kept rows (nan if none)
    mean_reward_sampled: float  # mean reward of all samples: what best-of-N improves on

    @property
    def metrics(self) -> dict:
        """What a round logs of its selection: the rows kept, the prompts dropped, the mean rewards."""
        return {"rows": len(self.rows), "prompts_dropped": self.prompts_dropped,
                "reward_sampled": self.mean_reward_sampled, "reward_kept": self.mean_reward_kept}


def score_samples(reward_fn: Callable[[str, str], float], prompts: list[str],
                  completions: list[list[str]]) -> torch.Tensor:
    """``reward_fn(prompt, completion)`` for every sample: (P, N) float64 (e.g. ``ToyWorld.true_reward``)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} lists of completions")
    sizes = {len(c) for c in completions}
    if len(sizes) > 1:
        raise ValueError(f"every prompt needs the same number N of samples, got sizes {sorted(sizes)}")
    rewards = torch.tensor([[float(reward_fn(p, y)) for y in ys] for p, ys in zip(prompts, completions)],
                           dtype=DTYPE)
    check_finite(rewards, "rewards")
    return rewards


def select_for_sft(prompts: list[str], completions: list[list[str]], rewards: torch.Tensor,
                   hp: RejectionSamplingHyperparams) -> RejectionSamplingResult:
    """Rejection sampling's data: for each prompt, its best ``hp.keep_per_prompt`` samples by reward.

    ``completions[i]`` holds the N = ``hp.samples_per_prompt`` samples of ``prompts[i]``; ``rewards``
    (P, N) their rewards (``score_samples``). Order: reward, largest first, ties by sample index
    (so ``keep_per_prompt=1`` is ``best_of_n``). With ``hp.min_reward`` a sample below it is never
    kept, and a prompt with none left is dropped (counted in ``prompts_dropped``).
    """
    hp.validate()
    P, N = len(prompts), hp.samples_per_prompt
    if len(completions) != P or any(len(c) != N for c in completions):
        raise ValueError(f"completions must hold N = samples_per_prompt = {N} samples for each of the {P} prompts")
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (P, N):
        raise ValueError(f"rewards must be a (P, N) = ({P}, {N}) tensor, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    check_finite(rewards, "rewards")
    # a stable sort keeps equal rewards in sample order: the tie rule of best_of_n
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices  # (P, N)
    rows, dropped = [], 0
    for i in range(P):
        kept, seen = [], set()
        for j in order[i].tolist():
            reward = float(rewards[i, j])
            if hp.min_reward is not None and reward < hp.min_reward:
                break  # sorted: every later sample is lower still
            if hp.distinct and completions[i][j] in seen:
                continue
            seen.add(completions[i][j])
            kept.append({"prompt": prompts[i], "completion": completions[i][j], "reward": reward})
            if len(kept) == hp.keep_per_prompt:
                break
        dropped += not kept
        rows += kept
    mean_kept = sum(r["reward"] for r in rows) / len(rows) if rows else float("nan")
    return RejectionSamplingResult(rows, P - dropped, dropped, mean_kept, float(rewards.mean()))


@dataclass
class RejectionSamplingRound:
    """What one round of rejection sampling made: the SFT rows, and every sample with its reward."""
    selection: RejectionSamplingResult  # the kept rows (``select_for_sft``)
    completions: list[list[str]]        # (P, N) sampled texts
    finished: list[list[bool]]          # (P, N) ended with EOS
    rewards: torch.Tensor               # (P, N) their rewards


@torch.no_grad()
def rejection_sampling_round(policy, tokenizer, reward_fn, prompts: list[str], hp: RejectionSamplingHyperparams,
                             generator: torch.Generator, max_new_tokens: int = 24,
                             temperature: float = 1.0) -> RejectionSamplingRound:
    r"""Rejection sampling's one step: $y_{i,1..N}\sim\pi_\theta(\cdot\mid x_i)$, score each with the reward,
    keep the best (``select_for_sft``). The caller fine-tunes on ``selection.rows`` with E0b (``sft.py``).

    ``reward_fn(prompts, completions, finished) -> list[float]`` has TRL's signature
    (``stages/rewards.py``): the verifiable reward, r*, or a reward model's $r_\phi$. Differs from SFT
    only in where the rows come from: the policy's own best samples instead of demonstrations.
    """
    hp.validate()
    N = hp.samples_per_prompt
    flat = [p for p in prompts for _ in range(N)]                   # (P*N,) each prompt N times in a row
    texts, done = [], []
    for i in range(0, len(flat), 512):  # bounded memory; a prompt's N samples share its prefill
        rollout = generate(policy, [tokenizer.prompt(p) for p in flat[i:i + 512]], max_new_tokens, tokenizer.eos_id,
                           tokenizer.pad_id, temperature=temperature, generator=generator)
        texts += [tokenizer.decode(r) for r in rollout.responses()]
        done += rollout.finished.tolist()
    values = [float(v) for v in reward_fn(prompts=flat, completions=texts, finished=done)]
    if len(values) != len(flat):
        raise ValueError(f"the reward function returned {len(values)} rewards for {len(flat)} samples")
    rewards = torch.tensor(values, dtype=DTYPE).view(len(prompts), N)  # (P, N)
    completions = [texts[i * N:(i + 1) * N] for i in range(len(prompts))]
    finished = [done[i * N:(i + 1) * N] for i in range(len(prompts))]
    return RejectionSamplingRound(select_for_sft(prompts, completions, rewards, hp), completions, finished, rewards)


# ----------------------------------------------------------------------------------------------
# the exact theory: best-of-N on a discrete reference
# ----------------------------------------------------------------------------------------------


def _levels(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int):
    """Reward levels v (ascending), q_v, and P_v = F(v)^N - F^-(v)^N; plus each response's level."""
    ref_probs = torch.as_tensor(ref_probs, dtype=DTYPE)
    rewards = torch.as_tensor(rewards, dtype=DTYPE)
    if ref_probs.dim() != 1 or ref_probs.numel() == 0 or rewards.shape != ref_probs.shape:
        raise ValueError(f"ref_probs and rewards must be (K,) tensors of one shape, got "
                         f"{tuple(ref_probs.shape)} and {tuple(rewards.shape)}")
    if (ref_probs < 0).any() or abs(float(ref_probs.sum()) - 1) > 1e-9:
        raise ValueError(f"ref_probs must be a distribution (>= 0, sum 1), sums to {float(ref_probs.sum())}")
    check_finite(rewards, "rewards")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"N must be an integer >= 1, got {n}")
    support = ref_probs > 0  # a response pi_ref never samples is never the best of N
    values, level = torch.unique(torch.where(support, rewards, rewards[support].min()), return_inverse=True)
    q = torch.zeros_like(values).index_add_(0, level, ref_probs)             # (m,) pi_ref(r = v)
    F_le = q.cumsum(0).clamp(max=1.0)                                        # (m,) F(v)
    F_lt = F_le - q                                                          # (m,) F^-(v)
    P = F_le ** n - F_lt.clamp_min(0) ** n                                   # (m,) P(best has reward v)
    return values, q, P, level


def best_of_n_distribution(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    r"""$\pi_{BoN}(y) = \pi_{ref}(y)\,(F(v)^N - F^-(v)^N)/q_v$, $v = r(y)$: the exact law of ``best_of_n``'s choice, (K,)."""
    _, q, P, level = _levels(ref_probs, rewards, n)
    ref_probs = torch.as_tensor(ref_probs, dtype=DTYPE)
    return ref_probs * (P / q)[level]


def best_of_n_kl(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> float:
    r"""$\mathrm{KL}(\pi_{BoN}\Vert\pi_{ref}) = \sum_v P_v\log(P_v/q_v)$ exactly (within a level the ratio is constant)."""
    _, q, P, _ = _levels(ref_probs, rewards, n)
    terms = torch.where(P > 0, P * (torch.log(P) - torch.log(q)), torch.zeros_like(P))  # 0 log 0 = 0
    return float(terms.sum())


def best_of_n_expected_reward(ref_probs: torch.Tensor, rewards: torch.Tensor, n: int) -> float:
    r"""$\mathbb{E}_{\pi_{BoN}}[r] = \sum_v P_v\, v$."""
    values, _, P, _ = _levels(ref_probs, rewards, n)
    return float((P * values).sum())


def best_of_n_kl_bound(n: int) -> float:
    r"""$\log N - \frac{N-1}{N}$: the KL of best-of-N for a reward without ties; an upper bound otherwise."""
    check_positive(n=n)
    return math.log(n) - (n - 1) / n


def best_of_n_from_samples(scores: torch.Tensor, values: torch.Tensor, n: int) -> tuple[float, float]:
    r"""Best-of-N of one prompt estimated from $M$ samples of $\pi_{ref}$: (E[value of the best], KL).

    The exact law (``best_of_n_distribution``) applied to the samples' empirical distribution
    ($1/M$ each): ``scores`` (M,) pick the best (the reward best-of-N selects by), ``values`` (M,)
    are what is reported of it (r*, which may differ from the score). The KL is then
    $\sum_v P_v\log(P_v/\hat q_v)$ with the levels' sampled masses $\hat q_v$: exact formula, sampled
    inputs (a plug-in estimate, close when $M \gg N$ and the levels are few, as r*'s are).
    """
    scores, values = torch.as_tensor(scores, dtype=DTYPE), torch.as_tensor(values, dtype=DTYPE)
    if scores.dim() != 1 or scores.shape != values.shape:
        raise ValueError(f"scores and values must be (M,) tensors of one shape, got {tuple(scores.shape)} "
                         f"and {tuple(values.shape)}")
    ref = torch.full_like(scores, 1.0 / scores.numel())
    law = best_of_n_distribution(ref, scores, n)                    # (M,) P(sample j is the best of N)
    return float((law * values).sum()), best_of_n_kl(ref, scores, n)


# ----------------------------------------------------------------------------------------------
# the theory lab's tables of best-of-N (``python -m minialign.theory_preference`` prints them)
# ----------------------------------------------------------------------------------------------


def best_of_n_table(problem: Problem, ns=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    r"""Best-of-N exactly: its KL, the formula $\log N - \frac{N-1}{N}$, its reward, E7's frontier at the same KL."""
    rows = []
    for n in ns:
        k = best_of_n_kl(problem.ref_probs, problem.rewards, n)
        reward = best_of_n_expected_reward(problem.ref_probs, problem.rewards, n)
        rows.append({"N": n, "kl": k, "bound": best_of_n_kl_bound(n), "bound_minus_kl": best_of_n_kl_bound(n) - k,
                     "reward": reward, "frontier_reward": frontier_reward_at(problem, k),
                     "below_frontier": frontier_reward_at(problem, k) - reward})
    return rows


def continuous_limit_table(ks=(6, 100, 10_000), ns=(2, 16, 64)) -> list[dict]:
    r"""Uniform $\pi_{ref}$ over K responses with distinct rewards: the exact KL approaches $\log N - \frac{N-1}{N}$ as K grows."""
    rows = []
    for K in ks:
        q = torch.full((K,), 1.0 / K, dtype=DTYPE)
        r = torch.arange(K, dtype=DTYPE)
        for n in ns:
            k = best_of_n_kl(q, r, n)
            rows.append({"K": K, "N": n, "kl": k, "bound": best_of_n_kl_bound(n), "bound_minus_kl": best_of_n_kl_bound(n) - k})
    return rows
