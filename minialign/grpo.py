r"""GRPO, group relative policy optimisation (E11-E14): PPO without a value head. The source
post's section 3.

PPO (``ppo.py``) needs a critic $V(x)$ for its baseline, a second network as large as the policy.
GRPO (DeepSeekMath, Shao et al. 2024) drops it: it samples $G$ answers to the same question and
uses their mean reward as the baseline. The group is the value estimate.

For a question $x$, sample $G$ answers $y_1, \dots, y_G \sim \pi_{old}(\cdot\mid x)$ and score them,
$r_i = r(x, y_i)$: here the toy world's verifiable reward, 1 if the arithmetic answer is right,
else 0.

**E11, the group baseline:**

$$\bar R(x) = \frac{1}{G}\sum_{i=1}^G r(x, y_i)$$

**E12, the normalised advantage,** one number per answer, given to every one of its tokens:

$$\hat A(x, y_i) = \frac{r(x, y_i) - \bar R(x)}{\mathrm{std}(\{r_1, \dots, r_G\}) + \epsilon}$$

A group whose answers all score the same (all right, or all wrong) carries no signal about which
answer is better: its advantage is exactly 0, never $0/0$ = NaN (``group_advantages``).

**E13, the objective,** with the per-token ratio
$\rho_{i,t} = \pi_\theta(y_{i,t}\mid x, y_{i,<t}) / \pi_{old}(y_{i,t}\mid x, y_{i,<t})$ (``grpo_loss``):

$$J_{GRPO}(\theta) = \mathbb{E}\Big[\frac{1}{G}\sum_{i=1}^G\Big(\frac{1}{|y_i|}\sum_{t=1}^{|y_i|}
\min\big(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon)\,\hat A_i\big)
- \beta\, D_{KL}(\pi_\theta\Vert\pi_{ref})\Big)\Big]$$

with the KL estimated per token by k3 (``ops.kl_k3``), unbiased and never negative:

$$D_{KL}(\pi_\theta\Vert\pi_{ref})_{i,t} \approx \frac{\pi_{ref}(y_{i,t}\mid\cdot)}{\pi_\theta(y_{i,t}\mid\cdot)}
- \log\frac{\pi_{ref}(y_{i,t}\mid\cdot)}{\pi_\theta(y_{i,t}\mid\cdot)} - 1$$

**E14, one iteration** (``grpo_iteration``): optionally reset $\pi_{ref} \leftarrow \pi_\theta$; set
$\pi_{old} \leftarrow \pi_\theta$; sample $G$ answers per question (``policy_gradient_sampling.sample_groups``);
reward $r_i = r(x, y_i) - \beta D_{KL}$ when the KL goes in the reward; E11-E12; several gradient steps
on E13 against the same samples of $\pi_{old}$.

Choices the source leaves open, each a field of ``GRPOHyperparams``:

- ``kl_in``: ``"loss"`` (default) puts $\beta\cdot$k3 in the loss per token, as E13 and DeepSeekMath
  do: the reward stays the plain verifiable 0/1, so E12's normalisation is not disturbed by the
  KL, and the KL's gradient is back-propagated rather than estimated by the policy gradient.
  ``"reward"`` subtracts $\beta\cdot$(the answer's summed k3) from $r_i$ before E11-E12, as E14
  writes it (and as PPO's E6 does).
- ``aggregation``: ``"answer_mean"`` is E13: the mean over each answer's tokens, then over answers,
  so a token of a short answer weighs more than a token of a long one. ``"token_mean"`` (DAPO)
  averages over all tokens of the batch. ``"constant"`` (Dr. GRPO) divides the token sum by
  $B\cdot$``max_new_tokens``, so the gradient does not depend on the answers' lengths.
- ``scale_by_std``: E12 divides by the group's std; Dr. GRPO shows this up-weights questions that
  are nearly always right or wrong and drops it (``False``: $\hat A = r - \bar R$). Default: E12 as
  written.
- ``ref_reset_every``: E14's $\pi_{ref} \leftarrow \pi_\theta$ every N iterations (0: the SFT model
  stays $\pi_{ref}$).

**Where this differs from the source**

- E13's KL term sits inside the per-token mean: $\beta\cdot$k3 is averaged with the surrogate over
  each answer's tokens. Its expected gradient is that of $\mathrm{KL}(\pi_{ref}\Vert\pi_\theta)$, the
  other direction from the $\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ it estimates (``docs/theory.md``
  derives it, ``tests/equations/test_theory.py`` checks it).
- E14's KL (``kl_in="reward"``) is the sum of the per-token k3 over the answer (the KL of two
  autoregressive distributions is the sum of the per-token KLs).
- E14 scores with a reward model $r_\phi$; here the reward is the toy world's verifiable one.
- E12's std is the sample std (divides by $G - 1$), as ``torch.std`` and common trainers compute
  it; $\epsilon = 10^{-4}$ (``adv_eps``).
- $\log\pi_{old}$ is the sampler's own (at the sampling temperature); ``recompute_old_logps``
  recomputes it with the training forward.

The family beyond GRPO (REINFORCE, RLOO, REINFORCE++, DAPO, GSPO, CISPO) runs through the same
``grpo_iteration``: its ``member`` replaces E12 and E13 (``policy_gradient.py``) and adds DAPO's
sampling-side steps (``policy_gradient_sampling.py``); the default is GRPO as written here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

from .runtime import distributed
from . import policy_gradient as PG
from .generation import Generation
from .ops import (check_choice, check_finite, check_groups, check_nonnegative, check_per_sequence, check_positive,
                  check_token_tensors, inference, kl_k1, kl_k3, masked_mean, masked_sum, response_logps, upcast)
from .policy_gradient_sampling import (overlong_filter, overlong_penalty, sample_groups, sample_until_full,
                                      zero_spread_fraction)
from .runtime.config import Config, check_range
from .runtime.devices import autocast


@dataclass
class GRPOHyperparams(Config):
    """What E11-E14 and one iteration need (``minialign grpo`` adds the run's settings to these, and the
    options of the family's members, ``policy_gradient.MemberOptions``)."""
    group_size: int = 8             # G answers sampled per question
    batch_size: int = 128           # answers per gradient step: the Q*G answers split into steps (>= Q*G: one step)
    inner_updates: int = 2          # passes over the same samples against the same pi_old (mu)
    clip_eps: float = 0.2           # E13's epsilon: the ratio is clipped to [1 - eps, 1 + eps]
    beta: float = 0.04              # KL coefficient
    kl_in: Literal["loss", "reward"] = "loss"  # loss (E13, DeepSeekMath; default) | reward (E14)
    # answer_mean (E13) | token_mean (DAPO) | constant (Dr. GRPO: divide by B * max_new_tokens)
    aggregation: Literal["answer_mean", "token_mean", "constant", "sequence_sum"] = "answer_mean"  # E13's mean over tokens (sequence_sum: REINFORCE's)
    scale_by_std: bool = True       # E12's division by the group's std (False: Dr. GRPO's r - mean)
    adv_eps: float = 1e-4           # E12's epsilon
    ref_reset_every: int = 0        # E14: pi_ref <- pi_theta every N iterations (0 = never)
    temperature: float = 1.0        # sampling temperature, also used to recompute log-probs
    max_new_tokens: int = 4         # longest answer, EOS included (also aggregation="constant"'s max_len)
    recompute_old_logps: bool = False  # recompute pi_old's log-probs instead of the sampler's
    share_prompt: bool = True       # run each question once for its G answers (exact; ops.prefill)

    def validate(self) -> None:
        super().validate()
        check_range(self, "group_size", 2)  # a group of one answer has no baseline (E11)
        for name in ("batch_size", "inner_updates", "max_new_tokens"):
            check_range(self, name, 1)
        for name in ("temperature", "clip_eps", "adv_eps"):  # GRPO samples from pi_theta: temperature > 0
            check_range(self, name, 0, low_open=True)
        for name in ("beta", "ref_reset_every"):
            check_range(self, name, 0)


# ----------------------------------------------------------------------------------------------
# the math: advantages (E11, E12), KL in the reward (E14), the clipped loss (E13)
# ----------------------------------------------------------------------------------------------


def group_advantages(rewards, group_size: int, eps: float = 1e-4, scale_by_std: bool = True) -> torch.Tensor:
    r"""E11 and E12: the advantage $\hat A_i$ of each of B answers, rows grouped $G$ = ``group_size`` at a time.

    ``rewards`` (B,): rows i*G .. i*G + G - 1 are the G answers to question i. Returns (B,) float32
    (float64 stays float64). A group whose rewards are all equal gets advantage 0.
    """
    rewards = torch.as_tensor(rewards)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    check_groups(rewards.numel(), group_size)
    check_positive(eps=eps)
    check_finite(rewards, "rewards")  # a NaN would make its group look all-equal: advantage 0
    # Exercise group_advantages (E11, E12): from here to the end of the function.
    r = rewards.view(-1, group_size)                                # (Q, G)
    baseline = r.mean(dim=1, keepdim=True)                          # (Q, 1)  E11
    advantages = r - baseline                                       # (Q, G)
    if scale_by_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)  # E12
    # all-equal rewards: the mean of equal floats may differ from them in the last bit, so
    # set 0 explicitly instead of trusting (r - mean) / eps to be 0
    spread = (r.max(dim=1, keepdim=True).values > r.min(dim=1, keepdim=True).values)  # (Q, 1)
    advantages = torch.where(spread, advantages, torch.zeros_like(advantages))
    return advantages.reshape(-1)                                   # (B,)


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                estimator: str = "k3") -> torch.Tensor:
    r"""$\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ of each answer: the sum over its tokens of a per-token estimate, (B,).

    The KL of two autoregressive distributions is the sum of the per-token KLs (chain rule).
    ``estimator`` "k3" (GRPO's, $\ge 0$) or "k1" ($\log\pi_\theta/\pi_{ref}$: the sum is E2's log-ratio).
    """
    check_choice("estimator", estimator, ("k1", "k3"))
    per_token = kl_k3(logps, ref_logps) if estimator == "k3" else kl_k1(logps, ref_logps)  # (B, T)
    return masked_sum(per_token, mask, dim=1)


