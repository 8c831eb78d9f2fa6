"""Checks minialign/stages/rejection_sampling.py: bad settings refused before any folder, and the stage
end to end on both toy tasks (and a Hugging Face model through the adapter). (The step it drives,
best_of_n.rejection_sampling_round, and best-of-N's estimate from samples: tests/equations/test_best_of_n.py.)"""

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from handworked import expect

import minialign.best_of_n as bon
from minialign.runtime.cli import main as cli
from minialign.runtime.files import ConfigError
from minialign.runtime.loading import save_policy
from minialign.stages import rejection_sampling as stage
from minialign.stages.rejection_sampling import RejectionSamplingConfig, main
from minialign.stages.rollout_tasks import RankedPrompts

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


# ----------------------------------------------------------------------------------------------
# the runner on scripted samples: what ranks, what is reported, what is fine-tuned on
# ----------------------------------------------------------------------------------------------


def scripted_generate(tok, samples: dict[str, list[str]]):
    """Stands in for ``generate`` in ``rejection_sampling_round``: the j-th time prompt x is sampled
    in a call it answers ``samples[x][j]`` (cycling), and every answer is finished (ends with EOS)."""
    by_ids = {tuple(tok.prompt(x)): ys for x, ys in samples.items()}

    def generate(model, prompts, max_new_tokens, eos_id, pad_id, **options):
        seen, responses = Counter(), []
        for p in map(tuple, prompts):
            responses.append(tok.response(by_ids[p][seen[p] % len(by_ids[p])]))
            seen[p] += 1
        return SimpleNamespace(responses=lambda: responses, finished=torch.ones(len(prompts), dtype=torch.bool))
    return generate


def test_best_of_n_at_sampling_time_ranks_by_the_scorer_and_reports_r_star(world, monkeypatch):
    """A reward model that prefers the wrong answer: best-of-N ranks by its r_phi and reports r*."""
    tok = world.tokenizer
    x = "what is 1 + 2 ?"
    monkeypatch.setattr(bon, "generate", scripted_generate(tok, {x: ["3", "4", "5", "3"]}))
    config = RejectionSamplingConfig(task="arithmetic", best_of_n="1,2", best_of_n_samples=4)
    task = RankedPrompts(config, world, tok)
    task.measured = [x]
    r_phi = {"3": 0.0, "4": 2.0, "5": 1.0}
    task.reward_fn = lambda prompts, completions, finished, **columns: [r_phi[y] for y in completions]
    rows = task.best_of_n(None, torch.Generator().manual_seed(0))
    assert [r["n"] for r in rows] == [1, 2]
    # M = 4 samples 3, 4, 5, 3: r_phi 0, 2, 1, 0 and r* (right answer: 3) 1, 0, 0, 1.
    # N = 1 is pi_ref: mean r* = 2/4 = 0.5, KL 0
    # N = 2 ranked by r_phi: levels 0, 1, 2 with q = 1/2, 1/4, 1/4; F = 0.5, 0.75, 1
    #   P(best level) = F^2 - F^-^2: 0.25, 0.5625 - 0.25 = 0.3125, 1 - 0.5625 = 0.4375
    #   r* of the levels: 1 (both samples of level 0 are right), 0, 0: E[r*] = 0.25, below best-of-1's 0.5
    #   KL = 0.25 log(0.25/0.5) + 0.3125 log(0.3125/0.25) + 0.4375 log(0.4375/0.25)
    #      = -0.1732868 + 0.0697324 + 0.2448319 = 0.1412775
    # (ranked by r* and reporting r_phi instead: N = 1 gives 0.75; N = 2 gives levels q = 1/2, 1/2,
    #  P = 0.25, 0.75, r_phi of the levels (2 + 1)/2 = 1.5 and 0: 0.375, KL 0.130812)
    expect([rows[0]["true_reward"], rows[0]["kl"]], [0.5, 0.0], abs=1e-12)
    expect([rows[1]["true_reward"], rows[1]["kl"]], [0.25, 0.1412775], abs=1e-6)
    expect([r["kl_bound"] for r in rows], [0.0, 0.193147], abs=1e-6)


