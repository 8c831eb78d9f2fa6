r"""PPO with a value head: the RLHF loop against the learned reward model (E2, E5, E6). The source
post's sections 0 (E2) and 1 (E5, E6).

**The objective (E2).** Sample a response from the policy, score it with the reward model, and
subtract a KL penalty that keeps the policy near the SFT model it started from:

$$J_r(\pi_\theta) = \mathbb{E}_{x,\ y\sim\pi_\theta}\Big[r_\phi(x,y) - \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{ref}(y\mid x)}\Big]$$

**Per-token rewards (E2 token by token, E6).** A response is a sequence of actions
$y_1, \dots, y_T$ (the last one is EOS). Each action pays the KL penalty of its own token, and the
last one also receives the reward model's score, read at the EOS (``per_token_rewards``):

$$r_t = -\beta\big(\log\pi_\theta(y_t\mid x, y_{<t}) - \log\pi_{ref}(y_t\mid x, y_{<t})\big) + [t = T]\, r_\phi(x,y),$$

so that $\sum_t r_t = r_\phi(x,y) - \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{ref}(y\mid x)}$, exactly the
quantity inside E2's expectation ($\log\pi(y\mid x)$ is a sum over tokens, E1).

**Advantages (E6).** The source gives the whole answer one advantage, with a learned baseline
$V(x)$ (``advantage="source"``, ``one_step_advantages``):

$$A(x,y) = r(x,y) - V(x).$$

Practice (Ziegler et al. 2019, InstructGPT) uses generalised advantage estimation per token, with
$V(s_t)$ read at every response position (``advantage="gae"``, the default, ``gae``):

$$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t),\qquad \hat A_t = \sum_{l\ge 0}(\gamma\lambda)^l\,\delta_{t+l},\qquad \hat R_t = \hat A_t + V(s_t),$$

with $V(s_{T+1}) = 0$ after the EOS. With $\gamma = \lambda = 1$ the sum telescopes to
$\hat A_1 = \sum_t r_t - V(s_1) = r(x,y) - V(x)$ at the first response token: the source's
advantage (``tests/equations/test_ppo.py`` checks it). With $\lambda < 1$, GAE trades that unbiased but
noisy signal for a lower-variance one that trusts $V(s_{t+1})$ for the tokens still to come, and
gives each token its own advantage (a token that raised the KL pays for it, not its neighbours).

**The clipped surrogate (E5).** With the ratio of new to old (rollout-time) probabilities

$$\rho_t(\theta) = \frac{\pi_\theta(y_t\mid x, y_{<t})}{\pi_{old}(y_t\mid x, y_{<t})},\qquad
L^{CLIP} = \mathbb{E}_t\big[\min\big(\rho_t\hat A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\,\hat A_t\big)\big],$$

we minimise $-L^{CLIP}$ (``clipped_surrogate_loss``): a token whose ratio has already moved past
$1\pm\epsilon$ in the direction its advantage pushes gets no more gradient, so several epochs over
one rollout cannot move the policy far from the one that sampled it.

**The value loss** (clipped, as in the PPO2 baselines), with the rollout-time values $V_{old}$
(``value_loss``):

$$L^V = \tfrac12\,\mathbb{E}_t\Big[\max\Big((V_t - \hat R_t)^2,\ \big(V_{old,t} + \mathrm{clip}(V_t - V_{old,t}, -c, c) - \hat R_t\big)^2\Big)\Big]$$

**One PPO iteration (E6).** Sample $y\sim\pi_\theta$ for a batch of prompts; score them with
$r_\phi$ at the EOS; per-token rewards with the KL to $\pi_{ref}$; advantages (GAE or the source's
$r - V(x)$), whitened; then ``ppo_epochs`` passes over the rollout in minibatches, minimising
$-L^{CLIP} + c_V L^V - c_H H(\pi_\theta)$ (``vf_coef``, ``ent_coef``).

**The value head has its own trunk** by default (``shared_trunk=False``): the critic is a copy of
the SFT model's trunk with a linear head on its final hidden states, trained by the value loss only
(InstructGPT initialised it from the reward model). With a shared trunk the value loss's gradient
also moves the policy's features, and when the returns jump it swamps the policy gradient under
the common norm clip; ``docs/measurements.md`` shows the runs. ``shared_trunk=True`` gives the cheaper
variant (one forward for logits and values). Either way the head starts at zero, so $V = 0$ at first.

**Where this differs from the source**

- The probability ratio is called $\rho_t$ (the source writes $r_t(\theta)$), because $r$ is the reward here.
- The advantage is per-token GAE by default; the source's one-number $A = r - V(x)$ is
  ``advantage="source"``. Either is whitened over the rollout's response tokens
  (``whiten_advantages``, default on), which the source does not do.
- E2's KL penalty is paid token by token (its sum is E2's log-ratio, so the total is the same).
- The source does not say how $V$ is trained: here by the clipped value loss above, on a separate
  trunk by default.
- A response cut off before its EOS has no place to read $r_\phi$ (the reward model saw only
  finished responses): it scores ``missing_eos_score`` (default $-7$, the world's own score of a
  malformed review) and is still terminal.
- Options the source does not have: an entropy bonus (``ent_coef``, off), an adaptive $\beta$
  (``kl_target``, Ziegler et al. 2019; off).

Where each equation is computed: ``per_token_rewards`` (E2, E6), ``gae`` and
``one_step_advantages`` (E6), ``clipped_surrogate_loss`` (E5), ``value_loss``,
``AdaptiveKLController``; then the value head (``PolicyWithValueHead``) and one iteration,
``ppo_iteration``. ``minialign ppo`` (``stages/ppo.py``) runs the iterations.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from .runtime import distributed
from .data import minibatches
from .generation import Generation, generate
from .model import GPT
from .ops import (check_finite, check_in_range, check_nonempty_rows, check_nonnegative, check_per_sequence,
                  check_positive, check_token_tensors, entropy_from_logits, explained_variance, inference, masked_mean,
                  masked_sum, masked_whiten, response_hidden, response_logps, token_logps)
from .reward_model import last_token_index
from .runtime.config import Config, check_range
from .runtime.devices import autocast


@dataclass
class PPOHyperparams(Config):
    """What E2, E5, E6 and one iteration need (``minialign ppo`` adds the run's settings to these)."""
    minibatch_size: int = 16            # responses per optimizer step (the rollout is cut into these)
    ppo_epochs: int = 2                 # passes over each rollout
    max_new_tokens: int = 24
    temperature: float = 1.0            # sampling and log-prob temperature (must be the same)
    beta: float = 0.1                   # KL strength of E2 (the initial one if adaptive)
    kl_target: float | None = None      # None: fixed beta; a number: adaptive, target KL (nats/response)
    kl_horizon: int = 320               # adaptive: beta moves <= 0.2 * batch_size / kl_horizon per iteration
    advantage: Literal["gae", "source"] = "gae"  # per-token GAE, or the source's A = r - V(x) (E6)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_eps: float = 0.2               # E5's epsilon
    value_clip: float = 0.2             # 0 turns the value clipping off
    vf_coef: float = 0.5
    ent_coef: float = 0.0               # entropy bonus
    shared_trunk: bool = False          # value head on the policy's own trunk? (see the docstring)
    missing_eos_score: float = -7.0     # score of a response cut off before its EOS
    share_prompt: bool = True           # run each prompt once for all its samples (exact; ops.prefill)

    def validate(self) -> None:
        super().validate()
        for name in ("minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            check_range(self, name, 1)
        for name in ("temperature", "clip_eps", "kl_target"):
            check_range(self, name, 0, low_open=True)
        for name in ("beta", "value_clip", "vf_coef", "ent_coef"):
            check_range(self, name, 0)
        check_range(self, "gamma", 0, 1)
        check_range(self, "lam", 0, 1)


# ----------------------------------------------------------------------------------------------
# the pure functions: rewards, advantages, losses
# ----------------------------------------------------------------------------------------------


def per_token_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor, beta: float) -> torch.Tensor:
    r"""E2/E6 per token: $r_t = -\beta(\log\pi_\theta(y_t\mid\cdot) - \log\pi_{ref}(y_t\mid\cdot))$ on every
    response token, plus ``score`` $r_\phi(x,y)$ (B,) on the last one of each row (the EOS).
    Returns (B, T), 0 outside ``mask``.

    Summed over a row: $r_\phi(x,y) - \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{ref}(y\mid x)}$, the inside of E2.
    """
    check_token_tensors(logps=logps, ref_logps=ref_logps, mask=mask)
    check_per_sequence(logps.shape[0], score=score)
    check_finite(score, "score")
    check_nonnegative(beta=beta)
    check_nonempty_rows(mask)
    # Exercise per_token_rewards (E2, E6): from here to the end of the function.
    m = mask.bool()
    kl = torch.where(m, logps - ref_logps, torch.zeros_like(logps))           # (B, T) k1 per token
    rewards = -beta * kl                                                      # (B, T)
    last = last_token_index(mask)                                             # (B,) the EOS column
    eos = torch.zeros_like(rewards).scatter(1, last[:, None], 1.0)            # (B, T) one-hot at EOS
    return rewards + eos * score.to(rewards.dtype)[:, None]                   # E2: score at the EOS


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation over each row's response tokens: (advantages, returns).

    $\delta_t = r_t + \gamma V_{t+1} - V_t$ ($V = 0$ after the last response token),
    $\hat A_t = \delta_t + \gamma\lambda\hat A_{t+1}$, returns $\hat R_t = \hat A_t + V_t$; both 0
    outside ``mask``. The response must be contiguous in each row (it is: prompt, response, padding).
    """
    check_token_tensors(rewards=rewards, values=values, mask=mask)
    check_finite(rewards, "rewards")
    check_nonempty_rows(mask)
    check_in_range(0, 1, gamma=gamma, lam=lam)
    # Exercise gae (GAE): from here to the end of the function.
    m = mask.bool()
    zero = torch.zeros_like(values[:, 0])
    next_value, next_adv = zero, zero                                         # (B,) past the end: 0
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]            # the TD error
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m[:, t], adv, zero)
        # a masked column (padding after the EOS, or the prompt) passes on V = 0 and A = 0
        next_value = torch.where(m[:, t], values[:, t], zero)
        next_adv = advantages[:, t]
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


@torch.no_grad()
def one_step_advantages(total_reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""E6 as the source writes it: $A(x,y) = r(x,y) - V(x)$, one number per answer.

    ``total_reward`` (B,) is the whole answer's KL-penalised reward
    $r(x,y) = r_\phi(x,y) - \beta\log\frac{\pi(y\mid x)}{\pi_{ref}(y\mid x)}$, the row sum of
    ``per_token_rewards``; $V(x)$ is the value at the first response token (read from the hidden
    state of the prompt's last token). The advantage is copied onto every response token; the
    returns (the value targets) are $r(x,y)$ on every one.
    """
    check_token_tensors(values=values, mask=mask)
    check_per_sequence(values.shape[0], total_reward=total_reward)
    check_finite(total_reward, "total_reward")
    check_nonempty_rows(mask)
    # Exercise one_step_advantages (E6): from here to the end of the function.
    m = mask.bool()
    first = m.long().argmax(1)                                                # (B,) first response token
    v_x = values.gather(1, first[:, None]).squeeze(1)                         # (B,) V(x)
    r = total_reward.to(values.dtype)[:, None].expand_as(values)              # (B, T) r(x, y) on every token
    advantages = torch.where(m, r - v_x[:, None], torch.zeros_like(values))   # E6: A = r - V(x)
    returns = torch.where(m, r, torch.zeros_like(values))
    return advantages, returns


def clipped_surrogate_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    r"""E5: loss $= -\operatorname{mean}_t \min(\rho_t\hat A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\hat A_t)$,
    $\rho_t = \pi_\theta(y_t\mid\cdot)/\pi_{old}(y_t\mid\cdot)$, over the tokens of ``mask`` (each weighs the same).

    Returns (loss, stats): ``clip_frac`` (fraction of tokens where the clipped term is the smaller,
    so their gradient is 0), ``approx_kl`` (k3 estimate of $\mathrm{KL}(\pi_{old}\Vert\pi_\theta)$ on
    the rollout's tokens) and ``ratio`` (mean $\rho_t$).
    """
    check_token_tensors(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    check_nonempty_rows(mask)
    check_positive(clip_eps=clip_eps)
    # Exercise clipped_surrogate_loss (E5): from here to the end of the function.
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)                                              # (B, T) rho_t
    unclipped = ratio * advantages                                            # rho A
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages     # clip(rho) A
    surrogate = torch.minimum(unclipped, clipped)                             # E5
    loss = -masked_mean(surrogate, mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),  # k3, >= 0
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    r"""Clipped value loss: $\frac12\operatorname{mean}_t \max\big((V_t - \hat R_t)^2,\ (V_{old,t} + \mathrm{clip}(V_t - V_{old,t}, -c, c) - \hat R_t)^2\big)$.

    ``clip_range=None`` (or 0) is the plain $\frac12(V_t - \hat R_t)^2$. Returns (loss, stats) with
    ``value_clip_frac``, the fraction of tokens where the clipped error is the larger.
    """
    check_token_tensors(values=values, old_values=old_values, returns=returns, mask=mask)
    check_nonempty_rows(mask)
    if clip_range is not None:  # a negative or NaN range would clip to nonsense and return a number
        check_nonnegative(clip_range=clip_range)
    # Exercise value_loss (PPO value loss): from here to the end of the function.
    err = (values - returns) ** 2                                             # (B, T)
    if not clip_range:
        return 0.5 * masked_mean(err, mask), {"value_clip_frac": 0.0}
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"value_clip_frac": masked_mean((err_clipped > err).float(), mask).item()}


