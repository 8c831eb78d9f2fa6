"""``minialign bench``: speed figures, printed, never asserted in a test.

For a chosen model size (flags, or ``--preset gpt2`` for the 124M GPT-2 shape, or the real GPT-2
weights with ``--gpt2-path``), device and dtype, it prints:

1. ``pretrain``: pre-training against the entropy floor: how close the held-out loss gets, and how
   fast (the toy world, at the flags' n_layer / n_head / n_embd);
2. ``generation``: sampling ``new_tokens`` tokens with and without the KV cache: tokens/s of each
   and the speed-up. With the cache a new token costs one forward of one token; without it, a
   forward of the whole prefix, so at 256 new tokens the cache should be >= 5x faster;
3. ``train``: training throughput in tokens/s, peak memory, and MFU, the model's FLOP/s as a
   fraction of the machine's *measured* matmul FLOP/s in the same dtype (``matmul_flops``; and,
   on a known GPU in bf16, of its datasheet peak). Model FLOPs per token: 6 N for the weights (forward 2 N, backward 4 N) plus
   12 L T C for attention (PaLM appendix B; nanoGPT's ``estimate_mfu``);
4. ``dpo``: seconds per DPO step (``dpo_step_time``: policy and reference forwards, E9, update);
5. ``grpo``: seconds per GRPO iteration (``grpo_step_time``: sample G answers per question,
   score, E11-E13, update), on the toy world's arithmetic questions with this model's body.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before each part, so it is
that part's peak) and the process's peak resident set size (``ru_maxrss``) on the CPU, which only
grows: read it as "the largest so far".
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .generation import generate
from .model import GPT, GPTConfig
from .train import autocast, resolve_device, resolve_dtype

PARTS = ("pretrain", "generation", "train", "dpo", "grpo")
# the 124M GPT-2 ("gpt2" on the Hugging Face hub): 12 layers, 12 heads, 768 wide, 50257 tokens
GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
# dense bf16 tensor-core peaks from the datasheets (FLOP/s), matched in order against the device name
KNOWN_BF16_PEAKS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))


@dataclass
class BenchConfig:
    """Print speed figures: pre-training vs the entropy floor, KV-cache speed-up, training tokens/s,
    MFU and peak memory, DPO and GRPO step times. --preset gpt2 times the 124M GPT-2 shape."""
    device: str = "auto"
    dtype: str = "float32"      # float32 | bfloat16 (autocast; log-probs and losses stay float32)
    preset: Literal["none", "gpt2"] = "none"  # gpt2: n_layer 12, n_head 12, n_embd 768, vocab 50257, block 1024
    gpt2_path: str = ""         # a GPT-2 checkpoint folder (config.json + model.safetensors) to time instead
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 64
    block_size: int = 0         # 0: just long enough for seq_len and new_tokens
    parts: str = ",".join(PARTS)  # comma-separated subset of: pretrain, generation, train, dpo, grpo
    batch_size: int = 64
    seq_len: int = 32           # training sequence length for the throughput figure
    steps: int = 10             # timed training steps
    new_tokens: int = 256       # tokens generated for the KV-cache figure
    gen_batch: int = 8
    pretrain_steps: int = 200   # the toy pre-training run (800 = the pipeline's default)
    dpo_pairs: int = 16         # preference pairs per DPO step (seq_len tokens each, half response)
    grpo_questions: int = 8     # questions per GRPO iteration
    grpo_group: int = 8         # answers per question (G)
    threads: int = 0            # CPU threads for torch (0: torch's default); 1 is steadier on a shared machine
    seed: int = 0


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


def matmul_flops(device, dtype: str, n: int | None = None, repeats: int | None = None) -> float:
    """Measured FLOP/s of an n x n matmul, the ceiling the MFU figure is a fraction of.

    Run the way the model runs its matmuls: ``F.linear`` on float32 tensors under the same
    autocast (a CPU without bf16 units multiplies bf16 through a slower path than ``a @ b``'s
    fp32 one, and ``nn.Linear`` under autocast takes yet another). The best of 3 rounds, so a
    moment of contention from other processes does not lower the ceiling.
    """
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 1024)  # big enough to saturate the device
    repeats = repeats or (50 if cuda else 2)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = 0.0
    with autocast(device, dtype):
        F.linear(a, b)  # warm-up (kernel selection, casts)
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                F.linear(a, b)
            _sync(device)
            best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t))
    return best


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward and backward) + 12 L T C (attention)."""
    n_no_pos = n_params - config.block_size * config.n_embd  # position table is a lookup, no FLOPs
    return 6 * n_no_pos + 12 * config.n_layer * seq_len * config.n_embd


