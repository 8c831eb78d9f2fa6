"""``benchmarks/step_kernels.py`` splits a DPO step and a GRPO iteration into the kernels the numbers
depend on and the rest, and prints the floor of the ratio to TRL's step that the kernels leave."""

import re

import pytest


@pytest.mark.slow  # two steps of each at vs_trl.py's shapes, profiled
def test_the_kernels_and_the_rest_add_up_to_the_profiled_step(benchmark_output):
    out = benchmark_output("step_kernels", ["--steps", "1", "--warmup", "1", "--vs-trl-dpo", "0.5"])
    for name in ("DPO step", "GRPO iteration"):
        block = out[out.index(f"{name}:"):]
        profiled = float(re.search(r"profiled ([\d.]+) s per step", block).group(1))
        parts = [float(x) for x in re.findall(r"^  (?:matmuls|tanh GELU[^\d]*|attention[^\d]*|the rest[^\d]*)\s+([\d.]+) s",
                                              block, re.M)[:4]]
        assert len(parts) == 4 and all(p > 0 for p in parts), block
        assert abs(sum(parts) - profiled) < 0.002 + 1e-9, (parts, profiled)  # printed to the millisecond
    # only the DPO step was given vs_trl.py's ratio: its floor is the kernels' share of the step times it
    assert out.count("if everything but these kernels took no time") == 1
    share = float(re.search(r"the kernels together\s+[\d.]+ s\s+([\d.]+)%", out).group(1)) / 100
    floor = float(re.search(r"([\d.]+) if everything but these kernels took no time", out).group(1))
    assert floor == pytest.approx(0.5 * share, abs=0.006)