class AdaptiveKLController:
    r"""Ziegler et al. (2019): $\beta \leftarrow \beta\,(1 + \mathrm{clip}(\mathrm{KL}/\mathrm{target} - 1, -0.2, 0.2)\cdot n/\mathrm{horizon})$.

    KL is the rollout's mean of $\log\pi(y\mid x) - \log\pi_{ref}(y\mid x)$ (nats per response). With
    ``target=None`` $\beta$ stays fixed.
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n / self.horizon
        return self.beta

    def state_dict(self) -> dict:  # the current beta, for resuming a run
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


# ----------------------------------------------------------------------------------------------
# the policy with a value head
# ----------------------------------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    r"""The policy $\pi_\theta$ (a GPT) and a critic $V(s_t)$, a linear head on final hidden states.

    ``shared_trunk=False`` (the default): the critic is a separate copy of the initial GPT's trunk,
    so the value loss cannot move the policy (see the module docstring for why).
    ``shared_trunk=True``: the head reads the policy's own hidden states (one forward for both).
    The head starts at zero, so $V = 0$ at first.
    """

    def __init__(self, policy: GPT, shared_trunk: bool = False):
        super().__init__()
        self.policy = policy
        self.critic = None if shared_trunk else copy.deepcopy(policy)
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) float32 for the response columns of ``generate``'s
        sequences (prompt in the first ``prompt_len`` columns): column t is the state before
        response token t is chosen. ``share_prompt``: see ``ops.prefill`` (the same numbers)."""
        h = response_hidden(self.policy, sequences, attention_mask, prompt_len, share_prompt)[:, :-1]  # (B, T, C)
        logits = self.policy.lm_head(h)                                       # (B, T, V)
        if self.critic is not None:
            h = response_hidden(self.critic, sequences, attention_mask, prompt_len, share_prompt)[:, :-1]
        values = self.value_head(h).squeeze(-1).float()                       # (B, T)
        return logits, values


