"""GPT-2 124M on a CUDA GPU in bf16: a DPO step and a GRPO iteration against TRL, MFU, the CUDA tests.

    python benchmarks/gpu.py                      # on a CUDA machine: every part, under 4 minutes on an H200
    python benchmarks/gpu.py --steps 8            # more timed steps per side
    python benchmarks/gpu.py --device cpu --tiny  # the same code paths on a tiny model on the CPU (tests)

Without a CUDA GPU (and without ``--device cpu``) it prints one line and exits 0.

**What it runs.** A GPT-2 of the 124M shape (12 layers, 12 heads, 768 wide, GPT-2's 50,257-token
vocabulary, 1,024 positions) is built as minialign's ``GPT`` from a seed (random weights) and
saved as a Hugging Face GPT-2 folder (``gpt2.save_gpt2``); TRL's trainers load
``GPT2LMHeadModel`` from that folder and minialign loads the same state dict (``gpt2.load_gpt2``),
so both start from the same weights. Then ``benchmarks/vs_trl.py``'s two comparisons run on the
GPU, both sides under bf16 autocast with float32 master weights (TRL's ``bf16=True``; minialign's
``dtype="bfloat16"``), TRL's gradient checkpointing off (like for like), one TRL step then one
step of each minialign side, in turn, each timed after ``torch.cuda.synchronize``:

- DPO: ``--dpo-pairs`` pairs (default 64) of an 8-token prompt and two 22-token responses, the
  reference forward in every step on both sides;
- GRPO: ``--grpo-questions`` questions (default 32) x G = 8 answers of <= 4 tokens, beta 0.04,
  one optimizer step per iteration on both sides.

The token ids are the toy world's (``hf_tokenizer_from_toy``: its 53 tokens are the first ids of
GPT-2's vocabulary; no download: the GPU machine may have no network), so every logit still spans
all 50,257 tokens.

**MFU** = model FLOPs of the step / seconds / the GPU's dense bf16 peak: the FLOPs are minialign's
plain-forward step counted by ``bench.FlopCounter`` (2 N per token forward, 4 L C S attention, x3
with the backward: the work the step needs without the shared prompt, which is what TRL
computes), the same count for every side; the peak is the datasheet's (``bench.KNOWN_BF16_PEAKS``:
H100 SXM and H200 989.4 TFLOP/s dense bf16), named in the output. Then ``pytest -k cuda`` runs the
CUDA tests (``--no-tests`` skips them). Without TRL installed, minialign's steps are timed alone
(shared prompt and plain forward, alternated, from the same random GPT-2), with the same MFU.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minialign.model import GPT, GPTConfig  # noqa: E402
from minialign.tools.bench import (GPT2_SHAPE, KNOWN_BF16_PEAKS, FlopCounter, dpo_step, grpo_step,  # noqa: E402
                                   random_preference_pairs, spread, time_alternately)

TINY_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64)


class WideVocabulary:
    """The toy tokenizer, for a model whose vocabulary is wider (GPT-2's 50,257 ids): ids past the
    toy's 53 decode to nothing, as they do in the Hugging Face tokenizer TRL decodes with, so both
    sides score the same text."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids) -> str:
        return self._tok.decode([i for i in ids if int(i) < self._tok.vocab_size])


def gpu_peak(device: torch.device) -> tuple[float | None, str]:
    """The dense bf16 FLOP/s of a known GPU and its name, else (None, why)."""
    if device.type != "cuda":
        return None, "no datasheet peak on the CPU"
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in KNOWN_BF16_PEAKS if key in name), None)
    return peak, name


def mfu(flops: float, seconds: float, peak: float | None) -> str:
    """The fraction of ``peak`` that ``flops`` in ``seconds`` reach, as printed."""
    return "n/a" if peak is None else f"{100 * flops / seconds / peak:.1f}%"


