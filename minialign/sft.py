r"""Stage 2, supervised fine-tuning: the base model becomes an instruct model (E0b). The source
post's introduction: SFT maximises $P(\text{response}\mid\text{instruction})$.

E0b is the language-modelling loss of E0a counted on the response tokens only (the EOS included,
so the model learns to stop):

$$\mathcal{L}_{SFT}(\theta) = -\frac{1}{N}\sum_{t\,\in\,\text{response}} \log\pi_\theta(y_t\mid x, y_{<t}),$$

with $N$ the number of response tokens in the batch. The prompt tokens are in the input, so the
model conditions on them, but they are not targets: ``response_mask`` is 0 over the prompt. That
mask is the whole difference from pre-training, which is why this file reuses ``pretrain.lm_loss``
and ``pretrain.fit_lm``.

The toy world's SFT data: ``review the ITEM`` $\to$ a review of that item, and ``what is a + b ?``
$\to$ the answer, wrong with probability ``arithmetic_noise`` as in the demonstrations (so the
instruct model answers right only about $1 -$ noise of the time: what RL can improve on).

**Where this differs from the source**

- The source states the goal, maximise $P(\text{response}\mid\text{instruction})$; the loss above
  is its negative log, averaged per response token (the mean, not the sum, as in ``pretrain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import distributed
from .datafiles import sft_data
from .evaluate import arithmetic_eval, review_eval
from .loading import load_model, save_model
from .pretrain import fit_lm
from .toyworld import ToyWorld, WorldConfig
from .train import (ConfigError, Run, TrainConfig, check_range, input_path, require, resolve_device, seed_everything,
                    stage)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the base model learns to answer instructions (E0b).

    Reads OUT/pretrain/model.pt (or --init, or a --model folder), and your rows with --data.
    Writes OUT/sft/: model.pt (the instruct model; a model/ folder after --model), metrics.jsonl,
    loss.png, truth.png, summary.json, status.json."""
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

    def pairs(rows):
        return [tok.prompt(r["prompt"]) for r in rows], [tok.response(r["response"]) for r in rows]

    reports = {}
    if config.data:  # refused here, before the run folder exists, if a row is bad
        block = model.config.block_size
        *train, reports["data"] = sft_data(config.data, tok, block, config.max_length)
        held_out = None
        if config.eval_data:
            *held_out, reports["eval_data"] = sft_data(config.eval_data, tok, block, config.max_length)
        for r in reports.values():
            distributed.print_main(r.describe())
        run = Run(config, "sft")
        last = fit_lm(model, train, held_out, config, run, "sft", config.eval_every)
        save_model(model, tok, run.dir)
        run.plot({"loss": "training batch", "heldout_loss": "held-out examples"}, "loss.png",
                 "SFT loss on response tokens (E0b)", ylabel="loss, nats per response token",
                 xlabel="optimizer step", caption="The loss on your responses; held-out examples are the honest measure.")
        summary = {"loss": last["loss"], "heldout_loss": last.get("heldout_loss"), "seconds": last["time"],
                   **{k: r.as_dict() for k, r in reports.items()}}
        run.finish(summary)
        return summary

    train = pairs(world.sft_dataset(config.num_examples, seed=config.seed))
    held_out = pairs(world.sft_dataset(config.eval_size, seed=config.seed + 10_000))
    longest = max(len(x) + len(y) for rows in (train, held_out) for x, y in zip(*rows))
    if longest > model.config.block_size:  # refused before the run folder exists; nothing is truncated
        raise ConfigError(f"{input_path(config, 'init')} has a context of {model.config.block_size} tokens, fewer than "
                          f"the toy world's longest SFT example ({longest}); pre-train it with --block-size {longest} "
                          "or more")
    run = Run(config, "sft")

    def truth(m):  # what the hidden reward says of the model's own samples
        return {"true_reward": review_eval(m, tok, world, samples_per_prompt=8, seed=config.seed)["true_reward"],
                "heldout_accuracy": arithmetic_eval(m, tok, world, "heldout", 4, seed=config.seed)["accuracy"]}

    before = truth(model)
    last = fit_lm(model, train, held_out, config, run, "sft", config.eval_every, extra_metrics=truth)
    save_model(model, tok, run.dir)
    floor = world.sft_entropy()["nats_per_token"]
    run.plot({"loss": "training batch", "heldout_loss": "held-out examples"}, "loss.png",
             "SFT loss on response tokens (E0b)", hlines={f"exact entropy floor {floor:.3f}": floor},
             ylabel="loss, nats per response token", xlabel="optimizer step",
             ylim=(0.95 * floor, 1.5 * floor),  # zoom on the approach to the floor
             caption="The response loss falls towards its exact floor H(response | prompt) (dashed).")
    run.plot_panels("truth.png", [
        {"title": "reviews", "metrics": {"true_reward": "mean r* of sampled reviews"},
         "xlabel": "optimizer step", "ylabel": "hidden reward r* (-7 malformed, up to +6)"},
        {"title": "arithmetic", "metrics": {"heldout_accuracy": "held-out questions, sampled at T = 1"},
         "xlabel": "optimizer step", "ylabel": "fraction answered right", "ylim": (0, 1)}],
        caption="Judged by the hidden truth (8 samples per review prompt, 4 per question): "
                "the instruct model writes well-formed reviews and answers sums.")
    final = review_eval(model, tok, world, samples_per_prompt=32, seed=config.seed)
    acc = arithmetic_eval(model, tok, world, "heldout", 16, seed=config.seed)["accuracy"]
    summary = {"heldout_loss": last["heldout_loss"], "entropy_floor": floor, "true_reward_before": before["true_reward"],
               "true_reward": final["true_reward"], "malformed": final["malformed"],
               "heldout_accuracy_before": before["heldout_accuracy"], "heldout_accuracy": acc,
               "examples": final["examples"], "seconds": last["time"]}
    run.finish(summary)
    return summary