def logps_values_entropy(model: PolicyWithValueHead, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_len: int, temperature: float = 1.0, share_prompt: bool = True):
    r"""$\log\pi(y_t\mid x, y_{<t})$, $V$(the state before $y_t$) and the entropy there: three (B, T)
    tensors, aligned with ``Generation.response_mask``."""
    logits, values = model(sequences, attention_mask, prompt_len, share_prompt)  # (B, T, V), (B, T)
    logps = token_logps(logits, sequences[:, prompt_len:], temperature)       # (B, T) E1 factors
    entropy = entropy_from_logits(logits.float() / temperature)               # (B, T)
    return logps, values, entropy


# ----------------------------------------------------------------------------------------------
# one PPO iteration (E6)
# ----------------------------------------------------------------------------------------------


@dataclass
class PPOIterationResult:
    """What one ``ppo_iteration`` did: its rollout, what it was paid, and its metrics on this rank
    (``distributed.mean_over_ranks`` averages them over the ranks)."""
    rollout: Generation             # the B sampled responses
    score: torch.Tensor             # (B,) r_phi read at the EOS (missing_eos_score without one)
    advantages: torch.Tensor        # (B, T) GAE or E6's r - V(x), whitened if asked
    returns: torch.Tensor           # (B, T) the value head's targets
    metrics: dict[str, float] = field(default_factory=dict)