def kl_penalised_rewards(rewards, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         beta: float, estimator: str = "k3") -> torch.Tensor:
    r"""E14: $r_i = r(x, y_i) - \beta\,\mathrm{KL}_i$, the KL summed over answer $i$'s tokens; (B,), no gradient.

    Used with ``kl_in="reward"``: these rewards go into ``group_advantages`` (E11-E12), and the
    loss then has no KL term of its own.
    """
    check_token_tensors(logps=logps, ref_logps=ref_logps, mask=mask)
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32  # float64 stays (theory lab)
    rewards = torch.as_tensor(rewards, dtype=dtype, device=logps.device)
    check_per_sequence(logps.shape[0], rewards=rewards)
    check_finite(rewards, "rewards")
    check_nonnegative(beta=beta)
    # Exercise kl_penalised_rewards (E14): from here to the end of the function.
    kl = sequence_kl(logps.detach().to(dtype), ref_logps.detach().to(dtype), mask, estimator)  # (B,)
    return rewards - beta * kl  # E14


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              kl_in: str = "loss", aggregation: str = "answer_mean", group_size: int | None = None,
              max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    r"""E13: $-J_{GRPO}$ (a loss to minimise) and a dict of statistics.

    logps, old_logps, ref_logps, mask: (B, T), one column per response token (EOS included in
    ``mask``: the policy must learn to stop). advantages: (B,) from ``group_advantages``.
    ``ref_logps`` may be None when no KL term is needed (``beta == 0`` or ``kl_in="reward"``).
    ``max_len`` is the constant of ``aggregation="constant"`` (e.g. max_new_tokens): the token
    sum is divided by B * max_len. ``group_size``, if given, checks that B is a multiple of it.
    """
    PG.check_grpo_loss_inputs(logps, old_logps, ref_logps, advantages, mask, clip_eps, beta, kl_in,
                              aggregation, group_size, max_len)
    # float32 even under bf16 autocast (ratios are differences of close log-probs); float64 stays
    dtype = upcast(logps).dtype
    logps, old_logps = logps.to(dtype), old_logps.to(dtype).detach()
    A = advantages.to(dtype).detach()[:, None]                   # (B, 1): one advantage per answer
    # Exercise grpo_loss (E13): from here to "End of exercise grpo_loss".
    ratio = torch.exp(logps - old_logps)                         # (B, T)  rho_{i,t}
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.minimum(ratio * A, clipped * A)            # (B, T)  E13's surrogate
    kl = None if ref_logps is None else kl_k3(logps, ref_logps.to(dtype).detach())  # (B, T) k3 >= 0
    if kl_in == "loss" and beta > 0:
        per_token = per_token - beta * kl                        # E13: KL in the loss

    if aggregation == "answer_mean":                             # E13: 1/|y_i| sum_t, then 1/G sum_i
        objective = masked_mean(per_token, mask, dim=1).mean()
    elif aggregation == "token_mean":                            # every token of the batch alike
        objective = masked_sum(per_token, mask) / mask.sum()
    else:                                                        # a constant: length-independent
        objective = masked_sum(per_token, mask) / (mask.shape[0] * max_len)
    loss = -objective
    # End of exercise grpo_loss.

    with torch.no_grad():  # the clip binds where the clipped term won the min: those tokens get no gradient
        stats = {"loss": loss.item(), "clip_frac": masked_mean((clipped * A < ratio * A).float(), mask).item(),
                 "ratio": masked_mean(ratio, mask).item(),
                 "kl": float("nan") if kl is None else masked_mean(kl, mask).item()}
    return loss, stats


