r"""Stage 1, pre-training: the base model learns the toy world's text (E0a). The source post's
introduction names the stage (language modelling on unlabelled text, giving a base model).

E0a, language modelling over every token of a document:

$$\mathcal{L}_{LM}(\theta) = -\sum_t \log\pi_\theta(x_t\mid x_{<t})$$

The same loss, counted on response tokens only, is SFT (E0b, ``sft.py``): a document here is a
"response" to the one-token prompt ``<bos>``, so both stages share ``lm_loss`` and ``fit_lm``.

**Where this differs from the source**

- E0a is this project's: the source describes pre-training in words and states no formula.
- ``lm_loss`` is the mean over predicted tokens, not the sum: the sum divided by the number of
  tokens, so the loss reads in nats per token and can be compared with the corpus's exact entropy
  floor ``ToyWorld.corpus_entropy()`` (no model can do better on fresh text than
  $H(\text{line}) / (\mathbb{E}[\text{length}] + 1)$). The minimiser is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import InfiniteMinibatches, collate
from .model import GPT, GPTConfig
from .ops import masked_mean, token_logps
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, autocast, check_range, make_optimizer, optimizer_step, require,
                    resolve_device, save_policy, seed_everything, stage)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    r"""E0a, E0b: the mean of $-\log\pi_\theta(x_t\mid x_{<t})$ over the tokens where ``response_mask`` is 1.

    logits (B, T, V) from the model on ``input_ids`` (B, T); position t-1 predicts token t.
    """
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1), E1 per token
    return -masked_mean(logps, response_mask[:, 1:])


@dataclass
class PretrainConfig(TrainConfig):
    """Pre-train a base model from scratch on the toy world's text (E0a).

    Reads nothing (the toy world is generated from --world-seed). Writes OUT/pretrain/: model.pt
    (the base model and its tokenizer), metrics.jsonl, loss.png, summary.json, status.json."""
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
        require(self, "corpus_size", self.corpus_size >= self.batch_size, f">= --batch-size ({self.batch_size})")


def fit_lm(model: GPT, train: tuple[list, list], held_out: tuple[list, list], config: TrainConfig,
           run: Run, desc: str, eval_every: int, extra_metrics=None) -> dict:
    """Minimise ``lm_loss`` on (prompts, responses) token lists; log train and held-out loss.

    Shared by pre-training (prompt = ``<bos>``) and SFT (prompt = the chat prompt).
    """
    device = next(model.parameters()).device
    generator = seed_everything(config.seed)  # data order
    optimizer = make_optimizer(model, config)
    prompts, responses = train
    batches = InfiniteMinibatches(len(prompts), config.batch_size, generator)
    block, pad = model.config.block_size, 0

    def held_out_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast(device, config.dtype):
            for i in range(0, len(held_out[0]), 256):
                b = collate(held_out[0][i:i + 256], held_out[1][i:i + 256], pad, block, device)
                n = b["response_mask"][:, 1:].sum().item()
                total += lm_loss(model(b["input_ids"], b["attention_mask"]), b["input_ids"],
                                 b["response_mask"]).item() * n
                count += n
        model.train()
        return total / count

    model.train()
    bar = run.loop(config.steps, desc, model=model, optimizer=optimizer, batches=batches)
    for step in bar:
        idx = next(batches).tolist()
        b = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad, block, device)
        with autocast(device, config.dtype):
            logits = model(b["input_ids"], b["attention_mask"])
        loss = lm_loss(logits, b["input_ids"], b["response_mask"])
        grad_norm = optimizer_step(model, optimizer, loss, step, config)
        last = step == config.steps - 1
        if step % config.log_every == 0 or last:
            metrics = {"loss": loss.item(), "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
            if step % eval_every == 0 or last:
                metrics["heldout_loss"] = held_out_loss()
                if extra_metrics is not None:
                    metrics.update(extra_metrics(model))
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return run.rows[-1]


@stage("pretrain")
def main(config: PretrainConfig) -> dict:
    """Train a base model from scratch on the toy corpus; save ``out/pretrain/model.pt``."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    tok = world.tokenizer
    run = Run(config, "pretrain")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd)).to(device)

    def docs(lines):  # a document is a "response" to the prompt <bos>
        return [[tok.bos_id]] * len(lines), [tok.document(s)[1:] for s in lines]

    train = docs(world.pretrain_corpus(config.corpus_size, seed=config.seed))
    held_out = docs(world.pretrain_corpus(config.eval_size, seed=config.seed + 10_000))
    floor = world.corpus_entropy()["nats_per_token"]
    last = fit_lm(model, train, held_out, config, run, "pretrain", config.eval_every)
    save_policy(model, tok, run.dir / "model.pt")
    run.plot(["loss", "heldout_loss"], "loss.png", "pre-training loss (E0a)",
             hlines={f"entropy floor {floor:.3f}": floor}, ylabel="nats / token",
             ylim=(0.95 * floor, 1.5 * floor))  # zoom on the approach to the floor
    summary = {"heldout_loss": last["heldout_loss"], "entropy_floor": floor,
               "gap_to_floor": last["heldout_loss"] / floor - 1, "params": model.num_params(),
               "seconds": last["time"]}
    run.finish(summary)
    return summary
