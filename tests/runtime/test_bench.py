"""``minialign bench`` at tiny sizes, the FLOP count behind MFU, and the device/dtype paths:
bf16 autocast on the CPU keeps log-probs and losses float32; the CUDA tests skip without a GPU.
"""

import copy
import json
import math

import pytest
import torch

from minialign.tools import bench, roofline, timing
from minialign.tools.bench import (GPT2_SHAPE, BenchConfig, FlopCounter, dpo_step, flops_per_token, known_peak_flops,
                             main, matmul_flops, model_config, peak_memory_bytes, random_preference_pairs, spread,
                             time_alternately)
from minialign.dpo import chosen_rejected_logps, dpo_loss
from minialign.generation import generate
from minialign.model import GPT, GPTConfig
from minialign.ops import model_token_logps, sequence_logps
from minialign.real.gpt2 import expected_gpt2_shapes, save_gpt2
from minialign.runtime.devices import autocast
from minialign.tools.roofline import Ceiling, cpu_peak, percent

TINY_BENCH = dict(device="cpu", n_layer=1, n_head=2, n_embd=16, vocab_size=32, batch_size=4, seq_len=8,
                  steps=2, repeats=2, new_tokens=8, gen_batch=2, dpo_pairs=2, dpo_prompt_len=3, grpo_questions=2,
                  grpo_group=2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flops_per_token_by_hand():
    # L=1, C=4, V=10, block 8: wte 40 + wpe 32 + ln_1 8 + c_attn 4*12+12=60 + c_proj 16+4=20
    # + ln_2 8 + c_fc 4*16+16=80 + mlp c_proj 64+4=68 + ln_f 8 = 324 parameters (head tied to wte)
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=4)
    n = GPT(config).num_params()
    assert n == 324
    # 6 * (324 - 32 position rows) + 12 * L * T * C = 6 * 292 + 12 * 1 * 5 * 4 = 1752 + 240 = 1992
    assert flops_per_token(config, seq_len=5, n_params=n) == 1992


def test_gpt2_preset_is_the_124m_shape():
    config = model_config(BenchConfig(preset="gpt2"))
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size) == \
        (12, 12, 768, 50257, 1024) == tuple(GPT2_SHAPE.values())
    # GPT-2 small has 124,439,808 parameters (head tied to the embedding):
    # V C + N C + L (12 C^2 + 13 C) + 2 C = 38,597,376 + 786,432 + 85,054,464 + 1,536
    shapes = expected_gpt2_shapes(config)  # every tensor of a GPT-2 checkpoint of this config
    assert sum(math.prod(s) for s in shapes.values()) == 124_439_808


@pytest.mark.slow
def test_bench_runs_every_part_at_tiny_size(capsys):
    results = main(BenchConfig(**TINY_BENCH, pretrain_steps=2))
    out = capsys.readouterr().out
    for key in ("pre-training", "KV cache", "tokens/s", "MFU", "peak memory", "DPO", "GRPO", "min", "median",
                "prompt shared", "plain forward", "GFLOP of model work", "of the measured matmul"):
        assert key in out
    assert results["train"]["tokens_per_s"] > 0 and results["train"]["mfu"] > 0
    assert results["train"]["step_seconds"] <= results["train"]["step_seconds_median"]
    assert results["train"]["peak_memory_bytes"] > 2 ** 20  # a Python process with torch holds > 1 MiB
    assert results["generation"]["speedup"] > 0 and results["generation"]["cache_tokens_per_s"] > 0
    assert results["generation"]["cache"] <= results["generation"]["cache_median"]
    for part in ("dpo", "grpo"):
        shared, plain = results[part]["shared"], results[part]["plain"]
        assert 0 < shared["seconds"] <= shared["seconds_median"] and 0 < plain["seconds"] <= plain["seconds_median"]
        assert 0 < shared["flops"] < plain["flops"]  # each prompt once: less model work
        assert shared["roofline"] == pytest.approx(shared["flops"] / shared["seconds"] / results[part]["matmul_flops_per_s"])
    assert results["pretrain"]["entropy_floor"] > 0
    assert "datasheet_flops_per_s" not in results["train"]  # the CPU has no datasheet peak here