def reset_reference(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    r"""E14's option $\pi_{ref} \leftarrow \pi_\theta$: copy the policy's weights into the reference (no sharing)."""
    reference.load_state_dict(policy.state_dict())  # load_state_dict copies values into the reference's own tensors


# ----------------------------------------------------------------------------------------------
# one iteration of E14
# ----------------------------------------------------------------------------------------------


@dataclass
class GRPOIterationResult:
    """What one ``grpo_iteration`` did: its samples, their rewards and advantages, and its metrics
    on this rank (``distributed.mean_over_ranks`` averages them over the ranks)."""
    rollout: Generation             # the B = Q * G sampled answers, group i in rows i*G .. i*G+G-1
    completions: list[str]          # the answers as text, as the reward function saw them
    rewards: torch.Tensor           # (B,) r(x, y_i)
    advantages: torch.Tensor        # (B,) E11-E12 (of the KL-penalised rewards with kl_in="reward"); reinforce_pp: (B, T)
    metrics: dict[str, float] = field(default_factory=dict)


def grpo_iteration(policy, reference, tokenizer, reward_fn, questions: list[dict], hp: GRPOHyperparams,
                   generator: torch.Generator, update, dtype: str = "float32",
                   member: PG.MemberOptions | None = None, draw=None) -> GRPOIterationResult:
    """One iteration of E14 on ``questions``: sample G answers each, score, E11-E12, update (E13).

    ``questions`` are rows with a ``prompt`` (and ``prompt_ids``, else ``tokenizer.prompt(prompt)``)
    and whatever columns ``reward_fn(prompts, completions, finished, **columns) -> list[float]``
    (``stages/rewards.py``) reads; a ``ToyWorld`` as ``reward_fn`` scores with its r*. ``update(rows,
    loss_of) -> Update`` (``runtime.optim.gradient_update``) makes one optimizer step from ``loss_of(micro)
    -> (mean loss, units, total units, stats)`` over ``rows``, hiding the optimizer, the schedule,
    ``--grad-accum`` and DDP. ``dtype``: autocast's ("float32": none). ``member``: a member of the family
    instead of GRPO (``policy_gradient.MemberOptions``); ``draw(n) -> n more questions``: its dynamic sampling.
    """
    member = member or PG.MemberOptions()  # None: GRPO itself
    PG.check_member(member, hp)
    device = next(policy.parameters()).device
    G = hp.group_size
    # y ~ pi_old = the current policy (frozen for the whole iteration): G answers to each question, scored
    sample = functools.partial(sample_groups, policy, tokenizer, reward_fn, hp=hp, generator=generator, dtype=dtype)

    if member.dynamic_sampling:  # DAPO: only the groups that carry a signal, more questions drawn to fill the batch
        sampled, (rollout, completions, rewards) = sample_until_full(sample, questions, draw, G, member.max_draws,
                                                                     tokenizer.pad_id)
    else:
        sampled = [sample(questions)]  # every draw, for the metrics
        rollout, completions, rewards = sampled[0]
    mask = rollout.response_mask                                                              # (B, T)
    seqs, attn, P = rollout.sequences, rollout.attention_mask, rollout.prompt_len

    with autocast(device, dtype):  # no gradient: inference mode (``ops.inference``), the same numbers
        # pi_old's log-probs: the sampler's own (same temperature, 0 after EOS), or recomputed by
        # the training forward so that rho = 1 exactly at the first update (the sampler's cached
        # forward agrees to ~1e-6 in float32, less closely under bf16)
        old_logps = rollout.logps
        if hp.recompute_old_logps:
            old_logps = inference(response_logps, policy, seqs, attn, P, hp.temperature, hp.share_prompt)
        ref_logps = inference(response_logps, reference, seqs, attn, P, hp.temperature, hp.share_prompt)
    if hp.kl_in == "reward" and member.advantage != "reinforce_pp":  # E14's r_i = r(x, y_i) - beta KL_i
        total_reward = kl_penalised_rewards(rewards, old_logps, ref_logps, mask, hp.beta, member.kl_estimator)
    else:                     # E13: the KL is in the loss (or in REINFORCE++'s per-token reward), r_i is the reward
        total_reward = rewards
    if member.overlong == "penalty":  # DAPO's soft length penalty, in the reward
        total_reward = total_reward + overlong_penalty(mask.sum(1), hp.max_new_tokens, member.overlong_cache,
                                                       rollout.finished)
    if member.advantage == "grpo":
        advantages = group_advantages(total_reward, G, hp.adv_eps, hp.scale_by_std)  # (B,) E11-E12
    else:                     # a member's baseline: (B,), or (B, T) for REINFORCE++
        kl_per_token = dict(mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                            beta=hp.beta if hp.kl_in == "reward" else 0.0) if member.advantage == "reinforce_pp" else {}
        advantages = PG.advantages(member.advantage, total_reward, G, eps=hp.adv_eps, **kl_per_token)
    if member.overlong == "filter":  # DAPO: a truncated answer leaves the loss, after it counted in its group's baseline
        mask = overlong_filter(mask, rollout.finished)
    aggregation = PG.effective_aggregation(member.loss, hp.aggregation)

    def units(idx) -> float:  # what the loss averages over: answers, or tokens for token_mean
        return float(mask[idx].sum()) if aggregation == "token_mean" else len(idx)

    def loss_of(micro, minibatch_units: float):  # one micro-batch of the minibatch's answers
        with autocast(device, dtype):
            logps = response_logps(policy, seqs[micro], attn[micro], P, hp.temperature, hp.share_prompt)
        if member.loss == "grpo":
            loss, stats = grpo_loss(logps, old_logps[micro], ref_logps[micro], advantages[micro], mask[micro],
                                    hp.clip_eps, hp.beta, hp.kl_in, hp.aggregation, max_len=hp.max_new_tokens)  # E13
        else:                 # a member's loss, with no KL term (it is in the reward)
            loss, stats = PG.policy_loss(
                member.loss, logps, old_logps[micro], advantages[micro], mask[micro], clip_eps=hp.clip_eps,
                eps_low=member.clip_eps_low or None, eps_high=member.clip_eps_high or None,
                max_len=hp.max_new_tokens, aggregation=hp.aggregation if member.loss == "reinforce" else None)
        return loss, units(micro), minibatch_units, stats

    trained = mask.any(1).nonzero().squeeze(1)  # the rows the loss sees: all but the filtered answers
    per_step = hp.batch_size // distributed.world_size()  # this rank's answers per optimizer step
    stats, norms = [], []
    for _ in range(hp.inner_updates):  # mu passes against the same pi_old
        order = trained[torch.randperm(len(trained), generator=generator, device=device)]
        for idx in order.split(per_step) if len(order) else ():  # nothing to train on: every answer filtered out
            minibatch_units = units(idx) * distributed.world_size()
            done = update(idx, functools.partial(loss_of, minibatch_units=minibatch_units))
            stats += done.extras
            norms.append(done.grad_norm)

    def mean(values) -> float:  # nan where nothing was trained on (every answer filtered out)
        return sum(values) / len(values) if values else float("nan")
    everything = torch.cat([r for _, _, r in sampled])  # every answer sampled (dynamic sampling: more than trained on)
    lengths = rollout.response_mask.sum(1).float()
    metrics = {"reward": everything.mean().item(),  # the verifiable reward (here = accuracy)
               "accuracy": (everything == 1).float().mean().item(),
               # KL(pi_old || pi_ref) per token of the sampled answers, before this iteration's updates
               "kl": masked_mean(kl_k3(old_logps, ref_logps), rollout.response_mask).item(),
               "clip_frac": mean([s.get("clip_frac", 0.0) for s in stats]),  # REINFORCE has no clip
               "loss": mean([s["loss"] for s in stats]),
               "grad_norm": mean(norms),
               "answer_len": lengths.mean().item(),
               "finished": rollout.finished.float().mean().item(),
               "zero_spread": zero_spread_fraction(everything, G),
               "tokens": float(sum(g.response_mask.sum() for g, _, _ in sampled))}  # generated, EOS included
    if hp.kl_in == "reward":
        metrics["kl_penalised_reward"] = total_reward.mean().item()  # what E11-E12 saw
    if member.dynamic_sampling:
        metrics["questions_drawn"] = float(everything.numel() // G)  # sampled, to fill the batch
    return GRPOIterationResult(rollout, completions, rewards, advantages, metrics)
