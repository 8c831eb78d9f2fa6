"""Measuring a policy against the toy world's hidden truth, shared by every stage after SFT.

The training algorithms never see r*; these functions sample from the policy and score the
samples with it, so a run can show whether the model really got better (and not only its
learned reward).
"""

from __future__ import annotations

import torch

from ..generation import generate
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
