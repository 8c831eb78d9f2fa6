"""What a speed figure is made of, for ``minialign bench`` and ``benchmarks/``: timing that waits for
the device, two things timed alternately so that load falls on both alike, the model FLOPs a step
runs (``FlopCounter``), and the DPO step and GRPO iteration that the figures time."""

from __future__ import annotations

import itertools
import resource
import statistics
import sys
import time
from typing import Callable

import torch

from ..model import GPTConfig
from ..ops import inference
from ..runtime.devices import autocast

# the 124M GPT-2 ("gpt2" on the Hugging Face hub): 12 layers, 12 heads, 768 wide, 50257 tokens
GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
# dense bf16 tensor-core peaks from the datasheets (FLOP/s), matched in order against the device name
KNOWN_BF16_PEAKS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> int:
    """CUDA: peak allocated by tensors since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # Linux reports kilobytes, macOS bytes


def known_peak_flops(device, dtype: str) -> float | None:
    """The datasheet dense bf16/fp16 FLOP/s of a known GPU, else None (then only measured MFU)."""
    if device.type != "cuda" or dtype not in ("bfloat16", "float16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_BF16_PEAKS if key in name), None)


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward and backward) + 12 L T C (attention)."""
    n_no_pos = n_params - config.block_size * config.n_embd  # position table is a lookup, no FLOPs
    return 6 * n_no_pos + 12 * config.n_layer * seq_len * config.n_embd




# ----------------------------------------------------------------------------------------------
# timing that holds still on a shared machine, and the FLOPs a step runs
# ----------------------------------------------------------------------------------------------


def time_alternately(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device=None, between: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions run in turn (a, b, a, b, ...).

    Alternating puts any load from other processes on every function alike, so a ratio of two
    of them holds while the absolute seconds move; ``warmup`` rounds are run first, untimed.
    ``between`` (untimed) runs after every timed round: ``Ceiling.measure``, so that the matmul
    ceiling is measured under the same load as the steps it is the ceiling of.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device or "cpu")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            _sync(device)
            t = time.perf_counter()
            call()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        if between is not None and i >= warmup:
            between()
    return times


def spread(times: list[float]) -> dict[str, float]:
    """min (the least disturbed run: targets are judged on it) and median of repeated timings."""
    return {"min": min(times), "median": statistics.median(times)}


class FlopCounter:
    """Model FLOPs of every forward (and its backward) that GPTs ``models`` run while the counter is on.

    Counted from the tokens each forward sees, at ``model.hidden`` (logits, hidden states, cached
    prefills) and ``model.decode`` (generation's steps): per real token (attention mask 1; a
    decode step counts every row, finished ones too, since it computes them) 2 N for the weights
    (N: parameters without the position table, which is a lookup) and 4 L C S for attention over
    S keys (QK^T and AV); three times that when the forward builds a graph (the backward costs
    twice the forward). The convention of ``flops_per_token`` (PaLM appendix B, nanoGPT): no
    recomputation, and S counts every key in view, not half of them.
    """

    def __init__(self, *models):
        self.models, self.flops = models, 0.0

    def __enter__(self) -> "FlopCounter":
        for model in self.models:  # an instance attribute shadows the method
            model.hidden = self._counting(model, model.hidden)
            if hasattr(model, "decode"):
                model.decode = self._counting_decode(model, model.decode)
        return self

    def __exit__(self, *exc) -> None:
        for model in self.models:
            del model.hidden
            if "decode" in vars(model):
                del model.decode

    def _count(self, model, B: int, T: int, real: int, cache) -> None:
        c = model.config
        n_weights = sum(p.numel() for p in model.parameters()) - c.block_size * c.n_embd
        keys = (cache.length if cache is not None else 0) + T
        forward = real * (2 * n_weights + 4 * c.n_layer * c.n_embd * keys)  # a minialign GPT's layers
        backward = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        self.flops += forward * (3 if backward else 1)

    def _counting(self, model, hidden):
        def counted(idx, attention_mask=None, cache=None):
            B, T = idx.shape
            self._count(model, B, T, B * T if attention_mask is None else int(attention_mask[:, -T:].sum()), cache)
            return hidden(idx, attention_mask, cache)
        return counted

    def _counting_decode(self, model, decode):
        def counted(idx, positions, attn_mask, cache):
            self._count(model, *idx.shape, idx.numel(), cache)
            return decode(idx, positions, attn_mask, cache)
        return counted


# ----------------------------------------------------------------------------------------------
# the algorithm steps, as their training loops take them (``stages.dpo.main``, ``grpo.grpo_iteration``)
# ----------------------------------------------------------------------------------------------


def random_preference_batch(vocab_size: int, pairs: int, prompt_len: int, response_len: int,
                            generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """A ``dpo.preference_batch`` of random tokens: rows b and B + b share their prompt."""
    prompts = torch.randint(0, vocab_size, (pairs, prompt_len), generator=generator)
    responses = torch.randint(0, vocab_size, (2 * pairs, response_len), generator=generator)
    ids = torch.cat([prompts.repeat(2, 1), responses], 1).to(device)            # (2B, P + R)
    response_mask = (torch.arange(prompt_len + response_len, device=device) >= prompt_len).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "response_mask": response_mask.expand(2 * pairs, -1)}


def dpo_step(policy, reference, batches: list[dict[str, torch.Tensor]], config=None) -> Callable[[], float]:
    """One DPO optimizer step of ``stages.dpo.main`` per call, on ``batches`` in turn (cycled).

    ``config`` (a ``stages.dpo.DPOConfig``) gives beta, the learning rate and clipping, ``dtype``,
    ``share_prompt`` and ``precompute_ref_logps`` (then log pi_ref is read from a table computed
    here, untimed, as ``stages.dpo.main`` precomputes its table; else the reference runs in every step).
    """
    from ..dpo import chosen_rejected_logps, dpo_loss
    from ..stages.dpo import DPOConfig
    from ..runtime.optim import make_optimizer, optimizer_step

    config = config or DPOConfig(progress=False)
    device = batches[0]["input_ids"].device
    optimizer = make_optimizer(policy, config)

    def reference_logps(batch):  # no gradient: inference mode (``ops.inference``), as dpo.main's reference pass
        with autocast(device, config.dtype):
            return inference(chosen_rejected_logps, reference, batch, config.share_prompt)
    tables = [reference_logps(b) for b in batches] if config.precompute_ref_logps else None
    order, steps = itertools.cycle(range(len(batches))), itertools.count()

    def step() -> float:
        i = next(order)
        with autocast(device, config.dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batches[i], config.share_prompt)
        ref_w, ref_l = tables[i] if tables is not None else reference_logps(batches[i])
        loss, _, _ = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta)  # E9
        return optimizer_step(policy, optimizer, loss, next(steps), config)
    return step


def grpo_step(model, ref_model, tok, world, question_batches: list[list[dict]], config) -> Callable[[], dict]:
    """One ``grpo.grpo_iteration`` (sample, score, E11-E13 updates) per call, on ``question_batches``
    in turn (cycled)."""
    from ..grpo import grpo_iteration
    from ..runtime.optim import gradient_update, make_optimizer

    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batches, steps = itertools.cycle(question_batches), itertools.count()
    return lambda: grpo_iteration(model, ref_model, tok, world, next(batches), config, generator,
                                  gradient_update(model, model, optimizer, config, next(steps)), config.dtype,
                                  member=config).metrics
