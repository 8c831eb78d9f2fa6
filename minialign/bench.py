"""``minialign bench``: speed figures, printed, never asserted in a test.

1. pre-training against the entropy floor: how close the held-out loss gets, and how fast;
2. generation with and without the KV cache, at ``new_tokens`` new tokens;
3. training throughput in tokens/s, and as a fraction of the machine's measured matmul FLOP/s
   (model FLOPs per token: 6 N for the weights, forward and backward, plus 12 L T C for attention).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from .generation import generate
from .model import GPT, GPTConfig
from .train import autocast, resolve_device, resolve_dtype


@dataclass
class BenchConfig:
    """Print speed figures: pre-training vs the entropy floor, KV-cache speed-up, tokens/s and MFU."""
    device: str = "auto"
    dtype: str = "float32"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 64
    seq_len: int = 32           # training sequence length for the throughput figure
    new_tokens: int = 256       # tokens generated for the KV-cache figure
    gen_batch: int = 8
    steps: int = 20             # timed training steps
    pretrain_steps: int = 800   # 0 skips the pre-training figure
    seed: int = 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device, dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """Measured FLOP/s of an n x n matmul: the ceiling the MFU figure is a fraction of."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward and backward) + 12 L T C (attention)."""
    n_no_pos = n_params - config.block_size * config.n_embd  # position table is a lookup, no FLOPs
    return 6 * n_no_pos + 12 * config.n_layer * seq_len * config.n_embd


def train_throughput(model: GPT, cfg: BenchConfig, device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)

    def step():
        with autocast(device, cfg.dtype):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    _sync(device)
    tokens_per_s = cfg.batch_size * cfg.seq_len * cfg.steps / (time.perf_counter() - t)
    achieved = tokens_per_s * flops_per_token(model.config, cfg.seq_len, model.num_params())
    peak = matmul_flops(device, resolve_dtype(cfg.dtype) if cfg.dtype != "float32" else torch.float32)
    return {"tokens_per_s": tokens_per_s, "model_flops_per_s": achieved, "matmul_flops_per_s": peak,
            "mfu": achieved / peak}


def generation_speed(model: GPT, cfg: BenchConfig, device) -> dict:
    """Seconds to sample ``new_tokens`` tokens with and without the KV cache (no EOS stop)."""
    prompts = [[1, 3, 5, 6]] * cfg.gen_batch
    out = {}
    for use_cache in (True, False):
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        _sync(device)
        t = time.perf_counter()
        with autocast(device, cfg.dtype):
            generate(model, prompts, cfg.new_tokens, eos_id=-1, pad_id=0, use_cache=use_cache, generator=g)
        _sync(device)
        out["cache" if use_cache else "no_cache"] = time.perf_counter() - t
    out["speedup"] = out["no_cache"] / out["cache"]
    return out


def main(cfg: BenchConfig) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    results = {"device": str(device), "dtype": cfg.dtype, "threads": torch.get_num_threads()}
    if cfg.pretrain_steps > 0:
        from .pretrain import PretrainConfig, main as pretrain
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            s = pretrain(PretrainConfig(out=out, steps=cfg.pretrain_steps, device=str(device), dtype=cfg.dtype,
                                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                        seed=cfg.seed, progress=False))
            results["pretrain"] = {"steps": cfg.pretrain_steps, "seconds": time.perf_counter() - t,
                                   "heldout_loss": s["heldout_loss"], "entropy_floor": s["entropy_floor"],
                                   "gap_to_floor": s["heldout_loss"] / s["entropy_floor"] - 1}
        print(f"pre-training: held-out loss {s['heldout_loss']:.4f} nats/token vs exact floor "
              f"{s['entropy_floor']:.4f} ({100 * results['pretrain']['gap_to_floor']:.2f}% above) "
              f"after {cfg.pretrain_steps} steps in {results['pretrain']['seconds']:.0f} s")
    big = GPTConfig(vocab_size=64, block_size=cfg.new_tokens + 8, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(big).to(device)
    model.eval()
    results["generation"] = gen = generation_speed(model, cfg, device)
    print(f"generation of {cfg.new_tokens} tokens x {cfg.gen_batch} rows: KV cache {gen['cache']:.2f} s, "
          f"no cache {gen['no_cache']:.2f} s, speed-up {gen['speedup']:.1f}x")
    model.train()
    results["train"] = tr = train_throughput(model, cfg, device)
    print(f"training: {tr['tokens_per_s']:,.0f} tokens/s = {tr['model_flops_per_s'] / 1e9:.2f} GFLOP/s, "
          f"{100 * tr['mfu']:.1f}% of the measured matmul peak {tr['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"({model.num_params():,} parameters, batch {cfg.batch_size} x {cfg.seq_len})")
    return results