def ppo_iteration(actor_critic: PolicyWithValueHead, reference: nn.Module, reward_model: nn.Module, tokenizer,
                  prompts: list[list[int]], hp: PPOHyperparams, beta: float, generator: torch.Generator,
                  data_generator: torch.Generator, update, dtype: str = "float32") -> PPOIterationResult:
    r"""One iteration of E6 on ``prompts`` (token lists): sample, score, advantages, then
    ``ppo_epochs`` passes of E5 and the value loss in minibatches (ordered by ``data_generator``).

    ``actor_critic``: $\pi_\theta$ and its critic; ``reference``: the frozen $\pi_{ref}$;
    ``reward_model(sequences, attention_mask, response_mask or None) -> (B,)``: $r_\phi$ at the EOS;
    ``beta``: E2's KL strength now (``AdaptiveKLController.beta``). ``update(rows, loss_of) -> Update``
    (``runtime.optim.gradient_update``) makes one optimizer step, hiding the optimizer, the schedule,
    ``--grad-accum`` and DDP; ``dtype`` is the autocast dtype ("float32": none).
    """
    device = next(actor_critic.parameters()).device
    # ---- 1. rollout: y ~ pi_theta(. | x) (E6, first step) ------------------------------------
    rollout = generate(actor_critic.policy, prompts, hp.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                       temperature=hp.temperature, generator=generator, share_prompt=hp.share_prompt)
    seqs, attn, P, share = rollout.sequences, rollout.attention_mask, rollout.prompt_len, hp.share_prompt
    mask = rollout.response_mask                                              # (B, T) response tokens
    finished = rollout.finished                                               # (B,) emitted EOS

    # ---- 2. score at the EOS, KL to pi_ref, per-token rewards (E2, E6) ----------------------
    def score_rollout():  # no gradient: run in inference mode (``ops.inference``), the same numbers
        old_logps, old_values, _ = logps_values_entropy(actor_critic, seqs, attn, P, hp.temperature, share)
        ref_logps = response_logps(reference, seqs, attn, P, hp.temperature, share)  # (B, T)
        rm_score = reward_model(seqs, attn, rollout.full_response_mask if share else None).float()  # (B,) at the EOS
        return old_logps, old_values, ref_logps, rm_score

    actor_critic.eval()
    with autocast(device, dtype):
        old_logps, old_values, ref_logps, rm_score = inference(score_rollout)
    # a response with no EOS has no place to read r_phi: it gets the penalty score instead
    score = torch.where(finished, rm_score, torch.full_like(rm_score, hp.missing_eos_score))
    rewards = per_token_rewards(score, old_logps, ref_logps, mask, beta)      # (B, T)
    if hp.advantage == "gae":
        advantages, returns = gae(rewards, old_values, mask, hp.gamma, hp.lam)
    else:
        total_reward = rewards.sum(1)                                          # (B,) r(x, y) of E6
        advantages, returns = one_step_advantages(total_reward, old_values, mask)  # E6
    if hp.whiten_advantages:
        advantages = masked_whiten(advantages, mask)  # over this rank's rollout, as TRL does

    # ---- 3. PPO epochs over the rollout, in minibatches (E5 + value loss) -------------------
    def loss_of(micro, minibatch_tokens: float):  # one micro-batch of rollout rows; a mean over its tokens
        with autocast(device, dtype):
            logps, values, entropy = logps_values_entropy(actor_critic, seqs[micro], attn[micro], P,
                                                          hp.temperature, share)
        m = mask[micro]
        pg_loss, pg_stats = clipped_surrogate_loss(logps, old_logps[micro], advantages[micro], m, hp.clip_eps)  # E5
        v_loss, v_stats = value_loss(values, old_values[micro], returns[micro], m, hp.value_clip)
        ent = masked_mean(entropy, m)
        loss = pg_loss + hp.vf_coef * v_loss - hp.ent_coef * ent
        stats = {"loss": loss.item(), "pg_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": ent.item(),
                 **pg_stats, **v_stats}
        return loss, float(m.sum()), minibatch_tokens, stats

    actor_critic.train()
    logs = []
    for _ in range(hp.ppo_epochs):
        for idx in minibatches(seqs.shape[0], hp.minibatch_size // distributed.world_size(), data_generator):
            idx = idx.to(device)
            minibatch_tokens = float(mask[idx].sum()) * distributed.world_size()  # over every rank's minibatch
            done = update(idx, functools.partial(loss_of, minibatch_tokens=minibatch_tokens))
            logs += [{**stats, "grad_norm": done.grad_norm} for stats in done.extras]

    # ---- 4. measure: the objective (E2) and the KL on the rollout ---------------------------
    with torch.no_grad():
        kl_seq = masked_sum(old_logps - ref_logps, mask, dim=1)               # (B,) log pi(y|x)/pi_ref(y|x)
        metrics = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}
        metrics.update({
            "objective": (score - beta * kl_seq).mean().item(),                # E2 on the rollout
            "score": score.mean().item(),                                      # learned reward r_phi
            "kl": kl_seq.mean().item(), "beta": beta,
            "explained_variance": explained_variance(old_values, returns, mask),
            "response_length": mask.sum(1).float().mean().item(),
            "finished": finished.float().mean().item(),
        })
    return PPOIterationResult(rollout, score, advantages, returns, metrics)
