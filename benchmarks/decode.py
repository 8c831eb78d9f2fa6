"""Decoding speed, this checkout against an earlier commit, alternated in one process.

    python benchmarks/decode.py                      # 8 rows x 256 new tokens, one thread, vs main's 8266309
    python benchmarks/decode.py --before HEAD~3 --repeats 7

**How it runs.** ``minialign/model.py`` and ``minialign/generation.py`` are read from the commit
``--before`` (``git show``) and loaded as modules beside today's; both GPTs get the same weights
(one seeded model's state dict) and sample the same prompts from the same seed, in turn
(before, now, before, now, ...) under one thread count, so load from other processes falls on
both alike. It prints tokens/s of each side (min and median of ``--repeats`` runs), their ratio,
the model FLOP/s of each side at the min and its fraction of the matmul ceiling (measured in a
burst after each round, as ``minialign bench`` does), and whether the two sides sampled the same
tokens with the same log-probs bit for bit (they must:
the speed-up may not change a seeded run). ``--compile`` adds a third side, today's code with
``torch.compile`` on the decode step (``generate(..., compile_decode=True)``: its numbers differ
in the last bits, so it is an option, off by default).

The shape is the bench's (``minialign bench``): 4 layers x 128, 4 heads, a 64-token vocabulary,
a 264-token context, the prompt ``[1, 3, 5, 6]`` for every row, no EOS (every row runs 256 steps).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minialign.generation import generate  # noqa: E402
from minialign.model import GPT, GPTConfig  # noqa: E402
from minialign.tools.bench import FlopCounter, model_ceiling, spread, time_alternately  # noqa: E402
from minialign.tools.roofline import percent  # noqa: E402

BEFORE = "8266309"  # main when issue 23 started


def load_before(rev: str, name: str) -> types.ModuleType:
    """``minialign/<name>.py`` as it was at commit ``rev``, as a module of the package (its relative
    imports resolve to today's other files)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:minialign/{name}.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"minialign._{name}_before")
    module.__package__ = "minialign"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:minialign/{name}.py", "exec"), module.__dict__)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time compile_decode=True (changes last bits)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = GPTConfig(vocab_size=64, block_size=args.new_tokens + 8)
    torch.manual_seed(0)
    now = GPT(config).eval()
    old_model, old_generation = load_before(args.before, "model"), load_before(args.before, "generation")
    before = old_model.GPT(old_model.GPTConfig(**vars(config))).eval()
    before.load_state_dict(now.state_dict())
    prompts = [[1, 3, 5, 6]] * args.rows
    results = {}

    def side(name, gen, model, **kw):
        def run():
            results[name] = gen(model, prompts, args.new_tokens, eos_id=-1, pad_id=0,
                                generator=torch.Generator().manual_seed(0), **kw)
        return run
    sides = {"before": side("before", old_generation.generate, before), "now": side("now", generate, now)}
    if args.compile:
        sides["now, compiled"] = side("now, compiled", generate, now, compile_decode=True)
    with FlopCounter(now) as counter:  # the model FLOPs of one run: the prefill and every decode step
        sides["now"]()
    # the matmul ceiling, a burst after each round (``minialign bench``'s roofline): it sees the same load
    ceiling = model_ceiling(config, "cpu", "float32")
    times = time_alternately(sides, args.repeats, warmup=1, between=ceiling.measure)
    tokens = args.rows * args.new_tokens
    print(f"decoding {args.rows} rows x {args.new_tokens} new tokens, {torch.get_num_threads()} thread(s), "
          f"float32, {now.num_params():,} parameters; {args.repeats} alternated runs per side after 1 warm-up; "
          f"before = {args.before}")
    base = spread(times["before"])
    for name, t in times.items():
        s = spread(t)
        print(f"  {name:14s} {tokens / s['min']:8,.0f} tokens/s at the min ({s['min']:.3f} s), "
              f"{tokens / s['median']:8,.0f} at the median; x{base['min'] / s['min']:.2f} / "
              f"x{base['median'] / s['median']:.2f} of before; {counter.flops / s['min'] / 1e9:.2f} GFLOP/s at "
              f"the min = {percent(ceiling.fraction(counter.flops / s['min']), ceiling)} of the matmul ceiling")
    print(f"  the matmul ceiling: {ceiling.best / 1e9:.1f} GFLOP/s (best of {len(ceiling.samples)} bursts of "
          f"{' x '.join(map(str, ceiling.shape))}, one after each round); a run is {counter.flops / 1e6:.1f} MFLOP")
    a, b = results["before"], results["now"]
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("sequences", "attention_mask", "response_ids", "response_mask", "logps", "finished"))
    print(f"  before and now sampled the same tokens and log-probs bit for bit: {same}")
    if "now, compiled" in results:
        c = results["now, compiled"]
        print(f"  compiled: same tokens {torch.equal(c.response_ids, b.response_ids)}, largest log-prob "
              f"difference {(c.logps - b.logps).abs().max().item():.2e}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
