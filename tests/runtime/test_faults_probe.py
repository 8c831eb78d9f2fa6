"""Runs that never lie, part 2 (issue 22): what a probe as a hostile user found, each case checked.

Exports of what is not a completed stage, input stages edited after they completed, pairs that
state no preference, data files smaller than a step, user reward functions that are wrong, bytes
that are not UTF-8, a full disk, a diverged model used for sampling, a kill during the final
rename, model folders without their tokenizer, a read-only --out, and GRPO batches that do not
split the answers. All on the session's tiny models (seconds), except the ``ulimit -f`` run.
"""

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from minialign.stages import dpo, pretrain, reward_model, sft
from minialign.generation import generate
from minialign.model import GPT, GPTConfig
from minialign.runtime import cli, files, folders, run as run_module
from minialign.runtime.datafiles import DataError, preference_data, read_rows
from minialign.runtime.folders import stage_problem
from minialign.stages import grpo as grpo_stage
from minialign.stages.rewards import RewardFunctionError, check_reward_function, score_answers

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=48)
FAST = dict(progress=False, device="cpu")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the session's tiny run folder (pretrain, sft), free to break."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def error_of(argv, capsys) -> str:
    assert cli.main([str(a) for a in argv]) == 1
    return capsys.readouterr().err.strip()


# ----------------------------------------------------------------------------------------------
# 1. export: only a completed stage (or a model folder), and a stage not yet run does not exist
# ----------------------------------------------------------------------------------------------


def test_export_refuses_what_is_not_a_completed_stage(run_copy, tmp_path, capsys):
    shutil.copytree(run_copy / "sft", run_copy / "dpo.partial")  # a failed run
    status = json.loads((run_copy / "dpo.partial" / "status.json").read_text())
    (run_copy / "dpo.partial" / "status.json").write_text(json.dumps({**status, "status": "failed",
                                                                      "error": "ValueError: broken"}))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "train.py").write_text("print('hello')\n")
    err = error_of(["export", run_copy / "dpo.partial", tmp_path / "d1"], capsys)
    assert "dpo.partial is failed" in err and len(err.splitlines()) == 1
    err = error_of(["export", run_copy / "dpo", tmp_path / "d2"], capsys)  # its partial folder says why
    assert "dpo has not completed" in err and "failed" in err
    err = error_of(["export", scripts, tmp_path / "d3"], capsys)
    assert "neither a stage folder (no status.json) nor a model folder (no config.json)" in err
    err = error_of(["export", run_copy / "reward_model", tmp_path / "d4"], capsys)  # issue 18: never run
    assert f"{run_copy / 'reward_model'} does not exist" in err
    with (run_copy / "sft" / "summary.json").open("a") as f:
        f.write("garbage")
    err = error_of(["export", run_copy / "sft" / "model.pt", tmp_path / "d5"], capsys)
    assert "summary.json changed after sft completed" in err
    assert not any((tmp_path / f"d{i}").exists() for i in range(1, 6))  # nothing written


# ----------------------------------------------------------------------------------------------
# 2. every recorded output of an input stage is checked, not only its checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, edit", [
    ("config.json", lambda p: p.write_text(p.read_text().replace('"lr": ', '"lr": 1'))),
    ("config.json", lambda p: p.write_text(p.read_text()[:40])),                 # cut to invalid JSON
    ("metrics.jsonl", lambda p: p.write_text(p.read_text() + "garbage\n")),
    ("summary.json", lambda p: p.unlink()),
])
def test_an_input_stage_edited_after_it_completed_is_refused(run_copy, name, edit, capsys):
    edit(run_copy / "sft" / name)
    problem = stage_problem(run_copy / "sft")
    assert problem and str(run_copy / "sft" / name) in problem and "after sft completed" in problem
    err = error_of(["dpo", "--out", run_copy, "--steps", "1", "--num-pairs", "8", "--batch-size", "8"], capsys)
    assert f"cannot use {run_copy / 'sft' / 'model.pt'}" in err and name in err
    assert not (run_copy / "dpo.partial").exists()


