r"""Direct preference optimisation (DPO): alignment from preference pairs with no reward model.

The derivation, as the source walks it (E2 -> E7 -> E8 -> E3 -> E9).

**E7, the optimal KL-regularised policy.** The RLHF objective (E2)

    J_r(pi) = E_{x, y ~ pi}[ r(x, y) - \beta \log \frac{\pi(y|x)}{\pi_{ref}(y|x)} ]

has, for every prompt x, a closed-form maximiser over all distributions on responses:

    \pi^*(y|x) = \frac{1}{Z(x)} \pi_{ref}(y|x) \exp(\frac{1}{\beta} r(x, y)),
    Z(x) = \sum_y \pi_{ref}(y|x) \exp(\frac{1}{\beta} r(x, y)).

``optimal_policy`` computes it for a discrete set of responses of one prompt. Z(x) sums over
every possible response, so for a language model it cannot be computed; that is the obstacle.

**E8, the reward as a policy ratio.** Take the log of E7 and solve for r:

    r(x, y) = \beta \log \frac{\pi^*(y|x)}{\pi_{ref}(y|x)} + \beta \log Z(x).

Any reward is, up to a term \beta \log Z(x) that depends on the prompt only, the log-ratio of its
optimal policy to the reference (``implied_reward`` returns the first term, r - \beta \log Z).

**E3, Bradley-Terry, where Z cancels.** Human preferences are modelled as

    P(y_w \succ y_l | x) = \sigma(r(x, y_w) - r(x, y_l)).

Only a *difference* of rewards of the same prompt enters, so the unknown \beta \log Z(x) of E8
cancels: substituting E8 gives the preference probability in terms of \pi^* and \pi_{ref} only.

**E9, the DPO loss.** Parametrise \pi^* by the policy \pi_\theta and maximise the likelihood of the
observed preferences:

    L_{DPO}(\theta) = -E_{(x, y_w, y_l)}[ \log \sigma( \beta \log \frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}
                                                     - \beta \log \frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)} ) ]

**E10, the implicit rewards.** r_w = \beta(\log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)), r_l likewise,
and L = -\log\sigma(r_w - r_l). The policy *is* its own reward model: no r_\phi is trained, no
response is sampled during training, and the KL penalty of E2 is built in through \pi_{ref}.

Its gradient shows what DPO does. With z = r_w - r_l,

    \partial L / \partial \log\pi_\theta(y_w|x) = -\beta \sigma(r_l - r_w),
    \partial L / \partial \log\pi_\theta(y_l|x) = +\beta \sigma(r_l - r_w):

raise the chosen response, lower the rejected one, weighted by how wrongly the implicit reward
currently orders the pair (a pair already ordered by a wide margin has weight near 0).

\log\pi(y|x) is E1: the sum of the log-probs of the response tokens (the EOS included), the
prompt and padding masked out (``ops.sequence_logps``).

Training. ``main`` starts from the SFT checkpoint, which is also \pi_{ref}. The reference's
log-probs of the fixed training pairs never change, so with ``precompute_ref_logps`` they are
computed once before training and the reference model is dropped (it is reloaded from disk only
to measure the KL on fresh samples). Each step runs chosen and rejected responses through the
policy in one forward pass of 2B rows. Metrics carry the names TRL users know
(``rewards/chosen``, ``rewards/margins``, ...). What DPO never sees is measured too: the hidden
true reward r* of sampled reviews and KL(\pi_\theta || \pi_{ref}), estimated on samples
y ~ \pi_\theta as the mean of \log\pi_\theta(y|x) - \log\pi_{ref}(y|x).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import InfiniteMinibatches, collate
from .evaluate import review_eval
from .generation import generate
from .model import GPT, GPTConfig
from .ops import masked_sum, response_logps, sequence_logps
from .reward_model import bradley_terry_probability
from .tokenizer import Tokenizer
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, autocast, check_range, input_path, load_policy, make_optimizer, optimizer_step,
                    require, resolve_device, save_policy, seed_everything, stage)

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
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x, y) / beta) (E7's normaliser), computed stably."""
    _check_discrete(ref_probs, rewards, beta, "rewards")
    return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=0)


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """E7: pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) over a discrete set of responses (K,)."""
    _check_discrete(ref_probs, rewards, beta, "rewards")
    # E7 in log space: log pi* = log pi_ref + r / beta - log Z (a softmax), so a large r / beta
    # cannot overflow exp(); a response with pi_ref = 0 keeps pi* = 0 (log 0 = -inf).
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=0)  # (K,)


