"""Checks minialign/stages/rejection_sampling.py and the step it drives, best_of_n.rejection_sampling_round:
the round keeps each prompt's best sample, best-of-N's estimate from samples by hand, and the stage end to
end on both toy tasks (and a Hugging Face model through the adapter)."""

import json
import math

import pytest
import torch
from handworked import expect

from minialign.best_of_n import RejectionSamplingHyperparams, best_of_n_from_samples, rejection_sampling_round
from minialign.runtime.cli import main as cli
from minialign.runtime.files import ConfigError
from minialign.stages.rejection_sampling import RejectionSamplingConfig, main

COMMON = ["--device", "cpu", "--no-progress", "--seed", "0"]


def test_best_of_n_from_samples_by_hand():
    # M = 4 samples, scores 1, 2, 2, 3 (values 10, 20, 30, 40), N = 2.
    # levels 1, 2, 3 with q = 1/4, 1/2, 1/4; F = 0.25, 0.75, 1
    # P(best level) = F^2 - F^-^2: 0.0625, 0.5625 - 0.0625 = 0.5, 1 - 0.5625 = 0.4375
    # the tied level 2 picks samples 2 and 3 with pi_ref's weights, half each: value (20 + 30) / 2 = 25
    # E[value] = 0.0625 * 10 + 0.5 * 25 + 0.4375 * 40 = 0.625 + 12.5 + 17.5 = 30.625
    # KL = 0.0625 log(0.0625 / 0.25) + 0.5 log(0.5 / 0.5) + 0.4375 log(0.4375 / 0.25)
    #    = -0.0866434 + 0 + 0.2448319 = 0.1581885
    value, kl = best_of_n_from_samples(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0, 40.0]), 2)
    expect(value, 30.625)
    expect(kl, 0.1581885, rel=1e-6)
    # N = 1 is pi_ref itself: the mean value, KL 0
    value, kl = best_of_n_from_samples(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0, 40.0]), 1)
    assert (value, kl) == (25.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        best_of_n_from_samples(torch.zeros(3), torch.zeros(4), 2)


def test_a_round_keeps_each_prompts_best_sample(tiny_model, world):
    """The reward is the response's length in characters: each kept row is the longest of its prompt's N."""
    tok = world.tokenizer
    prompts = ["review the movie", "what is 1 + 2 ?"]

    def length(prompts, completions, finished, **columns):
        return [float(len(y)) for y in completions]

    hp = RejectionSamplingHyperparams(samples_per_prompt=5)
    result = rejection_sampling_round(tiny_model, tok, length, prompts, hp, torch.Generator().manual_seed(0), 8)
    assert result.rewards.shape == (2, 5) and [len(c) for c in result.completions] == [5, 5]
    for i, row in enumerate(result.selection.rows):
        assert row["prompt"] == prompts[i]
        lengths = [len(y) for y in result.completions[i]]
        assert row["completion"] == result.completions[i][lengths.index(max(lengths))]  # ties: the first
        assert row["reward"] == max(lengths)
    expect(result.selection.mean_reward_sampled, float(result.rewards.mean()))


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