def test_a_completed_stage_whose_files_were_edited_can_be_rerun_without_overwrite(run_copy):
    path = run_copy / "sft" / "config.json"
    recorded = json.loads(path.read_text())
    config = sft.SFTConfig(**{k: v for k, v in recorded.items() if k != "out"}, out=str(run_copy))
    path.write_text(path.read_text().replace('"lr": ', '"lr": 1'))  # now it seems made with another lr
    assert folders.check_run_folder(config, "sft") is False  # not "made with other settings": it is broken


# ----------------------------------------------------------------------------------------------
# 4, 5, 8. data files: pairs with no preference, fewer rows than a step draws, bytes not UTF-8
# ----------------------------------------------------------------------------------------------


def test_a_pair_whose_answers_are_the_same_is_a_bad_row(tmp_path, world):
    pair = {"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."}
    path = write_rows(tmp_path / "pairs.jsonl", [pair, {**pair, "rejected": pair["chosen"]}, pair])
    for truncate in (True, False):  # dpo, reward model
        with pytest.raises(DataError, match=r"1 bad row\(s\) of 3: line 2: 'chosen' and 'rejected' are the same"):
            preference_data(path, world.tokenizer, 48, truncate=truncate)


def test_a_pair_cut_to_one_answer_by_max_length_is_dropped_and_counted(tmp_path, world):
    tok = world.tokenizer
    pair = {"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."}
    path = write_rows(tmp_path / "pairs.jsonl", [pair, {**pair, "rejected": "the movie was good and long ."}])
    n = len(tok.prompt("review the movie")) + 3  # cut after "the movie was": row 2's answers meet there
    data, report = preference_data(path, tok, 48, max_length=n + 1)
    assert (report.kept, report.same_when_cut, report.truncated) == (1, 1, 1)
    assert "1 pairs dropped (chosen and rejected differ only past --max-length" in report.describe()
    assert report.as_dict()["same_when_cut"] == 1


def test_a_line_that_is_not_utf8_is_named_like_any_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xff"}\n{"text": "fine"}\n')
    rows, bad = read_rows(path)
    assert len(rows) == 2 and bad == [("line 2", "not UTF-8 text (byte 0xff at byte 14 of the line)")]


CONFIGS = {  # a 2-row file against a step of 8 rows (4 for pretrain's default-free check)
    "pretrain": lambda: pretrain.PretrainConfig(steps=2, batch_size=8, eval_size=4, **TINY),
    "sft": lambda: sft.SFTConfig(steps=2, batch_size=8, eval_size=4),
    "reward_model": lambda: reward_model.RewardModelConfig(steps=2, batch_size=8),
    "dpo": lambda: dpo.DPOConfig(steps=2, batch_size=8, max_new_tokens=8),
}
ROWS = {"pretrain": {"text": "the movie was good ."},
        "sft": {"prompt": "review the movie", "completion": "the movie was good ."},
        "reward_model": {"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."},
        "dpo": {"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."}}
MAINS = {"pretrain": pretrain.main, "sft": sft.main, "reward_model": reward_model.main, "dpo": dpo.main}


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_a_data_file_smaller_than_a_step_is_refused_before_the_run_folder_exists(stage, run_copy, tmp_path):
    data = write_rows(tmp_path / "two.jsonl", [ROWS[stage]] * 2)
    config = dataclasses.replace(CONFIGS[stage](), out=str(run_copy), data=str(data), overwrite=True, **FAST)
    with pytest.raises(DataError, match=r"two.jsonl: 2 row\(s\), fewer than the 8 one step draws \(--batch-size 8\)"):
        MAINS[stage](config)
    assert not (run_copy / f"{stage}.partial").exists()


# ----------------------------------------------------------------------------------------------
# 6, 7. your reward function: tried before the run folder exists, its mistakes named as yours
# ----------------------------------------------------------------------------------------------