def model_config(cfg: BenchConfig) -> GPTConfig:
    """The benchmarked shape: the preset, or the flags (block_size long enough for every part)."""
    if cfg.preset == "gpt2":
        shape = dict(GPT2_SHAPE)
    else:
        need = max(cfg.seq_len, cfg.new_tokens + 8)
        shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                     block_size=cfg.block_size or need)
    if shape["block_size"] < max(cfg.seq_len, cfg.new_tokens + 8):
        raise ValueError(f"block_size {shape['block_size']} is shorter than seq_len={cfg.seq_len} or "
                         f"new_tokens={cfg.new_tokens} + an 8-token prompt")
    return GPTConfig(**shape)


# ----------------------------------------------------------------------------------------------
# the algorithm timers: one DPO step, one GRPO iteration, each on a fresh model
# ----------------------------------------------------------------------------------------------


def dpo_step_time(model_config: GPTConfig, batch_size: int, seq_len: int, device="cpu",
                  steps: int = 10, warmup: int = 3, precompute_ref: bool = False, dtype: str = "float32") -> float:
    """Seconds per DPO optimizer step: B pairs of ``seq_len`` tokens (half prompt, half response).

    ``precompute_ref=False`` (the default, as TRL's default) runs the reference forward in every
    step; ``True`` times the step with log pi_ref read from a table.
    """
    from .dpo import chosen_rejected_logps, dpo_loss

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    policy = GPT(model_config).to(device)
    reference = GPT(model_config).to(device).requires_grad_(False).eval()
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(0, model_config.vocab_size, (2 * batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "response_mask": (torch.arange(seq_len, device=device) >= seq_len // 2).long().expand(2 * batch_size, -1)}
    with torch.no_grad():
        ref_w, ref_l = chosen_rejected_logps(reference, batch)

    def step():
        with autocast(device, dtype):
            pi_w, pi_l = chosen_rejected_logps(policy, batch)
        if precompute_ref:
            rw, rl = ref_w, ref_l
        else:
            with torch.no_grad(), autocast(device, dtype):
                rw, rl = chosen_rejected_logps(reference, batch)
        loss, _, _ = dpo_loss(pi_w, pi_l, rw, rl, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # wait for the device

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def grpo_step_time(model_config: GPTConfig, group_size: int = 8, questions: int = 32, device="cpu",
                   steps: int = 5, warmup: int = 1, config=None) -> float:
    """Seconds per GRPO iteration (sampling, scoring, E11-E13 updates) of a fresh model, median.

    ``model_config``'s vocab_size is set from the toy world's tokenizer; ``config`` is a
    ``grpo.GRPOConfig`` (default: its defaults).
    """
    import copy
    import statistics

    from .grpo import GRPOConfig, grpo_iteration
    from .toyworld import ToyWorld, WorldConfig
    from .train import make_optimizer

    device = torch.device(device) if not isinstance(device, torch.device) else device
    world = ToyWorld(WorldConfig(seed=0))
    tok = world.tokenizer
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(model_config, vocab_size=tok.vocab_size)).to(device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    config = config or GRPOConfig(device=str(device), progress=False)
    config = dataclasses.replace(config, group_size=group_size, questions=questions,
                                 batch_size=max(config.batch_size, group_size * questions))
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(0)
    qs = world.arithmetic_questions("train")
    qs = (qs * (questions // len(qs) + 1))[:questions]
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        grpo_iteration(model, ref_model, optimizer, tok, world, qs, config, i, generator)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# the figures
# ----------------------------------------------------------------------------------------------


def train_throughput(model: GPT, cfg: BenchConfig, device) -> dict:
    """Tokens/s of AdamW steps on random tokens (batch_size x seq_len), MFU, peak memory."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)

    def step():
        with autocast(device, cfg.dtype):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _reset_peak_memory(device)
    for _ in range(2):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t
    memory = peak_memory_bytes(device)
    tokens_per_s = cfg.batch_size * cfg.seq_len * cfg.steps / seconds
    achieved = tokens_per_s * flops_per_token(model.config, cfg.seq_len, model.num_params())
    measured = matmul_flops(device, cfg.dtype)
    out = {"tokens_per_s": tokens_per_s, "step_seconds": seconds / cfg.steps, "model_flops_per_s": achieved,
           "matmul_flops_per_s": measured, "mfu": achieved / measured, "peak_memory_bytes": memory}
    peak = known_peak_flops(device, cfg.dtype)
    if peak is not None:
        out.update(datasheet_flops_per_s=peak, mfu_datasheet=achieved / peak)
    return out


def generation_speed(model: GPT, cfg: BenchConfig, device) -> dict:
    """Seconds and tokens/s to sample ``new_tokens`` tokens with and without the KV cache (no EOS stop)."""
    prompts = [[1, 3, 5, 6]] * cfg.gen_batch
    out = {}
    _reset_peak_memory(device)
    for use_cache in (True, False):
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        _sync(device)
        t = time.perf_counter()
        with autocast(device, cfg.dtype):
            generate(model, prompts, cfg.new_tokens, eos_id=-1, pad_id=0, use_cache=use_cache,
                     generator=generator)
        _sync(device)
        key = "cache" if use_cache else "no_cache"
        out[key] = time.perf_counter() - t
        out[key + "_tokens_per_s"] = cfg.gen_batch * cfg.new_tokens / out[key]
    out["speedup"] = out["no_cache"] / out["cache"]
    out["peak_memory_bytes"] = peak_memory_bytes(device)
    return out


def pretrain_figure(cfg: BenchConfig, device) -> dict:
    from .pretrain import PretrainConfig, main as pretrain

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        s = pretrain(PretrainConfig(out=out, steps=cfg.pretrain_steps, device=str(device), dtype=cfg.dtype,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    corpus_size=max(1_000, cfg.pretrain_steps * 64), eval_size=1000,
                                    eval_every=max(1, cfg.pretrain_steps), seed=cfg.seed, progress=False))
    return {"steps": cfg.pretrain_steps, "seconds": time.perf_counter() - t, "heldout_loss": s["heldout_loss"],
            "entropy_floor": s["entropy_floor"], "gap_to_floor": s["heldout_loss"] / s["entropy_floor"] - 1}


def dpo_figure(config: GPTConfig, cfg: BenchConfig, device) -> dict:
    _reset_peak_memory(device)
    seconds = dpo_step_time(config, cfg.dpo_pairs, cfg.seq_len, device=device, steps=3, warmup=1,
                            dtype=cfg.dtype)
    return {"step_seconds": seconds, "pairs": cfg.dpo_pairs, "seq_len": cfg.seq_len,
            "peak_memory_bytes": peak_memory_bytes(device)}


def grpo_figure(config: GPTConfig, cfg: BenchConfig, device) -> dict:
    from .grpo import GRPOConfig

    _reset_peak_memory(device)
    grpo_config = GRPOConfig(device=str(device), dtype=cfg.dtype, progress=False)
    seconds = grpo_step_time(config, group_size=cfg.grpo_group, questions=cfg.grpo_questions, device=device,
                             steps=2, warmup=1, config=grpo_config)
    return {"step_seconds": seconds, "questions": cfg.grpo_questions, "group_size": cfg.grpo_group,
            "max_new_tokens": grpo_config.max_new_tokens, "peak_memory_bytes": peak_memory_bytes(device)}


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(cfg: BenchConfig) -> dict:
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown bench part(s) {unknown}; choose from {list(PARTS)}")
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    resolve_dtype(cfg.dtype)  # a bad --dtype fails here, before any timing
    torch.manual_seed(cfg.seed)
    if cfg.gpt2_path:
        from .gpt2 import load_gpt2
        model = load_gpt2(cfg.gpt2_path, device)
        config = model.config
    else:
        config = model_config(cfg)
        model = GPT(config).to(device)
    results = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "dtype": cfg.dtype, "threads": torch.get_num_threads(),
               "model": {**dataclasses.asdict(config), "params": model.num_params()}}
    print(f"model: {model.num_params():,} parameters (n_layer {config.n_layer}, n_head {config.n_head}, "
          f"n_embd {config.n_embd}, vocab {config.vocab_size}, block {config.block_size}) on "
          f"{results['device_name']}, {cfg.dtype}, {results['threads']} CPU threads")

    if "pretrain" in parts and cfg.pretrain_steps > 0:
        results["pretrain"] = p = pretrain_figure(cfg, device)
        print(f"pre-training (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}): held-out loss {p['heldout_loss']:.4f} "
              f"nats/token vs exact floor {p['entropy_floor']:.4f} ({100 * p['gap_to_floor']:.2f}% above) "
              f"after {p['steps']} steps in {p['seconds']:.0f} s")

    if "generation" in parts:
        model.eval()
        results["generation"] = speed = generation_speed(model, cfg, device)
        verdict = "met" if speed["speedup"] >= 5 else "NOT met"
        print(f"generation of {cfg.new_tokens} tokens x {cfg.gen_batch} rows: KV cache {speed['cache']:.2f} s "
              f"({speed['cache_tokens_per_s']:,.0f} tokens/s), no cache {speed['no_cache']:.2f} s "
              f"({speed['no_cache_tokens_per_s']:,.0f} tokens/s), speed-up {speed['speedup']:.1f}x "
              f"(target >= 5x at 256 new tokens: {verdict if cfg.new_tokens >= 256 else 'n/a, fewer tokens'})")

    if "train" in parts:
        model.train()
        results["train"] = tr = train_throughput(model, cfg, device)
        datasheet = (f", {100 * tr['mfu_datasheet']:.1f}% of the datasheet {tr['datasheet_flops_per_s'] / 1e12:.0f} "
                     f"TFLOP/s" if "mfu_datasheet" in tr else "")
        print(f"training: {tr['tokens_per_s']:,.0f} tokens/s = {tr['model_flops_per_s'] / 1e9:.2f} GFLOP/s, "
              f"MFU {100 * tr['mfu']:.1f}% of the measured matmul {tr['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
              f"{datasheet} (batch {cfg.batch_size} x {cfg.seq_len}, {tr['step_seconds']:.3f} s/step), "
              f"peak memory {_gib(tr['peak_memory_bytes'])}")
    del model  # the DPO and GRPO timers build their own models

    if "dpo" in parts:
        results["dpo"] = d = dpo_figure(config, cfg, device)
        print(f"DPO: {d['step_seconds']:.3f} s/step ({cfg.dpo_pairs} pairs x {cfg.seq_len} tokens, policy + "
              f"reference forward, E9, update), peak memory {_gib(d['peak_memory_bytes'])}")

    if "grpo" in parts:
        results["grpo"] = g = grpo_figure(config, cfg, device)
        print(f"GRPO: {g['step_seconds']:.3f} s/iteration ({cfg.grpo_questions} questions x G={cfg.grpo_group} "
              f"answers of <= {g['max_new_tokens']} tokens: sample, score, E11-E13, update), "
              f"peak memory {_gib(g['peak_memory_bytes'])}")
    return results
