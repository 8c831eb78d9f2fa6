r"""The sampling side of ``grpo.grpo_iteration``: the groups it samples, and DAPO's steps that decide
which groups and which answers reach the policy loss.

``policy_gradient.py`` holds what each member computes from a batch (its advantage and its loss);
this file holds how the batch is drawn, and what DAPO (Yu et al., 2025) changes in it *before* the loss:

- **the groups** (``sample_groups``): $G$ answers to each question, sampled from $\pi_{old}$ and scored
  (E14's sampling); ``zero_spread_fraction`` measures how many carry no signal (their advantage is 0, E12);
- **dynamic sampling** (``signal_groups``, ``dynamic_sampling``): a group whose $G$ answers all score
  the same has advantage 0 (E12); it is dropped, and more questions are drawn until the batch holds
  enough groups that carry a signal;
- **overlong handling** (``overlong_filter``, ``overlong_penalty``): a truncated answer (no EOS within
  the longest answer allowed) is left out of the loss, or its reward gets a soft length penalty.

``grpo.grpo_iteration`` applies DAPO's as options (``--dynamic-sampling``, through ``sample_until_full``;
``--overlong``). Every function but the two that sample is pure (tensors in, tensors out), and bad input is
a ValueError that names the problem. The exact effect of dynamic sampling on the expected update (it divides
it by P(signal)) is ``theory_policy_gradient.dynamic_sampling_table``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import cat_generations, generate
from .ops import check_groups, check_mask, check_per_sequence, check_token_tensors, rewards_1d
from .runtime.devices import autocast
from .stages.rewards import score_answers, toy_reward


def sample_groups(policy, tokenizer, reward_fn, questions: list[dict], hp, generator: torch.Generator,
                  dtype: str = "float32"):
    r"""E14's sampling: ``hp.group_size`` answers to each of ``questions``, $y \sim$ ``policy`` ($\pi_{old}$), scored.

    Returns (Generation, the answers as text, (B,) rewards), group i in rows i*G .. i*G+G-1.
    ``questions`` and ``reward_fn`` as ``grpo.grpo_iteration`` takes them (a ``ToyWorld`` scores with its r*);
    ``hp``: its ``group_size``, ``max_new_tokens``, ``temperature`` and ``share_prompt``; ``dtype``: autocast's.
    """
    device = next(policy.parameters()).device
    if hasattr(reward_fn, "true_reward"):  # the toy world (or anything with an r*): score with it
        reward_fn = toy_reward(reward_fn)
    rows = [q for q in questions for _ in range(hp.group_size)]  # group i = rows i*G .. i*G+G-1
    prompts = [q["prompt_ids"] if "prompt_ids" in q else tokenizer.prompt(q["prompt"]) for q in rows]
    with autocast(device, dtype):
        rollout = generate(policy, prompts, hp.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                           temperature=hp.temperature, generator=generator, share_prompt=hp.share_prompt)
    completions = [tokenizer.decode(r) for r in rollout.responses()]
    finished = [bool(f) for f in rollout.finished.tolist()]
    return rollout, completions, score_answers(reward_fn, rows, completions, finished, device)  # (B,)


def signal_groups(rewards, group_size: int) -> torch.Tensor:
    """(Q,) bool: True for a group whose G rewards are not all equal (it carries a signal; E12 gives 0 otherwise)."""
    r = rewards_1d(rewards)
    check_groups(r.numel(), group_size)
    groups = r.view(-1, group_size)
    return groups.max(dim=1).values > groups.min(dim=1).values


def zero_spread_fraction(rewards, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (they teach nothing: advantage 0), the groups
    ``signal_groups`` leaves out; a group of one (always 'zero spread') is refused, not counted 1.0."""
    return (~signal_groups(rewards, group_size)).float().mean().item()


@dataclass
class DynamicSamplingResult:
    """What ``dynamic_sampling`` kept out of the questions drawn so far."""
    keep: torch.Tensor        # (B,) bool: the answers of the groups kept for the batch
    kept: int                 # questions kept (<= the target)
    drawn: int                # questions drawn until the batch was full (all of them if it is not)
    full: bool                # kept == target: stop drawing
    zero_spread: float        # fraction of the drawn questions whose group carried no signal


