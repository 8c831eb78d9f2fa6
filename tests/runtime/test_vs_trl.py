"""``benchmarks/vs_trl.py`` still runs against the installed TRL (an optional benchmark: skipped
without ``trl``, and slow: it builds TRL's trainers). Checks the printed figures, not their values."""

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_vs_trl_alternates_both_libraries_and_prints_their_ratio(benchmark_output):
    out = benchmark_output("vs_trl", ["--parts", "dpo,grpo", "--dpo-settings", "defaults", "--grpo-settings",
                                      "no-checkpointing", "--steps", "3", "--warmup", "1"])
    assert "setting 'defaults' (TRL's gradient checkpointing: True; threads: [1])" in out
    assert "setting 'no-checkpointing' (TRL's gradient checkpointing: False; threads: [1])" in out
    assert out.count("minialign / TRL:") == 4  # DPO and GRPO, shared prompt and plain forward
    assert "malloc: glibc" in out and out.count("page faults per step (median)") == 6  # TRL's and minialign's
    assert out.count("2 steps timed per side after 1 warm-up steps") == 2
