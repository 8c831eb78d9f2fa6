"""The loop that pre-training and SFT share: ``fit_lm`` calls their step (``pretrain.pretrain_step``,
``sft.sft_step``) once per optimizer step and logs the train and held-out loss."""

from __future__ import annotations

import torch

from ..data import InfiniteMinibatches, collate
from ..pretrain import lm_loss
from ..runtime import distributed
from ..runtime.config import TrainConfig
from ..runtime.devices import autocast, seed_everything
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.run import Run


@torch.no_grad()
def held_out_loss(model, held_out: tuple[list, list], dtype: str, pad_id: int = 0) -> float:
    """E0a (E0b) on the held-out (prompts, responses): the mean over all their response tokens."""
    device, block = next(model.parameters()).device, model.config.block_size
    model.eval()
    total, count = 0.0, 0
    with autocast(device, dtype):
        for i in range(0, len(held_out[0]), 256):
            b = collate(held_out[0][i:i + 256], held_out[1][i:i + 256], pad_id, block, device)
            n = b["response_mask"][:, 1:].sum().item()
            total += lm_loss(model(b["input_ids"], b["attention_mask"]), b["input_ids"], b["response_mask"]).item() * n
            count += n
    model.train()
    return total / count


def fit_lm(model, train: tuple[list, list], held_out: tuple[list, list] | None, config: TrainConfig, run: Run,
           desc: str, step_fn, extra_metrics=None) -> dict:
    """Train on (prompts, responses) token lists; log the train loss, and every ``config.eval_every``
    steps the held-out loss and ``extra_metrics(model)``. Returns the last logged row.

    ``step_fn(model, prompts, responses, update) -> pretrain.LMStepResult`` is one optimizer step
    on the global batch (``config.batch_size`` rows, shared out over the ranks and ``grad_accum``
    micro-batches by the ``update`` hook).
    """
    generator = seed_everything(config.seed)  # data order
    optimizer = make_optimizer(model, config)
    parallel = distributed.wrap(model)  # DDP under torchrun
    prompts, responses = train
    batches = InfiniteMinibatches(len(prompts), config.batch_size, generator)

    model.train()
    bar = run.loop(config.steps, desc, model=model, optimizer=optimizer, batches=batches)
    for step in bar:
        idx = next(batches).tolist()  # the global batch, the same on every rank
        result = step_fn(model, [prompts[i] for i in idx], [responses[i] for i in idx],
                         update=gradient_update(model, parallel, optimizer, config, step))
        last = step == config.steps - 1
        if step % config.log_every == 0 or last:
            metrics = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": optimizer.param_groups[0]["lr"]}
            if (step % config.eval_every == 0 or last) and held_out is not None:
                metrics["heldout_loss"] = held_out_loss(model, held_out, config.dtype)
            if (step % config.eval_every == 0 or last) and extra_metrics is not None:
                metrics.update(extra_metrics(model))
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{result.loss:.3f}")
    return run.rows[-1]
