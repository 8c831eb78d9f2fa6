"""Checks minialign/runtime/distributed.py: gradient accumulation and torchrun (DDP, gloo on the CPU) give
the update of one process with the whole global batch."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import accumulation
import torch

from minialign.stages.dpo import DPOConfig, main as dpo
from minialign.runtime import distributed
from minialign.stages.sft import SFTConfig, main as sft

SMALL_SFT = dict(steps=3, batch_size=8, lr=1e-3, num_examples=64, eval_size=8, eval_every=100,
                 progress=False, device="cpu")
SMALL_DPO = dict(steps=3, batch_size=8, lr=1e-3, num_pairs=32, eval_pairs=8, eval_every=100,
                 eval_samples_per_prompt=1, max_new_tokens=4, progress=False, device="cpu")


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < atol, f"weights differ by {worst}"
    return worst


def test_split_and_share():
    assert distributed.split(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]  # nothing left out
    assert distributed.split([1, 2], 4) == [[1], [2]]                           # no empty pieces
    assert distributed.local_share(list(range(6))) == list(range(6))            # one process: everything


def test_grad_accum_gives_the_gradient_of_the_whole_batch(tiny_run):
    """Micro-batches weighted by their token (SFT) or pair (DPO) counts give the gradient of one
    forward over the whole batch. The identity is exact, so it is checked where it is exact: in
    float64 and before the optimizer, whose Adam normalisation would amplify a float32
    reduction-order difference (it depends on the thread count and the CPU) past any tolerance."""
    whole = accumulation.gradients(tiny_run, 1)
    for name, g in whole.items():
        assert g.abs().max() > 1e-3, name  # a gradient worth comparing
    for k in (2, 3, 4):
        for name, g in accumulation.gradients(tiny_run, k).items():
            assert torch.allclose(g, whole[name], rtol=1e-10, atol=1e-12), (name, k, (g - whole[name]).abs().max())


def _torchrun(args, cwd):
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([exe, "--standalone", "--nproc_per_node", "2", "-m", "minialign", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_two_processes_give_the_gradient_of_one_process(tiny_run, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), each rank with half the rows in 2 micro-batches: DDP's
    average over the ranks is the gradient of one process over the whole batch (float64, exact)."""
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = os.path.join(os.path.dirname(__file__), "accumulation.py")
    done = subprocess.run([exe, "--standalone", "--nproc_per_node", "2", script, str(tiny_run), str(tmp_path / "g.pt")],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = torch.load(tmp_path / "g.pt", weights_only=True)
    for name, g in accumulation.gradients(tiny_run, 1).items():
        assert torch.allclose(two[name], g, rtol=1e-10, atol=1e-12), (name, (two[name] - g).abs().max())


@pytest.mark.slow
def test_torchrun_sft_and_dpo_write_one_run_folder(tiny_run, tmp_path):
    """The SFT and DPO stages under torchrun: one complete run folder, written by rank 0 alone."""
    init = str(tiny_run / "pretrain" / "model.pt")
    one, two = tmp_path / "one", tmp_path / "two"
    sft(SFTConfig(out=str(one), init=init, **SMALL_SFT))
    dpo(DPOConfig(out=str(one), **SMALL_DPO))

    def flags(config: dict) -> list[str]:
        out = []
        for k, v in config.items():
            flag = "--" + k.replace("_", "-")
            out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
        return out

    _torchrun(["sft", "--out", str(two), "--init", init, *flags(SMALL_SFT)], tmp_path)
    _torchrun(["dpo", "--out", str(two), *flags(SMALL_DPO)], tmp_path)
    for stage in ("sft", "dpo"):
        assert (two / stage / "summary.json").is_file() and (two / stage / "model.pt").is_file()
        rows = (two / stage / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == len((one / stage / "metrics.jsonl").read_text().splitlines())  # one writer


@pytest.mark.slow
def test_torchrun_runs_the_reward_model_ppo_and_grpo(tiny_run, tmp_path):
    """The other stages under torchrun (rollouts sharded by prompt, --grad-accum on top): each
    writes one complete run folder, from rank 0."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "sft", out / "sft")
    common = ["--out", str(out), "--device", "cpu", "--no-progress", "--steps", "2"]
    _torchrun(["reward-model", *common, "--batch-size", "8", "--num-pairs", "64", "--eval-pairs", "16",
               "--eval-every", "1"], tmp_path)
    _torchrun(["ppo", *common, "--batch-size", "8", "--minibatch-size", "4", "--grad-accum", "2",
               "--eval-every", "1", "--eval-samples", "2", "--final-eval-samples", "2"], tmp_path)
    _torchrun(["grpo", *common, "--questions", "4", "--group-size", "4", "--batch-size", "8",
               "--grad-accum", "2", "--eval-every", "1", "--eval-samples", "2", "--final-eval-samples", "2"],
              tmp_path)
    # one writer: each row once (GRPO logs step 0 before training and its last step twice)
    for stage, steps in (("reward_model", [0, 1]), ("ppo", [0, 1]), ("grpo", [0, 1, 2, 2])):
        assert (out / stage / "summary.json").is_file() and (out / stage / "model.pt").is_file()
        logged = [json.loads(line)["step"] for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert logged == steps, (stage, logged)


@pytest.mark.slow
def test_torchrun_runs_rejection_sampling_and_unpaired_kto(tiny_run, tmp_path):
    """The preference family's two steps of their own under torchrun: rejection sampling (prompts
    sharded, the kept rows fine-tuned with DDP) and KTO on unpaired rows. Each writes one complete run
    folder, from rank 0, with each step logged once."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "sft", out / "sft")
    common = ["--out", str(out), "--device", "cpu", "--no-progress", "--steps", "2"]
    _torchrun(["rejection-sampling", *common, "--reward", "true", "--rounds", "1", "--prompts-per-round", "4",
               "--samples-per-prompt", "4", "--batch-size", "4", "--max-new-tokens", "8",
               "--eval-samples", "2", "--best-of-n", "1,2", "--best-of-n-samples", "4"], tmp_path)
    _torchrun(["dpo", *common, "--loss", "kto", "--kto-unpaired", "--batch-size", "8", "--num-pairs", "32",
               "--eval-pairs", "8", "--eval-every", "1", "--eval-samples-per-prompt", "1", "--max-new-tokens", "4"],
              tmp_path)
    # one writer: the rows of one process (rejection sampling: the SFT model's evaluation and the
    # round's selection at step 0, then its two SFT steps; KTO: its two steps)
    for stage, steps in (("rejection_sampling", [0, 0, 1, 2]), ("dpo", [0, 1])):
        assert (out / stage / "summary.json").is_file() and (out / stage / "model.pt").is_file(), stage
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps, (stage, rows)
        assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r), (stage, rows)
    assert json.loads((out / "dpo" / "config.json").read_text())["kto_unpaired"] is True