def implied_reward(pi_star: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """E8 without its prompt-only term: beta log(pi*(y|x) / pi_ref(y|x)) = r(x, y) - beta log Z(x), (K,)."""
    _check_discrete(ref_probs, pi_star, beta, "pi_star")
    return beta * (torch.log(pi_star) - torch.log(ref_probs))  # E8


def preference_probability(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """E3: P(y_w > y_l | x) = exp(r_w) / (exp(r_w) + exp(r_l)) = sigma(r_w - r_l).

    Only the difference enters: adding beta log Z(x) (or any c(x)) to both rewards changes
    nothing. That is why the intractable Z of E7 drops out of DPO. The same function the reward
    model fits (``reward_model.bradley_terry_probability``).
    """
    return bradley_terry_probability(r_w, r_l)  # E3


# ----------------------------------------------------------------------------------------------
# E9 and E10: the DPO loss from sequence log-probs
# ----------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E9 and E10 on a batch of pairs; every input is (B,) log pi(y|x) summed over response tokens (E1).

    Returns ``(loss, chosen_rewards, rejected_rewards)``: the scalar mean of -log sigma(r_w - r_l),
    and the implicit rewards r_w, r_l (B,). Log-probs in bf16/fp16 are computed on in float32.
    """
    inputs = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
              "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 1 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (B,) tensor of sequence log-probs, "
                             f"got shape {tuple(x.shape)}")
    shapes = {name: tuple(x.shape) for name, x in inputs.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"batch sizes differ: {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pi_w, pi_l, ref_w, ref_l = (x if x.dtype == torch.float64 else x.float() for x in inputs.values())

    chosen_rewards = beta * (pi_w - ref_w)      # E10: r_w = beta log(pi_theta(y_w|x) / pi_ref(y_w|x)), (B,)
    rejected_rewards = beta * (pi_l - ref_l)    # E10: r_l, (B,)
    # E9: -log sigma(r_w - r_l); logsigmoid stays finite where log(sigmoid(.)) would give -inf
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


def dpo_loss_gradients(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The analytic gradient of ``dpo_loss`` (B,) w.r.t. log pi_theta(y_w|x) and log pi_theta(y_l|x).

    dL/d log pi(y_w) = -beta sigma(r_l - r_w) / B and dL/d log pi(y_l) = +beta sigma(r_l - r_w) / B
    (the 1/B from the batch mean). Written out for the reader and the tests; training uses autograd.
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


def chosen_rejected_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """E1 for a ``preference_batch``: (log pi(y_w|x), log pi(y_l|x)), each (B,), float32.

    Only response tokens count: ``response_mask`` is 0 over the prompt and the padding.
    """
    response_mask = batch["response_mask"][:, 1:]                                    # (2B, T-1)
    if response_mask.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen then rejected), got {response_mask.shape[0]}")
    if (response_mask.sum(1) == 0).any():
        raise ValueError("a response in the batch has no tokens")
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])  # (2B,) E1
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


@torch.no_grad()
def pair_logps(model, pairs: dict[str, list[list[int]]], pad_id: int, device,
               dtype: str = "float32", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_w|x) and log pi(y_l|x) of every pair (``tokenize_pairs``), (N,) each, no gradient.

    With pi_ref this is the precomputation: the training pairs are fixed and pi_ref is frozen, so
    its log-probs never change; computing them once saves a forward pass per step and lets the
    reference leave memory.
    """
    was_training = model.training
    model.eval()
    logps_w, logps_l = [], []
    n = len(pairs["prompt"])
    for i in range(0, n, batch_size):
        b = preference_batch(pairs["prompt"][i:i + batch_size], pairs["chosen"][i:i + batch_size],
                             pairs["rejected"][i:i + batch_size], pad_id, model.config.block_size, device)
        with autocast(torch.device(device), dtype):
            w, l = chosen_rejected_logps(model, b)
        logps_w.append(w)
        logps_l.append(l)
    model.train(was_training)
    return torch.cat(logps_w), torch.cat(logps_l)


# ----------------------------------------------------------------------------------------------
# What DPO never sees: the KL to the reference, measured on the policy's own samples
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sampled_kl(policy, reference, tok: Tokenizer, prompts: list[str], samples_per_prompt: int = 32,
               max_new_tokens: int = 24, seed: int = 0) -> float:
    """KL(pi_theta || pi_ref) per prompt, estimated by sampling y ~ pi_theta:

        KL ~= mean over samples of  sum_t [log pi_theta(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)]

    (the sequence-level k1 estimator: unbiased, and exactly 0 when the policy is the reference).
    """
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = [tok.prompt(p) for p in prompts for _ in range(samples_per_prompt)]
    g = generate(policy, ids, max_new_tokens, tok.eos_id, tok.pad_id, generator=gen)
    # recompute both log-probs with full forwards, the same way, so policy == reference gives 0 exactly
    logp = response_logps(policy, g.sequences, g.attention_mask, g.prompt_len)      # (B, T)
    logq = response_logps(reference, g.sequences, g.attention_mask, g.prompt_len)   # (B, T)
    return masked_sum(logp - logq, g.response_mask, dim=1).mean().item()              # mean of (B,)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class DPOConfig(TrainConfig):
    """Align the SFT model with DPO (E7-E10) on the toy world's preference pairs; it is also pi_ref.

    Reads OUT/sft/model.pt (or --init). Writes OUT/dpo/: model.pt (the aligned policy),
    metrics.jsonl, loss.png, rewards.png, logps.png, truth.png, summary.json, status.json."""
    init: str = ""                      # policy and reference checkpoint; default: out/sft/model.pt
    beta: float = 0.1                   # KL strength of E2; the implicit reward's scale (E10)
    steps: int = 200
    batch_size: int = 64                # preference pairs per step (2x rows in the forward pass)
    lr: float = 1e-4
    warmup_steps: int = 10
    num_pairs: int = 10_000             # training pairs drawn from the toy world (Bradley-Terry labels)
    eval_pairs: int = 500               # held-out pairs for the implicit reward's accuracy
    precompute_ref_logps: bool = True   # compute log pi_ref once; the reference leaves memory
    eval_every: int = 50                # steps between measurements of r* and KL (by sampling)
    eval_samples_per_prompt: int = 32   # sampled reviews per prompt for r* and KL
    max_new_tokens: int = 24

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        super().validate()
        check_range(self, "beta", 0, low_open=True)
        for name in ("eval_pairs", "eval_every", "eval_samples_per_prompt", "max_new_tokens"):
            check_range(self, name, 1)
        require(self, "num_pairs", self.num_pairs >= self.batch_size, f">= --batch-size ({self.batch_size})")


@stage("dpo")
def main(config: DPOConfig) -> dict:
    """Train pi_theta with DPO from the SFT model; save ``out/dpo/model.pt``, plots and a summary."""
    gen = seed_everything(config.seed)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    init = input_path(config, "init")  # out/sft/model.pt unless --init
    policy, tok = load_policy(init, device, world.tokenizer)
    run = Run(config, "dpo")
    block = policy.config.block_size

    train = tokenize_pairs(tok, world.preference_dataset(config.num_pairs, seed=config.seed))
    held_out_rows = world.preference_dataset(config.eval_pairs, seed=config.seed + 10_000)
    held_out = tokenize_pairs(tok, held_out_rows)

    # pi_ref: the SFT model, frozen. Its log-probs of the held-out pairs are always precomputed.
    reference, _ = load_policy(init, device, tok)
    reference.requires_grad_(False).eval()
    ref_eval = pair_logps(reference, held_out, tok.pad_id, device, config.dtype)
    if config.precompute_ref_logps:
        ref_train = pair_logps(reference, train, tok.pad_id, device, config.dtype)            # (N,), (N,)
        del reference  # not needed in memory while training; reloaded to measure the KL

    def get_reference():
        if config.precompute_ref_logps:
            ref, _ = load_policy(init, device, tok)
            return ref.requires_grad_(False).eval()
        return reference

    def truth() -> dict:
        """r* and KL of sampled reviews, and the implicit reward's held-out accuracy."""
        policy.eval()
        ev = review_eval(policy, tok, world, config.eval_samples_per_prompt, seed=config.seed,
                         max_new_tokens=config.max_new_tokens)
        kl = sampled_kl(policy, get_reference(), tok, world.review_prompts(), config.eval_samples_per_prompt,
                        config.max_new_tokens, seed=config.seed + 1)
        pi_w, pi_l = pair_logps(policy, held_out, tok.pad_id, device, config.dtype)
        _, r_w, r_l = dpo_loss(pi_w, pi_l, *ref_eval, config.beta)
        policy.train()
        # a tie (as at the start, where every implicit reward is 0) counts as half right
        accuracy = ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean().item()
        return {"true_reward": ev["true_reward"], "malformed": ev["malformed"], "kl": kl,
                "heldout/accuracy": accuracy, "examples": ev["examples"]}

    before = truth()
    optimizer = make_optimizer(policy, config)
    batches = InfiniteMinibatches(config.num_pairs, config.batch_size, gen)
    policy.train()
    bar = run.loop(config.steps, f"dpo beta={config.beta}", policy=policy, optimizer=optimizer, batches=batches)
    for step in bar:
        idx = next(batches)
        rows = idx.tolist()
        batch = preference_batch([train["prompt"][i] for i in rows], [train["chosen"][i] for i in rows],
                                 [train["rejected"][i] for i in rows], tok.pad_id, block, device)
        with autocast(device, config.dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batch)                    # (B,), (B,)
        if config.precompute_ref_logps:
            ref_w, ref_l = ref_train[0][idx.to(device)], ref_train[1][idx.to(device)]
        else:
            with torch.no_grad(), autocast(device, config.dtype):
                ref_w, ref_l = chosen_rejected_logps(reference, batch)
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta)          # E9, E10
        grad_norm = optimizer_step(policy, optimizer, loss, step, config)

        last = step == config.steps - 1
        evaluate_now = (step + 1) % config.eval_every == 0 or last
        if step % config.log_every == 0 or evaluate_now:
            metrics = {"loss": loss.item(), "rewards/chosen": r_w.mean().item(),
                       "rewards/rejected": r_l.mean().item(),
                       "rewards/accuracies": (r_w > r_l).float().mean().item(),
                       "rewards/margins": (r_w - r_l).mean().item(),
                       "logps/chosen": pi_w.mean().item(), "logps/rejected": pi_l.mean().item(),
                       "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
            if step == 0:  # the SFT model's truth, measured before the first update (KL 0)
                metrics.update({k: v for k, v in before.items() if k != "examples"})
            if evaluate_now:
                latest = truth()
                metrics.update({k: v for k, v in latest.items() if k != "examples"})
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{loss.item():.3f}", margin=f"{metrics['rewards/margins']:.2f}")

    save_policy(policy, tok, run.dir / "model.pt")
    after = latest  # measured at the last step
    run.plot(["loss"], "loss.png", f"DPO loss (E9), beta={config.beta}",
             hlines={"ln 2 (policy = reference)": 0.6931}, ylabel="nats")
    run.plot(["rewards/chosen", "rewards/rejected", "rewards/margins"], "rewards.png",
             "implicit rewards (E10) on training pairs", ylabel="beta log(pi / pi_ref)")
    run.plot(["logps/chosen", "logps/rejected"], "logps.png", "log pi_theta(y|x) of training pairs", ylabel="nats")
    run.plot(["true_reward", "kl"], "truth.png", "hidden truth: r* and KL(pi || pi_ref) of samples",
             hlines={f"SFT r* {before['true_reward']:.2f}": before["true_reward"]})
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


# ----------------------------------------------------------------------------------------------
# Speed: seconds per DPO step on a fixed config (``minialign bench`` calls this)
# ----------------------------------------------------------------------------------------------


def dpo_step_time(model_config: GPTConfig, batch_size: int, seq_len: int, device="cpu",
                  steps: int = 10, warmup: int = 3, precompute_ref: bool = False, dtype: str = "float32") -> float:
    """Seconds per DPO optimizer step: B pairs of ``seq_len`` tokens (half prompt, half response).

    ``precompute_ref=False`` (the default, as TRL's default) runs the reference forward in every
    step; ``True`` times the step with log pi_ref read from a table.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    policy = GPT(model_config).to(device)
    reference = GPT(model_config).to(device).requires_grad_(False).eval()
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(0, model_config.vocab_size, (2 * batch_size, seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "response_mask": (torch.arange(seq_len, device=device) >= seq_len // 2).long().expand(2 * batch_size, -1)}
    with torch.no_grad():
        ref_w, ref_l = chosen_rejected_logps(reference, batch)

    def step():
        with autocast(device, dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batch)
        if precompute_ref:
            rw, rl = ref_w, ref_l
        else:
            with torch.no_grad(), autocast(device, dtype):
                rw, rl = chosen_rejected_logps(reference, batch)
        loss, _, _ = dpo_loss(pi_w, pi_l, rw, rl, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # wait for the device

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps
