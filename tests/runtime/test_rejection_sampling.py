"""Checks minialign/stages/rejection_sampling.py: bad settings refused before any folder, and the stage
end to end on both toy tasks (and a Hugging Face model through the adapter). (The step it drives,
best_of_n.rejection_sampling_round, and best-of-N's estimate from samples: tests/equations/test_best_of_n.py.)"""

import json
import math

import pytest
import torch

from minialign.runtime.cli import main as cli
from minialign.runtime.files import ConfigError
from minialign.stages.rejection_sampling import RejectionSamplingConfig, main

COMMON = ["--device", "cpu", "--no-progress", "--seed", "0"]


def test_bad_settings_are_refused_before_any_folder(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    for flags, message in [
            (["--steps", "5", "--rounds", "2"], "--steps must be a multiple of --rounds (2)"),
            (["--task", "arithmetic", "--reward", "reward_model"], "--reward must be auto or true on --task arithmetic"),
            (["--best-of-n", "1,x"], "--best-of-n must be comma-separated integers >= 1"),
            (["--keep-per-prompt", "9"], "keep_per_prompt must be an integer in [1, samples_per_prompt = 8]")]:
        assert cli(["rejection-sampling", "--out", str(out), *COMMON, *flags]) == 1
        assert message in capsys.readouterr().err, flags
    # the review task ranks by the reward model: without one, the error says how to make it
    with pytest.raises(ConfigError, match="no reward model at .*minialign reward-model"):
        main(RejectionSamplingConfig(out=str(out), init=str(tiny_run / "sft" / "model.pt"), device="cpu"))
    assert not out.exists()


def _tiny(tmp_path, tiny_run, **options):
    config = RejectionSamplingConfig(out=str(tmp_path), init=str(tiny_run / "sft" / "model.pt"), steps=4, rounds=2,
                                     batch_size=8, prompts_per_round=12, samples_per_prompt=4, max_new_tokens=12,
                                     eval_samples=2, best_of_n="1,4", best_of_n_samples=8, log_every=1,
                                     device="cpu", progress=False, **options)
    summary = main(config)
    folder = tmp_path / "rejection_sampling"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return summary, folder, rows


@pytest.mark.slow
def test_expert_iteration_on_arithmetic_end_to_end(tiny_run, tmp_path):
    summary, folder, rows = _tiny(tmp_path, tiny_run, task="arithmetic")
    for name in ["model.pt", "summary.json", "loss.png", "truth.png", "best_of_n.png"]:
        assert (folder / name).is_file(), name
    assert rows[0]["kl"] == 0.0  # pi_ref measured against itself: the sampled KL is exactly 0
    assert [r["round"] for r in rows if "round" in r] == [1, 2]
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [0, 2, 4]  # before, after each round
    assert summary["scorer"] == "true" and len(summary["rows_per_round"]) == 2
    assert summary["rows_per_round"] == [12, 12]  # one best answer per question
    assert all(k >= s for k, s in zip(summary["reward_kept_per_round"], summary["reward_sampled_per_round"]))
    assert 0 <= summary["heldout_accuracy"] <= 1 and summary["kl"] > 0
    bon = summary["best_of_n"]
    assert [b["n"] for b in bon] == [1, 4] and bon[0]["kl"] == 0.0
    assert bon[1]["kl"] <= bon[1]["kl_bound"] + 1e-12 and bon[1]["true_reward"] >= bon[0]["true_reward"]


@pytest.mark.slow
def test_review_task_ranked_by_a_reward_model(tiny_run, tmp_path):
    from minialign.reward_model import RewardModel
    from minialign.runtime.loading import load_policy
    torch.manual_seed(0)
    policy, tok = load_policy(tiny_run / "sft" / "model.pt")
    RewardModel.from_policy(policy).save(tmp_path / "rm.pt", tok)  # a random head: any scorer will do here
    summary, folder, rows = _tiny(tmp_path, tiny_run, reward_model=str(tmp_path / "rm.pt"))
    assert summary["scorer"] == "reward_model" and math.isfinite(summary["true_reward"])
    assert summary["rows_per_round"] == [12, 12]  # one best sample per prompt
    # the kept samples score at least the mean of those drawn (the best of N is never below the mean)
    assert all(k >= s for k, s in zip(summary["reward_kept_per_round"], summary["reward_sampled_per_round"]))


@pytest.mark.slow
def test_on_a_hugging_face_model_through_the_adapter(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minialign.real.hf import hf_tokenizer_from_toy
    tok = world.tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    hf_tokenizer_from_toy(tok).save_pretrained(str(folder))
    assert cli(["rejection-sampling", "--out", str(tmp_path / "run"), *COMMON, "--model", str(folder),
                "--model-impl", "hf", "--task", "arithmetic", "--steps", "2", "--batch-size", "4",
                "--prompts-per-round", "4", "--samples-per-prompt", "2", "--max-new-tokens", "6",
                "--eval-samples", "1", "--best-of-n", "1,2", "--best-of-n-samples", "2"]) == 0
    folder = tmp_path / "run" / "rejection_sampling"
    summary = json.loads((folder / "summary.json").read_text())
    first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0.0 and math.isfinite(summary["kl"])  # the sampled KL of pi_ref to itself: exactly 0
    assert summary["rows_per_round"] == [4] and (folder / "model" / "config.json").is_file()  # an HF folder
