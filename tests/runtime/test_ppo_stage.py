"""The PPO stage (minialign/stages/ppo.py) end to end on the tiny checkpoints, and a setting it
refuses. (The equations of minialign/ppo.py: tests/equations/test_ppo.py.)"""

import json
import math

import pytest
import torch

from minialign.stages.ppo import PPOConfig


def _tiny_reward_model(tiny_run):
    from minialign.reward_model import RewardModel
    from minialign.runtime.loading import load_policy
    path = tiny_run / "ppo_test_rm" / "model.pt"
    if not path.is_file():
        torch.manual_seed(0)
        policy, tok = load_policy(tiny_run / "sft" / "model.pt")
        RewardModel.from_policy(policy).save(path, tok)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(advantage="source", shared_trunk=True, kl_target=1.0,
                                                   ent_coef=0.01, whiten_advantages=False)])
def test_ppo_end_to_end_tiny(tiny_run, tmp_path, options):
    from minialign.stages.ppo import main
    config = PPOConfig(out=str(tmp_path), init=str(tiny_run / "sft" / "model.pt"),
                       reward_model=str(_tiny_reward_model(tiny_run)), steps=8, batch_size=16,
                       minibatch_size=8, ppo_epochs=2, max_new_tokens=12, eval_every=4, eval_samples=2,
                       final_eval_samples=2,
                       device="cpu", progress=False, **options)
    summary = main(config)
    run = tmp_path / "ppo"
    for name in ["model.pt", "value_head.pt", "summary.json", "metrics.jsonl", "reward.png", "kl.png"]:
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))
    # the result: PPO raises the reward it is given. The tiny reward model is a random head on the
    # SFT trunk, so r* says nothing here; the learned reward r_phi of the rollouts does (seed 0:
    # -1.43 over the first three iterations, -0.08 and -0.38 over the last three, by option)
    first, last = (sum(r["score"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last > first + 0.5
    for key in ["objective", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance",
                "score", "rollout/true_reward", "pg_loss"]:
        assert key in rows[0], key
        assert math.isfinite(rows[0][key]) or key == "explained_variance", key  # EV is NaN if Var(R) = 0
    assert "true_reward" in rows[-1] and rows[-1]["true_reward"] == summary["true_reward"]
    # on the first epoch of the first rollout the policy is the rollout policy: the KL to pi_ref is 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert math.isfinite(summary["true_reward"]) and -7 <= summary["true_reward"] <= 7
    from minialign.runtime.loading import load_policy
    load_policy(run / "model.pt")                               # a plain policy checkpoint


def test_ppo_rejects_a_bad_minibatch_size(tmp_path):
    from minialign.stages.ppo import main
    with pytest.raises(ValueError, match="minibatch-size"):
        main(PPOConfig(out=str(tmp_path), batch_size=4, minibatch_size=8))
