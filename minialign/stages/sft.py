"""``minialign sft``: the run around ``sft.sft_step`` (flags, run folder, the loop
``language_model.fit_lm``, what r* says of the samples, plots, summary)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.folders import input_path
from ..runtime.loading import load_model, save_model
from ..runtime.run import Run
from ..runtime.stage import stage
from ..sft import SFTHyperparams, sft_step
from ..toyworld import ToyWorld, WorldConfig
from .language_model import fit_lm
from .supervised_tasks import sft_task


@dataclass
class SFTRun(TrainConfig):
    """The run's own settings (``SFTConfig`` adds the hyperparameters after them)."""
    init: str = ""               # base model checkpoint; default: out/pretrain/model.pt
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    num_examples: int = 20_000   # instruction/response pairs drawn from the toy world
    eval_size: int = 1_000
    eval_every: int = 200

    INPUTS = {"init": "pretrain"}

    def validate(self) -> None:
        super().validate()
        check_range(self, "eval_size", 1)
        check_range(self, "eval_every", 1)
        require(self, "num_examples", self.data or self.num_examples >= self.batch_size,
                f">= --batch-size ({self.batch_size})")


@dataclass
class SFTConfig(SFTHyperparams, SFTRun):
    """Supervised fine-tuning: the base model learns to answer instructions (E0b).

    Reads OUT/pretrain/model.pt (or --init, or a --model folder), and your rows with --data.
    Writes OUT/sft/: model.pt (the instruct model; a model/ folder after --model), metrics.jsonl,
    loss.png, truth.png, summary.json, status.json."""


@stage("sft")
def main(config: SFTConfig) -> dict:
    """Fine-tune the base model on instruction/response pairs; save ``out/sft/model.pt``.

    ``--model`` starts from a Hugging Face folder instead of the base model; ``--data`` trains
    on your rows (``{"prompt", "completion"}`` or ``{"messages"}``) instead of the toy world's,
    and then only what can be measured without r* is plotted: train and held-out loss.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    model, tok = load_model(input_path(config, "init"), config.model_impl, device, world.tokenizer)
    task = sft_task(world, tok, config, model.config.block_size)  # your rows, or the toy world's
    run = Run(config, "sft")
    before = task.truth(model)  # {} for your rows: r* is not known
    step_fn = functools.partial(sft_step, hp=config, pad_id=0, dtype=config.dtype)
    last = fit_lm(model, task.train, task.heldout, config, run, "sft", step_fn, extra_metrics=task.truth)
    save_model(model, tok, run.dir)
    plots(run, task.floor, config.eval_every)
    summary = {"heldout_loss": last.get("heldout_loss"), **task.final(model, before), "seconds": last["time"],
               **{k: r.as_dict() for k, r in task.reports.items()}}
    if task.floor is not None:
        summary["entropy_floor"] = task.floor
    else:  # your own rows: the last training loss
        summary["loss"] = last["loss"]
    run.finish(summary)
    return summary


def plots(run: Run, floor: float | None, eval_every: int) -> None:
    """loss.png, with the exact floor where it is known; truth.png where r* judged the samples."""
    run.plot({"loss": "training batch", "heldout_loss": f"held-out examples (every {eval_every} steps)"}, "loss.png",
             "SFT loss on response tokens (E0b)", hlines={f"exact entropy floor {floor:.3f}": floor} if floor else None,
             ylabel="loss, nats per response token", xlabel="optimizer step",
             ylim=(0.95 * floor, 1.5 * floor) if floor else None,  # zoom on the approach to the floor
             caption="The response loss falls towards its exact floor H(response | prompt) (dashed), the least "
                     "expected loss: one batch's loss can dip below it by chance, the expectation cannot." if floor else
             "The loss on your responses; held-out examples are the honest measure.")
    if floor is None:
        return
    run.plot_panels("truth.png", [
        {"title": "reviews", "metrics": {"true_reward": "mean r* of sampled reviews"},
         "xlabel": "optimizer step", "ylabel": "hidden reward r* (-7 malformed, up to +6)"},
        {"title": "arithmetic", "metrics": {"heldout_accuracy": "held-out questions, 4 samples each at T = 1"},
         "xlabel": "optimizer step", "ylabel": "fraction answered right", "ylim": (0, 1)}],
        caption="Judged by the hidden truth (8 samples per review prompt, 4 per question): the instruct model "
                "writes well-formed reviews and answers sums. The summary's accuracy takes 16 samples per question, "
                "so it differs from the last point by sampling noise.")