def dynamic_sampling(rewards, group_size: int, questions: int) -> DynamicSamplingResult:
    r"""DAPO's dynamic sampling: keep the first ``questions`` groups that carry a signal.

    Yu et al. (2025), eq. (11): sample until the batch holds ``questions`` groups with
    $0 < |\{i: y_i \text{ correct}\}| < G$; here, for any reward, groups whose rewards are not all equal
    (``signal_groups``). ``rewards`` (B,) are the rewards of every group drawn so far, in draw order;
    the caller draws more while ``full`` is False. ``drawn`` counts the questions up to the one that
    filled the batch: the cost of the filter (in expectation $1/P(\text{signal})$ per kept question,
    ``theory_policy_gradient``).

    *Differs from its parent* (GRPO): GRPO keeps zero-spread groups, whose advantage is 0: they add
    no gradient but dilute every mean over the batch. *Where this departs from the paper:* the
    filter is "not all equal", which is the paper's for 0/1 rewards.
    """
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    signal = signal_groups(rewards, group_size)                             # (Q,)
    kept_so_far = signal.long().cumsum(0)                                   # (Q,)
    full = bool(kept_so_far[-1] >= questions)
    drawn = int((kept_so_far < questions).sum()) + 1 if full else signal.numel()
    keep_groups = signal & (kept_so_far <= questions)
    keep_groups[drawn:] = False
    return DynamicSamplingResult(keep=keep_groups.repeat_interleave(group_size), kept=int(keep_groups.sum()),
                                 drawn=drawn, full=full, zero_spread=1 - signal[:drawn].float().mean().item())


def sample_until_full(sample, questions: list, draw, group_size: int, max_draws: int, pad_id: int):
    """Dynamic sampling in ``grpo.grpo_iteration``: ``sample(questions) -> (Generation, completions, rewards)``
    of ``questions``, then of ``draw(len(questions))`` more questions while the batch is not full, at most
    ``max_draws`` more times. Returns every draw (for the metrics) and the batch: the groups kept
    (``dynamic_sampling``), or the first draw when no group carried a signal, as without the filter."""
    if draw is None:
        raise ValueError("dynamic_sampling needs draw(n) -> n more questions, to fill the batch")
    sampled = [sample(questions)]
    filled = dynamic_sampling(sampled[0][2], group_size, len(questions))
    while not filled.full and len(sampled) <= max_draws:
        sampled.append(sample(draw(len(questions))))
        filled = dynamic_sampling(torch.cat([r for _, _, r in sampled]), group_size, len(questions))
    if not filled.kept:
        return sampled, sampled[0]
    completions = [c for _, cs, _ in sampled for c in cs]
    return sampled, (cat_generations([g for g, _, _ in sampled], pad_id).select(filled.keep),
                     [c for c, k in zip(completions, filled.keep.tolist()) if k],
                     torch.cat([r for _, _, r in sampled])[filled.keep])


def overlong_filter(mask: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    r"""DAPO's overlong filtering: the mask with every truncated answer (no EOS: ``finished`` False) removed.

    A truncated answer's reward says nothing about its reasoning, only that it ran out of room
    (Yu et al., 2025, section 3.4): it is left out of the loss (use with ``dapo_loss``, whose token mean
    accepts empty rows) but still counts in its group's advantages.
    """
    check_token_tensors(mask=mask)
    check_mask(mask)
    finished = torch.as_tensor(finished, device=mask.device)
    check_per_sequence(mask.shape[0], finished=finished)
    return mask * finished.bool()[:, None].to(mask.dtype)


def overlong_penalty(lengths, max_len: int, cache_len: int, finished=None) -> torch.Tensor:
    r"""DAPO's soft overlong punishment, added to the reward, (B,):

    $$R_{length}(y) = \begin{cases} 0 & |y| \le L_{max} - L_{cache} \\
    \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
    -1 & L_{max} < |y| \end{cases}$$

    Yu et al. (2025), eq. (13), with $L_{max}$ = ``max_len`` and $L_{cache}$ = ``cache_len`` (paper: 20480 and
    4096). *Where this departs from the paper:* generation stops at $L_{max}$ here, so $|y| > L_{max}$
    cannot be seen; a truncated answer (``finished`` False) counts as that case (-1).
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty (B,) tensor, got shape {tuple(lengths.shape)}")
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len = {max_len}], got {cache_len}")
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"lengths must be in [0, max_len = {max_len}], got {lengths.min().item()}..{lengths.max().item()}")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.float32
    y = lengths.to(dtype)
    soft_start = max_len - cache_len                                        # L_max - L_cache
    penalty = torch.where(y <= soft_start, torch.zeros_like(y), (soft_start - y) / cache_len)
    if finished is not None:
        finished = torch.as_tensor(finished, device=y.device)
        check_per_sequence(y.shape[0], finished=finished)
        penalty = torch.where(finished.bool(), penalty, torch.full_like(y, -1.0))  # |y| > L_max
    return penalty
