"""Beyond one device: data parallelism with ``torch.distributed``, and gradient accumulation.

Launch any stage on N processes (one per GPU, or N CPU processes with the gloo backend)::

    torchrun --nproc_per_node 2 -m minialign dpo --out runs/demo ...

Every process (a *rank*) runs the same stage code on its own device. What differs, written here
once so that an algorithm file only calls it:

- **sharding**: ``batch_size`` is the *global* batch of one optimizer step. Every rank draws the
  same global batch (the data order comes from the same seed on every rank) and keeps its own
  contiguous share (``local_share``), then splits it into ``grad_accum`` micro-batches.
- **gradients**: ``wrap`` puts the model in ``DistributedDataParallel``, which averages the
  gradients of the ranks during ``backward``. ``accumulate`` weights each micro-batch's mean loss
  by its share of the global batch (``units / total_units``, times the number of ranks to undo
  DDP's average), so one optimizer step sees the gradient of the mean over the global batch:
  the same update as one process with the whole batch in one forward (to float32 rounding).
- **metrics**: ``mean_over_ranks`` averages a dict of floats over the ranks.
- **writing**: only rank 0 writes the run folder (``is_main``); the others train and stay silent.

Rollouts (PPO, GRPO) are sharded by prompt: each rank samples its share of the iteration's
prompts with its own sampling generator (rank 0's is the single-process one), so G answers of a
GRPO group always live on one rank and E11-E12 need no communication.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """Each rank gets its own GPU (``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device_name: str = "auto"):
    """Join torchrun's process group for the duration of the block (nothing without torchrun).

    nccl for CUDA, gloo for the CPU. Leaves the group however the block ends.
    """
    if not launched() or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and device_name != "cpu" and not device_name.startswith("mps")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield
        # every rank leaves together: gloo's teardown can abort a rank ("terminate called without an
        # active exception") whose peer has already destroyed its end of the group
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_share(items, n_total: int | None = None):
    """This rank's contiguous share of a global batch (a list or a tensor of equal-size shares)."""
    n = len(items) if n_total is None else n_total
    per = n // world_size()
    return items[rank() * per:(rank() + 1) * per]


def sampling_generator(device, seed: int) -> torch.Generator:
    """The generator a rollout samples with: under torchrun each rank samples its own share of the
    prompts with its own generator, rank 0's the one a single process would have."""
    return torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank())


def split(items, parts: int) -> list:
    """``items`` in ``parts`` consecutive pieces (the micro-batches), sizes differing by at most one,
    none empty, nothing left out."""
    n = len(items)
    bounds = [i * n // parts for i in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


class _Closure(torch.nn.Module):
    """Runs any function of the model inside one forward, so that DDP sees it.

    DDP averages gradients only for work done inside its own forward. The algorithms compute a
    loss with more than ``model(x)`` (``model.hidden``, ``model.lm_head``, a shared prompt's KV
    cache), so the whole loss of a micro-batch runs as this module's forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


def wrap(model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` under torchrun; the model itself in one process.

    Give the result to ``optim.accumulated_step``: it computes each micro-batch's loss inside
    DDP's forward, whose backward averages the gradients of the ranks. Sampling, evaluation and
    saving use the model itself.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(_Closure(model), device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


def accumulate(parallel: torch.nn.Module, micro_batches: list, loss_of) -> list:
    """Backward through every micro-batch; gradients add up to those of the global mean loss.

    ``loss_of(micro_batch) -> (loss, units, total_units, extra)``: ``loss`` is the micro-batch's
    *mean* over its ``units`` (tokens, pairs or answers), ``total_units`` the count over the
    global batch (every rank's micro-batches together). Returns the ``extra`` of each call.
    DDP averages over ranks, so each loss is scaled by world_size * units / total_units; the
    all-reduce runs once, after the last micro-batch (``no_sync`` before it).
    """
    ddp = hasattr(parallel, "no_sync")
    extras = []
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with parallel.no_sync() if ddp and not last else contextlib.nullcontext():
            loss, units, total_units, extra = parallel(loss_of, micro) if ddp else loss_of(micro)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} in micro-batch {i}; stopping before it spreads")
            weight = world_size() * float(units) / float(total_units)
            (loss if weight == 1.0 else loss * weight).backward()
        extras.append(extra)
    return extras


def mean_over_ranks(metrics: dict) -> dict:
    """Each float averaged over the ranks (every rank must call it with the same keys)."""
    if world_size() == 1 or not metrics:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values)
    out = dict(metrics)
    out.update({k: v / world_size() for k, v in zip(keys, values.tolist())})
    return out


def sum_over_ranks(x: float) -> float:
    """A number summed over the ranks (e.g. a token count for a global normaliser)."""
    if world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def global_mean(values_units: list[tuple[float, float]], total_units: float) -> float:
    """The mean over the global batch of per-micro-batch means, each with its count of units.

    One micro-batch in one process: its value as it is (no rounding from * n / n).
    """
    if len(values_units) == 1 and world_size() == 1:
        return float(values_units[0][0])
    return sum_over_ranks(sum(float(v) * u for v, u in values_units)) / total_units


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)