def scalar(prompts, completions, **kwargs):
    return 0.5


def nones(prompts, completions, **kwargs):
    return [None for _ in completions]


def no_parameters():
    return []


def words(prompts, completions, **kwargs):
    return ["good" for _ in completions]


def raises(prompts, completions, **kwargs):
    raise KeyError("answer_text")


def lengths(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("fn, said", [
    (scalar, "returned 0.5 (a float), not a list of 2 rewards"),
    (nones, "returned None for answer 0, not a number"),
    (no_parameters, "raised TypeError: no_parameters() got an unexpected keyword argument 'prompts'"),
    (words, "returned 'good' (a str) for answer 0, not a number"),
    (raises, "raised KeyError: 'answer_text'"),
])
def test_a_wrong_reward_function_is_named_with_what_it_did_and_what_it_must_be(fn, said):
    rows = [{"prompt": "what is 1 + 1 ?", "answer": "2"}, {"prompt": "what is 2 + 2 ?", "answer": "4"}]
    with pytest.raises(RewardFunctionError) as e:
        check_reward_function(fn, rows)
    message = str(e.value)
    assert f"the reward function {__name__}:{fn.__name__} {said}" in message
    assert "def f(prompts, completions, **kwargs) -> list[float]" in message


def test_a_right_reward_function_scores_as_before():
    rows = [{"prompt": "q", "answer": "2"}, {"prompt": "q", "answer": "4"}]
    assert score_answers(lengths, rows, ["12", "1"], [True, True]).tolist() == [2.0, 1.0]


def test_grpo_tries_your_reward_before_the_run_folder_exists(run_copy, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def nones(prompts, completions, **kwargs):\n"
                                            "    return [None] * len(completions)\n")
    config = grpo_stage.GRPOConfig(out=str(run_copy), steps=1, questions=2, group_size=2, batch_size=4,
                                   reward=f"{tmp_path / 'my_rewards.py'}:nones", **FAST)
    with pytest.raises(RewardFunctionError, match="my_rewards:nones returned None for answer 0"):
        grpo_stage.main(config)
    assert not (run_copy / "grpo.partial").exists()


# ----------------------------------------------------------------------------------------------
# 9. a full disk: the write that failed, where, and the previous results untouched
# ----------------------------------------------------------------------------------------------


def sft_argv(out):
    return ["sft", "--out", str(out), "--steps", "2", "--batch-size", "8", "--num-examples", "16",
            "--eval-size", "8", "--eval-every", "2", "--lr", "0.001", "--overwrite", "--no-progress"]


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_results(run_copy, monkeypatch, capsys):
    before = files.fingerprint(run_copy / "sft")

    def full_disk(obj, path, *args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 36416 vs 36304")
    monkeypatch.setattr(torch, "save", full_disk)
    err = error_of(sft_argv(run_copy), capsys)
    assert f"writing {run_copy / 'sft.partial' / 'model.pt'} failed" in err and "is the disk full" in err
    assert f"{run_copy / 'sft'} still holds the previous results, untouched" in err
    assert files.fingerprint(run_copy / "sft") == before


@pytest.mark.slow
def test_ulimit_f_gives_the_write_error_line(run_copy):
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, resource.RLIM_INFINITY))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "minialign", *sft_argv(run_copy)], capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()[-1]
    assert "writing" in err and "failed" in err and "still holds the previous results, untouched" in err
    assert stage_problem(run_copy / "sft") is None


# ----------------------------------------------------------------------------------------------
# 10. a diverged model is caught where it is next used (sampling), with the step
# ----------------------------------------------------------------------------------------------


def test_sampling_from_a_diverged_model_is_a_non_finite_error(world):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=world.tokenizer.vocab_size, **TINY))
    with torch.no_grad():
        gpt.lm_head.weight.mul_(1e30)  # finite weights, logits past float32's range
    with pytest.raises(files.NonFiniteError, match="next-token probabilities hold NaN or inf while sampling"):
        generate(gpt, [world.tokenizer.prompt("review the movie")], 4, world.tokenizer.eos_id,
                 world.tokenizer.pad_id)


