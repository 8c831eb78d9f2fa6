"""``benchmarks/gpu.py``: it skips cleanly without a GPU, and its CPU-side code paths run at tiny size."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert load().main([]) == 0
    assert capsys.readouterr().out.strip() == \
        "benchmarks/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False): skipped"


def test_mfu_by_hand_and_the_wide_vocabulary():
    gpu = load()
    # 989.4e12 FLOP/s peak; 98.94e12 FLOPs in 1 s is 10%; no peak (the CPU): n/a
    assert gpu.mfu(98.94e12, 1.0, 989.4e12) == "10.0%" and gpu.mfu(1.0, 1.0, None) == "n/a"
    assert gpu.gpu_peak(torch.device("cpu")) == (None, "no datasheet peak on the CPU")
    from minialign.toyworld import ToyWorld, WorldConfig
    toy = ToyWorld(WorldConfig(seed=0)).tokenizer
    wide = gpu.WideVocabulary(toy)
    ids = toy.encode("the movie was good")
    assert wide.decode(ids + [toy.vocab_size, 50_000]) == toy.decode(ids)  # ids past the toy's are dropped
    assert wide.eos_id == toy.eos_id and wide.prompt("the movie") == toy.prompt("the movie")
    with pytest.raises(SystemExit, match="must exceed"):
        gpu.main(["--device", "cpu", "--steps", "2", "--warmup", "2"])


@pytest.mark.slow
def test_tiny_run_on_the_cpu_times_both_libraries(capsys):
    pytest.importorskip("trl")
    threads = torch.get_num_threads()
    try:
        assert load().main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("minialign / TRL:") == 4 and out.count("MFU n/a") == 6 and "DPO step, 4 pairs" in out and "GRPO iteration, 2 questions" in out
    assert "GFLOP of model work per step" in out and "CUDA tests: not run" in out


def test_without_trl_it_times_minialign_alone(monkeypatch, capsys):
    gpu = load()
    monkeypatch.setattr(gpu, "load_vs_trl", lambda: None)
    threads = torch.get_num_threads()
    try:
        assert gpu.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "TRL is not installed" in out and "DPO step without TRL" in out and "GRPO iteration without TRL" in out
    assert out.count("MFU n/a") == 4  # two sides of two steps, no datasheet peak on the CPU
