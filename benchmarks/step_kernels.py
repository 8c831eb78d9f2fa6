"""Where a DPO step's and a GRPO iteration's time goes, at ``benchmarks/vs_trl.py``'s shapes: the
kernels the numbers depend on, and the rest.

    OMP_NUM_THREADS=1 python benchmarks/step_kernels.py            # one thread, as vs_trl.py
    OMP_NUM_THREADS=1 python benchmarks/step_kernels.py --vs-trl-dpo 0.78 --vs-trl-grpo 0.39

**Why.** A step's time splits into the kernels that compute its numbers (the matmuls, GPT-2's
tanh GELU and its backward, attention and its backward: each one ATen / MKL call whose result
the seeded runs depend on, bit for bit) and everything else (LayerNorm, residual adds, copies,
the loss, AdamW, Python). Only the rest can be cut without new kernels. With ``--vs-trl-dpo`` /
``--vs-trl-grpo``, the ratio minialign / TRL that ``vs_trl.py`` printed (alternated in one process,
like for like), it prints the ratio the step would reach if the rest took no time at all: the
kernels' share of minialign's step times that ratio (two ratios, each measured within one
process; TRL's seconds from another process are never divided into these).

**How.** minialign's step (``tools.timing.dpo_step`` with the reference forward in every step,
and ``grpo_step`` with ``vs_trl.py``'s GRPO settings) runs ``--warmup`` times untimed, then
``--steps`` times under ``torch.profiler`` (CPU); each op's self time is summed by group and
divided by the steps. The profiler adds its own cost to every op, so the "rest" is an upper bound
and the kernels' seconds are the figure to read; the unprofiled step (the min of ``--steps``
timed runs, before the profiled ones) is printed beside them, with its page faults per step:
``--malloc glibc`` leaves glibc's malloc as the process starts, to see what the stages' setting
(``keep_freed_memory``) saves.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minialign.model import GPT, GPTConfig  # noqa: E402
from minialign.stages.dpo import DPOConfig  # noqa: E402
from minialign.stages.grpo import GRPOConfig  # noqa: E402
from minialign.tools.bench import random_preference_pairs  # noqa: E402
from minialign.tools.timing import MALLOC, dpo_step, grpo_step, page_faults, use_malloc  # noqa: E402
from minialign.toyworld import ToyWorld, WorldConfig  # noqa: E402

# each group's ATen ops (their self time); anything else is "the rest"
KERNELS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm"),
    "tanh GELU, forward and backward": ("aten::gelu", "aten::gelu_backward"),
    "attention, forward and backward": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
}


def steps_at_vs_trl_shapes() -> dict:
    """minialign's DPO step and GRPO iteration at vs_trl.py's shapes, from one seeded GPT each."""
    config = GPTConfig(vocab_size=53, block_size=64, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    start = GPT(config)
    pairs = random_preference_pairs(53, 64, 8, 22, torch.Generator().manual_seed(0))  # 64 pairs x (8 + 22)
    dpo = dpo_step(copy.deepcopy(start), copy.deepcopy(start).requires_grad_(False).eval(), pairs,
                   DPOConfig(batch_size=64, precompute_ref_logps=False, progress=False))
    world = ToyWorld(WorldConfig(seed=0))
    questions = world.arithmetic_questions("train")
    questions = (questions * (32 // len(questions) + 1))[:32]
    grpo_config = GRPOConfig(questions=32, group_size=8, batch_size=256, inner_updates=1, max_new_tokens=4,
                             beta=0.04, lr=1e-3, weight_decay=0.1, progress=False)
    grpo = grpo_step(copy.deepcopy(start), copy.deepcopy(start).eval().requires_grad_(False), world.tokenizer,
                     world, [questions], grpo_config)
    return {"DPO step": dpo, "GRPO iteration": grpo}


def split(step, steps: int, warmup: int) -> dict:
    """The step's unprofiled min and page faults (median), then its profiled seconds per step by group."""
    for _ in range(warmup):
        step()
    times, faults = [], []
    for _ in range(steps):
        before, t = page_faults(), time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        faults.append(page_faults() - before)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_seconds = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    groups = {name: sum(self_seconds.get(op, 0.0) for op in ops) for name, ops in KERNELS.items()}
    total = sum(self_seconds.values())
    return {"min": min(times), "faults": statistics.median(faults), "profiled": total, "groups": groups, "rest": total - sum(groups.values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc", choices=MALLOC, default="keep",
                        help="keep: freed memory kept in the process, as the stages run (keep_freed_memory); "
                             "glibc: malloc as the process starts")
    parser.add_argument("--vs-trl-dpo", type=float, help="vs_trl.py's DPO ratio minialign / TRL (like for like)")
    parser.add_argument("--vs-trl-grpo", type=float, help="vs_trl.py's GRPO ratio minialign / TRL (like for like)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_malloc(args.malloc)  # keep, by default: as the stages run
    vs_trl = {"DPO step": args.vs_trl_dpo, "GRPO iteration": args.vs_trl_grpo}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 on the CPU; "
          f"malloc: {args.malloc}; {args.steps} timed steps, then {args.steps} profiled, after {args.warmup} warm-up steps")
    for name, step in steps_at_vs_trl_shapes().items():
        s = split(step, args.steps, args.warmup)
        kernels = sum(s["groups"].values())
        print(f"{name}: {s['min']:.3f} s at the min unprofiled, {s['faults']:,.0f} page faults per step (median); "
              f"profiled {s['profiled']:.3f} s per step:")
        for group, seconds in s["groups"].items():
            print(f"  {group:34s} {seconds:.3f} s  {100 * seconds / s['profiled']:4.1f}%")
        print(f"  {'the kernels together':34s} {kernels:.3f} s  {100 * kernels / s['profiled']:4.1f}%")
        print(f"  {'the rest (profiler cost included)':34s} {s['rest']:.3f} s  {100 * s['rest'] / s['profiled']:4.1f}%")
        if vs_trl[name]:
            print(f"  at minialign / TRL = {vs_trl[name]:.2f} (vs_trl.py): "
                  f"{vs_trl[name] * kernels / s['profiled']:.2f} if everything but these kernels took no time")


if __name__ == "__main__":
    main()
