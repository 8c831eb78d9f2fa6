"""What a rollout stage (PPO, GRPO, rejection sampling) samples from and how it measures its policy:
the toy world's prompts or your own ``--data`` file's, behind one interface, so that a stage runner has
one path.

A task has
- ``train``: the rows the rollouts sample, each a dict with ``prompt`` (text) and ``prompt_ids``,
  and the columns a reward function reads (GRPO's ``answer``);
- ``heldout``: rows never trained on, or None;
- ``reports``: what was read from each data file ({} in the toy world), for the summary;
- ``measure(rows, completions, finished) -> dict``: what the hidden truth says of a rollout;
- ``evaluate(policy, samples) -> dict``: fresh samples, measured against what is known: r* of
  the reviews (PPO) or the held-out accuracy (GRPO) in the toy world, the mean reward on
  ``--eval-data`` with your questions, nothing when nothing is known (an empty dict);
- GRPO's also ``reward_fn(prompts, completions, finished, **columns)``, ``examples(policy)`` and
  ``heldout_label`` (what its held-out figure is, for the accuracy plot).

Rejection sampling's task (``RankedPrompts``) holds prompt texts, the reward that ranks their samples
(the reward model's r_phi, or r*), each round's prompts and the rows it fine-tunes on, and
``evaluate(policy, reference)``: r* or the held-out accuracy, and the KL to pi_ref.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..best_of_n import (RejectionSamplingHyperparams, RejectionSamplingResult, best_of_n_from_samples,
                         best_of_n_kl_bound, rejection_sampling_round)
from ..runtime import distributed
from ..runtime.config import check_max_new_tokens, require
from ..runtime.datafiles import prompt_data
from ..runtime.files import ConfigError
from ..runtime.folders import stage_model, stage_problem
from ..runtime.loading import load_reward_model, same_tokenizer
from .evaluate import arithmetic_eval, review_eval, reward_eval, sample_texts, sampled_kl
from .rewards import check_reward_function, exact_match_reward, load_reward, toy_reward


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

    def draw(self, n: int, generator: torch.Generator) -> list[dict]:
        """``n`` distinct training questions drawn at random (an iteration's, or more for dynamic sampling)."""
        return [self.train[i] for i in torch.randperm(len(self.train), generator=generator)[:n].tolist()]

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
    heldout_label = "held-out questions (never trained on)"

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
    heldout_label = "held-out mean reward (= answer accuracy with the built-in exact-match reward)"

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
    require(config, "questions", config.questions <= len(task.train),
            f"<= {len(task.train)} (the questions there are to draw from)")
    require(config, "dynamic_sampling", not config.dynamic_sampling or distributed.world_size() == 1,
            "off under torchrun: it draws a different number of questions on each rank (run it in one process)")
    return task


# ----------------------------------------------------------------------------------------------
# rejection sampling: review prompts or arithmetic questions, ranked by the reward model or by r*
# ----------------------------------------------------------------------------------------------


class RankedPrompts:
    """The prompts a round samples (``train``), what ranks its samples (``reward_fn``), and how the truth
    measures a policy (``measured``: the same prompts, or held-out questions on arithmetic; ``truth_key``:
    the metric, r* or the held-out accuracy, and ``truth_panel``: its panel of truth.png)."""

    def __init__(self, config, world, tok, reward_model=None):
        self.config, self.world, self.tok = config, world, tok
        if config.task == "review":
            self.train = self.measured = world.review_prompts()
            self.truth_key = "true_reward"
            self.truth_panel = {"title": "hidden reward r*", "metrics": {"true_reward": "mean r* of sampled reviews"},
                                "ylabel": "r* (-7 malformed, up to +6)"}
        else:  # trained on the train split, measured on questions it never saw
            self.train = [q["prompt"] for q in world.arithmetic_questions("train")]
            self.measured = [q["prompt"] for q in world.arithmetic_questions("heldout")]
            self.truth_key = "heldout_accuracy"
            self.truth_panel = {"title": "held-out accuracy", "ylabel": "fraction answered right",
                                "metrics": {"heldout_accuracy": "held-out questions, sampled"}}
        self.true_reward = toy_reward(world)
        self.reward_fn = self.true_reward if reward_model is None else _distinct_scores(reward_model, tok)

    def round_prompts(self, step: int) -> list[str]:
        """The prompts of the round that starts at ``step``: the next ``--prompts-per-round`` of ``train``, cycling."""
        return [self.train[(i + step) % len(self.train)] for i in range(self.config.prompts_per_round)]

    def sft_rows(self, kept: RejectionSamplingResult, round_number: int) -> list[dict]:
        """A round's kept samples as the rows the SFT step trains on (token ids of the prompt and of the
        response); refused when no sample was kept."""
        if not kept.rows:
            raise ConfigError(f"round {round_number}: no sample reached --min-reward {self.config.min_reward}; "
                              "nothing to fine-tune on (a lower --min-reward, or more --samples-per-prompt)")
        return [{"prompt_ids": self.tok.prompt(r["prompt"]), "response_ids": self.tok.response(r["completion"])}
                for r in kept.rows]

    def evaluate(self, policy, reference) -> dict:
        """r* of sampled reviews (or the held-out accuracy), and KL(pi || pi_ref) on the same prompts."""
        c = self.config
        if c.task == "review":
            ev = review_eval(policy, self.tok, self.world, c.eval_samples, c.temperature, seed=c.seed,
                             max_new_tokens=c.max_new_tokens)
            out = {"true_reward": ev["true_reward"], "malformed": ev["malformed"]}
        else:
            out = {"heldout_accuracy": arithmetic_eval(policy, self.tok, self.world, "heldout", c.eval_samples,
                                                       c.temperature, seed=c.seed,
                                                       max_new_tokens=c.max_new_tokens)["accuracy"]}
        out["kl"] = sampled_kl(policy, reference, self.tok, self.measured, c.eval_samples, c.max_new_tokens,
                               seed=c.seed + 1)
        return out

    def summary(self, before: dict, after: dict) -> dict:
        """What the truth says of the start and of the fine-tuned policy (``after``: a row measured by
        ``evaluate``), and the KL between them."""
        key = self.truth_key
        out = {f"{key}_before": before[key], key: after[key], "kl": after["kl"]}
        if self.config.task == "review":
            out.update(malformed_before=before["malformed"], malformed=after["malformed"])
        return out

    @torch.no_grad()
    def best_of_n(self, reference, generator: torch.Generator) -> list[dict]:
        """Best-of-N at sampling time from pi_ref, for each N of ``--best-of-n``: the mean r* of the chosen
        response and KL(pi_BoN || pi_ref) by the exact formula on the sampled levels, averaged over the
        prompts, beside the bound log N - (N-1)/N."""
        c = self.config
        if not c.best_of_n_list:
            return []
        hp = RejectionSamplingHyperparams(samples_per_prompt=c.best_of_n_samples)
        # one round's sampling and scoring, with nothing fine-tuned on it: M samples per prompt
        samples = rejection_sampling_round(reference, self.tok, self.reward_fn, self.measured, hp, generator,
                                           c.max_new_tokens, c.temperature)
        flat = [p for p in self.measured for _ in range(hp.samples_per_prompt)]
        truth = torch.tensor(self.true_reward(flat, [y for ys in samples.completions for y in ys],
                                              [f for fs in samples.finished for f in fs]),
                             dtype=torch.float64).view_as(samples.rewards)               # (P, M) r*
        rows = []
        for n in c.best_of_n_list:
            per_prompt = [best_of_n_from_samples(samples.rewards[i], truth[i], n) for i in range(len(self.measured))]
            rows.append({"n": n, "true_reward": sum(v for v, _ in per_prompt) / len(per_prompt),
                         "kl": sum(k for _, k in per_prompt) / len(per_prompt), "kl_bound": best_of_n_kl_bound(n)})
        return rows


def _distinct_scores(reward_model, tok):
    """r_phi of each distinct (prompt, response) once: a response sampled twice gets one score, so
    best-of-N sees it as one level (batch padding would otherwise split it by rounding)."""
    from ..reward_model import reward_function  # imported here: the review task's scorer only
    score = reward_function(reward_model, tok)

    def reward(prompts, completions, finished, **columns) -> list[float]:
        keys = list(dict.fromkeys(zip(prompts, completions, finished)))
        values = dict(zip(keys, score([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])))
        return [values[k] for k in zip(prompts, completions, finished)]
    return reward


def _load_scorer(config, device, tok):
    """The reward model when it ranks the samples (checked: complete, the policy's tokenizer), else None."""
    if config.scorer != "reward_model":
        return None
    path = Path(config.reward_model) if config.reward_model else stage_model(config.out, "reward_model")
    if not path.exists():
        raise ConfigError(f"no reward model at {path}: make it with `minialign reward-model --out {config.out}`, "
                          "or rank the samples by r* with --reward true")
    problem = stage_problem(path.parent) if (path.parent / "status.json").is_file() else None
    if problem:
        raise ConfigError(f"cannot use {path}: {problem}")
    rm, rm_tok = load_reward_model(path, config.model_impl, device)
    if not same_tokenizer(rm_tok, tok):
        raise ConfigError(f"reward model {path} was trained with another tokenizer than the policy")
    return rm


def rejection_sampling_task(world, tok, config, device, block_size: int) -> RankedPrompts:
    """The task of ``config.task``, ranked by ``config.scorer``; refused here, before the run folder exists,
    if the reward model is missing or the responses would not fit the model's context."""
    task = RankedPrompts(config, world, tok, _load_scorer(config, device, tok))
    longest = max(len(tok.prompt(p)) for p in task.train + task.measured)
    require(config, "max_new_tokens", longest + config.max_new_tokens <= block_size,
            f"<= {block_size - longest} (the model's context less the longest prompt)")
    return task
