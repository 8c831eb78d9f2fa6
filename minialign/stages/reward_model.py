"""``minialign reward-model``: the run around ``reward_model.reward_model_step`` (flags, run folder,
loop, what it measures, plots, summary)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data import InfiniteMinibatches
from ..reward_model import RewardModel, RewardModelHyperparams, reward_model_step
from ..runtime import distributed
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.folders import input_path
from ..runtime.loading import load_model, save_reward_model
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.plots import plot_scatter, running_mean
from ..runtime.run import Run
from ..runtime.stage import stage
from ..toyworld import ToyWorld, WorldConfig
from .supervised_tasks import reward_model_task


@dataclass
class RewardModelRun(TrainConfig):
    """The run's own settings (``RewardModelConfig`` adds the hyperparameters after them)."""
    init: str = ""                # SFT checkpoint the trunk starts from; default: out/sft/model.pt
    steps: int = 1000
    batch_size: int = 32          # preference pairs per step (2 x batch_size sequences)
    lr: float = 2e-3
    weight_decay: float = 0.0
    num_pairs: int = 20_000       # training pairs, labelled by sampling E3 with the hidden r*
    eval_pairs: int = 2_000       # fresh held-out pairs
    eval_every: int = 250

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        super().validate()
        for name in ("eval_pairs", "eval_every"):
            check_range(self, name, 1)
        require(self, "num_pairs", self.data or self.num_pairs >= self.batch_size,
                f">= --batch-size ({self.batch_size})")


@dataclass
class RewardModelConfig(RewardModelHyperparams, RewardModelRun):
    """Train a Bradley-Terry reward model r_phi (E3, E4) on the toy world's preference pairs.

    Reads OUT/sft/model.pt (or --init, or a --model folder), whose trunk it starts from, and your
    pairs with --data. Writes OUT/reward_model/: model.pt (the reward model; a model/ folder after
    --model), metrics.jsonl, loss.png, accuracy.png, pearson.png, scatter.png, summary.json,
    status.json."""


@stage("reward_model")
def main(config: RewardModelConfig) -> dict:
    """Train r_phi from the SFT checkpoint on preference pairs; save ``out/reward_model/model.pt``.

    ``--model`` takes the trunk from a Hugging Face folder; ``--data`` trains on your pairs, and
    then the held-out metrics are those of ``--eval-data`` without r*: E4 loss, accuracy and margin.
    """
    generator = seed_everything(config.seed)  # pair order
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    policy, tok = load_model(input_path(config, "init"), config.model_impl, device, world.tokenizer)
    model = RewardModel.from_policy(policy)
    del policy
    task = reward_model_task(world, tok, config, model.config.block_size)  # your pairs, or the toy world's
    run = Run(config, "reward_model")

    last_eval: dict = {}  # the latest held-out evaluation, kept by a resumed run

    def held_out_metrics() -> dict:
        last_eval.clear()
        last_eval.update(task.evaluate(model))
        return {k: v for k, v in last_eval.items() if k != "responses"}

    before = held_out_metrics()  # the SFT trunk and a random head: about chance
    optimizer = make_optimizer(model, config)
    parallel = distributed.wrap(model, find_unused_parameters=True)  # DDP under torchrun; the LM head is unused
    batches = InfiniteMinibatches(len(task.train), config.batch_size, generator)
    model.train()
    bar = run.loop(config.steps, "reward model", model=model, optimizer=optimizer, batches=batches,
                   last_eval=last_eval)
    for step in bar:
        pairs = [task.train[i] for i in next(batches).tolist()]
        result = reward_model_step(model, pairs, config, gradient_update(model, parallel, optimizer, config, step),
                                   tok.pad_id, config.dtype)
        last = step == config.steps - 1
        evaluate_now = step % config.eval_every == 0 or last
        if step % config.log_every == 0 or evaluate_now:
            metrics = {"loss": result.loss, **distributed.mean_over_ranks(result.metrics),
                       "grad_norm": result.grad_norm, "lr": optimizer.param_groups[0]["lr"]}
            if step == 0 and not last:  # the step-0 metrics are of the model before its first update, like `before`
                metrics.update(before)
            elif evaluate_now:
                metrics.update(held_out_metrics())
                model.train()
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{metrics['accuracy']:.2f}")

    model.eval()
    save_reward_model(model, tok, run.dir)
    final = dict(last_eval)  # the evaluation after the last update
    summary = {**final, "heldout_accuracy_before": before.get("heldout_accuracy"), "seconds": run.rows[-1]["time"],
               **{k: r.as_dict() for k, r in task.reports.items()}}
    if "responses" in final:  # the toy world: r* is known
        learned, true = summary.pop("responses")
        summary.update(accuracy_vs_bayes=final["heldout_accuracy"] / final["bayes_optimal_accuracy"],
                       pearson_before=before["pearson"], num_heldout_responses=len(true))
        plot_scatter(run.dir / "scatter.png", true, learned, "hidden reward r*(x, y)", "learned reward r_phi(x, y)",
                     f"{len(true)} held-out responses: Pearson {final['pearson']:.3f}", jitter=0.06,
                     caption="Each point is a review; r* takes few values, so they are spread a little sideways.")
    else:  # your own data: the last training loss too
        summary["loss"] = run.rows[-1]["loss"]
    plots(run, config, final)
    run.finish(summary)
    return summary


def plots(run: Run, config: RewardModelConfig, final: dict) -> None:
    """loss.png, accuracy.png, and pearson.png where r* is known, with the lines that r* draws."""
    floor, bayes = final.get("true_reward_loss"), final.get("bayes_optimal_accuracy")
    run.plot({"loss": "training batch", "heldout_loss": "held-out pairs"}, "loss.png", "reward-model loss (E4)",
             hlines={f"E4 of the true r* on the held-out pairs ({floor:.3f})": floor} if floor is not None else None,
             ylabel="loss, nats per pair", xlabel="optimizer step",
             caption="The held-out loss falls towards that of the hidden reward itself: the labels' own noise."
             if floor is not None else "ln 2 = 0.693 is chance; your labels' noise sets how far below it the "
             "held-out loss can go.")
    steps, batch_accuracy = run.series("accuracy")
    window = max(1, 100 // config.log_every)
    run.plot_panels("accuracy.png", [{
        "title": "preference accuracy: r_phi(chosen) > r_phi(rejected)", "xlabel": "optimizer step",
        "ylabel": "fraction of pairs", "metrics": {"heldout_accuracy": "held-out pairs"},
        "curves": [(steps, running_mean(batch_accuracy, window),
                    f"training batches of {config.batch_size} pairs, mean of the last {window} logged", "-")],
        "hlines": [(bayes, f"Bayes-optimal accuracy of the labels, {bayes:.3f}")] if bayes is not None else []}],
        caption="Held-out accuracy rises towards the ceiling no model can pass on these noisy labels; training "
                "pairs are the ones being fit, so their accuracy can pass it." if bayes is not None else
                "Held-out pairs are the honest measure; training batches are the pairs being fit.")
    if "pearson" in final:
        run.plot({"pearson": "held-out responses"}, "pearson.png",
                 "Pearson(r_phi, r*): did it learn the hidden reward?", ylabel="correlation", xlabel="optimizer step",
                 caption="1 would be the hidden reward up to scale and shift; the labels never show r* itself.")
