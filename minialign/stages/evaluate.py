"""Measuring a policy (or a reward model) against the toy world's hidden truth, shared by the stages.

The training algorithms never see r*; these functions sample from the policy and score the
samples with it, so a run can show whether the model really got better (and not only its
learned reward), and how far it moved from its reference to get there (``sampled_kl``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..generation import generate
from ..ops import masked_sum, response_logps
from ..reward_model import reward_model_loss, score
from ..tokenizer import Tokenizer
from ..toyworld import ToyWorld


def sample_texts(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 24,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 batch_size: int = 256) -> list[tuple[str, bool]]:
    """(response text, finished with EOS) for each prompt (text, or token ids already)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.prompt(p) if isinstance(p, str) else p for p in prompts[i:i + batch_size]]
        rollout = generate(model, ids, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                           temperature=temperature, generator=generator)
        out += [(tokenizer.decode(r), bool(f)) for r, f in zip(rollout.responses(), rollout.finished.tolist())]
    return out


def review_eval(model, tokenizer: Tokenizer, world: ToyWorld, samples_per_prompt: int = 32,
                temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 24) -> dict:
    """Mean hidden reward r* of sampled reviews, and the fraction that are malformed."""
    prompts = [p for p in world.review_prompts() for _ in range(samples_per_prompt)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens, temperature, generator)
    rewards = [world.true_reward(p, y, done) for p, (y, done) in zip(prompts, texts)]
    malformed = [r == world.config.malformed_reward for r in rewards]
    return {"true_reward": sum(rewards) / len(rewards), "malformed": sum(malformed) / len(malformed),
            "examples": [(p, y) for p, (y, _) in zip(prompts[::samples_per_prompt], texts[::samples_per_prompt])]}


def arithmetic_eval(model, tokenizer: Tokenizer, world: ToyWorld, split: str = "heldout",
                    samples_per_question: int = 8, temperature: float = 1.0, seed: int = 0,
                    max_new_tokens: int = 4) -> dict:
    """Accuracy of sampled answers (temperature 1 by default: the policy's own distribution)."""
    questions = world.arithmetic_questions(split)
    prompts = [q["prompt"] for q in questions for _ in range(samples_per_question)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens, temperature, generator)
    correct = [world.true_reward(p, y, done) == 1.0 for p, (y, done) in zip(prompts, texts)]
    return {"accuracy": sum(correct) / len(correct)}


def reward_eval(model, tokenizer, questions: list[dict], reward_fn, samples_per_question: int = 8,
                temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 4) -> dict:
    """Mean reward of sampled answers to ``questions`` (data rows with ``prompt_ids``): on your own
    data, what GRPO can measure without r* (with the exact-match reward: the answer accuracy)."""
    from .rewards import score_answers

    rows = [q for q in questions for _ in range(samples_per_question)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = sample_texts(model, tokenizer, [q["prompt_ids"] for q in rows], max_new_tokens, temperature, generator)
    rewards = score_answers(reward_fn, rows, [y for y, _ in texts], [done for _, done in texts])
    return {"reward": rewards.mean().item()}


# ----------------------------------------------------------------------------------------------
# how far the policy moved: the KL to the reference, measured on its own samples
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
# a reward model on held-out preference pairs
# ----------------------------------------------------------------------------------------------


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def pair_eval(model, encoded, pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """E4 loss, accuracy and margin of a reward model on encoded pairs [(x, y_w, y_l)]: what real
    data can measure. Also returns r_w and r_l, (N,) each."""
    x, y_w, y_l = zip(*encoded)
    r_w, r_l = score(model, list(x), list(y_w), pad_id), score(model, list(x), list(y_l), pad_id)  # (N,), (N,)
    return {"heldout_loss": reward_model_loss(r_w, r_l).item(),
            "heldout_accuracy": (r_w > r_l).float().mean().item(),
            "heldout_margin": (r_w - r_l).mean().item()}, r_w, r_l


@torch.no_grad()
def reward_model_eval(model, world: ToyWorld, tokenizer: Tokenizer, pairs: list[dict], encoded) -> dict:
    r"""``pair_eval`` on the toy world's held-out ``pairs`` (``encoded`` by ``encode_pairs``), and how
    $r_\phi$ agrees with the hidden $r^*$:

    - ``bayes_optimal_accuracy``: the best any model can do on these labels, $\mathbb{E}[\sigma(|r^*_w - r^*_l|)]$;
    - ``true_reward_loss``: E4 with $r^*$ itself, the floor of the loss in expectation;
    - ``true_order_accuracy``: how often $r_\phi$ orders a pair as $r^*$ does (pairs $r^*$ decides);
    - ``pearson``: correlation of $r_\phi$ and $r^*$ over the distinct held-out (prompt, response)s;
      ``pearson_within_prompt`` first removes each prompt's mean (the $c(x)$ E3 cannot see);
    - ``responses``: those responses' (learned, true) rewards, for the scatter plot.
    """
    measured, r_w, r_l = pair_eval(model, encoded, tokenizer.pad_id)
    true_w = torch.tensor([world.true_reward(p["prompt"], p["chosen"]) for p in pairs])
    true_l = torch.tensor([world.true_reward(p["prompt"], p["rejected"]) for p in pairs])

    # the distinct responses of these pairs, with their learned and true rewards
    seen: dict[tuple[str, str], tuple[float, float]] = {}
    for p, rw, rl, tw, tl in zip(pairs, r_w.tolist(), r_l.tolist(), true_w.tolist(), true_l.tolist()):
        seen[(p["prompt"], p["chosen"])] = (rw, tw)
        seen[(p["prompt"], p["rejected"])] = (rl, tl)
    keys = list(seen)
    learned = np.array([seen[k][0] for k in keys])
    true = np.array([seen[k][1] for k in keys])
    prompts = np.array([k[0] for k in keys])
    centred_learned, centred_true = learned.copy(), true.copy()
    for prompt in set(prompts.tolist()):
        m = prompts == prompt
        centred_learned[m] -= learned[m].mean()
        centred_true[m] -= true[m].mean()

    true_gap = true_w - true_l
    decided = true_gap != 0  # pairs where r* prefers one answer
    return {
        **measured,
        "bayes_optimal_accuracy": world.bayes_optimal_accuracy(pairs),
        "true_reward_loss": reward_model_loss(true_w, true_l).item(),
        "true_order_accuracy": ((r_w - r_l).sign() == true_gap.sign())[decided].float().mean().item(),
        "pearson": pearson(learned, true),
        "pearson_within_prompt": pearson(centred_learned, centred_true),
        "responses": (learned.tolist(), true.tolist()),
    }
