r"""DPO, direct preference optimisation (E7-E10): alignment from preference pairs, with no reward
model and no sampling during training. The source post's section 2.

The derivation, as the source walks it: E2 $\to$ E7 $\to$ E8 $\to$ E3 $\to$ E9.

**E7, the optimal KL-regularised policy.** The RLHF objective (E2)

$$J_r(\pi) = \mathbb{E}_{x,\ y\sim\pi}\Big[r(x,y) - \beta\log\frac{\pi(y\mid x)}{\pi_{ref}(y\mid x)}\Big]$$

has, for every prompt $x$, a closed-form maximiser over all distributions on responses:

$$\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x,y)\Big),\qquad
Z(x) = \sum_y \pi_{ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x,y)\Big).$$

$Z(x)$ sums over every possible response, so for a language model it cannot be computed: that is
the obstacle. On a discrete set of responses of one prompt it can (``optimal_policy``,
``log_partition``).

**E8, the reward as a policy ratio.** Take the log of E7 and solve for $r$:

$$r(x,y) = \beta\log\frac{\pi^*(y\mid x)}{\pi_{ref}(y\mid x)} + \beta\log Z(x).$$

Every reward is, up to the prompt-only term $\beta\log Z(x)$, the log-ratio of its optimal policy
to the reference (``implied_reward``).

**E3, Bradley-Terry, where $Z(x)$ cancels.** Preferences are modelled as
$P(y_w \succ y_l\mid x) = \sigma(r(x,y_w) - r(x,y_l))$. Only a difference of two rewards of the
same prompt enters, so $\beta\log Z(x)$ cancels: substituting E8 gives the preference probability
in terms of $\pi^*$ and $\pi_{ref}$ alone (``preference_probability``).

**E9, the DPO loss.** Parametrise $\pi^*$ by the policy $\pi_\theta$ and maximise the likelihood of
the observed preferences:

$$\mathcal{L}_{DPO}(\theta) = -\mathbb{E}_{(x,y_w,y_l)}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w\mid x)}{\pi_{ref}(y_w\mid x)}
- \beta\log\frac{\pi_\theta(y_l\mid x)}{\pi_{ref}(y_l\mid x)}\Big)\Big]$$

**E10, the implicit rewards.** $r_w = \beta(\log\pi_\theta(y_w\mid x) - \log\pi_{ref}(y_w\mid x))$,
$r_l$ likewise, and $\mathcal{L}_{DPO} = -\log\sigma(r_w - r_l)$ (``dpo_loss``). The policy is its own
reward model: no $r_\phi$ is trained, no response is sampled, and E2's KL penalty is built in
through $\pi_{ref}$. The gradient shows what DPO does (``dpo_loss_gradients``):

$$\frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_w\mid x)} = -\beta\,\sigma(r_l - r_w),\qquad
\frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_l\mid x)} = +\beta\,\sigma(r_l - r_w):$$

raise the chosen response, lower the rejected one, each pair weighted by how wrongly the implicit
reward orders it (a pair already ordered by a wide margin has weight near 0).

$\log\pi(y\mid x)$ is E1: the sum of the log-probs of the response tokens, the EOS included, the
prompt and the padding masked out (``ops.sequence_logps``).

**Where this differs from the source**

- Nothing in E9 and E10: ``dpo_loss`` computes them as written, the expectation as the mean over
  a batch of pairs.
- ``implied_reward`` returns E8 without its $\beta\log Z(x)$ term, which cannot be computed for a
  language model and cancels in E3 anyway.
- The source's step 2 runs $\pi_{ref}$ on every batch; here its log-probs of the fixed training
  pairs are computed once before training (``precompute_ref_logps``, default on), which gives the
  same losses.
- What DPO never sees is measured beside it: the hidden reward $r^*$ of sampled reviews and
  $\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ on samples $y\sim\pi_\theta$ (``stages/evaluate.py``:
  ``review_eval``, ``sampled_kl``).

The file reads top to bottom: the hyperparameters, E7 and E8 on a discrete example, E9 and E10,
sequence log-probs of chosen and rejected responses, then the step a training loop calls,
``dpo_step`` (the loop itself, its flags and its plots: ``stages/dpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .runtime import distributed
from .data import collate
from .ops import check_positive, check_sequence_logps, inference, sequence_logps, upcast
from .reward_model import bradley_terry_probability
from .tokenizer import Tokenizer
from .runtime.config import Config, check_range
from .runtime.devices import autocast


@dataclass
class DPOHyperparams(Config):
    """What E9-E10 and one step need (``minialign dpo`` adds the run's settings to these)."""
    beta: float = 0.1                   # KL strength of E2; the implicit reward's scale (E10)
    share_prompt: bool = True           # run x once for y_w and y_l (exact; ops.prefill)

    def validate(self) -> None:
        super().validate()
        check_range(self, "beta", 0, low_open=True)


# ----------------------------------------------------------------------------------------------
# E7 and E8 on a discrete set of responses (one prompt): the closed form DPO starts from
# ----------------------------------------------------------------------------------------------


def _check_discrete(ref_probs: torch.Tensor, other: torch.Tensor, beta: float, other_name: str) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if ref_probs.dim() != 1 or ref_probs.numel() == 0:
        raise ValueError(f"ref_probs must be a non-empty 1-D tensor (one prompt's responses), "
                         f"got shape {tuple(ref_probs.shape)}")
    if other.shape != ref_probs.shape:
        raise ValueError(f"{other_name} {tuple(other.shape)} and ref_probs {tuple(ref_probs.shape)} differ in shape")
    if (ref_probs < 0).any() or abs(float(ref_probs.sum()) - 1.0) > 1e-4:
        raise ValueError("ref_probs must be a probability distribution (>= 0, sum 1), "
                         f"sums to {float(ref_probs.sum())}")


def log_partition(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    r"""$\log Z(x) = \log\sum_y \pi_{ref}(y\mid x)\, e^{r(x,y)/\beta}$, E7's normaliser, computed stably."""
    _check_discrete(ref_probs, rewards, beta, "rewards")
    return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=0)


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    r"""E7: $\pi^*(y\mid x) = \pi_{ref}(y\mid x)\, e^{r(x,y)/\beta} / Z(x)$ over K responses of one prompt, (K,)."""
    _check_discrete(ref_probs, rewards, beta, "rewards")
    # Exercise optimal_policy (E7): from here to the end of the function.
    # E7 in log space: log pi* = log pi_ref + r / beta - log Z (a softmax), so a large r / beta
    # cannot overflow exp(); a response with pi_ref = 0 keeps pi* = 0 (log 0 = -inf).
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=0)  # (K,)


