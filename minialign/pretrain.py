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

from . import distributed
from .data import InfiniteMinibatches, collate
from .datafiles import text_data
from .loading import load_model, save_model
from .model import GPT, GPTConfig
from .ops import masked_mean, token_logps
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, accumulated_step, autocast, check_range, make_optimizer, require, resolve_device,
                    seed_everything, stage)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    r"""E0a, E0b: the mean of $-\log\pi_\theta(x_t\mid x_{<t})$ over the tokens where ``response_mask`` is 1.

    logits (B, T, V) from the model on ``input_ids`` (B, T); position t-1 predicts token t.
    """
    # Exercise lm_loss (E0a, E0b): from here to the end of the function.
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1), E1 per token
    return -masked_mean(logps, response_mask[:, 1:])


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


def fit_lm(model: GPT, train: tuple[list, list], held_out: tuple[list, list] | None, config: TrainConfig,
           run: Run, desc: str, eval_every: int, extra_metrics=None) -> dict:
    """Minimise ``lm_loss`` on (prompts, responses) token lists; log train and held-out loss.

    Shared by pre-training (prompt = ``<bos>``) and SFT (prompt = the chat prompt). Each step's
    ``batch_size`` rows are shared out over the ranks and ``grad_accum`` micro-batches; the
    loss is the mean over every response token of the global batch (``distributed``).
    """
    device = next(model.parameters()).device
    generator = seed_everything(config.seed)  # data order
    optimizer = make_optimizer(model, config)
    parallel = distributed.wrap(model)  # DDP under torchrun
    prompts, responses = train
    distributed.check_divisible(config.batch_size, config.grad_accum)
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

    def loss_of(rows: list[int]):
        b = collate([prompts[i] for i in rows], [responses[i] for i in rows], pad, block, device)
        with autocast(device, config.dtype):
            logits = model(b["input_ids"], b["attention_mask"])
        loss = lm_loss(logits, b["input_ids"], b["response_mask"])
        n = sum(len(responses[i]) for i in rows)  # = response_mask[:, 1:].sum(): tokens in the mean
        return loss, n, total_tokens, (loss.detach(), n)

    model.train()
    bar = run.loop(config.steps, desc, model=model, optimizer=optimizer, batches=batches)
    for step in bar:
        idx = next(batches).tolist()  # the global batch, the same on every rank
        total_tokens = sum(len(responses[i]) for i in idx)
        micro = distributed.split(distributed.local_share(idx), config.grad_accum)
        grad_norm, parts = accumulated_step(model, parallel, optimizer, micro, loss_of, step, config)
        loss = distributed.global_mean(parts, total_tokens)
        last = step == config.steps - 1
        if step % config.log_every == 0 or last:
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
            if (step % eval_every == 0 or last) and held_out is not None:
                metrics["heldout_loss"] = held_out_loss()
            if (step % eval_every == 0 or last) and extra_metrics is not None:
                metrics.update(extra_metrics(model))
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{loss:.3f}")
    return run.rows[-1]


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

    def docs(lines):  # a document is a "response" to the prompt <bos>
        return [[tok.bos_id]] * len(lines), [tok.document(s)[1:] for s in lines]

    reports, floor = {}, None
    if config.data:  # refused here, before the run folder exists, if a row is bad
        *train, reports["data"] = text_data(config.data, tok, model.config.block_size, config.max_length)
        held_out = None
        if config.eval_data:
            *held_out, reports["eval_data"] = text_data(config.eval_data, tok, model.config.block_size,
                                                        config.max_length)
        for r in reports.values():
            distributed.print_main(r.describe())
    else:
        train = docs(world.pretrain_corpus(config.corpus_size, seed=config.seed))
        held_out = docs(world.pretrain_corpus(config.eval_size, seed=config.seed + 10_000))
        floor = world.corpus_entropy()["nats_per_token"]
        longest = max(len(x) + len(y) for rows in (train, held_out) for x, y in zip(*rows))
        require(config, "block_size", longest <= config.block_size,
                f">= {longest} (the longest line of the toy corpus, in tokens)")
    run = Run(config, "pretrain")
    last = fit_lm(model, train, held_out, config, run, "pretrain", config.eval_every)
    save_model(model, tok, run.dir)
    run.plot({"loss": "training batch", "heldout_loss": "held-out text"}, "loss.png", "pre-training loss (E0a)",
             hlines={f"exact entropy floor {floor:.3f}": floor} if floor else None,
             ylabel="loss, nats per token", xlabel="optimizer step",
             ylim=(0.95 * floor, 1.5 * floor) if floor else None,  # zoom on the approach to the floor
             caption="The loss falls towards the corpus's exact entropy (dashed): no model can go below it."
             if floor else "The language-modelling loss on your text, training batches and held-out text.")
    if floor is not None:
        summary = {"heldout_loss": last["heldout_loss"], "entropy_floor": floor,
                   "gap_to_floor": last["heldout_loss"] / floor - 1, "params": model.num_params(),
                   "seconds": last["time"]}
    else:  # your own text: no known floor
        summary = {"loss": last["loss"], "heldout_loss": last.get("heldout_loss"), "params": model.num_params(),
                   "seconds": last["time"], **{k: r.as_dict() for k, r in reports.items()}}
    run.finish(summary)
    return summary
