"""The GRPO stage (minialign/stages/grpo.py) end to end on the tiny fixtures, and each member of the
family from the command line. (The equations of minialign/grpo.py: tests/equations/test_grpo.py.)"""

import json
import math

import pytest
import torch

from minialign.runtime import distributed
from minialign.runtime.files import ConfigError
from minialign.stages import grpo as grpo_stage
from minialign.stages.grpo import GRPOConfig
from minialign.stages.rollout_tasks import grpo_task


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(kl_in="reward", ref_reset_every=2)])
def test_main_tiny_end_to_end(tiny_run, tmp_path, monkeypatch, options):
    """GRPO raises the reward it is given. The tiny SFT model answers almost no sum right, so every
    group would have zero spread; instead the reward is one the tiny model earns a fifth to a
    third of the time: 1 for a finished one-word answer. (The arithmetic reward itself is
    ``tests/equations/test_toyworld.py``'s.)"""
    from minialign.toyworld import ToyWorld

    monkeypatch.setattr(ToyWorld, "true_reward",
                        lambda self, prompt, response, finished=True: float(finished and len(response.split()) == 1))
    config = GRPOConfig(out=str(tmp_path), init=str(tiny_run / "sft" / "model.pt"), steps=8,
                        questions=8, group_size=4, batch_size=32, inner_updates=2, eval_every=4,
                        eval_samples=2, final_eval_samples=4, progress=False, device="cpu", lr=3e-3, **options)
    summary = grpo_stage.main(config)
    run = tmp_path / "grpo"
    for f in ("model.pt", "summary.json", "metrics.jsonl", "accuracy.png", "answer_len.png", "config.json"):
        assert (run / f).is_file(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    for key in ("reward", "accuracy", "kl", "clip_frac", "answer_len", "zero_spread", "heldout/accuracy"):
        assert key in logged, key
    assert ("kl_penalised_reward" in logged) == (config.kl_in == "reward")
    assert all(math.isfinite(v) for r in rows for v in r.values())
    # the result (seed 0; KL in the loss / in the reward): the rewarded fraction of the train rollouts rose
    # from 0.41 / 0.27 over the first four iterations to 0.73 / 0.57 over the last four, and on held-out
    # questions from 0.33 to 0.81 / 0.71
    assert summary["train_accuracy_last"] > summary["train_accuracy_first"] + 0.2
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_before"] + 0.2
    # the trained policy differs from the SFT model it started from
    before = torch.load(tiny_run / "sft" / "model.pt", weights_only=True)["model"]
    after = torch.load(run / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


# every member from the command line, on tiny settings (slow: 18-38 s each on 2 loaded cores)
MEMBER_FLAGS = {
    "reinforce": "--advantage none --loss reinforce --kl-in reward --kl-estimator k1 --aggregation sequence_sum",
    "reinforce_batch": "--advantage batch_mean --loss reinforce --kl-in reward --kl-estimator k1",
    "rloo": "--advantage rloo --loss reinforce --kl-in reward --kl-estimator k1",
    "reinforce_pp": "--advantage reinforce_pp --loss ppo_clip --kl-in reward",
    "dapo": "--loss dapo --beta 0 --clip-eps-high 0.28 --dynamic-sampling --max-draws 2 --overlong filter",
    "dapo_penalty": "--loss dapo --beta 0 --overlong penalty --overlong-cache 2",
    "gspo": "--loss gspo --beta 0",
    "cispo": "--loss cispo --beta 0",
}


@pytest.mark.slow
@pytest.mark.parametrize("member", MEMBER_FLAGS)
def test_each_member_runs_from_the_command_line(tiny_run, tmp_path, member):
    from minialign.runtime.cli import main
    flags = ["--out", str(tmp_path), "--init", str(tiny_run / "sft" / "model.pt"), "--steps", "2", "--questions", "2",
             "--group-size", "4", "--batch-size", "8", "--eval-every", "0", "--final-eval-samples", "1",
             "--no-progress", "--device", "cpu", *MEMBER_FLAGS[member].split()]
    assert main(["grpo", *flags]) == 0
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 2 and all(r["tokens"] >= 8 for r in trained)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["heldout_accuracy"] is not None
    # dynamic sampling reports the questions it drew: at least the 2 of each iteration
    assert ("questions_drawn" in summary) == ("--dynamic-sampling" in MEMBER_FLAGS[member])
    if "questions_drawn" in summary:
        assert summary["questions_drawn"] >= 4 and all(r["questions_drawn"] >= 2 for r in trained)


def test_questions_per_iteration_at_most_the_questions_there_are(world, tmp_path):
    """--questions distinct questions are drawn per iteration (``Questions.draw``): the task refuses
    more than it holds, before the run folder exists (the toy world's 80 train questions, or a file's)."""
    tok, block_size = world.tokenizer, 48

    def config(questions, **options):  # one group of G = 8 answers per step, whatever --questions is
        return GRPOConfig(questions=questions, group_size=8, batch_size=8, **options)

    assert len(grpo_task(world, tok, config(80), block_size).train) == 80
    with pytest.raises(ConfigError, match=r"--questions must be <= 80 \(the questions there are to draw from\), "
                                          r"got 81"):
        grpo_task(world, tok, config(81), block_size)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} + 2 ?", "answer": str(a + 2)}) + "\n"
                            for a in (1, 2, 3)))
    task = grpo_task(world, tok, config(3, data=str(data)), block_size)
    assert len(task.draw(3, torch.Generator().manual_seed(0))) == 3
    with pytest.raises(ConfigError, match=r"--questions must be <= 3 .*, got 4"):
        grpo_task(world, tok, config(4, data=str(data)), block_size)


def test_dynamic_sampling_is_refused_under_torchrun(world, monkeypatch):
    """Dynamic sampling draws until its batch is full, a different number of questions on each rank:
    under torchrun the task refuses it, before the run folder exists."""
    config = GRPOConfig(questions=2, group_size=8, batch_size=8, dynamic_sampling=True)
    assert grpo_task(world, world.tokenizer, config, 48).train  # one process: allowed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="--dynamic-sampling must be off under torchrun"):
        grpo_task(world, world.tokenizer, config, 48)
