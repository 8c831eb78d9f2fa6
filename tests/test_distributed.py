"""Checks minialign/distributed.py: gradient accumulation and torchrun (DDP, gloo on the CPU) give
the update of one process with the whole global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minialign import distributed
from minialign.dpo import DPOConfig, main as dpo
from minialign.sft import SFTConfig, main as sft

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
    with pytest.raises(ValueError, match="multiple of 3"):
        distributed.check_divisible(8, 3)


def test_grad_accum_gives_the_update_of_the_whole_batch(tiny_run, tmp_path):
    """Micro-batches weighted by their token (SFT) or pair (DPO) counts = one forward of the batch."""
    init = str(tiny_run / "pretrain" / "model.pt")
    for k in (1, 4):
        sft(SFTConfig(out=str(tmp_path / f"a{k}"), init=init, grad_accum=k, **SMALL_SFT))
        dpo(DPOConfig(out=str(tmp_path / f"a{k}"), init=str(tmp_path / f"a{k}" / "sft" / "model.pt"),
                      grad_accum=k, **SMALL_DPO))
    assert_same_weights(tmp_path / "a1" / "sft" / "model.pt", tmp_path / "a4" / "sft" / "model.pt")
    assert_same_weights(tmp_path / "a1" / "dpo" / "model.pt", tmp_path / "a4" / "dpo" / "model.pt")


def _torchrun(args, cwd):
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([exe, "--standalone", "--nproc_per_node", "2", "-m", "minialign.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tiny_run, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the same weights after SFT and DPO steps as one process
    with the same global batch; only rank 0 writes the run folder."""
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
    assert_same_weights(one / "sft" / "model.pt", two / "sft" / "model.pt")
    assert_same_weights(one / "dpo" / "model.pt", two / "dpo" / "model.pt")
    rows = (two / "dpo" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((one / "dpo" / "metrics.jsonl").read_text().splitlines())  # one writer


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
