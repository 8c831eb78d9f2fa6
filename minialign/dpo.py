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
  $\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ on samples $y\sim\pi_\theta$ (``sampled_kl``).

The file reads top to bottom: E7 and E8 on a discrete example, E9 and E10, sequence log-probs
of chosen and rejected responses, the sampled KL, then the training loop ``main``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed
from .data import InfiniteMinibatches, collate
from .datafiles import preference_data
from .evaluate import review_eval
from .generation import generate
from .ops import check_positive, check_sequence_logps, masked_sum, response_logps, sequence_logps, upcast
from .reward_model import bradley_terry_probability
from .tokenizer import Tokenizer
from .loading import load_model, save_model
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, accumulated_step, autocast, check_max_new_tokens, check_range, input_path,
                    make_optimizer, require, resolve_device, seed_everything, stage)

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
            w, l = chosen_rejected_logps(model, b, share_prompt)
        logps_w.append(w)
        logps_l.append(l)
    model.train(was_training)
    return torch.cat(logps_w), torch.cat(logps_l)


# ----------------------------------------------------------------------------------------------
# What DPO never sees: the KL to the reference, measured on the policy's own samples
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sampled_kl(policy, reference, tok: Tokenizer, prompts: list[str], samples_per_prompt: int = 32,
               max_new_tokens: int = 24, seed: int = 0, share_prompt: bool = True) -> float:
    r"""$\mathrm{KL}(\pi_\theta\Vert\pi_{ref})$ per response, estimated on samples $y\sim\pi_\theta$:

    $$\mathrm{KL} \approx \operatorname{mean}_y \sum_t \big[\log\pi_\theta(y_t\mid x, y_{<t}) - \log\pi_{ref}(y_t\mid x, y_{<t})\big]$$

    (the sequence-level k1 estimator: unbiased, and exactly 0 when the policy is the reference).
    """
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # prompts as text (through the chat template) or as token ids already
    ids = [p if isinstance(p, list) else tok.prompt(p) for p in prompts for _ in range(samples_per_prompt)]
    rollout = generate(policy, ids, max_new_tokens, tok.eos_id, tok.pad_id, generator=generator,
                       share_prompt=share_prompt)
    # recompute both log-probs with full forwards, the same way, so policy == reference gives 0 exactly
    seqs, mask, P = rollout.sequences, rollout.attention_mask, rollout.prompt_len
    logp = response_logps(policy, seqs, mask, P, share_prompt=share_prompt)     # (B, T)
    logq = response_logps(reference, seqs, mask, P, share_prompt=share_prompt)  # (B, T)
    return masked_sum(logp - logq, rollout.response_mask, dim=1).mean().item()  # mean over the (B,) samples


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class DPOConfig(TrainConfig):
    """Align the SFT model with DPO (E7-E10) on the toy world's preference pairs; it is also pi_ref.

    Reads OUT/sft/model.pt (or --init, or a --model folder), and your pairs with --data. Writes
    OUT/dpo/: model.pt (the aligned policy; a model/ folder after --model), metrics.jsonl,
    loss.png, rewards.png, logps.png, truth.png, summary.json, status.json."""
    init: str = ""                      # policy and reference checkpoint; default: out/sft/model.pt
    beta: float = 0.1                   # KL strength of E2; the implicit reward's scale (E10)
    steps: int = 200
    batch_size: int = 64                # preference pairs per step (2x rows in the forward pass)
    lr: float = 1e-4
    warmup_steps: int = 10
    num_pairs: int = 10_000             # training pairs drawn from the toy world (Bradley-Terry labels)
    eval_pairs: int = 500               # held-out pairs for the implicit reward's accuracy
    precompute_ref_logps: bool = True   # compute log pi_ref once; the reference leaves memory
    share_prompt: bool = True           # run x once for y_w and y_l (exact; ops.prefill)
    eval_every: int = 50                # steps between measurements of r* and KL (by sampling)
    eval_samples_per_prompt: int = 32   # sampled reviews per prompt for r* and KL
    max_new_tokens: int = 24

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        super().validate()
        check_range(self, "beta", 0, low_open=True)
        for name in ("eval_pairs", "eval_every", "eval_samples_per_prompt", "max_new_tokens"):
            check_range(self, name, 1)
        require(self, "num_pairs", self.data or self.num_pairs >= self.batch_size,
                f">= --batch-size ({self.batch_size})")


