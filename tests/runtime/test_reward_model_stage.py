"""The reward-model stage (minialign/stages/reward_model.py) end to end on the tiny SFT checkpoint.
(The equations of minialign/reward_model.py: tests/equations/test_reward_model.py.)"""

import json
import math

import pytest

from minialign.model import GPT
from minialign.reward_model import RewardModel
from minialign.stages.reward_model import RewardModelConfig, main


@pytest.mark.slow
def test_main_end_to_end_tiny(tiny_run, tmp_path, world):
    config = RewardModelConfig(out=str(tmp_path), init=str(tiny_run / "sft" / "model.pt"), steps=40,
                               batch_size=32, lr=3e-3, num_pairs=1280, eval_pairs=200, eval_every=20,
                               log_every=10, progress=False, device="cpu")
    summary = main(config)
    run = tmp_path / "reward_model"
    for name in ("model.pt", "metrics.jsonl", "config.json", "summary.json", "loss.png", "accuracy.png",
                 "scatter.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert key in rows[0] and math.isfinite(rows[-1][key])
    assert "heldout_accuracy" in rows[-1] and "pearson" in rows[-1]
    # the ceiling of these labels is well above chance (~0.75) and below 1
    assert 0.6 < summary["bayes_optimal_accuracy"] < 0.9
    # even 40 steps of a tiny model learn some sentiment (seeds 0-2 gave accuracy 0.59-0.67 and
    # Pearson 0.55-0.66, from 0.49-0.54 and -0.04-0.06 before training): better than chance
    assert summary["heldout_accuracy"] > 0.56 > summary["heldout_accuracy_before"]
    assert summary["pearson"] > 0.4 > summary["pearson_before"]
    assert summary["heldout_loss"] < math.log(2)
    # the saved model gives the same rewards as the one that was trained
    rm, tok = RewardModel.load(run / "model.pt", tokenizer=world.tokenizer)
    assert rm.config == GPT.load(tiny_run / "sft" / "model.pt").config
