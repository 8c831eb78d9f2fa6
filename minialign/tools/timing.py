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


def page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel handed it (zeroed) on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


MALLOC = ("glibc", "keep")  # a benchmark's --malloc


def use_malloc(mode: str) -> None:
    """A benchmark's ``--malloc``: ``glibc`` leaves glibc's malloc as the process starts, ``keep``
    keeps freed memory in the process (``runtime.devices.keep_freed_memory``, as the stages run)."""
    from ..runtime.devices import keep_freed_memory
    if mode == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep needs Linux with glibc and no MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set")


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


def random_preference_pairs(vocab_size: int, pairs: int, prompt_len: int, response_len: int,
                            generator: torch.Generator) -> dict[str, list[list[int]]]:
    """Pairs of random tokens as ``dpo.tokenize_pairs`` gives them: chosen and rejected share their
    prompt, every prompt and response of one length (no padding)."""
    def rows(n, length):
        return torch.randint(0, vocab_size, (n, length), generator=generator).tolist()
    return {"prompt": rows(pairs, prompt_len), "chosen": rows(pairs, response_len),
            "rejected": rows(pairs, response_len)}


def dpo_step(policy, reference, pairs: dict[str, list[list[int]]], config=None, pad_id: int = 0) -> Callable[[], object]:
    """One ``dpo.dpo_step`` per call, as ``stages.dpo.main`` runs it, on ``config.batch_size`` of
    ``pairs`` after another (cycled; ``pairs`` as ``dpo.tokenize_pairs`` gives them).

    ``config`` (a ``stages.dpo.DPOConfig``) gives beta, the optimizer, ``grad_accum``, ``dtype``,
    ``share_prompt`` and ``precompute_ref_logps`` (then log pi_ref of every pair is computed here,
    untimed, by ``dpo.pair_logps`` as the stage precomputes it; else the reference runs in every step).
    """
    from types import SimpleNamespace

    from ..dpo import dpo_step as step_of_dpo, pair_logps
    from ..stages.dpo import DPOConfig
    from ..runtime.optim import gradient_update, make_optimizer

    config = config or DPOConfig(progress=False)
    device = next(policy.parameters()).device
    n = len(pairs["prompt"])
    if n % config.batch_size:
        raise ValueError(f"{n} pairs do not split into batches of --batch-size {config.batch_size}")
    optimizer = make_optimizer(policy, config)
    if config.precompute_ref_logps:
        chosen, rejected = pair_logps(reference, pairs, pad_id, device, config.dtype, share_prompt=config.share_prompt)
        reference = {"chosen": chosen, "rejected": rejected}
    tokenizer = SimpleNamespace(pad_id=pad_id)  # all that dpo.dpo_step reads of its tokenizer
    starts, steps = itertools.cycle(range(0, n, config.batch_size)), itertools.count()

    def step():
        start, i = next(starts), next(steps)
        return step_of_dpo(policy, reference, tokenizer, pairs, list(range(start, start + config.batch_size)), config,
                           gradient_update(policy, policy, optimizer, config, i), config.dtype)
    return step


def grpo_step(policy, reference, tok, world, question_batches: list[list[dict]], config) -> Callable[[], dict]:
    """One ``grpo.grpo_iteration`` (sample, score, E11-E13 updates) per call, on ``question_batches``
    in turn (cycled)."""
    from ..grpo import grpo_iteration
    from ..runtime.optim import gradient_update, make_optimizer

    device = next(policy.parameters()).device
    optimizer = make_optimizer(policy, config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batches, steps = itertools.cycle(question_batches), itertools.count()
    return lambda: grpo_iteration(policy, reference, tok, world, next(batches), config, generator,
                                  gradient_update(policy, policy, optimizer, config, next(steps)), config.dtype,
                                  member=config).metrics