def load_vs_trl():
    """``benchmarks/vs_trl.py`` as a module (it needs TRL; None when TRL is missing)."""
    if importlib.util.find_spec("trl") is None:
        return None
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_flops(kind: str, folder: Path, device: str, dtype: str, world, vs_trl, shape: dict) -> float:
    """Model FLOPs of one minialign plain-forward DPO step or GRPO iteration at the comparison's shapes."""
    from minialign.stages.dpo import DPOConfig
    from minialign.real.gpt2 import load_gpt2
    from minialign.stages.grpo import GRPOConfig

    policy, reference = load_gpt2(folder, device).train(), load_gpt2(folder, device).requires_grad_(False)
    if kind == "dpo":  # the FLOPs depend on the shapes only: random tokens of the comparison's lengths
        pairs = random_preference_pairs(policy.config.vocab_size, shape["pairs"], vs_trl.PROMPT_WORDS,
                                        vs_trl.RESPONSE_WORDS + 1, torch.Generator().manual_seed(0))
        step = dpo_step(policy, reference, pairs, DPOConfig(batch_size=shape["pairs"], share_prompt=False,
                                                            precompute_ref_logps=False, dtype=dtype, progress=False))
    else:
        questions = world.arithmetic_questions("train")[:shape["questions"]]
        config = GRPOConfig(questions=len(questions), group_size=vs_trl.GROUP, batch_size=len(questions) * vs_trl.GROUP,
                            inner_updates=1, max_new_tokens=vs_trl.ANSWER_TOKENS, share_prompt=False, device=device,
                            dtype=dtype, progress=False)
        step = grpo_step(policy, reference, world.tokenizer, world, [questions], config)
    with FlopCounter(policy, reference) as counter:
        step()
    return counter.flops


def compare(vs_trl, kind: str, folder: Path, world, tok, args, device: str, dtype: str, peak, shape) -> None:
    """One TRL-vs-minialign comparison, printed with each side's seconds, ratio and MFU."""
    run = vs_trl.run_dpo if kind == "dpo" else vs_trl.run_grpo
    sizes = dict(pairs=shape["pairs"]) if kind == "dpo" else dict(questions_per_step=shape["questions"])
    t = time.perf_counter()
    result = run("no-checkpointing", folder, world, tok, args.steps, device=device, dtype=dtype, **sizes)
    flops = step_flops(kind, folder, device, dtype, world, vs_trl, shape)
    title = (f"DPO step, {shape['pairs']} pairs x 30 tokens" if kind == "dpo" else
             f"GRPO iteration, {shape['questions']} questions x G={vs_trl.GROUP}, <= {vs_trl.ANSWER_TOKENS} answer tokens")
    print(f"{title}: {flops / 1e9:.1f} GFLOP of model work per step (the plain forward's count)")
    vs_trl.report(f"  {dtype} on {device}", result, args.warmup, note=lambda s: f"MFU {mfu(flops, s, peak)}")
    print(f"  ({time.perf_counter() - t:.0f} s for this comparison, TRL's trainer built and run)")
    sys.stdout.flush()


