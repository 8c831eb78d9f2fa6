"""``minialign pretrain``: the run around ``pretrain.pretrain_step`` (flags, run folder, the loop
``language_model.fit_lm``, plots, summary)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..model import GPT, GPTConfig
from ..pretrain import pretrain_step
from ..runtime.config import TrainConfig, check_range, require
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.loading import load_model, save_model
from ..runtime.run import Run
from ..runtime.stage import stage
from ..toyworld import ToyWorld, WorldConfig
from .language_model import fit_lm
from .supervised_tasks import pretrain_task


@dataclass
class PretrainConfig(TrainConfig):
    """Pre-train a base model from scratch on the toy world's text (E0a).

    Reads nothing (the toy world is generated from --world-seed), or your text with --data (and
    a --model folder to continue). Writes OUT/pretrain/: model.pt (the base model and its
    tokenizer; a model/ folder after --model), metrics.jsonl, loss.png, summary.json, status.json."""
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    corpus_size: int = 100_000   # lines of training text drawn from the grammar
    eval_size: int = 2_000       # fresh held-out lines for the loss against the floor
    eval_every: int = 200

    def validate(self) -> None:
        super().validate()
        for name in ("n_layer", "n_head", "n_embd", "eval_size", "eval_every"):
            check_range(self, name, 1)
        require(self, "n_head", self.n_embd % self.n_head == 0, f"a divisor of --n-embd ({self.n_embd})")
        check_range(self, "block_size", 2)
        require(self, "corpus_size", self.data or self.corpus_size >= self.batch_size,
                f">= --batch-size ({self.batch_size})")
        require(self, "model", not self.model or self.data, "given with --data (rows {\"text\"}) to continue "
                "pre-training it")


@stage("pretrain")
def main(config: PretrainConfig) -> dict:
    """Train a base model from scratch on the toy corpus; save ``out/pretrain/model.pt``.

    With ``--data`` (rows ``{"text"}``): pre-train on that file instead, from scratch with the
    toy tokenizer, or continuing a ``--model`` folder with its own tokenizer.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    if config.model:
        model, tok = load_model(config.model, config.model_impl, device)
    else:
        tok = world.tokenizer
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                              n_head=config.n_head, n_embd=config.n_embd)).to(device)
    task = pretrain_task(world, tok, config, model.config.block_size)  # your text, or the toy corpus
    run = Run(config, "pretrain")
    step_fn = functools.partial(pretrain_step, pad_id=0, dtype=config.dtype)
    last = fit_lm(model, task.train, task.heldout, config, run, "pretrain", step_fn)
    save_model(model, tok, run.dir)
    floor = task.floor  # the toy corpus's exact entropy; None for your text
    run.plot({"loss": "training batch", "heldout_loss": f"held-out text (every {config.eval_every} steps)"},
             "loss.png", "pre-training loss (E0a)",
             hlines={f"exact entropy floor {floor:.3f}": floor} if floor else None,
             ylabel="loss, nats per token", xlabel="optimizer step",
             ylim=(0.95 * floor, 1.5 * floor) if floor else None,  # zoom on the approach to the floor
             caption="The loss falls towards the corpus's exact entropy (dashed), the least expected loss: one "
                     "batch's loss can dip below it by chance, the expectation cannot."
             if floor else "The language-modelling loss on your text, training batches and held-out text.")
    summary = {"heldout_loss": last.get("heldout_loss"), "params": model.num_params(), "seconds": last["time"],
               **{k: r.as_dict() for k, r in task.reports.items()}}
    if floor is not None:
        summary.update(entropy_floor=floor, gap_to_floor=last["heldout_loss"] / floor - 1)
    else:  # your own text: no known floor, the last training loss instead
        summary["loss"] = last["loss"]
    run.finish(summary)
    return summary
