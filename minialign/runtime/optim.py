"""The optimizer and its schedule, and the hook through which an algorithm's step updates the
weights: ``gradient_update(...)`` -> ``update(rows, loss_of) -> Update``, so that the optimizer,
the learning-rate schedule, gradient accumulation and DDP stay out of the algorithm files.

A NaN or inf loss or gradient stops training (``NonFiniteError`` naming the step) before the
optimizer touches the weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import distributed
from .config import TrainConfig
from .files import NonFiniteError


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or scalars)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   step: int, config: TrainConfig) -> float:
    """Backward, clip, step at the scheduled learning rate; returns the pre-clip gradient norm.

    A NaN or inf loss or gradient stops training (``NonFiniteError`` naming the step) before the
    optimizer touches the weights, so nothing non-finite reaches a checkpoint.
    """
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is {loss.item()} at step {step}; stopping before it spreads", step)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _clip_and_step(model, optimizer, step, config)


def accumulated_step(model: torch.nn.Module, parallel: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     micro_batches: list, loss_of, step: int, config: TrainConfig) -> tuple[float, list]:
    """``optimizer_step`` for a global batch in micro-batches, on this rank and the others.

    ``parallel`` is ``distributed.wrap(model)`` (the model itself in one process);
    ``loss_of(micro_batch) -> (mean loss, units, total units, extra)`` as ``distributed.accumulate``.
    Returns the pre-clip gradient norm and each micro-batch's ``extra``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    try:
        extras = distributed.accumulate(parallel, micro_batches, loss_of)
    except FloatingPointError as e:  # a NaN or inf loss, refused before its backward
        raise NonFiniteError(f"at step {step}: {e}", step) from e
    return _clip_and_step(model, optimizer, step, config), extras


@dataclasses.dataclass
class Update:
    """What one optimizer step reports: the pre-clip gradient norm and each micro-batch's ``extra``."""
    grad_norm: float
    extras: list


def gradient_update(model: torch.nn.Module, parallel: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, step: int):
    """The hook an algorithm's step calls for each optimizer step: ``update(rows, loss_of) -> Update``.

    It splits this rank's ``rows`` into ``config.grad_accum`` micro-batches and runs
    ``accumulated_step`` at step ``step``'s learning rate, so that the optimizer, the schedule,
    the micro-batching and DDP stay out of the algorithm files; ``loss_of`` is as in
    ``distributed.accumulate``.
    """
    def update(rows, loss_of) -> Update:
        grad_norm, extras = accumulated_step(model, parallel, optimizer, distributed.split(rows, config.grad_accum),
                                             loss_of, step, config)
        return Update(grad_norm, extras)
    return update


def _clip_and_step(model, optimizer, step: int, config: TrainConfig) -> float:
    """Clip the gradients and step; a NaN or inf gradient stops here, before the weights change."""
    params = [p for p in model.parameters() if p.grad is not None]
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if not torch.isfinite(norm):
        raise NonFiniteError(f"the gradient norm is {float(norm)} at step {step} (a NaN or inf gradient); "
                             "the weights were not updated", step)
    optimizer.step()
    return float(norm)
