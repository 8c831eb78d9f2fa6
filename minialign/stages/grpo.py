"""``minialign grpo``: the run around ``grpo.grpo_iteration`` (flags, run folder, loop, plots, summary)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..grpo import GRPOHyperparams, grpo_iteration, reset_reference
from ..policy_gradient import MemberOptions, check_member
from ..runtime import distributed
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.loading import load_policy_and_reference, save_model
from ..toyworld import ToyWorld, WorldConfig
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.run import Run
from ..runtime.stage import stage
from .rollout_tasks import grpo_task


@dataclass
class GRPOConfig(MemberOptions, GRPOHyperparams, TrainConfig):
    """Align the SFT model with GRPO (E11-E14) on the toy world's verifiable arithmetic reward.

    Reads OUT/sft/model.pt (or --init, or a --model folder; also the first pi_ref), and your
    questions with --data. Writes OUT/grpo/: model.pt (the aligned policy; a model/ folder after
    --model), metrics.jsonl, accuracy.png, answer_len.png, kl_clip.png, summary.json, status.json.

    The policy-gradient family (docs/policy_gradient.md), each member GRPO with a few options changed:
      GRPO          (the default) E12's group advantage, E13's clipped loss, the KL in the loss (k3)
      REINFORCE     --advantage none --loss reinforce --kl-in reward --kl-estimator k1: A = r, -A log pi
      REINFORCE+b   --advantage batch_mean --loss reinforce --kl-in reward --kl-estimator k1: the batch's mean as baseline
      RLOO          --advantage rloo --loss reinforce --kl-in reward --kl-estimator k1: the others' mean as baseline
      REINFORCE++   --advantage reinforce_pp --loss ppo_clip --kl-in reward: per-token KL, whitened over the batch
      DAPO          --loss dapo --beta 0 --dynamic-sampling --overlong filter: clip-higher, token mean, only groups with signal
      GSPO          --loss gspo --beta 0: one ratio per answer, (pi/pi_old)^(1/|y|), clipped per answer
      CISPO         --loss cispo --beta 0: REINFORCE weighted by the clipped ratio, its gradient stopped"""
    init: str = ""                  # SFT checkpoint; default: out/sft/model.pt
    steps: int = 150                # iterations of E14 (sample, score, update)
    questions: int = 16             # questions per iteration
    lr: float = 1e-3                # AdamW's learning rate
    warmup_steps: int = 0           # iterations of linear warm-up before the cosine decay
    log_every: int = 1              # one metrics row per iteration (cheap next to the iteration)
    weight_decay: float = 0.1       # on AdamW's matrices, as in the measured runs (docs/measurements.md)
    reward: str = ""                # your reward function module:function (default: r*, or exact match with --data)
    eval_every: int = 25            # held-out accuracy every N iterations (0 = only before and after)
    eval_samples: int = 16          # samples per held-out question during training
    final_eval_samples: int = 64    # samples per held-out question before and after

    INPUTS = {"init": "sft"}
    SPLITS = {"questions": False, "batch_size": True}  # questions over ranks; answers over micro-batches too
    ROWS_PER_STEP = "questions"  # distinct questions per iteration

    def validate(self) -> None:
        super().validate()
        check_member(self, self)  # the member's options against GRPO's own
        for name in ("questions", "eval_samples", "final_eval_samples"):
            check_range(self, name, 1)
        check_range(self, "eval_every", 0)
        answers = self.questions * self.group_size  # what one iteration samples and splits into steps
        require(self, "batch_size", self.batch_size >= answers or answers % self.batch_size == 0,
                f"a divisor of the {answers} answers an iteration samples (--questions {self.questions} x "
                f"--group-size {self.group_size}), so that every step weighs its answers alike; or >= {answers}: "
                "one step of all of them")


@stage("grpo")
def main(config: GRPOConfig) -> dict:
    """Train the SFT model with GRPO on the arithmetic questions; save ``out/grpo/model.pt``.

    ``--model`` starts from a Hugging Face folder; ``--data`` samples your questions
    (``{"prompt", "answer"}``, scored by exact match of the final number) or scores them with
    ``--reward module:function``; the held-out figure is then the mean reward on ``--eval-data``.
    """
    data_generator = seed_everything(config.seed)  # question order (CPU)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    policy, reference, tok = load_policy_and_reference(config, device, world.tokenizer)  # pi_ref: the SFT model
    task = grpo_task(world, tok, config, policy.config.block_size)  # the questions and how they are measured
    run = Run(config, "grpo")
    generator = distributed.sampling_generator(device, config.seed)  # this rank's answers
    optimizer = make_optimizer(policy, config)
    parallel = distributed.wrap(policy)  # DDP under torchrun

    before = task.evaluate(policy, config.final_eval_samples)  # {} when nothing is held out
    examples_before = task.examples(policy)
    if before:
        run.log(0, **before)
    policy.train()
    history = []
    bar = run.loop(config.steps, "grpo", model=policy, ref_model=reference, optimizer=optimizer,  # resume.pt's names
                   generator=generator, data_generator=data_generator, history=history)
    for step in bar:
        if config.ref_reset_every and step > 0 and step % config.ref_reset_every == 0:
            reset_reference(reference, policy)  # E14's option
        mine = distributed.local_share(task.draw(config.questions, data_generator))  # whole groups on one rank
        update = gradient_update(policy, parallel, optimizer, config, step)
        result = grpo_iteration(policy, reference, tok, task.reward_fn, mine, config, generator, update, config.dtype,
                                member=config, draw=lambda n: task.draw(n, data_generator))  # config: hp and member
        metrics = distributed.mean_over_ranks(result.metrics)
        history.append(metrics)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps and before:
            metrics.update(task.evaluate(policy, config.eval_samples))
        if step % config.log_every == 0 or "heldout/accuracy" in metrics or step == config.steps - 1:
            run.log(step + 1, **metrics)  # step k = after k iterations
        bar.set_postfix(acc=f"{metrics['accuracy']:.2f}", kl=f"{metrics['kl']:.3f}")
    after = task.evaluate(policy, config.final_eval_samples)
    if after:
        run.log(config.steps, **after)
    seconds = time.time() - run.start

    save_model(policy, tok, run.dir)
    plots(run, config, task)

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)
    k = max(1, min(5, len(history) // 2))  # first / last few iterations (one is noisy)
    first, last = history[:k], history[-k:]
    summary = {"heldout_accuracy_before": before.get("heldout/accuracy"),
               "heldout_accuracy": after.get("heldout/accuracy"),
               "train_accuracy_first": mean("accuracy", first), "train_accuracy_last": mean("accuracy", last),
               "answer_len_first": mean("answer_len", first), "answer_len_last": mean("answer_len", last),
               "kl_last": mean("kl", last), "zero_spread_last": mean("zero_spread", last),
               "seconds": seconds, "examples_before": examples_before, "examples": task.examples(policy),
               **{name: report.as_dict() for name, report in task.reports.items()}}
    if config.dynamic_sampling:  # the cost of the filter: questions sampled to fill the batches
        summary["questions_drawn"] = sum(r["questions_drawn"] for r in history)
    run.finish(summary)
    return summary


def plots(run: Run, config: GRPOConfig, task) -> None:
    """accuracy.png, answer_len.png, kl_clip.png (drawn by ``runtime.plots.plot_panels``)."""
    x = f"GRPO iteration ({config.questions} questions x G = {config.group_size} answers)"
    run.plot({"accuracy": f"train rollouts (temperature {config.temperature})", "heldout/accuracy": task.heldout_label},
             "accuracy.png", "accuracy of sampled answers", ylabel="fraction answered right", xlabel=x, ylim=(0, 1),
             caption="Train: the share of each iteration's sampled answers with reward 1, the answers GRPO learns "
                     "from; held-out: sampled at temperature 1 before, every --eval-every iterations and after.")
    run.plot({"answer_len": "mean answer length, EOS included"}, "answer_len.png", "answer length",
             ylabel="tokens per answer", xlabel=x,
             caption="The answers keep their EOS: the length does not drift towards max_new_tokens.")
    run.plot_panels("kl_clip.png", [
        {"title": "distance from pi_ref", "metrics": {"kl": "KL(pi_old || pi_ref) per token, k3"},
         "xlabel": x, "ylabel": "KL, nats per token"},
        {"title": "clipping (E13)", "metrics": {"clip_frac": "tokens whose clip binds"},
         "xlabel": x, "ylabel": "fraction of answer tokens"},
        {"title": "groups that teach nothing", "metrics": {"zero_spread": "all G answers score the same (A = 0)"},
         "xlabel": x, "ylabel": "fraction of groups", "ylim": (0, 1)}],
        caption="As the train questions are learnt, more groups score all-right and teach nothing; the KL to "
                "pi_ref stays bounded, noisy from batch to batch.")
