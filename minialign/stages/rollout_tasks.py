"""What a rollout stage (PPO, GRPO) samples from and how it measures its policy: the toy world's
prompts or your own ``--data`` file's, behind one interface, so that a stage runner has one path.

A task has
- ``train``: the rows the rollouts sample, each a dict with ``prompt`` (text) and ``prompt_ids``,
  and the columns a reward function reads (GRPO's ``answer``);
- ``heldout``: rows never trained on, or None;
- ``reports``: what was read from each data file ({} in the toy world), for the summary;
- ``measure(rows, completions, finished) -> dict``: what the hidden truth says of a rollout;
- ``evaluate(policy, samples) -> dict``: fresh samples, measured against what is known: r* of
  the reviews (PPO) or the held-out accuracy (GRPO) in the toy world, the mean reward on
  ``--eval-data`` with your questions, nothing when nothing is known (an empty dict);
- GRPO's also ``reward_fn(prompts, completions, finished, **columns)`` and ``examples(policy)``.
"""

from __future__ import annotations

import torch

from ..runtime import distributed
from ..runtime.datafiles import prompt_data
from .evaluate import arithmetic_eval, review_eval, reward_eval, sample_texts
from .rewards import check_reward_function, exact_match_reward, load_reward, toy_reward
from ..runtime.config import check_max_new_tokens


class RolloutTask:
    """The defaults: no held-out rows, no data files, nothing known about a rollout or a policy."""
    heldout: list[dict] | None = None

    def __init__(self, tokenizer, config):
        self.tokenizer, self.config, self.reports = tokenizer, config, {}

    def read(self, field: str, block_size: int, required: tuple[str, ...] = ()) -> list[dict]:
        """The rows of data file ``config.<field>``; refused here, before the run folder exists, if one is bad."""
        c = self.config
        rows, self.reports[field] = prompt_data(getattr(c, field), self.tokenizer, block_size, c.max_new_tokens,
                                                c.max_length, required)
        distributed.print_main(self.reports[field].describe())
        return rows

    def measure(self, rows: list[dict], completions: list[str], finished: list[bool]) -> dict:
        return {}

    def evaluate(self, policy, samples: int) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------
# PPO: review prompts, or your prompts ({"prompt"})
# ----------------------------------------------------------------------------------------------


class ReviewPrompts(RolloutTask):
    """The toy world's review prompts; its hidden r* scores every review. There is no held-out
    split: ``evaluate`` samples every review prompt afresh (``evaluate.review_eval``)."""

    def __init__(self, world, tokenizer, config, block_size: int):
        super().__init__(tokenizer, config)
        self.world = world
        self.train = [{"prompt": p, "prompt_ids": tokenizer.prompt(p)} for p in world.review_prompts()]
        check_max_new_tokens(config, [r["prompt_ids"] for r in self.train], block_size)

    def measure(self, rows, completions, finished) -> dict:
        true = [self.world.true_reward(r["prompt"], y, f) for r, y, f in zip(rows, completions, finished)]
        return {"rollout/true_reward": sum(true) / len(true)}

    def evaluate(self, policy, samples: int) -> dict:
        c = self.config
        ev = review_eval(policy, self.tokenizer, self.world, samples, c.temperature, seed=c.seed,
                         max_new_tokens=c.max_new_tokens)
        return {"true_reward": ev["true_reward"], "malformed": ev["malformed"], "examples": ev["examples"]}


class PromptFile(RolloutTask):
    """Your prompts (``--data``); nothing is known of their answers, so the plots show r_phi and the KL."""

    def __init__(self, tokenizer, config, block_size: int):
        super().__init__(tokenizer, config)
        self.train = self.read("data", block_size)


def ppo_task(world, tokenizer, config, block_size: int) -> RolloutTask:
    return PromptFile(tokenizer, config, block_size) if config.data else ReviewPrompts(world, tokenizer, config,
                                                                                       block_size)


# ----------------------------------------------------------------------------------------------
# GRPO: arithmetic questions, or your questions ({"prompt", "answer"})
# ----------------------------------------------------------------------------------------------


class Questions(RolloutTask):
    """Questions with a reward: ``--reward module:function`` if given, else the task's own."""

    def __init__(self, tokenizer, config, default_reward):
        super().__init__(tokenizer, config)
        self.reward_fn = load_reward(config.reward) if config.reward else default_reward

    def examples(self, policy, n: int = 5, samples: int = 8) -> list:
        """[question, right answer, ``samples`` sampled answers] for the first ``n`` shown questions."""
        questions = (self.heldout or self.train)[:n]
        device = next(policy.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.config.seed)
        prompts = [q.get("prompt_ids", q["prompt"]) for q in questions for _ in range(samples)]
        texts = sample_texts(policy, self.tokenizer, prompts, self.config.max_new_tokens, 1.0, generator)
        return [[q["prompt"], q.get("answer"), [y for y, _ in texts[i * samples:(i + 1) * samples]]]
                for i, q in enumerate(questions)]


class ArithmeticQuestions(Questions):
    """The toy world's arithmetic: train and held-out questions, scored by r* (1 if right, else 0)."""

    def __init__(self, world, tokenizer, config, block_size: int):
        super().__init__(tokenizer, config, toy_reward(world))
        self.world = world
        self.train, self.heldout = world.arithmetic_questions("train"), world.arithmetic_questions("heldout")
        check_max_new_tokens(config, [tokenizer.prompt(q["prompt"]) for q in self.train + self.heldout], block_size)

    def evaluate(self, policy, samples: int) -> dict:  # sampled at temperature 1: the policy's own distribution
        c = self.config
        return {"heldout/accuracy": arithmetic_eval(policy, self.tokenizer, self.world, "heldout", samples,
                                                    temperature=1.0, seed=c.seed,
                                                    max_new_tokens=c.max_new_tokens)["accuracy"]}


class QuestionFile(Questions):
    """Your questions (``--data``), scored by exact match of the final number with their ``answer``
    (or by ``--reward``); held out: ``--eval-data``'s, measured by their mean reward."""

    def __init__(self, tokenizer, config, block_size: int):
        super().__init__(tokenizer, config, exact_match_reward)
        need = () if config.reward else ("answer",)  # the built-in reward compares with the answer
        self.train = self.read("data", block_size, need)
        if config.eval_data:
            self.heldout = self.read("eval_data", block_size, need)

    def evaluate(self, policy, samples: int) -> dict:
        if self.heldout is None:
            return {}
        c = self.config
        return {"heldout/accuracy": reward_eval(policy, self.tokenizer, self.heldout, self.reward_fn, samples, 1.0,
                                                c.seed, c.max_new_tokens)["reward"]}


def grpo_task(world, tokenizer, config, block_size: int) -> Questions:
    task = QuestionFile(tokenizer, config, block_size) if config.data else ArithmeticQuestions(world, tokenizer,
                                                                                               config, block_size)
    if config.reward:  # yours: tried on two rows now, before the run folder exists
        check_reward_function(task.reward_fn, task.train)
    return task
