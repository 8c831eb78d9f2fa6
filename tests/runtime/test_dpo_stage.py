"""The DPO stage (minialign/stages/dpo.py) end to end on the tiny SFT checkpoint, with and without
the precomputed reference log-probs. (The equations of minialign/dpo.py: tests/equations/test_dpo.py.)"""

import json
import math

import pytest

from minialign.stages import dpo as dpo_stage
from minialign.stages.dpo import DPOConfig


@pytest.mark.slow
def test_dpo_end_to_end_on_tiny_run(tiny_run, tmp_path):
    config = DPOConfig(out=str(tmp_path), init=str(tiny_run / "sft" / "model.pt"), steps=16, batch_size=16,
                       lr=1e-3, warmup_steps=1, num_pairs=256, eval_pairs=64, eval_every=8, log_every=1,
                       eval_samples_per_prompt=2, max_new_tokens=8, precompute_ref_logps=True,
                       progress=False, device="cpu", beta=0.5)
    summary = dpo_stage.main(config)
    run = tmp_path / "dpo"
    assert (run / "model.pt").is_file() and (run / "truth.png").is_file() and (run / "rewards.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    # step 0: the policy is the reference, so the loss is ln 2 and every implicit reward is 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in rows[0]
    assert rows[0]["kl"] == 0.0 and rows[0]["true_reward"] == summary["true_reward_before"]  # before training
    assert "kl" in rows[7] and "true_reward" in rows[7]
    # the result: the implicit reward (E10) orders held-out pairs it never saw like their labels
    # (0.5 before: every implicit reward is 0, a tie; seed 0 gave 0.67 of 64 pairs), the policy
    # moved away from the reference, and it separates chosen from rejected on its training pairs
    assert summary["heldout_accuracy_before"] == 0.5
    assert summary["heldout_accuracy"] > 0.6
    assert summary["kl"] > 0.01 and rows[-1]["rewards/margins"] > 0
    assert summary["beta"] == 0.5
    assert set(summary) >= {"true_reward_before", "true_reward", "kl", "malformed", "heldout_accuracy"}


@pytest.mark.slow
def test_precompute_option_does_not_change_the_result(tiny_run, tmp_path):
    common = dict(init=str(tiny_run / "sft" / "model.pt"), steps=3, batch_size=8, lr=1e-3, warmup_steps=1,
                  num_pairs=32, eval_pairs=8, eval_every=100, log_every=1, eval_samples_per_prompt=1,
                  max_new_tokens=6, progress=False, device="cpu")
    a = dpo_stage.main(DPOConfig(out=str(tmp_path / "a"), precompute_ref_logps=True, **common))
    b = dpo_stage.main(DPOConfig(out=str(tmp_path / "b"), precompute_ref_logps=False, **common))
    assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-5)
    assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