def test_a_round_that_keeps_nothing_is_refused(world):
    """--min-reward above every sample's reward: no row to fine-tune on, said with the flags that change it."""
    task = RankedPrompts(RejectionSamplingConfig(task="arithmetic", min_reward=2.0), world, world.tokenizer)
    nothing = bon.RejectionSamplingResult(rows=[], prompts_kept=0, prompts_dropped=2, mean_reward_kept=float("nan"),
                                          mean_reward_sampled=0.5)
    with pytest.raises(ConfigError, match=r"round 3: no sample reached --min-reward 2.0; nothing to fine-tune on "
                                          r"\(a lower --min-reward, or more --samples-per-prompt\)"):
        task.sft_rows(nothing, 3)


def test_a_round_fine_tunes_on_the_kept_responses_only(world, tiny_model, tmp_path, monkeypatch):
    """The runner's round on scripted samples: the kept rows are known, and the SFT step's loss is
    E0b on their responses: -log pi of the response tokens (and EOS), never the prompt's."""
    tok = world.tokenizer
    tiny_model.eval()  # dropout 0: the same log-probs as in the runner's train mode
    save_policy(tiny_model, tok, tmp_path / "init.pt")
    a, b = "what is 1 + 2 ?", "what is 2 + 2 ?"
    monkeypatch.setattr(bon, "generate", scripted_generate(tok, {a: ["5", "3", "4"], b: ["2", "4", "6"]}))

    def task_of(world, tok, config, device, block_size):  # the two prompts; no sampled evaluation
        task = RankedPrompts(config, world, tok)
        task.train = [a, b]
        task.evaluate = lambda policy, reference: {"heldout_accuracy": 0.0, "kl": 0.0}
        return task

    steps = []

    def recorded_sft_step(policy, prompts, responses, *args, **kwargs):
        done = real_sft_step(policy, prompts, responses, *args, **kwargs)
        steps.append((prompts, responses, done.loss))
        return done

    real_sft_step = stage.sft_step
    monkeypatch.setattr(stage, "rejection_sampling_task", task_of)
    monkeypatch.setattr(stage, "sft_step", recorded_sft_step)
    monkeypatch.setattr(stage, "plots", lambda *args: None)  # seconds of matplotlib, nothing tested here
    summary = stage.main(RejectionSamplingConfig(
        out=str(tmp_path), init=str(tmp_path / "init.pt"), task="arithmetic", steps=1, batch_size=4,
        prompts_per_round=2, samples_per_prompt=3, max_new_tokens=4, best_of_n="", warmup_steps=0,
        device="cpu", progress=False))
    # r* of the samples: 1 + 2 -> 5, 3, 4 = 0, 1, 0; 2 + 2 -> 2, 4, 6 = 0, 1, 0. Each prompt keeps its
    # right answer: 2 rows of reward 1; the mean r* sampled is 2/6 = 0.333333
    assert summary["rows_per_round"] == [2]
    expect([summary["reward_kept_per_round"][0], summary["reward_sampled_per_round"][0]], [1.0, 1 / 3])
    # the one SFT step trains on 4 of them (drawn with replacement): prompt x = <bos> <user> ... <assistant>,
    # response y = answer <eos>
    [(prompts, responses, loss)] = steps
    kept = {(tuple(tok.prompt(a)), tuple(tok.response("3"))), (tuple(tok.prompt(b)), tuple(tok.response("4")))}
    assert len(prompts) == 4 and {(tuple(x), tuple(y)) for x, y in zip(prompts, responses)} <= kept
    # E0b: the mean of -log pi(y_t | x, y_<t) over the 4 x 2 response tokens (the answer, EOS) at the start
    with torch.no_grad():
        nll = []
        for x, y in zip(prompts, responses):
            logps = torch.log_softmax(tiny_model(torch.tensor([x + y]))[0].double(), -1)  # (T, V)
            nll += [-logps[len(x) + t - 1, y[t]] for t in range(len(y))]
    assert len(nll) == 8
    expect(loss, float(torch.stack(nll).mean()), abs=1e-5)