def test_bench_parts_and_bad_flags(capsys):
    results = main(BenchConfig(**TINY_BENCH, parts="train"))
    assert set(results) >= {"train", "model"} and "generation" not in results and "dpo" not in results
    json.dumps(results)  # the command prints its results as JSON
    assert "theoretical peak" in capsys.readouterr().out and results["peak"]["flops_per_s"] > 0
    with pytest.raises(ValueError, match="unknown bench part"):
        main(BenchConfig(**TINY_BENCH, parts="train,rlhf"))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        main(BenchConfig(**{**TINY_BENCH, "seq_len": 64}, block_size=16))
    with pytest.raises(ValueError, match="dtype must be one of"):
        main(BenchConfig(**{**TINY_BENCH, "dtype": "float8"}))


def test_bench_times_a_gpt2_checkpoint_folder(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=40, block_size=24, n_layer=1, n_head=2, n_embd=16))
    save_gpt2(model, tmp_path)
    results = main(BenchConfig(**TINY_BENCH, gpt2_path=str(tmp_path), parts="generation,train"))
    assert results["model"]["params"] == model.num_params() and results["model"]["vocab_size"] == 40
    assert results["generation"]["speedup"] > 0


class FakeClock:
    """``time.perf_counter`` that moves only when ``tick`` is called: a timed step lasts what the test says."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_time_alternately_runs_the_calls_in_turn_and_times_each_after_the_warmup(monkeypatch):
    """1 warm-up round (a 100 s, b 50 s, untimed), then a: 3, 1, 2 s and b: 6, 2, 4 s, run a, b, a, b:
    each call's own seconds come back; min and median of a are 1 and 2, b twice a."""
    clock, order = FakeClock(), []
    durations = {"a": iter([100.0, 3.0, 1.0, 2.0]), "b": iter([50.0, 6.0, 2.0, 4.0])}
    monkeypatch.setattr(timing, "time", clock)

    def call(name):
        order.append(name)
        clock.tick(next(durations[name]))
    times = time_alternately({"a": lambda: call("a"), "b": lambda: call("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert times == {"a": [3.0, 1.0, 2.0], "b": [6.0, 2.0, 4.0]}
    assert spread(times["a"]) == {"min": 1.0, "median": 2.0}
    with pytest.raises(ValueError, match="repeats"):
        time_alternately({"a": lambda: None}, repeats=0)


def test_flop_counter_by_hand():
    # 1 layer, C = 8, vocab 10, block 6: N = 10*8 (wte, tied head) + 6*8 (wpe) + 12*64 + 13*8 (block) + 2*8 (ln_f)
    # = 80 + 48 + 768 + 104 + 16 = 1016; without the position table N' = 968
    model = GPT(GPTConfig(vocab_size=10, block_size=6, n_layer=1, n_head=2, n_embd=8))
    assert model.num_params() == 1016
    ids = torch.zeros(2, 4, dtype=torch.long)
    with FlopCounter(model) as counter, torch.no_grad():
        model(ids)                  # 8 tokens, 4 keys each: 8 * (2 * 968 + 4 * 1 * 8 * 4) = 8 * 2064 = 16512
    assert counter.flops == 16512
    with FlopCounter(model) as counter:
        model(ids)                  # with a graph for the backward: 3 x 16512
    assert counter.flops == 3 * 16512
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with FlopCounter(model) as counter, torch.no_grad():
        cache = model.new_cache(2, 6)
        model(ids, mask, cache)     # 7 real tokens, 4 keys: 7 * 2064 = 14448
        model(ids[:, :1], torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache)
        # 2 new tokens, 5 keys: 2 * (1936 + 4 * 8 * 5) = 2 * 2096 = 4192
    assert counter.flops == 14448 + 4192
    assert "hidden" not in vars(model)  # the counter leaves the model as it found it


def test_dpo_step_is_the_training_step_on_its_batches_in_turn():
    """The bench times ``dpo.dpo_step`` itself: three timed steps give the weights of the same three
    steps run as ``stages.dpo.main`` runs them (pairs 0-2, 3-5, then 0-2 again)."""
    from types import SimpleNamespace

    from minialign import dpo
    from minialign.runtime.optim import gradient_update, make_optimizer
    from minialign.stages.dpo import DPOConfig
    config = GPTConfig(vocab_size=20, block_size=12, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    start = GPT(config)
    pairs = random_preference_pairs(20, 6, 4, 5, torch.Generator().manual_seed(0))
    assert {len(x) for x in pairs["prompt"]} == {4} and {len(y) for y in pairs["chosen"] + pairs["rejected"]} == {5}
    for precompute in (True, False):
        dpo_config = DPOConfig(batch_size=3, precompute_ref_logps=precompute, progress=False)
        policy, reference = copy.deepcopy(start), copy.deepcopy(start).requires_grad_(False)
        step = dpo_step(policy, reference, pairs, dpo_config)
        with FlopCounter(reference) as ref_counter, FlopCounter(policy) as counter:
            timed = [step() for _ in range(3)]
        assert (ref_counter.flops > 0) != precompute  # the table, or a reference forward per step
        assert counter.flops > 0
        trained, reference = copy.deepcopy(start), copy.deepcopy(start).requires_grad_(False)
        if precompute:
            reference = dict(zip(("chosen", "rejected"), dpo.pair_logps(reference, pairs, 0, "cpu")))
        optimizer = make_optimizer(trained, dpo_config)
        for i, rows in enumerate(([0, 1, 2], [3, 4, 5], [0, 1, 2])):
            result = dpo.dpo_step(trained, reference, SimpleNamespace(pad_id=0), pairs, rows, dpo_config,
                                  gradient_update(trained, trained, optimizer, dpo_config, i))
            assert timed[i].loss == result.loss and torch.equal(timed[i].chosen_logps, result.chosen_logps)
        assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), trained.parameters()))


def test_memory_and_peak_helpers_on_cpu():
    # the process's peak resident memory, in bytes: at least a 256 MiB tensor it has just filled
    # (a kilobyte count read as bytes would be 1024 times too small)
    big = torch.ones(64 * 2 ** 20)  # 64 Mi float32 = 256 MiB
    assert peak_memory_bytes(torch.device("cpu")) >= big.numel() * 4
    assert known_peak_flops(torch.device("cpu"), "bfloat16") is None


def test_matmul_flops_counts_2mkn_per_matmul_and_keeps_the_best_round(monkeypatch):
    """An (m, k) x (k, n) matmul is 2 m k n FLOPs. Three timed rounds of 5 matmuls at 2 s, 1 s and 4 s
    each (after a warm-up of 100 s): the best round, 1 s per matmul, gives 2 * 2 * 3 * 4 = 48 FLOP/s."""
    import types

    clock = FakeClock()
    seconds = iter([100.0] + [2.0] * 5 + [1.0] * 5 + [4.0] * 5)
    monkeypatch.setattr(roofline, "time", clock)
    monkeypatch.setattr(roofline, "F", types.SimpleNamespace(linear=lambda a, b: clock.tick(next(seconds))))
    assert matmul_flops(torch.device("cpu"), "float32", repeats=5, shape=(2, 3, 4)) == 48.0


AVX2_CPUINFO = """processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2445.428
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
processor\t: 1
cpu MHz\t\t: 2445.428
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""


def test_cpu_peak_by_hand_and_says_what_it_read_and_assumed():
    # AVX2 + FMA at 2445.428 MHz, one core: 8 lanes x 2 (FMA) x 2 units (assumed) x 2.445428e9 = 78.254 GFLOP/s
    peak = cpu_peak(1, cpuinfo=AVX2_CPUINFO, lscpu="")
    assert peak.flops_per_s == pytest.approx(78.253696e9)
    text = peak.describe()
    assert "avx2" in text and "/proc/cpuinfo cpu MHz" in text and "assumed: 2 FMA units per core" in text
    # two threads use both cores; more threads than cores count the cores present
    assert cpu_peak(2, AVX2_CPUINFO, "").flops_per_s == cpu_peak(8, AVX2_CPUINFO, "").flops_per_s == 2 * peak.flops_per_s
    # AVX-512 doubles the lanes; lscpu's max clock (turbo) wins over the clock of the moment
    avx512 = AVX2_CPUINFO.replace("avx2", "avx2 avx512f")
    fast = cpu_peak(1, avx512, "CPU max MHz:                  3500.0000\n")
    assert fast.flops_per_s == pytest.approx(16 * 2 * 2 * 3.5e9) and "lscpu CPU max MHz" in fast.describe()
    assert cpu_peak(1, "", "").flops_per_s is None  # no clock anywhere: no peak, said so
    assert "unknown" in cpu_peak(1, "", "").describe()


def test_ceiling_never_gives_a_fraction_above_one():
    """Bursts of 10 and 12 FLOP/s: a step at 6 is 50%; a step at 15 beats them, so more bursts are
    measured (14, then 16): 15 / 16; a step at 100 beats every burst: None, printed as disturbed."""
    bursts = iter([10.0, 12.0, 14.0, 16.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    ceiling = Ceiling("cpu", "float32", (1, 1, 1), burst=lambda: next(bursts))
    ceiling.measure()
    ceiling.measure()
    assert ceiling.fraction(6.0) == 0.5
    assert ceiling.fraction(15.0) == 15.0 / 16.0 and ceiling.remeasured == 2
    assert ceiling.fraction(100.0) is None and ceiling.remeasured == 7
    assert percent(None, ceiling).startswith("not printed: the ceiling measurement was disturbed")
    assert percent(0.5, ceiling) == "50%"


def test_time_alternately_measures_between_rounds_untimed(monkeypatch):
    """``between`` runs after each timed round (not after the warm-up), outside the timings."""
    clock, order = FakeClock(), []
    monkeypatch.setattr(timing, "time", clock)

    def call(name, seconds):
        order.append(name)
        clock.tick(seconds)
    times = time_alternately({"a": lambda: call("a", 1.0)}, repeats=2, warmup=1,
                             between=lambda: call("burst", 50.0))
    assert order == ["a", "a", "burst", "a", "burst"]
    assert times == {"a": [1.0, 1.0]}


# ----------------------------------------------------------------------------------------------
# bf16 autocast on the CPU: the matmuls in bf16, log-probs and losses in float32
# ----------------------------------------------------------------------------------------------


def _pairs_batch(vocab: int, B: int = 3, T: int = 10):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * B, T), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a shorter (right-padded) row
    response_mask = (torch.arange(T) >= 4).long().expand(2 * B, T) * mask
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask}


def test_bf16_autocast_on_cpu_keeps_logps_float32(tiny_model):
    model = tiny_model.eval()
    batch = _pairs_batch(model.config.vocab_size)
    device = torch.device("cpu")
    with torch.no_grad():
        logps32 = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with autocast(device, "bfloat16"):
        logits = model(batch["input_ids"], batch["attention_mask"])
        token = model_token_logps(model, batch["input_ids"], batch["attention_mask"])
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        pi_w, pi_l = chosen_rejected_logps(model, batch)
    assert logits.dtype == torch.bfloat16              # the forward ran in bf16 ...
    assert token.dtype == logps.dtype == pi_w.dtype == torch.float32  # ... the log-probs did not
    # bf16 keeps ~3 significant digits: six response tokens of log-prob ~ -4 agree to ~0.1
    assert (logps - logps32).abs().max() < 0.15
    reference = copy.deepcopy(model).requires_grad_(False)
    with autocast(device, "bfloat16"):
        ref_w, ref_l = chosen_rejected_logps(reference, batch)
    loss, r_w, _ = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)
    assert loss.dtype == r_w.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()  # gradients flow back through the bf16 matmuls into the float32 weights
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_autocast_generation_on_cpu(tiny_model, world):
    tok = world.tokenizer
    prompts = [tok.prompt(q["prompt"]) for q in world.arithmetic_questions("train")[:3]]
    with autocast(torch.device("cpu"), "bfloat16"):
        rollout = generate(tiny_model, prompts, 4, tok.eos_id, tok.pad_id, generator=torch.Generator().manual_seed(0))
    assert rollout.logps.dtype == torch.float32 and torch.isfinite(rollout.logps).all()


# ----------------------------------------------------------------------------------------------
# CUDA (skipped on the CPU; CI without a GPU skips them)
# ----------------------------------------------------------------------------------------------


@cuda
def test_cuda_bf16_forward_logps_and_dpo_step(tiny_model):
    device = torch.device("cuda")
    model = tiny_model.to(device)
    reference = copy.deepcopy(model).requires_grad_(False)
    batch = {k: v.to(device) for k, v in _pairs_batch(model.config.vocab_size).items()}
    with autocast(device, "bfloat16"):
        logits = model(batch["input_ids"], batch["attention_mask"])
        pi_w, pi_l = chosen_rejected_logps(model, batch)
        with torch.no_grad():
            ref_w, ref_l = chosen_rejected_logps(reference, batch)
    assert logits.dtype == torch.bfloat16 and pi_w.dtype == torch.float32 and pi_w.device.type == "cuda"
    loss, _, _ = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # the same numbers as on the CPU, to bf16 precision
        cpu = sequence_logps(tiny_model.cpu(), *(_pairs_batch(model.config.vocab_size)[k] for k in
                             ("input_ids", "attention_mask", "response_mask")))
    assert ((pi_w.detach().cpu() - cpu[:3]).abs().max()) < 0.15


@cuda
def test_cuda_generation_cache_matches_no_cache(tiny_model, world):
    model = tiny_model.to("cuda")
    tok = world.tokenizer
    prompts = [tok.prompt(q["prompt"]) for q in world.arithmetic_questions("train")[:4]]
    runs = [generate(model, prompts, 6, tok.eos_id, tok.pad_id, use_cache=c,
                     generator=torch.Generator(device="cuda").manual_seed(0)) for c in (True, False)]
    assert runs[0].sequences.device.type == "cuda"
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert (runs[0].logps - runs[1].logps).abs().max() < 1e-3


@cuda
def test_cuda_bench_tiny_bf16():
    results = main(BenchConfig(**{**TINY_BENCH, "device": "cuda", "dtype": "bfloat16"}, pretrain_steps=0))
    assert results["train"]["tokens_per_s"] > 0 and results["train"]["peak_memory_bytes"] > 0
    name = torch.cuda.get_device_name(0)
    if "H100" in name or "H200" in name:
        assert results["train"]["datasheet_flops_per_s"] > 7e14


@cuda
def test_cuda_hf_adapter_bf16(world):
    transformers = pytest.importorskip("transformers")
    from minialign.real.hf import HFCausalLM

    tok = world.tokenizer
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=48,
                                                              n_embd=32, n_layer=2, n_head=2))
    model = HFCausalLM(hf).to("cuda")
    prompts = [tok.prompt(q["prompt"]) for q in world.arithmetic_questions("train")[:4]]
    with autocast(torch.device("cuda"), "bfloat16"):
        rollout = generate(model, prompts, 4, tok.eos_id, tok.pad_id, generator=torch.Generator(device="cuda").manual_seed(0))
        logps = model_token_logps(model, rollout.sequences, rollout.attention_mask)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
