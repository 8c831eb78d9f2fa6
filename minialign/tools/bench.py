"""``minialign bench``: speed figures, printed, never asserted in a test.

For a chosen model size (flags, or ``--preset gpt2`` for the 124M GPT-2 shape, or the real GPT-2
weights with ``--gpt2-path``), device and dtype, it prints:

1. ``pretrain``: pre-training against the entropy floor: how close the held-out loss gets, and how
   fast (the toy world, at the flags' n_layer / n_head / n_embd);
2. ``generation``: sampling ``new_tokens`` tokens with and without the KV cache: tokens/s of each
   and the speed-up. With the cache a new token costs one forward of one token; without it, a
   forward of the whole prefix, so at 256 new tokens the cache should be >= 5x faster;
3. ``train``: training throughput in tokens/s, peak memory, and MFU, the model's FLOP/s as a
   fraction of the machine's *measured* matmul FLOP/s in the same dtype (``roofline.Ceiling``; and,
   on a known GPU in bf16, of its datasheet peak). Model FLOPs per token: 6 N for the weights
   (forward 2 N, backward 4 N) plus 12 L T C for attention (PaLM appendix B; nanoGPT's ``estimate_mfu``);
4. ``dpo``: a DPO step (``dpo.dpo_step``, as training runs it: the batch built from token lists,
   policy forward and backward, reference forward, E9, AdamW)
   with the prompt shared by chosen and rejected (``ops.prefill``) and with the plain forward;
5. ``grpo``: a GRPO iteration (``grpo_step``: sample G answers per question, score, E11-E13,
   updates) on the toy world's arithmetic questions, shared and plain.

For DPO and GRPO it prints the model FLOPs each step runs (``FlopCounter``: the shared step runs
fewer, each prompt once), the FLOP/s achieved and its fraction of the measured FLOP/s of the
model's own largest matmul (the roofline of a step made of such matmuls); for decoding, the same.

**Ceilings that cannot be beaten** (``roofline.py``). On the CPU it first prints the theoretical
peak (vector width, FMA, FMA units, clock: which were read from the OS and which assumed). The
matmul ceiling is measured in short bursts *between* the timed steps, under the same load, and
is the best burst; a fraction above 100 % is never printed: the ceiling is remeasured, and if the
step still beats it, the line says the ceiling measurement was disturbed.

**Figures that hold still.** Every timed figure is repeated (``--repeats``, ``--steps``) and
printed as its min and its median; a target is judged on the min, the least disturbed run. Two
things compared (cache and no cache, shared and plain) run alternately (``time_alternately``),
so load from other processes falls on both alike and their ratio holds on a busy machine.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before each part, so it is
that part's peak) and the process's peak resident set size (``ru_maxrss``) on the CPU, which only
grows: read it as "the largest so far".
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..generation import generate
from ..model import GPT, GPTConfig
from .roofline import Ceiling, cpu_peak, matmul_flops, percent
from .timing import (GPT2_SHAPE, KNOWN_BF16_PEAKS, FlopCounter, _reset_peak_memory, dpo_step,  # noqa: F401
                     flops_per_token, grpo_step, known_peak_flops, peak_memory_bytes, random_preference_pairs,
                     spread, time_alternately)
from ..runtime.config import Config, check_range, require
from ..runtime.devices import autocast, keep_freed_memory, resolve_device, resolve_dtype, set_threads

PARTS = ("pretrain", "generation", "train", "dpo", "grpo")


@dataclass
class BenchConfig(Config):
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
    steps: int = 10             # timed training steps (each timed: min and median)
    repeats: int = 5            # timed runs of the generation, DPO and GRPO figures (min and median; targets on the min)
    new_tokens: int = 256       # tokens generated for the KV-cache figure
    gen_batch: int = 8
    pretrain_steps: int = 200   # the toy pre-training run (800 = the pipeline's default)
    dpo_pairs: int = 16         # preference pairs per DPO step (seq_len tokens each)
    dpo_prompt_len: int = 8     # prompt tokens of each DPO pair, shared by chosen and rejected; the rest is response
    grpo_questions: int = 8     # questions per GRPO iteration
    grpo_group: int = 8         # answers per question (G)
    threads: int = 0            # CPU threads for torch (0: torch's default); 1 is steadier on a shared machine
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "steps", "repeats", "new_tokens",
                     "gen_batch", "dpo_pairs", "dpo_prompt_len", "grpo_questions"):
            check_range(self, name, 1)
        for name in ("block_size", "pretrain_steps", "threads", "seed"):
            check_range(self, name, 0)
        require(self, "n_head", self.n_embd % self.n_head == 0, f"a divisor of --n-embd ({self.n_embd})")
        check_range(self, "seq_len", 2)
        check_range(self, "grpo_group", 2)  # a group of one answer has no baseline


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
# the figures
# ----------------------------------------------------------------------------------------------


def train_throughput(model: GPT, cfg: BenchConfig, device, ceiling: Ceiling) -> dict:
    """Seconds per AdamW step on random tokens (batch_size x seq_len), each of ``steps`` steps timed
    (a matmul burst of ``ceiling`` after each): tokens/s and MFU at the fastest step and the
    median one, peak memory."""
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
    times = time_alternately({"train": step}, cfg.steps, warmup=2, device=device, between=ceiling.measure)
    seconds = spread(times["train"])
    memory = peak_memory_bytes(device)
    tokens = cfg.batch_size * cfg.seq_len
    flops = tokens * flops_per_token(model.config, cfg.seq_len, model.num_params())
    out = {"step_seconds": seconds["min"], "step_seconds_median": seconds["median"],
           "tokens_per_s": tokens / seconds["min"], "tokens_per_s_median": tokens / seconds["median"],
           "model_flops_per_s": flops / seconds["min"], "mfu": ceiling.fraction(flops / seconds["min"]),
           "mfu_median": ceiling.fraction(flops / seconds["median"]), "matmul_flops_per_s": ceiling.best,
           "peak_memory_bytes": memory}
    peak = known_peak_flops(device, cfg.dtype)
    if peak is not None:
        out.update(datasheet_flops_per_s=peak, mfu_datasheet=out["model_flops_per_s"] / peak)
    return out


def generation_speed(model: GPT, cfg: BenchConfig, device, ceiling: Ceiling) -> dict:
    """Seconds and tokens/s to sample ``new_tokens`` tokens with and without the KV cache (no EOS
    stop), alternated ``repeats`` times (a matmul burst of ``ceiling`` after each round); the
    speed-up is judged on the fastest run of each. With the cache: the model FLOPs of a run
    (``FlopCounter``: prefill and every decode step) and their fraction of the ceiling."""
    prompts = [[1, 3, 5, 6]] * cfg.gen_batch

    def sample(use_cache: bool):
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast(device, cfg.dtype):
            generate(model, prompts, cfg.new_tokens, eos_id=-1, pad_id=0, use_cache=use_cache, generator=generator)

    with FlopCounter(model) as counter:
        sample(True)
    _reset_peak_memory(device)
    times = time_alternately({"cache": lambda: sample(True), "no_cache": lambda: sample(False)},
                             cfg.repeats, warmup=1, device=device, between=ceiling.measure)
    out = {"cache_flops": counter.flops}
    for key, t in times.items():
        out[key], out[key + "_median"] = spread(t)["min"], spread(t)["median"]
        out[key + "_tokens_per_s"] = cfg.gen_batch * cfg.new_tokens / out[key]
    out["speedup"] = out["no_cache"] / out["cache"]
    out["speedup_median"] = out["no_cache_median"] / out["cache_median"]
    out["cache_flops_per_s"] = counter.flops / out["cache"]
    out["cache_roofline"] = ceiling.fraction(out["cache_flops_per_s"])
    out["matmul_flops_per_s"] = ceiling.best
    out["peak_memory_bytes"] = peak_memory_bytes(device)
    return out


def pretrain_figure(cfg: BenchConfig, device) -> dict:
    from ..stages.pretrain import PretrainConfig, main as pretrain

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        s = pretrain(PretrainConfig(out=out, steps=cfg.pretrain_steps, device=str(device), dtype=cfg.dtype,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    corpus_size=max(1_000, cfg.pretrain_steps * 64), eval_size=1000,
                                    eval_every=max(1, cfg.pretrain_steps), seed=cfg.seed, progress=False))
    return {"steps": cfg.pretrain_steps, "seconds": time.perf_counter() - t, "heldout_loss": s["heldout_loss"],
            "entropy_floor": s["entropy_floor"], "gap_to_floor": s["heldout_loss"] / s["entropy_floor"] - 1}


def _sharing_figure(steps: dict[str, Callable], counters: dict[str, FlopCounter], cfg: BenchConfig,
                    device, ceiling: Ceiling) -> dict:
    """Time the shared and the plain step alternately (a matmul burst of ``ceiling`` after each
    round); FLOPs per step and FLOP/s for each, and their fraction of the ceiling."""
    _reset_peak_memory(device)
    for counter in counters.values():
        counter.__enter__()
    try:
        times = time_alternately(steps, cfg.repeats, warmup=1, device=device, between=ceiling.measure)
    finally:
        for counter in counters.values():
            counter.__exit__()
    out = {"peak_memory_bytes": peak_memory_bytes(device)}
    for name, t in times.items():
        flops = float(counters[name].flops) / (cfg.repeats + 1)  # the mean step (the warm-up counted too)
        seconds = spread(t)
        out[name] = {"seconds": seconds["min"], "seconds_median": seconds["median"], "flops": flops,
                     "flops_per_s": flops / seconds["min"], "flops_per_s_median": flops / seconds["median"],
                     "roofline": ceiling.fraction(flops / seconds["min"])}
    out["matmul_flops_per_s"] = ceiling.best  # after every remeasurement the fractions asked for
    out["speedup"] = out["plain"]["seconds"] / out["shared"]["seconds"]
    out["speedup_median"] = out["plain"]["seconds_median"] / out["shared"]["seconds_median"]
    return out


def model_ceiling(config: GPTConfig, device, dtype: str) -> Ceiling:
    """The ceiling of every figure: the model's own MLP matmul, 4096 tokens x C -> 4C, measured in
    bursts between the timed steps."""
    return Ceiling(device, dtype, shape=(4096, config.n_embd, 4 * config.n_embd))


def dpo_figure(config: GPTConfig, cfg: BenchConfig, device, ceiling: Ceiling) -> dict:
    """A DPO step (policy forward and backward, reference forward, E9, AdamW) with the shared
    prompt and with the plain forward, alternated, from the same fresh model."""
    from ..stages.dpo import DPOConfig

    P = cfg.dpo_prompt_len
    if not 1 <= P < cfg.seq_len:
        raise ValueError(f"dpo_prompt_len must be in [1, seq_len={cfg.seq_len}), got {P}")
    pairs = random_preference_pairs(config.vocab_size, cfg.dpo_pairs, P, cfg.seq_len - P,
                                    torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    start = GPT(config).to(device)
    steps, counters = {}, {}
    for name, share in (("shared", True), ("plain", False)):
        policy, reference = copy.deepcopy(start), copy.deepcopy(start).requires_grad_(False).eval()
        dpo_config = DPOConfig(dtype=cfg.dtype, batch_size=cfg.dpo_pairs, share_prompt=share,
                               precompute_ref_logps=False, progress=False)
        steps[name], counters[name] = dpo_step(policy, reference, pairs, dpo_config), FlopCounter(policy, reference)
    return {"pairs": cfg.dpo_pairs, "prompt_len": P, "seq_len": cfg.seq_len,
            **_sharing_figure(steps, counters, cfg, device, ceiling)}


def grpo_figure(config: GPTConfig, cfg: BenchConfig, device, ceiling: Ceiling) -> dict:
    """A GRPO iteration (sample G answers per question, score, E11-E13 updates: ``grpo.grpo_iteration``
    with its defaults, one minibatch of all answers) with the shared prompt and without, alternated."""
    from ..stages.grpo import GRPOConfig
    from ..toyworld import ToyWorld, WorldConfig

    world = ToyWorld(WorldConfig(seed=0))
    tok = world.tokenizer
    questions = world.arithmetic_questions("train")
    questions = (questions * (cfg.grpo_questions // len(questions) + 1))[:cfg.grpo_questions]
    torch.manual_seed(cfg.seed)
    start = GPT(dataclasses.replace(config, vocab_size=tok.vocab_size)).to(device)
    steps, counters = {}, {}
    for name, share in (("shared", True), ("plain", False)):
        policy, reference = copy.deepcopy(start), copy.deepcopy(start).eval().requires_grad_(False)
        grpo_config = GRPOConfig(device=str(device), dtype=cfg.dtype, progress=False, seed=cfg.seed,
                                 group_size=cfg.grpo_group, questions=cfg.grpo_questions,
                                 batch_size=cfg.grpo_group * cfg.grpo_questions, share_prompt=share)
        steps[name] = grpo_step(policy, reference, tok, world, [questions], grpo_config)
        counters[name] = FlopCounter(policy, reference)
    return {"questions": cfg.grpo_questions, "group_size": cfg.grpo_group,
            "max_new_tokens": GRPOConfig.max_new_tokens, "inner_updates": GRPOConfig.inner_updates,
            **_sharing_figure(steps, counters, cfg, device, ceiling)}


def _print_sharing(title: str, f: dict, ceiling: Ceiling) -> None:
    print(title)
    for key, label in (("shared", "prompt shared"), ("plain", "plain forward")):
        r = f[key]
        print(f"  {label}: {r['seconds']:.3f} s min, {r['seconds_median']:.3f} s median; "
              f"{r['flops'] / 1e9:.2f} GFLOP of model work -> {r['flops_per_s'] / 1e9:.1f} GFLOP/s at the min "
              f"({r['flops_per_s_median'] / 1e9:.1f} at the median) = {percent(r['roofline'], ceiling)} of "
              f"the measured matmul {f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"  plain / shared: {f['speedup']:.2f}x at the min, {f['speedup_median']:.2f}x at the median; "
          f"peak memory {_gib(f['peak_memory_bytes'])}")


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(cfg: BenchConfig) -> dict:
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown bench part(s) {unknown}; choose from {list(PARTS)}")
    device = resolve_device(cfg.device)
    set_threads(cfg.threads)
    keep_freed_memory()  # as the stages run: a step's freed activations stay for the next step
    resolve_dtype(cfg.dtype)  # a bad --dtype fails here, before any timing
    torch.manual_seed(cfg.seed)
    if cfg.gpt2_path:
        from ..real.gpt2 import load_gpt2
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
              f"after {p['steps']} steps in {p['seconds']:.0f} s (one run, not repeated)")

    ceiling = model_ceiling(config, device, cfg.dtype)  # measured between the timed steps of every part
    if device.type == "cpu":
        peak = cpu_peak(results["threads"])
        results["peak"] = {**dataclasses.asdict(peak), "flops_per_s": peak.flops_per_s}
        print(peak.describe())

    if "generation" in parts:
        model.eval()
        results["generation"] = speed = generation_speed(model, cfg, device, ceiling)
        verdict = "met" if speed["speedup"] >= 5 else "NOT met"
        print(f"generation of {cfg.new_tokens} tokens x {cfg.gen_batch} rows, {cfg.repeats} alternated runs each: "
              f"KV cache {speed['cache']:.2f} s min, {speed['cache_median']:.2f} s median "
              f"({speed['cache_tokens_per_s']:,.0f} tokens/s at the min); no cache {speed['no_cache']:.2f} s min, "
              f"{speed['no_cache_median']:.2f} s median; speed-up {speed['speedup']:.1f}x at the min "
              f"({speed['speedup_median']:.1f}x at the median; target >= 5x at 256 new tokens, judged on the min: "
              f"{verdict if cfg.new_tokens >= 256 else 'n/a, fewer tokens'})")
        print(f"  decoding with the cache: {speed['cache_flops'] / 1e9:.3f} GFLOP of model work per run -> "
              f"{speed['cache_flops_per_s'] / 1e9:.2f} GFLOP/s at the min = {percent(speed['cache_roofline'], ceiling)} "
              f"of the measured matmul {ceiling.best / 1e9:.1f} GFLOP/s")

    if "train" in parts:
        model.train()
        results["train"] = tr = train_throughput(model, cfg, device, ceiling)
        datasheet = (f", {100 * tr['mfu_datasheet']:.1f}% of the datasheet {tr['datasheet_flops_per_s'] / 1e12:.0f} "
                     f"TFLOP/s" if "mfu_datasheet" in tr else "")
        print(f"training (batch {cfg.batch_size} x {cfg.seq_len}, {cfg.steps} steps timed): "
              f"{tr['step_seconds']:.3f} s/step min, {tr['step_seconds_median']:.3f} median; "
              f"{tr['tokens_per_s']:,.0f} tokens/s = {tr['model_flops_per_s'] / 1e9:.2f} GFLOP/s at the min, "
              f"MFU {percent(tr['mfu'], ceiling)} ({percent(tr['mfu_median'], ceiling)} at the median) of the "
              f"measured matmul {tr['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s{datasheet}, "
              f"peak memory {_gib(tr['peak_memory_bytes'])}")
    del model  # the DPO and GRPO figures build their own models

    if "dpo" in parts:
        results["dpo"] = d = dpo_figure(config, cfg, device, ceiling)
        _print_sharing(f"DPO step ({cfg.dpo_pairs} pairs x {cfg.seq_len} tokens: {d['prompt_len']} prompt + "
                       f"{cfg.seq_len - d['prompt_len']} response; policy forward and backward, reference "
                       f"forward, E9, AdamW), {cfg.repeats} alternated steps each:", d, ceiling)

    if "grpo" in parts:
        results["grpo"] = g = grpo_figure(config, cfg, device, ceiling)
        _print_sharing(f"GRPO iteration ({cfg.grpo_questions} questions x G={cfg.grpo_group} answers of <= "
                       f"{g['max_new_tokens']} tokens: sample, score, E11-E13, {g['inner_updates']} updates), "
                       f"{cfg.repeats} alternated iterations each:", g, ceiling)
    if ceiling.samples:
        peak = results.get("peak", {}).get("flops_per_s")
        above = (f"; ABOVE the theoretical peak {peak / 1e9:.1f} GFLOP/s: the clock read is not the one the "
                 f"core ran at" if peak and ceiling.best > peak else "")
        print(f"(the ceiling: the model's MLP matmul, 4096 tokens x {config.n_embd} -> {4 * config.n_embd}, "
              f"the best of {len(ceiling.samples)} bursts measured between the timed steps "
              f"({ceiling.remeasured} remeasured), {ceiling.best / 1e9:.1f} GFLOP/s{above}; model work counted by "
              f"bench.FlopCounter: 2N per real token, 4 L C S attention, x3 with the backward)")
    return results
