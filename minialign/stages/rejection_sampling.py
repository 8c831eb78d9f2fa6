"""``minialign rejection-sampling``: the run around ``best_of_n.rejection_sampling_round`` and
``sft.sft_step`` (flags, run folder, loop, plots, summary), with best-of-N at sampling time as an
evaluation; its task is ``rollout_tasks.RankedPrompts``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..best_of_n import RejectionSamplingHyperparams, rejection_sampling_round
from ..runtime import distributed
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.loading import load_policy_and_reference, save_model
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.plots import plot_truth_and_kl
from ..runtime.run import Run
from ..runtime.stage import stage
from ..sft import SFTHyperparams, sft_step
from ..toyworld import ToyWorld, WorldConfig
from .rollout_tasks import rejection_sampling_task


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
        require(self, "best_of_n", all(n.strip().isdecimal() and int(n) >= 1 for n in self.best_of_n.split(",")
                                       if n.strip()), "comma-separated integers >= 1, e.g. 1,4,16")

    @property
    def scorer(self) -> str:
        """``reward_model`` or ``true``: what ranks the samples."""
        return "reward_model" if self.task == "review" and self.reward in ("auto", "reward_model") else "true"

    @property
    def best_of_n_list(self) -> list[int]:
        return [int(n) for n in self.best_of_n.split(",") if n.strip()]


@stage("rejection_sampling")
def main(config: RejectionSamplingConfig) -> dict:
    """Rejection-sampling fine-tuning from the SFT model (or --model); save ``out/rejection_sampling/model.pt``."""
    data_generator = seed_everything(config.seed)  # which kept rows each SFT step trains on (CPU)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    policy, reference, tok = load_policy_and_reference(config, device, world.tokenizer)  # pi_ref: the frozen start
    task = rejection_sampling_task(world, tok, config, device, policy.config.block_size)
    run = Run(config, "rejection_sampling")
    generator = torch.Generator(device=device).manual_seed(config.seed)  # sampling

    best_of_n = task.best_of_n(reference, generator)
    for row in best_of_n:
        distributed.print_main(f"best-of-{row['n']:<3} from pi_ref: r* {row['true_reward']:+.3f}, "
                               f"KL {row['kl']:.3f} nats (bound log N - (N-1)/N = {row['kl_bound']:.3f})")
    before = task.evaluate(policy, reference)
    run.log(0, **before)

    optimizer = make_optimizer(policy, config)
    parallel = distributed.wrap(policy)  # DDP under torchrun (every rank samples the same rounds)
    steps_per_round = config.steps // config.rounds
    rows: list[dict] = []        # this round's kept rows; in the loop's state, so a resume keeps them
    history: list[dict] = []     # one entry per round
    policy.train()
    bar = run.loop(config.steps, "rejection sampling", policy=policy, optimizer=optimizer, generator=generator,
                   data_generator=data_generator, rows=rows, history=history)
    for step in bar:
        if step % steps_per_round == 0:  # a new round: sample from the current policy, keep the best
            s = rejection_sampling_round(policy, tok, task.reward_fn, task.round_prompts(step), config, generator,
                                         config.max_new_tokens, config.temperature).selection
            rows[:] = task.sft_rows(s, len(history) + 1)  # refused when no sample was kept
            history.append({"round": len(history) + 1, **s.metrics})
            run.log(step, **history[-1])
        pick = torch.randint(len(rows), (config.batch_size,), generator=data_generator).tolist()
        done = sft_step(policy, [rows[i]["prompt_ids"] for i in pick], [rows[i]["response_ids"] for i in pick],
                        SFTHyperparams(), gradient_update(policy, parallel, optimizer, config, step), tok.pad_id,
                        config.dtype)  # E0b on the kept rows: SFT's loss, a mean over the response tokens
        metrics = {"loss": done.loss, "grad_norm": done.grad_norm, "lr": optimizer.param_groups[0]["lr"]}
        if (step + 1) % steps_per_round == 0:  # the end of a round: what the truth says of the new policy
            metrics.update(task.evaluate(policy, reference))
        if step % config.log_every == 0 or (step + 1) % steps_per_round == 0:
            run.log(step + 1, **metrics)  # step k = after k SFT steps
        bar.set_postfix(loss=f"{done.loss:.3f}", round=len(history))
    save_model(policy, tok, run.dir)
    plots(run, config, task, before, best_of_n)
    summary = {"task": config.task, "scorer": config.scorer, "rounds": config.rounds,
               **task.summary(before, run.rows[-1]),  # the last row: the measurement after the last round
               **{f"{key}_per_round": [h[key] for h in history] for key in ("rows", "reward_sampled", "reward_kept")},
               "best_of_n": best_of_n, "seconds": run.rows[-1]["time"]}
    run.finish(summary)
    return summary


def plots(run: Run, config: RejectionSamplingConfig, task, before: dict, best_of_n: list[dict]) -> None:
    """loss.png, truth.png and best_of_n.png."""
    x = f"SFT step ({config.rounds} round(s) of {config.steps // config.rounds}, {config.batch_size} kept rows each)"
    run.plot({"loss": "kept rows of the current round"}, "loss.png", "SFT loss on the best samples (E0b)",
             ylabel="loss, nats per response token", xlabel=x,
             caption="Each round's rows are the policy's own best samples, so the loss starts low and falls.")
    plot_truth_and_kl(run, x, task.truth_panel, before[task.truth_key], f"Measured on {config.eval_samples} samples "
                      "per prompt after each round: what fine-tuning on the best samples bought, and the KL it paid.")
    if best_of_n:
        ns, true, kl, bound = ([r[key] for r in best_of_n] for key in ("n", "true_reward", "kl", "kl_bound"))
        log_n = {"xlabel": "N (log scale)", "xscale": "log"}
        run.plot_panels("best_of_n.png", [
            {"title": "best-of-N from pi_ref", **log_n, "ylabel": "mean r* of the chosen response",
             "curves": [(ns, true, f"ranked by {config.scorer.replace('_', ' ')}")]},
            {"title": "its KL to pi_ref", **log_n, "ylabel": "KL, nats",
             "curves": [(ns, kl, "exact formula on the sampled levels"),
                        (ns, bound, "log N - (N-1)/N (no ties)", "k--")]}],
            caption=f"Best-of-N without training, from {config.best_of_n_samples} samples per prompt: the KL "
                    "lies below the often-quoted formula where the reward has ties.")
