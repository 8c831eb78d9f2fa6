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

from .evaluate import arithmetic_eval, review_eval
from .pretrain import fit_lm
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, check_range, input_path, load_policy, require, resolve_device, save_policy,
                    seed_everything, stage)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the base model learns to answer instructions (E0b).

    Reads OUT/pretrain/model.pt (or --init). Writes OUT/sft/: model.pt (the instruct model),
    metrics.jsonl, loss.png, truth.png, summary.json, status.json."""
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
        require(self, "num_examples", self.num_examples >= self.batch_size, f">= --batch-size ({self.batch_size})")


@stage("sft")
def main(config: SFTConfig) -> dict:
    """Fine-tune the base model on instruction/response pairs; save ``out/sft/model.pt``."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    init = input_path(config, "init")  # out/pretrain/model.pt unless --init
    model, tok = load_policy(init, device, world.tokenizer)
    run = Run(config, "sft")

    def pairs(rows):
        return [tok.prompt(r["prompt"]) for r in rows], [tok.response(r["response"]) for r in rows]

    train = pairs(world.sft_dataset(config.num_examples, seed=config.seed))
    held_out = pairs(world.sft_dataset(config.eval_size, seed=config.seed + 10_000))

    def truth(m):  # what the hidden reward says of the model's own samples
        return {"true_reward": review_eval(m, tok, world, samples_per_prompt=8, seed=config.seed)["true_reward"],
                "heldout_accuracy": arithmetic_eval(m, tok, world, "heldout", 4, seed=config.seed)["accuracy"]}

    before = truth(model)
    last = fit_lm(model, train, held_out, config, run, "sft", config.eval_every, extra_metrics=truth)
    save_policy(model, tok, run.dir / "model.pt")
    floor = world.sft_entropy()["nats_per_token"]
    run.plot(["loss", "heldout_loss"], "loss.png", "SFT loss on response tokens (E0b)",
             hlines={f"entropy floor {floor:.3f}": floor}, ylabel="nats / token",
             ylim=(0.95 * floor, 1.5 * floor))  # zoom on the approach to the floor
    run.plot(["true_reward", "heldout_accuracy"], "truth.png", "hidden truth of sampled responses")
    final = review_eval(model, tok, world, samples_per_prompt=32, seed=config.seed)
    acc = arithmetic_eval(model, tok, world, "heldout", 16, seed=config.seed)["accuracy"]
    summary = {"heldout_loss": last["heldout_loss"], "entropy_floor": floor, "true_reward_before": before["true_reward"],
               "true_reward": final["true_reward"], "malformed": final["malformed"],
               "heldout_accuracy_before": before["heldout_accuracy"], "heldout_accuracy": acc,
               "examples": final["examples"], "seconds": last["time"]}
    run.finish(summary)
    return summary
