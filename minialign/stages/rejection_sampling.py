"""``minialign rejection-sampling``: the run around ``best_of_n.rejection_sampling_round`` (flags, run
folder, loop, plots, summary), and best-of-N at sampling time as an evaluation.

Each round samples N responses per prompt from the current policy, keeps the best by the reward
(the reward model's r_phi on reviews, the verifiable reward on arithmetic, or r* itself with
``--reward true``) and fine-tunes on them with SFT's loss (E0b, ``pretrain.lm_loss``); with
``--rounds`` > 1 the next round samples from the fine-tuned policy (expert iteration). The SFT
model is also pi_ref: r* (or the held-out accuracy) and KL(pi || pi_ref) are measured by
sampling before and after every round. Before training, best-of-N itself is measured from pi_ref's
samples for every N of ``--best-of-n``: its r* and its KL by the exact formula
(``best_of_n.best_of_n_from_samples``) beside the bound log N - (N-1)/N.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..best_of_n import (RejectionSamplingHyperparams, best_of_n_from_samples, best_of_n_kl_bound,
                         rejection_sampling_round)
from ..data import collate
from ..dpo import sampled_kl
from ..pretrain import lm_loss
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.files import ConfigError
from ..runtime.folders import input_path, stage_model, stage_problem
from ..runtime.loading import load_model, load_reward_model, same_tokenizer, save_model
from ..runtime.devices import autocast
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.run import Run
from ..runtime.stage import stage
from ..toyworld import ToyWorld, WorldConfig
from .evaluate import arithmetic_eval, review_eval
from .rewards import toy_reward


@dataclass
class RejectionSamplingConfig(RejectionSamplingHyperparams, TrainConfig):
    """Rejection-sampling fine-tuning: sample N per prompt, keep the best by the reward, fine-tune on
    them with SFT's loss (E0b); --rounds > 1 repeats it from the new policy (expert iteration).
    Before training, best-of-N at sampling time is measured for every N of --best-of-n.

    Reads OUT/sft/model.pt (or --init, or a --model folder; it is also pi_ref) and, on --task review
    scored by the reward model, OUT/reward_model/model.pt (or --reward-model). Writes
    OUT/rejection_sampling/: model.pt (the fine-tuned policy; a model/ folder after --model),
    metrics.jsonl, loss.png, truth.png, best_of_n.png, summary.json, status.json."""
    init: str = ""                  # policy and pi_ref checkpoint; default: out/sft/model.pt
    task: Literal["review", "arithmetic"] = "review"  # the toy task: review prompts, or arithmetic questions (train split)
    reward: Literal["auto", "reward_model", "true"] = "auto"  # what ranks the samples: auto = reward model (review) or the verifiable reward (arithmetic); true = r* (an oracle)
    reward_model: str = ""          # --reward reward_model: its checkpoint; default out/reward_model/model.pt
    rounds: int = 1                 # sample-select-fine-tune rounds (> 1: expert iteration)
    prompts_per_round: int = 96     # prompts sampled per round, cycling through the task's prompts
    steps: int = 60                 # SFT steps in all, split evenly over the rounds
    batch_size: int = 32            # kept rows per SFT step (drawn with replacement)
    lr: float = 1e-4                # AdamW's learning rate
    warmup_steps: int = 5           # steps of linear warm-up before the cosine decay
    max_new_tokens: int = 24        # longest sampled response (a response cut off before EOS is malformed)
    temperature: float = 1.0        # sampling temperature of the rounds and of every measurement
    eval_samples: int = 32          # samples per prompt for r* / accuracy and the KL, before and after each round
    best_of_n: str = "1,2,4,8,16,32,64"  # comma-separated N for best-of-N at sampling time ("" = skip)
    best_of_n_samples: int = 256    # samples of pi_ref per prompt behind the best-of-N estimates (>> the largest N)

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        TrainConfig.validate(self)
        RejectionSamplingHyperparams.validate(self)  # the selection's own checks (not a Config: no super())
        for name in ("rounds", "prompts_per_round", "max_new_tokens", "eval_samples", "best_of_n_samples"):
            check_range(self, name, 1)
        check_range(self, "temperature", 0, low_open=True)
        require(self, "steps", self.steps % self.rounds == 0, f"a multiple of --rounds ({self.rounds})")
        require(self, "data", not self.data, "left out: rejection sampling runs on the toy world's tasks (--task)")
        require(self, "reward", not (self.task == "arithmetic" and self.reward == "reward_model"),
                "auto or true on --task arithmetic (its verifiable reward is r*; the reward model scores reviews)")
        require(self, "reward_model", not self.reward_model or self.scorer == "reward_model",
                "left out unless the reward model ranks the samples (--task review, --reward auto or reward_model)")
        try:
            ns = self.best_of_n_list
        except ValueError:
            ns = [0]
        require(self, "best_of_n", all(n >= 1 for n in ns), "comma-separated integers >= 1, e.g. 1,4,16")

    @property
    def scorer(self) -> str:
        """``reward_model`` or ``true``: what ranks the samples."""
        return "reward_model" if self.task == "review" and self.reward in ("auto", "reward_model") else "true"

    @property
    def best_of_n_list(self) -> list[int]:
        return [int(n) for n in self.best_of_n.split(",") if n.strip()]


class Task:
    """The prompts a round samples, what ranks its samples, and how the truth measures a policy."""

    def __init__(self, config: RejectionSamplingConfig, world: ToyWorld, tok, reward_model=None):
        self.config, self.world, self.tok = config, world, tok
        if config.task == "review":
            self.train = self.measured = world.review_prompts()
        else:  # trained on the train split, measured on questions it never saw
            self.train = [q["prompt"] for q in world.arithmetic_questions("train")]
            self.measured = [q["prompt"] for q in world.arithmetic_questions("heldout")]
        self.true_reward = toy_reward(world)
        self.reward_fn = self.true_reward if reward_model is None else _reward_model_fn(reward_model, tok)

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


def _reward_model_fn(reward_model, tok):
    """r_phi of each distinct (prompt, response) once: a response sampled twice gets one score, so
    best-of-N sees it as one level (batch padding would otherwise split it by rounding)."""
    from ..reward_model import reward_function  # imported here: the review task's scorer only
    score = reward_function(reward_model, tok)

    def reward(prompts, completions, finished, **columns) -> list[float]:
        keys = list(dict.fromkeys(zip(prompts, completions, finished)))
        values = dict(zip(keys, score([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])))
        return [values[k] for k in zip(prompts, completions, finished)]
    return reward


def _load_scorer(config: RejectionSamplingConfig, device, tok):
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


@torch.no_grad()
def best_of_n_eval(reference, task: Task, generator: torch.Generator) -> list[dict]:
    """Best-of-N at sampling time from pi_ref, for each N: the mean r* of the chosen response and
    KL(pi_BoN || pi_ref) by the exact formula on the sampled levels, averaged over the prompts."""
    c = task.config
    ns = c.best_of_n_list
    if not ns:
        return []
    hp = RejectionSamplingHyperparams(samples_per_prompt=c.best_of_n_samples)
    # one round's sampling and scoring, with nothing fine-tuned on it: M samples per prompt
    samples = rejection_sampling_round(reference, task.tok, task.reward_fn, task.measured, hp, generator,
                                       c.max_new_tokens, c.temperature)
    flat = [p for p in task.measured for _ in range(hp.samples_per_prompt)]
    truth = torch.tensor(task.true_reward(flat, [y for ys in samples.completions for y in ys],
                                          [f for fs in samples.finished for f in fs]),
                         dtype=torch.float64).view_as(samples.rewards)                   # (P, M) r*
    rows = []
    for n in ns:
        per_prompt = [best_of_n_from_samples(samples.rewards[i], truth[i], n) for i in range(len(task.measured))]
        rows.append({"n": n, "true_reward": sum(v for v, _ in per_prompt) / len(per_prompt),
                     "kl": sum(k for _, k in per_prompt) / len(per_prompt), "kl_bound": best_of_n_kl_bound(n)})
    return rows


@stage("rejection_sampling")
def main(config: RejectionSamplingConfig) -> dict:
    """Rejection-sampling fine-tuning from the SFT model; save ``out/rejection_sampling/model.pt``.

    ``--model`` starts the policy and pi_ref from a Hugging Face folder.
    """
    data_generator = seed_everything(config.seed)  # which kept rows each SFT step trains on (CPU)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    init = input_path(config, "init")  # out/sft's model unless --init or --model
    policy, tok = load_model(init, config.model_impl, device, world.tokenizer)
    reference, _ = load_model(init, config.model_impl, device, world.tokenizer)  # pi_ref: the frozen start
    reference.eval().requires_grad_(False)
    task = Task(config, world, tok, _load_scorer(config, device, tok))
    longest = max(len(tok.prompt(p)) for p in task.train + task.measured)
    require(config, "max_new_tokens", longest + config.max_new_tokens <= policy.config.block_size,
            f"<= {policy.config.block_size - longest} (the model's context less the longest prompt)")
    run = Run(config, "rejection_sampling")
    generator = torch.Generator(device=device).manual_seed(config.seed)  # sampling

    best_of_n = best_of_n_eval(reference, task, generator)
    for row in best_of_n:
        print(f"best-of-{row['n']:<3} from pi_ref: r* {row['true_reward']:+.3f}, KL {row['kl']:.3f} nats "
              f"(bound log N - (N-1)/N = {row['kl_bound']:.3f})")
    before = task.evaluate(policy, reference)
    run.log(0, **before)

    optimizer = make_optimizer(policy, config)
    steps_per_round = config.steps // config.rounds
    rows: list[dict] = []        # this round's kept rows; in the loop's state, so a resume keeps them
    history: list[dict] = []     # one entry per round
    policy.train()
    bar = run.loop(config.steps, "rejection sampling", policy=policy, optimizer=optimizer, generator=generator,
                   data_generator=data_generator, rows=rows, history=history)
    for step in bar:
        if step % steps_per_round == 0:  # a new round: sample from the current policy, keep the best
            prompts = [task.train[(i + step) % len(task.train)] for i in range(config.prompts_per_round)]
            result = rejection_sampling_round(policy, tok, task.reward_fn, prompts, config, generator,
                                              config.max_new_tokens, config.temperature)
            s = result.selection
            if not s.rows:
                raise ConfigError(f"round {len(history) + 1}: no sample reached --min-reward {config.min_reward}; "
                                  "nothing to fine-tune on (a lower --min-reward, or more --samples-per-prompt)")
            rows[:] = [{"prompt_ids": tok.prompt(r["prompt"]), "response_ids": tok.response(r["completion"])}
                       for r in s.rows]
            history.append({"round": len(history) + 1, "rows": len(s.rows), "prompts_dropped": s.prompts_dropped,
                            "reward_sampled": s.mean_reward_sampled, "reward_kept": s.mean_reward_kept})
            run.log(step, **history[-1])
            policy.train()

        def loss_of(idx: list[int]):  # E0b on the kept rows: SFT's loss, counted on response tokens
            b = collate([rows[i]["prompt_ids"] for i in idx], [rows[i]["response_ids"] for i in idx], tok.pad_id,
                        policy.config.block_size, device)
            with autocast(device, config.dtype):
                logits = policy(b["input_ids"], b["attention_mask"])
            loss = lm_loss(logits, b["input_ids"], b["response_mask"])                     # E0b
            n = sum(len(rows[i]["response_ids"]) for i in idx)  # = response_mask[:, 1:].sum(): tokens in the mean
            return loss, n, total_tokens, (loss.item(), n)

        pick = torch.randint(len(rows), (config.batch_size,), generator=data_generator).tolist()
        total_tokens = sum(len(rows[i]["response_ids"]) for i in pick)
        update = gradient_update(policy, policy, optimizer, config, step)(pick, loss_of)
        loss = sum(mean * n for mean, n in update.extras) / total_tokens  # the mean over the step's tokens
        metrics = {"loss": loss, "grad_norm": update.grad_norm, "lr": optimizer.param_groups[0]["lr"]}
        if (step + 1) % steps_per_round == 0:  # the end of a round: what the truth says of the new policy
            metrics.update(task.evaluate(policy, reference))
            policy.train()
        if step % config.log_every == 0 or (step + 1) % steps_per_round == 0:
            run.log(step + 1, **metrics)  # step k = after k SFT steps
        bar.set_postfix(loss=f"{loss:.3f}", round=len(history))
    after = {k: v for k, v in run.rows[-1].items() if k in before}
    save_model(policy, tok, run.dir)
    plots(run, config, before, best_of_n)
    measure = "true_reward" if config.task == "review" else "heldout_accuracy"
    summary = {"task": config.task, "scorer": config.scorer, "rounds": config.rounds,
               f"{measure}_before": before[measure], measure: after[measure], "kl": after["kl"],
               "rows_per_round": [h["rows"] for h in history],
               "reward_sampled_per_round": [h["reward_sampled"] for h in history],
               "reward_kept_per_round": [h["reward_kept"] for h in history],
               "best_of_n": best_of_n, "seconds": round(time.time() - run.start, 1)}
    if config.task == "review":
        summary.update(malformed_before=before["malformed"], malformed=after["malformed"])
    run.finish(summary)
    return summary


def plots(run: Run, config: RejectionSamplingConfig, before: dict, best_of_n: list[dict]) -> None:
    """loss.png, truth.png and best_of_n.png."""
    x = f"SFT step ({config.rounds} round(s) of {config.steps // config.rounds}, {config.batch_size} kept rows each)"
    run.plot({"loss": "kept rows of the current round"}, "loss.png", "SFT loss on the best samples (E0b)",
             ylabel="loss, nats per response token", xlabel=x,
             caption="Each round's rows are the policy's own best samples, so the loss starts low and falls.")
    review = config.task == "review"
    measure = "true_reward" if review else "heldout_accuracy"
    run.plot_panels("truth.png", [
        {"title": "hidden reward r*" if review else "held-out accuracy",
         "metrics": {measure: "mean r* of sampled reviews" if review else "held-out questions, sampled"},
         "hlines": [(before[measure], f"SFT model, {before[measure]:.3f}")], "xlabel": x,
         "ylabel": "r* (-7 malformed, up to +6)" if review else "fraction answered right"},
        {"title": "distance from the reference", "metrics": {"kl": "KL(pi || pi_ref), sampled"},
         "xlabel": x, "ylabel": "KL, nats per response"}],
        caption=f"Measured on {config.eval_samples} samples per prompt after each round: what fine-tuning on the "
                "best samples bought, and the KL it paid.")
    if best_of_n:
        from ..runtime.plots import plot_panels
        ns = [r["n"] for r in best_of_n]
        plot_panels(run.dir / "best_of_n.png", [
            {"title": "best-of-N from pi_ref", "xlabel": "N (log scale)", "xscale": "log",
             "ylabel": "mean r* of the chosen response",
             "curves": [(ns, [r["true_reward"] for r in best_of_n], f"ranked by {config.scorer.replace('_', ' ')}")]},
            {"title": "its KL to pi_ref", "xlabel": "N (log scale)", "xscale": "log", "ylabel": "KL, nats",
             "curves": [(ns, [r["kl"] for r in best_of_n], "exact formula on the sampled levels"),
                        (ns, [r["kl_bound"] for r in best_of_n], "log N - (N-1)/N (no ties)", "k--")]}],
            caption=f"Best-of-N without training, from {config.best_of_n_samples} samples per prompt: the KL "
                    "lies below the often-quoted formula where the reward has ties.")
