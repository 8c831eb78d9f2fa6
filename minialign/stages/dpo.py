"""``minialign dpo``: the run around ``dpo.dpo_step`` (flags, run folder, loop, plots, summary), for
DPO and the members of its family (``preference.py``, ``--loss``)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..runtime import distributed
from ..data import InfiniteMinibatches
from ..dpo import dpo_step
from ..kto import kto_step
from ..preference import PreferenceHyperparams, needs_reference, preference_loss
from ..runtime.loading import load_model, load_reference, save_model
from ..toyworld import ToyWorld, WorldConfig
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.folders import input_path
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.run import Run
from ..runtime.stage import stage
from .preference_tasks import preference_task


@dataclass
class DPOConfig(TrainConfig, PreferenceHyperparams):
    """Align the SFT model with DPO (E7-E10) on the toy world's preference pairs; it is also pi_ref.

    Reads OUT/sft/model.pt (or --init, or a --model folder), and your pairs with --data (for --loss
    kto also TRL's unpaired rows {prompt, completion, label}: a desirable or undesirable answer). Writes
    OUT/dpo/: model.pt (the aligned policy; a model/ folder after --model), metrics.jsonl,
    loss.png, rewards.png, logps.png, truth.png, summary.json, status.json.

    --loss picks the member of DPO's family (minialign/preference.py, docs/preference.md):
      sigmoid  DPO (E9); with --label-smoothing eps > 0, cDPO: each label trusted with 1 - eps
      robust   rDPO: E9 de-biased for labels flipped with probability --label-smoothing
      ipo      IPO: the squared loss (h - 1/(2 beta))^2, whose margins stay bounded (--ipo-normalise)
      simpo    SimPO: no reference model; the mean log-prob per token is the reward, margin --simpo-gamma
      kto      KTO: single answers, desirable or not, each against a reference point z_0 (pairs: chosen desirable)
      orpo     ORPO: SFT's loss plus an odds-ratio term, no reference; from the base model (--init OUT/pretrain/model.pt)
    simpo and orpo hold no reference model: KL(pi || init model) loads the init model to measure it."""
    init: str = ""                      # policy and reference checkpoint; default: out/sft/model.pt
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
    kto_unpaired: bool = False          # --loss kto on the toy world's pairs split into single examples, chosen desirable (--batch-size counts examples)

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        super().validate()
        for name in ("eval_pairs", "eval_every", "eval_samples_per_prompt", "max_new_tokens"):
            check_range(self, name, 1)
        require(self, "num_pairs", self.data or self.num_pairs >= self.batch_size,
                f">= --batch-size ({self.batch_size})")
        require(self, "kto_unpaired", not self.kto_unpaired or (self.loss == "kto" and not self.data),
                "false unless --loss kto on the toy world (a --data file is read as its rows are: pairs or unpaired)")


@stage("dpo")
def main(config: DPOConfig) -> dict:
    """Train the policy with DPO (or ``--loss``) from the SFT model; save ``out/dpo/model.pt``, plots, a summary.

    ``--model`` starts policy and reference from a Hugging Face folder; ``--data`` trains on your
    pairs, and the truth plotted is then what can be measured without r*: the implicit reward's
    held-out accuracy (``--eval-data``) and KL(pi || pi_ref) of samples.
    """
    generator = seed_everything(config.seed)  # pair order
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    init = input_path(config, "init")  # out/sft's model unless --init or --model
    policy, tok = load_model(init, config.model_impl, device, world.tokenizer)
    # the config holds the member's hyperparameters (a PreferenceHyperparams); E9 itself: None
    member = None if config.loss == "sigmoid" and not config.label_smoothing else config
    task = preference_task(world, tok, config, member, policy.config.block_size)  # the pairs, how they are measured
    run = Run(config, "dpo")

    def load_ref():  # pi_ref: the SFT model, frozen
        return load_reference(init, config.model_impl, device, tok if not config.data else None)

    reference = load_ref() if needs_reference(config.loss) else None  # simpo, orpo: none at all
    if reference is not None:  # its log-probs of the held-out pairs are always precomputed
        table = task.reference_logps(reference, train=config.precompute_ref_logps)
        reference = table or reference  # precomputed: the model leaves memory

    def reference_model():  # for the sampled KL: the one in memory, else loaded now
        return reference if reference is not None and not isinstance(reference, dict) else load_ref()

    before = task.evaluate(policy, reference_model)
    optimizer = make_optimizer(policy, config)
    parallel = distributed.wrap(policy)  # DDP under torchrun
    batches = InfiniteMinibatches(len(task.train["prompt"]), config.batch_size, generator)
    loss_fn = None if member is None else functools.partial(preference_loss, member)

    policy.train()
    after = before
    bar = run.loop(config.steps, f"dpo beta={config.beta}", policy=policy, optimizer=optimizer, batches=batches)
    for step in bar:
        rows = distributed.local_share(next(batches).tolist())
        update = gradient_update(policy, parallel, optimizer, config, step)
        if task.unpaired:  # KTO on single examples
            result = kto_step(policy, reference, tok, task.train, rows, member, update, config.dtype, config.share_prompt)
        else:
            result = dpo_step(policy, reference, tok, task.train, rows, config, update, config.dtype, loss_fn)
        evaluate_now = (step + 1) % config.eval_every == 0 or step == config.steps - 1
        if step % config.log_every == 0 or evaluate_now:
            metrics = distributed.mean_over_ranks(result.metrics)
            metrics.update(loss=result.loss, grad_norm=result.grad_norm, lr=optimizer.param_groups[0]["lr"])
            if step == 0:  # the SFT model's truth, measured before the first update (KL 0)
                metrics.update({k: v for k, v in before.items() if k != "examples"})
            if evaluate_now:
                after = task.evaluate(policy, reference_model)
                metrics.update({k: v for k, v in after.items() if k != "examples"})
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{result.loss:.3f}", margin=f"{metrics.get('rewards/margins', math.nan):.2f}")

    save_model(policy, tok, run.dir)
    plots(run, config, task, before)
    summary = {"beta": config.beta, "kl": after.get("kl"), "heldout_accuracy_before": before.get("heldout/accuracy"),
               "heldout_accuracy": after.get("heldout/accuracy"), "final_loss": run.rows[-1]["loss"],
               **task.summary(before, after), "seconds": run.rows[-1]["time"]}
    run.finish(summary)
    return summary


def plots(run: Run, config: DPOConfig, task, before: dict) -> None:
    """loss.png, rewards.png, logps.png, and the task's: truth.png where r* is known, else kl.png, accuracy.png."""
    x = f"DPO step (batches of {config.batch_size} pairs)"
    dpo = config.loss in ("sigmoid", "robust")  # E9, and its relatives that start at ln 2 too
    run.plot({"loss": "training batch"}, "loss.png", f"{'DPO loss (E9)' if dpo else config.loss + ' loss'}, "
             f"beta = {config.beta:g}", hlines={"ln 2: the policy equals the reference": math.log(2)} if dpo else {},
             ylabel="loss, nats per pair", xlabel=x, caption="The loss starts at ln 2 (every implicit reward is 0) "
             "and falls as the implicit rewards order the training pairs." if dpo else "")
    run.plot({"rewards/chosen": "chosen responses", "rewards/rejected": "rejected responses",
              "rewards/margins": "margin, chosen minus rejected"}, "rewards.png",
             "implicit rewards on training pairs (E10)", ylabel="beta x log(pi_theta / pi_ref), nats x beta",
             xlabel=x, caption="DPO widens the margin; both rewards may fall: it asks only that chosen "
                               "beat rejected.")
    run.plot({"logps/chosen": "chosen responses", "logps/rejected": "rejected responses"}, "logps.png",
             "log pi_theta(y | x) of training pairs", ylabel="log-probability, nats per response", xlabel=x,
             caption="Watch the chosen log-prob: when it falls too, probability goes to responses no pair showed.")
    task.plot(run, x, before)