def minialign_alone(kind: str, config: GPTConfig, args, device: torch.device, dtype: str, peak, shape) -> None:
    """Without TRL: minialign's step alone, shared prompt and plain forward alternated, with MFU
    (the same shapes and FLOP count as the comparison)."""
    import copy

    from minialign.stages.dpo import DPOConfig
    from minialign.stages.grpo import GRPOConfig
    from minialign.toyworld import ToyWorld, WorldConfig

    torch.manual_seed(0)
    start = GPT(config).to(device)
    world = ToyWorld(WorldConfig(seed=0))
    world.tokenizer = WideVocabulary(world.tokenizer)
    steps, counters = {}, {}
    for name, share in (("minialign", True), ("minialign, plain forward", False)):
        policy, reference = copy.deepcopy(start).train(), copy.deepcopy(start).requires_grad_(False)
        if kind == "dpo":
            pairs = random_preference_pairs(config.vocab_size, shape["pairs"], 8, 22, torch.Generator().manual_seed(0))
            steps[name] = dpo_step(policy, reference, pairs, DPOConfig(batch_size=shape["pairs"], share_prompt=share,
                                                                       precompute_ref_logps=False, dtype=dtype,
                                                                       progress=False))
        else:
            questions = world.arithmetic_questions("train")[:shape["questions"]]
            steps[name] = grpo_step(policy, reference, world.tokenizer, world, [questions], GRPOConfig(
                questions=len(questions), group_size=8, batch_size=8 * len(questions), inner_updates=1,
                max_new_tokens=4, share_prompt=share, device=str(device), dtype=dtype, progress=False))
        counters[name] = FlopCounter(policy, reference)
    with counters["minialign, plain forward"] as counter:
        steps["minialign, plain forward"]()
    flops = counter.flops
    times = time_alternately(steps, args.steps - args.warmup, warmup=args.warmup, device=device)
    print(f"{'DPO step' if kind == 'dpo' else 'GRPO iteration'} without TRL, {dtype} on {device}: "
          f"{flops / 1e9:.1f} GFLOP of model work per step (the plain forward's count)")
    for name, t in times.items():
        s = spread(t)
        print(f"  {name:26s} {1e3 * s['min']:.1f} ms min, {1e3 * s['median']:.1f} ms median; "
              f"MFU {mfu(flops, s['min'], peak)}")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (with --tiny: the code paths, not a figure)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per comparison, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each side left out of the figures")
    parser.add_argument("--dpo-pairs", type=int, default=64)
    parser.add_argument("--grpo-questions", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help=f"a tiny model ({TINY_SHAPE}) instead of GPT-2 124M")
    parser.add_argument("--parts", default="dpo,grpo", help="comma-separated: dpo, grpo")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -k cuda")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False): skipped")
        return 0
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    peak, peak_name = gpu_peak(device)
    print(f"torch {torch.__version__}, {peak_name}; dense bf16 peak used for MFU: "
          f"{'none' if peak is None else f'{peak / 1e12:.1f} TFLOP/s (datasheet)'}")
    vs_trl = load_vs_trl()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if vs_trl is None:
        print("TRL is not installed (pip install trl==1.16.0): minialign's steps are timed alone")
        config = GPTConfig(**(TINY_SHAPE if args.tiny else GPT2_SHAPE))
        shape = dict(pairs=min(args.dpo_pairs, 4) if args.tiny else args.dpo_pairs,
                     questions=min(args.grpo_questions, 2) if args.tiny else args.grpo_questions)
        for kind in parts:
            minialign_alone(kind, config, args, device, dtype, peak, shape)
    else:
        import transformers
        from minialign.real.gpt2 import save_gpt2
        from minialign.real.hf import hf_tokenizer_from_toy
        from minialign.toyworld import ToyWorld, WorldConfig

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames gradient_checkpointing
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        vs_trl.datasets.disable_progress_bars()
        world = ToyWorld(WorldConfig(seed=0))
        tok = hf_tokenizer_from_toy(world.tokenizer)
        world.tokenizer = WideVocabulary(world.tokenizer)  # minialign's GRPO samples from all the model's ids
        config = GPTConfig(**(TINY_SHAPE if args.tiny else GPT2_SHAPE))
        shape = dict(pairs=min(args.dpo_pairs, 4) if args.tiny else args.dpo_pairs,
                     questions=min(args.grpo_questions, 2) if args.tiny else args.grpo_questions)
        torch.manual_seed(0)
        model = GPT(config)
        print(f"model: {model.num_params():,} parameters ({config.n_layer} layers x {config.n_embd}, "
              f"vocabulary {config.vocab_size}), random weights, saved once, loaded by both sides")
        with tempfile.TemporaryDirectory() as tmp:
            save_gpt2(model, tmp, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
            tok.save_pretrained(tmp)
            del model
            for kind in parts:
                compare(vs_trl, kind, Path(tmp), world, tok, args, str(device), dtype, peak, shape)
    rc = 0
    if not args.no_tests:
        if device.type != "cuda":
            print("CUDA tests: not run (the device is not CUDA)")
        else:
            t = time.perf_counter()
            test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                                   str(ROOT / "tests")], capture_output=True, text=True)
            lines = (test.stdout + test.stderr).strip().splitlines()
            print(f"CUDA tests (pytest -k cuda, {time.perf_counter() - t:.0f} s): exit {test.returncode}")
            print("\n".join("  " + line for line in lines[-15:]))
            rc = test.returncode
    print(f"benchmarks/gpu.py: {time.perf_counter() - start:.0f} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