def test_dpo_at_a_huge_lr_names_the_step_and_the_last_good_checkpoint(run_copy, capsys):
    err = error_of(["dpo", "--out", run_copy, "--lr", "1e30", "--steps", "2", "--batch-size", "8", "--num-pairs",
                    "16", "--eval-pairs", "8", "--eval-every", "1", "--eval-samples-per-prompt", "1",
                    "--max-new-tokens", "8", "--no-progress"], capsys)
    assert err.startswith("minialign: error: at step 0: the model's next-token probabilities hold NaN or inf")
    assert "No checkpoint of this run was saved (--save-every 0)" in err and "unexpected" not in err


# ----------------------------------------------------------------------------------------------
# probed: a kill during the final rename, model folders, a read-only --out, GRPO's batch
# ----------------------------------------------------------------------------------------------


class Killed(BaseException):
    """SIGKILL, as far as the process's own code can tell: nothing after it runs."""


@pytest.mark.parametrize("renames_done", [0, 1])
def test_a_kill_during_the_final_renames_is_completed_by_the_next_reader(run_copy, monkeypatch, renames_done):
    calls, real = [], os.replace

    def replace(src, dst):
        if str(src).endswith(("sft", "sft.partial")):  # Run._complete's two renames
            if len(calls) == renames_done:
                raise Killed
            calls.append(src)
        real(src, dst)
    monkeypatch.setattr(run_module.os, "replace", replace)
    with pytest.raises(Killed):
        cli.main(sft_argv(run_copy))
    monkeypatch.setattr(run_module.os, "replace", real)
    status = json.loads((run_copy / "sft.partial" / "status.json").read_text())
    assert status["status"] == "complete"
    status["pid"] = 2 ** 22 + 1  # the killed process is gone (this one is alive)
    (run_copy / "sft.partial" / "status.json").write_text(json.dumps(status))
    assert stage_problem(run_copy / "sft") is None  # the reader finished the swap: the new run is there
    assert json.loads((run_copy / "sft" / "config.json").read_text())["lr"] == 0.001
    assert not (run_copy / "sft.partial").exists() and not list(run_copy.glob(".sft.old-*"))


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["export", str(tiny_run / "sft"), str(tmp_path / "hf")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    err = error_of(["sft", "--out", tmp_path / "run", "--model", tmp_path / "hf", "--steps", "1"], capsys)
    assert f"{tmp_path / 'hf'} has no tokenizer files" in err
    assert not (tmp_path / "run").exists()


def test_a_model_folder_whose_config_disagrees_with_its_weights_is_one_line(tiny_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["export", str(tiny_run / "sft"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 5}))
    for impl in ("minialign", "hf"):
        err = error_of(["sft", "--out", tmp_path / "run", "--model", tmp_path / "hf", "--model-impl", impl,
                        "--steps", "1"], capsys).splitlines()[-1]
        assert str(tmp_path / "hf") in err and "unexpected" not in err
    assert not (tmp_path / "run").exists()


def test_a_read_only_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(folders.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    err = error_of(["pretrain", "--out", locked / "run", "--steps", "1"], capsys)
    assert f"--out {locked / 'run'}: this user cannot write in {locked}" in err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("batch_size, ok", [(8, True), (4, True), (16, True), (12, True), (6, False), (3, False)])
def test_grpo_batch_divides_the_answers_of_an_iteration_or_takes_them_all(batch_size, ok):
    make = lambda: grpo_stage.GRPOConfig(questions=2, group_size=4, batch_size=batch_size)  # noqa: E731 - 8 answers
    if ok:
        make()
    else:
        with pytest.raises(files.ConfigError, match=r"--batch-size must be a divisor of the 8 answers an iteration "
                                                    r"samples \(--questions 2 x --group-size 4\)"):
            make()