def implied_reward(pi_star: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    r"""E8 without its prompt-only term: $\beta\log\frac{\pi^*(y\mid x)}{\pi_{ref}(y\mid x)} = r(x,y) - \beta\log Z(x)$, (K,)."""
    _check_discrete(ref_probs, pi_star, beta, "pi_star")
    # Exercise implied_reward (E8): from here to the end of the function.
    return beta * (torch.log(pi_star) - torch.log(ref_probs))  # E8


def preference_probability(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    r"""E3: $P(y_w \succ y_l\mid x) = \frac{e^{r_w}}{e^{r_w} + e^{r_l}} = \sigma(r_w - r_l)$.

    Only the difference enters: adding $\beta\log Z(x)$ (or any $c(x)$) to both rewards changes
    nothing, which is why the intractable $Z(x)$ of E7 drops out of DPO. The same function the
    reward model fits (``reward_model.bradley_terry_probability``).
    """
    return bradley_terry_probability(r_w, r_l)  # E3


# ----------------------------------------------------------------------------------------------
# E9 and E10: the DPO loss from sequence log-probs
# ----------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""E9 and E10 on B pairs; every input is (B,) $\log\pi(y\mid x)$ summed over response tokens (E1).

    Returns ``(loss, chosen_rewards, rejected_rewards)``: the mean over pairs of
    $-\log\sigma(r_w - r_l)$, and the implicit rewards $r_w$, $r_l$, each (B,). Log-probs in
    bf16/fp16 are computed on in float32.
    """
    check_sequence_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    check_positive(beta=beta)
    pi_w, pi_l = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    ref_w, ref_l = upcast(ref_chosen_logps), upcast(ref_rejected_logps)

    # Exercise dpo_loss (E9, E10): from here to the end of the function.
    chosen_rewards = beta * (pi_w - ref_w)      # E10: r_w = beta (log pi_theta(y_w|x) - log pi_ref(y_w|x)), (B,)
    rejected_rewards = beta * (pi_l - ref_l)    # E10: r_l likewise, (B,)
    # E9: -log sigma(r_w - r_l); logsigmoid stays finite where log(sigmoid(.)) would give -inf
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


def dpo_loss_gradients(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The analytic gradient of ``dpo_loss`` w.r.t. $\log\pi_\theta(y_w\mid x)$ and $\log\pi_\theta(y_l\mid x)$, (B,) each:

    $-\beta\,\sigma(r_l - r_w)/B$ and $+\beta\,\sigma(r_l - r_w)/B$ (the $1/B$ from the batch mean).
    Written out for the reader and the tests; training uses autograd.
    """
    _, r_w, r_l = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta)
    weight = beta * torch.sigmoid(r_l - r_w) / r_w.numel()  # how wrongly the pair is ordered
    return -weight, weight


# ----------------------------------------------------------------------------------------------
# From token ids to the sequence log-probs of chosen and rejected responses
# ----------------------------------------------------------------------------------------------


def tokenize_pairs(tok: Tokenizer, rows: list[dict]) -> dict[str, list[list[int]]]:
    """``[{"prompt", "chosen", "rejected"}]`` -> token lists (responses end with EOS)."""
    out = {"prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        missing = {"prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"preference pair {i} lacks {sorted(missing)}")
        for key in ("chosen", "rejected"):
            if not str(row[key]).strip():
                raise ValueError(f"preference pair {i} has an empty {key} response")
        out["prompt"].append(tok.prompt(row["prompt"]))
        out["chosen"].append(tok.response(row["chosen"]))
        out["rejected"].append(tok.response(row["rejected"]))
    return out


def preference_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                     pad_id: int, block_size: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """Chosen then rejected responses of B pairs as one right-padded batch of 2B rows.

    Rows 0..B-1 are (x, y_w), rows B..2B-1 are (x, y_l): one forward pass gives both log-probs.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses")
    return collate(prompts + prompts, chosen + rejected, pad_id, block_size, device)


def chosen_rejected_logps(model, batch: dict[str, torch.Tensor],
                          share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    r"""E1 for a ``preference_batch``: $(\log\pi(y_w\mid x), \log\pi(y_l\mid x))$, each (B,), float32.

    Only response tokens count: ``response_mask`` is 0 over the prompt and the padding.
    ``share_prompt``: chosen and rejected answer the same x, so x runs once for both (``ops.prefill``).
    """
    response_mask = batch["response_mask"][:, 1:]                                    # (2B, T-1)
    if response_mask.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen then rejected), got {response_mask.shape[0]}")
    if (response_mask.sum(1) == 0).any():
        raise ValueError("a response in the batch has no tokens")
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                           share_prompt=share_prompt)                                  # (2B,) E1
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


@torch.no_grad()
def pair_logps(model, pairs: dict[str, list[list[int]]], pad_id: int, device, dtype: str = "float32",
               batch_size: int = 256, share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\log\pi(y_w\mid x)$ and $\log\pi(y_l\mid x)$ of every pair (``tokenize_pairs``), (N,) each, no gradient.

    With $\pi_{ref}$ this is the precomputation: the training pairs are fixed and $\pi_{ref}$ is
    frozen, so its log-probs never change; computing them once saves a forward pass per step and
    lets the reference leave memory.
    """
    was_training = model.training
    model.eval()
    logps_w, logps_l = [], []
    n = len(pairs["prompt"])
    for i in range(0, n, batch_size):
        b = preference_batch(pairs["prompt"][i:i + batch_size], pairs["chosen"][i:i + batch_size],
                             pairs["rejected"][i:i + batch_size], pad_id, model.config.block_size, device)
        with autocast(torch.device(device), dtype):
            w, l = inference(chosen_rejected_logps, model, b, share_prompt)  # no gradient: ``ops.inference``
        logps_w.append(w)
        logps_l.append(l)
    model.train(was_training)
    return torch.cat(logps_w), torch.cat(logps_l)


# ----------------------------------------------------------------------------------------------
# One step: E1 for the pairs of a batch, E9 and E10, one optimizer step
# ----------------------------------------------------------------------------------------------


@dataclass
class DPOStepResult:
    """What one ``dpo_step`` did, on this rank (``distributed.mean_over_ranks`` averages ``metrics``)."""
    loss: float                     # the batch's mean loss over every rank's pairs (E9, or the member's)
    grad_norm: float                # before clipping
    chosen_rewards: torch.Tensor    # (B,) r_w (E10, or the member's implicit reward), this rank's pairs
    rejected_rewards: torch.Tensor  # (B,) r_l
    chosen_logps: torch.Tensor      # (B,) log pi_theta(y_w | x) before the step
    rejected_logps: torch.Tensor    # (B,) log pi_theta(y_l | x)
    metrics: dict[str, float] = field(default_factory=dict)


def dpo_step(policy, reference, tokenizer, pairs: dict[str, list[list[int]]], rows: list[int],
             hp: DPOHyperparams, update, dtype: str = "float32", loss_fn=None) -> DPOStepResult:
    r"""One optimizer step of E9 on the training pairs ``rows`` (this rank's share of the batch).

    ``pairs``: the token lists of every training pair (``tokenize_pairs``). ``reference``: $\pi_{ref}$
    itself (run here), its log-probs of every pair precomputed (``{"chosen": (N,), "rejected": (N,)}``,
    ``pair_logps``), or None for a member without one (SimPO, ORPO). ``update(rows, loss_of) ->
    Update`` (``runtime.optim.gradient_update``) makes the optimizer step from ``loss_of(micro) ->
    (mean loss, units, total units, stats)``, hiding the optimizer, the schedule, ``--grad-accum``
    and DDP. ``dtype`` is the autocast dtype ("float32": none). ``loss_fn``: None is E9
    (``dpo_loss``); a relative (``preference.py``) comes as ``partial(preference_loss, hp)`` and gets
    the response lengths too, and, where ``pairs`` holds KTO's mismatched responses (``kl_chosen``,
    ``kl_rejected``), their log-probs for $z_0$.
    """
    device = next(policy.parameters()).device
    block = policy.config.block_size

    def batch_of(micro, chosen="chosen", rejected="rejected"):  # 2B rows: (x, y_w) then (x, y_l)
        return preference_batch([pairs["prompt"][i] for i in micro], [pairs[chosen][i] for i in micro],
                                [pairs[rejected][i] for i in micro], tokenizer.pad_id, block, device)

    def reference_logps(batch, micro, prefix=""):  # log pi_ref(y_w | x), log pi_ref(y_l | x), (B,) each
        if reference is None:
            return None, None
        if isinstance(reference, dict):  # precomputed
            idx = torch.tensor(micro, device=device)
            return reference[prefix + "chosen"][idx], reference[prefix + "rejected"][idx]
        with autocast(device, dtype):  # no gradient: inference mode (``ops.inference``), the same numbers
            return inference(chosen_rejected_logps, reference, batch, hp.share_prompt)

    def loss_of(micro: list[int]):
        batch = batch_of(micro)
        with autocast(device, dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batch, hp.share_prompt)       # (B,), (B,) E1
        ref_w, ref_l = reference_logps(batch, micro)
        if loss_fn is None:
            loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, hp.beta)            # E9, E10
        else:  # a member of the family: its loss and its implicit rewards
            lengths = batch["response_mask"].sum(1)                                  # (2B,) |y|, EOS included
            kl = {}
            if "kl_chosen" in pairs:  # KTO: log-probs of mismatched responses, for z_0 (no gradient)
                kl_batch = batch_of(micro, "kl_chosen", "kl_rejected")
                with autocast(device, dtype):
                    kl_w, kl_l = inference(chosen_rejected_logps, policy, kl_batch, hp.share_prompt)
                kl_ref = reference_logps(kl_batch, micro, "kl_")
                kl = {"kl_policy_logps": torch.cat([kl_w, kl_l]), "kl_ref_logps": torch.cat(kl_ref)}
            loss, r_w, r_l = loss_fn(pi_w, pi_l, ref_w, ref_l, chosen_lengths=lengths[:len(micro)],
                                     rejected_lengths=lengths[len(micro):], **kl)[:3]
        stats = {"loss": loss.detach(), "chosen_rewards": r_w.detach(), "rejected_rewards": r_l.detach(),
                 "chosen_logps": pi_w.detach(), "rejected_logps": pi_l.detach()}
        return loss, len(micro), len(rows) * distributed.world_size(), stats

    done = update(rows, loss_of)
    parts = done.extras
    loss = distributed.global_mean([(p["loss"], len(p["chosen_logps"])) for p in parts],
                                   len(rows) * distributed.world_size())
    r_w, r_l, pi_w, pi_l = (torch.cat([p[k] for p in parts]) for k in
                            ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"))
    metrics = {"loss": loss, "rewards/chosen": r_w.mean().item(), "rewards/rejected": r_l.mean().item(),
               "rewards/accuracies": (r_w > r_l).float().mean().item(), "rewards/margins": (r_w - r_l).mean().item(),
               "logps/chosen": pi_w.mean().item(), "logps/rejected": pi_l.mean().item()}
    return DPOStepResult(loss, done.grad_norm, r_w, r_l, pi_w, pi_l, metrics)