@stage("dpo")
def main(config: DPOConfig) -> dict:
    """Train the policy with DPO from the SFT model; save ``out/dpo/model.pt``, plots and a summary.

    ``--model`` starts policy and reference from a Hugging Face folder; ``--data`` trains on your
    pairs, and the truth plotted is then what can be measured without r*: the implicit reward's
    held-out accuracy (``--eval-data``) and KL(pi || pi_ref) of samples.
    """
    generator = seed_everything(config.seed)  # pair order
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    init = input_path(config, "init")  # out/sft's model unless --init or --model
    policy, tok = load_model(init, config.model_impl, device, world.tokenizer)
    block = policy.config.block_size

    reports, held_out_rows = {}, None
    if config.data:  # refused here, before the run folder exists, if a row is bad
        train, reports["data"] = preference_data(config.data, tok, block, config.max_length)
        held_out = None
        if config.eval_data:
            held_out, reports["eval_data"] = preference_data(config.eval_data, tok, block, config.max_length)
        for r in reports.values():
            distributed.print_main(r.describe())
        # KL(pi || pi_ref) is measured on samples for a few distinct prompts that leave room to answer
        fits = [x for x in (held_out or train)["prompt"] if len(x) + config.max_new_tokens <= block]
        kl_prompts = list({tuple(x): x for x in fits}.values())[:8]
        run = Run(config, "dpo")
    else:
        kl_prompts = world.review_prompts()  # sampled to measure r* and the KL
        check_max_new_tokens(config, [tok.prompt(p) for p in kl_prompts], block)
        run = Run(config, "dpo")
        train = tokenize_pairs(tok, world.preference_dataset(config.num_pairs, seed=config.seed))
        held_out_rows = world.preference_dataset(config.eval_pairs, seed=config.seed + 10_000)
        held_out = tokenize_pairs(tok, held_out_rows)

    # pi_ref: the SFT model, frozen. Its log-probs of the held-out pairs are always precomputed.
    reference, _ = load_model(init, config.model_impl, device, tok if not config.data else None)
    reference.requires_grad_(False).eval()
    ref_eval = (pair_logps(reference, held_out, tok.pad_id, device, config.dtype, share_prompt=config.share_prompt)
                if held_out else None)
    if config.precompute_ref_logps:
        ref_train = pair_logps(reference, train, tok.pad_id, device, config.dtype,
                               share_prompt=config.share_prompt)                               # (N,), (N,)
        del reference  # not needed in memory while training; reloaded to measure the KL

    def get_reference():
        if config.precompute_ref_logps:
            ref, _ = load_model(init, config.model_impl, device, tok if not config.data else None)
            return ref.requires_grad_(False).eval()
        return reference

    def truth() -> dict:
        """r* (toy world) and KL of sampled reviews, and the implicit reward's held-out accuracy."""
        policy.eval()
        out = {}
        if held_out_rows is not None:  # the toy world knows r*
            ev = review_eval(policy, tok, world, config.eval_samples_per_prompt, seed=config.seed,
                             max_new_tokens=config.max_new_tokens)
            out.update(true_reward=ev["true_reward"], malformed=ev["malformed"])
        if kl_prompts:
            out["kl"] = sampled_kl(policy, get_reference(), tok, kl_prompts, config.eval_samples_per_prompt,
                                   config.max_new_tokens, seed=config.seed + 1,
                                   share_prompt=config.share_prompt)
        if held_out is not None:
            pi_w, pi_l = pair_logps(policy, held_out, tok.pad_id, device, config.dtype,
                                    share_prompt=config.share_prompt)
            _, r_w, r_l = dpo_loss(pi_w, pi_l, *ref_eval, config.beta)
            # a tie (as at the start, where every implicit reward is 0) counts as half right
            out["heldout/accuracy"] = ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean().item()
        policy.train()
        if held_out_rows is not None:
            out["examples"] = ev["examples"]
        return out

    before = truth()
    optimizer = make_optimizer(policy, config)
    parallel = distributed.wrap(policy)  # DDP under torchrun
    distributed.check_divisible(config.batch_size, config.grad_accum)
    batches = InfiniteMinibatches(len(train["prompt"]), config.batch_size, generator)

    def loss_of(rows: list[int]):
        batch = preference_batch([train["prompt"][i] for i in rows], [train["chosen"][i] for i in rows],
                                 [train["rejected"][i] for i in rows], tok.pad_id, block, device)
        with autocast(device, config.dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batch, config.share_prompt)   # (B,), (B,)
        if config.precompute_ref_logps:
            idx = torch.tensor(rows, device=device)
            ref_w, ref_l = ref_train[0][idx], ref_train[1][idx]
        else:
            with torch.no_grad(), autocast(device, config.dtype):
                ref_w, ref_l = chosen_rejected_logps(reference, batch, config.share_prompt)
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta)          # E9, E10
        return loss, len(rows), config.batch_size, [t.detach() for t in (loss, r_w, r_l, pi_w, pi_l)]

    policy.train()
    bar = run.loop(config.steps, f"dpo beta={config.beta}", policy=policy, optimizer=optimizer, batches=batches)
    for step in bar:
        micro = distributed.split(distributed.local_share(next(batches).tolist()), config.grad_accum)
        grad_norm, parts = accumulated_step(policy, parallel, optimizer, micro, loss_of, step, config)
        loss = distributed.global_mean([(p[0], len(p[1])) for p in parts], config.batch_size)
        r_w, r_l, pi_w, pi_l = (torch.cat([p[k] for p in parts]) for k in range(1, 5))

        last = step == config.steps - 1
        evaluate_now = (step + 1) % config.eval_every == 0 or last
        if step % config.log_every == 0 or evaluate_now:
            metrics = distributed.mean_over_ranks({
                "loss": loss, "rewards/chosen": r_w.mean().item(), "rewards/rejected": r_l.mean().item(),
                "rewards/accuracies": (r_w > r_l).float().mean().item(),
                "rewards/margins": (r_w - r_l).mean().item(),
                "logps/chosen": pi_w.mean().item(), "logps/rejected": pi_l.mean().item()})
            metrics.update(loss=loss, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"])
            if step == 0:  # the SFT model's truth, measured before the first update (KL 0)
                metrics.update({k: v for k, v in before.items() if k != "examples"})
            if evaluate_now:
                latest = truth()
                metrics.update({k: v for k, v in latest.items() if k != "examples"})
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{loss:.3f}", margin=f"{metrics['rewards/margins']:.2f}")

    save_model(policy, tok, run.dir)
    after = latest  # measured at the last step
    x = f"DPO step (batches of {config.batch_size} pairs)"
    run.plot({"loss": "training batch"}, "loss.png", f"DPO loss (E9), beta = {config.beta:g}",
             hlines={"ln 2: the policy equals the reference": math.log(2)}, ylabel="loss, nats per pair",
             xlabel=x, caption="The loss starts at ln 2 (every implicit reward is 0) and falls as the "
                               "implicit rewards order the training pairs.")
    run.plot({"rewards/chosen": "chosen responses", "rewards/rejected": "rejected responses",
              "rewards/margins": "margin, chosen minus rejected"}, "rewards.png",
             "implicit rewards on training pairs (E10)", ylabel="beta x log(pi_theta / pi_ref), nats x beta",
             xlabel=x, caption="DPO widens the margin; both rewards may fall: it asks only that chosen "
                               "beat rejected.")
    run.plot({"logps/chosen": "chosen responses", "logps/rejected": "rejected responses"}, "logps.png",
             "log pi_theta(y | x) of training pairs", ylabel="log-probability, nats per response", xlabel=x,
             caption="Watch the chosen log-prob: when it falls too, probability goes to responses no pair showed.")
    if held_out_rows is None:  # your own data: what can be measured without r*
        run.plot({"kl": "KL(pi_theta || pi_ref), sampled"}, "kl.png", "distance from the reference",
                 ylabel="KL, nats per response", xlabel=x,
                 caption="What DPO never sees: how far the policy moved from the reference on its own samples.")
        run.plot({"heldout/accuracy": "held-out pairs"}, "accuracy.png", "implicit-reward accuracy (E10)",
                 ylabel="fraction of pairs with r_w > r_l", xlabel=x, ylim=(0, 1),
                 caption="Pairs it never trained on, ordered by the implicit reward like their labels (ties count half).")
        summary = {"beta": config.beta, "kl": after.get("kl"),
                   "heldout_accuracy_before": before.get("heldout/accuracy"),
                   "heldout_accuracy": after.get("heldout/accuracy"), "final_loss": run.rows[-1]["loss"],
                   "seconds": round(time.time() - run.start, 1), **{k: r.as_dict() for k, r in reports.items()}}
        run.finish(summary)
        return summary
    run.plot_panels("truth.png", [
        {"title": "hidden reward of the policy's samples", "metrics": {"true_reward": "mean r* of sampled reviews"},
         "hlines": [(before["true_reward"], f"SFT model, {before['true_reward']:.3f}")],
         "xlabel": x, "ylabel": "hidden reward r* (-7 malformed, up to +6)"},
        {"title": "distance from the reference", "metrics": {"kl": "KL(pi_theta || pi_ref), sampled"},
         "xlabel": x, "ylabel": "KL, nats per response"}],
        caption=f"What DPO never sees, measured on {config.eval_samples_per_prompt} samples per review prompt: "
                "the hidden reward it gained, and the KL it paid for it.")
    summary = {"beta": config.beta, "true_reward_before": before["true_reward"],
               "true_reward": after["true_reward"], "malformed_before": before["malformed"],
               "malformed": after["malformed"], "kl": after["kl"],
               "heldout_accuracy_before": before["heldout/accuracy"],
               "heldout_accuracy": after["heldout/accuracy"],
               "bayes_optimal_accuracy": world.bayes_optimal_accuracy(held_out_rows),
               "final_loss": run.rows[-1]["loss"], "examples": after["examples"],
               "seconds": round(time.time() - run.start, 1)}
    run.finish(summary)
    return summary
