"""Runs that never lie: fault injection against minialign/runtime/ (the run folder, files.py) and the CLI.

A bad value is refused before the run folder exists; a failure or Ctrl-C leaves the previous
results intact and a status that says why, and the next stage refuses the unfinished one; a
resumed run ends bit-identical to an uninterrupted one; nothing NaN is saved; a broken
checkpoint gives one clear error naming the file. All on tiny models (seconds).
"""

import dataclasses
import json
import os
import shlex
import shutil
import signal

import pytest
import torch

from minialign import grpo, ppo, reward_model
from minialign.runtime import optim
from minialign.stages import dpo as dpo_stage, grpo as grpo_stage, ppo as ppo_stage
from minialign.stages import pretrain, sft
from minialign.stages import reward_model as reward_model_stage
from minialign.model import GPT, GPTConfig
from minialign.ops import check_mask, kl_k1, kl_k2, kl_k3, masked_mean, masked_sum
from minialign.runtime import cli, files
from minialign.runtime.config import TrainConfig
from minialign.runtime.folders import stage_problem
from minialign.runtime.loading import load_policy, save_policy
from minialign.runtime.optim import optimizer_step
from minialign.runtime.run import DivergenceWarning, Run

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=48)
FAST = dict(progress=False, device="cpu")


# ----------------------------------------------------------------------------------------------
# tiny configs of every stage; the alignment stages start from the session's tiny SFT model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    """{"pretrain", "sft", "reward_model"}: tiny checkpoints for the stages that read them."""
    rm_path = tmp_path_factory.mktemp("rm") / "model.pt"
    torch.manual_seed(0)
    policy, tok = load_policy(tiny_run / "sft" / "model.pt")
    reward_model.RewardModel.from_policy(policy).save(rm_path, tok)
    return {"pretrain": str(tiny_run / "pretrain" / "model.pt"), "sft": str(tiny_run / "sft" / "model.pt"),
            "reward_model": str(rm_path)}


def config(stage, out, inputs=None, **kw):
    """A seconds-long config of ``stage`` writing to ``out``; its inputs from ``inputs`` (or out's stages)."""
    inputs = inputs or {"pretrain": "", "sft": "", "reward_model": ""}
    settings = {
        "pretrain": lambda: pretrain.PretrainConfig(steps=12, batch_size=8, corpus_size=200, eval_size=20,
                                                    eval_every=5, log_every=2, **TINY),
        "sft": lambda: sft.SFTConfig(init=inputs["pretrain"], steps=8, batch_size=8, num_examples=64, eval_size=16,
                                     eval_every=4, log_every=2),
        "reward_model": lambda: reward_model_stage.RewardModelConfig(init=inputs["sft"], steps=8, batch_size=8, num_pairs=64,
                                                               eval_pairs=16, eval_every=4, log_every=2),
        "dpo": lambda: dpo_stage.DPOConfig(init=inputs["sft"], steps=8, batch_size=8, num_pairs=64, eval_pairs=8,
                                           eval_every=4, log_every=1, eval_samples_per_prompt=1, max_new_tokens=8),
        "ppo": lambda: ppo_stage.PPOConfig(init=inputs["sft"], reward_model=inputs["reward_model"], steps=5,
                                           batch_size=8, minibatch_size=4, max_new_tokens=8, eval_every=2,
                                           eval_samples=1, final_eval_samples=1, kl_target=1.0, kl_horizon=40),
        "grpo": lambda: grpo_stage.GRPOConfig(init=inputs["sft"], steps=5, questions=4, group_size=4, batch_size=8,
                                              eval_every=2, eval_samples=1, final_eval_samples=1, ref_reset_every=2,
                                              kl_in="reward"),
    }[stage]()
    import dataclasses
    return dataclasses.replace(settings, out=str(out), **{**FAST, **kw})


MODULES = {"pretrain": pretrain, "sft": sft, "reward_model": reward_model_stage, "dpo": dpo_stage, "ppo": ppo_stage,
           "grpo": grpo_stage}
# where each stage's loop finds accumulated_step (a step given the update hook reaches it through
# runtime.optim.gradient_update)
STEPPERS = {**MODULES, "pretrain": optim, "sft": optim, "reward_model": optim, "dpo": optim, "ppo": optim,
            "grpo": optim}


def at_step(monkeypatch, stage, step, action):
    """Call ``action(loss)`` once, on the first micro-batch loss of the stage's optimizer step
    number ``step``, before its backward."""
    module = STEPPERS[stage]
    real, fired = module.accumulated_step, []

    def patched(model, parallel, optimizer, micro_batches, loss_of, i, cfg):
        def watched(micro):
            out = loss_of(micro)
            if i == step and not fired:
                fired.append(i)
                action(out[0])
            return out
        return real(model, parallel, optimizer, micro_batches, watched, i, cfg)
    monkeypatch.setattr(module, "accumulated_step", patched)


def ctrl_c(loss):
    signal.raise_signal(signal.SIGINT)  # the real signal: the stage's handler asks the loop to stop


def boom(loss):
    raise RuntimeError("boom")


def status(folder) -> dict:
    return json.loads((folder / "status.json").read_text())


def rows(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    """Two stage folders hold the same weights, metrics (but their wall time) and summary."""
    for name in ("model.pt", "value_head.pt"):
        if (a / name).is_file():
            sa, sb = (torch.load(p / name, weights_only=True) for p in (a, b))
            flat_a = {k: v for k, v in _flat(sa)}
            flat_b = {k: v for k, v in _flat(sb)}
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name
    assert rows(a) == rows(b)
    summary = [{k: v for k, v in json.loads((p / "summary.json").read_text()).items() if k != "seconds"}
               for p in (a, b)]
    assert summary[0] == summary[1]


def _flat(obj, key=""):
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{key}.{k}")


# ----------------------------------------------------------------------------------------------
# bad values: refused before the run folder exists, in one line
# ----------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("pretrain", ["--steps", "1", "--lr", "inf"], "--lr must be a finite number"),
    ("pretrain", ["--min-lr-ratio", "-5"], "--min-lr-ratio must be in [0, 1]"),
    ("pretrain", ["--steps", "0"], "--steps must be >= 1"),
    ("pretrain", ["--log-every", "0"], "--log-every must be >= 1"),
    ("pretrain", ["--eval-every", "0"], "--eval-every must be >= 1"),
    ("pretrain", ["--n-head", "3"], "--n-head must be a divisor of --n-embd (32)"),
    ("pretrain", ["--seed", "-1"], "--seed must be in [0, "),
    ("pretrain", ["--device", "gpu"], "--device must be auto, cpu"),
    ("ppo", ["--beta", "-1"], "--beta must be >= 0"),
    ("ppo", ["--value-clip", "-0.2"], "--value-clip must be >= 0"),
    ("ppo", ["--kl-target", "0"], "--kl-target must be > 0"),
    ("ppo", ["--ppo-epochs", "0"], "--ppo-epochs must be >= 1"),
    ("ppo", ["--minibatch-size", "64"], "--minibatch-size must be in [1, 32]"),
    ("grpo", ["--beta", "nan"], "--beta must be a finite number"),
    ("grpo", ["--beta", "-1"], "--beta must be >= 0"),
    ("grpo", ["--group-size", "1"], "--group-size must be >= 2"),
    ("dpo", ["--beta", "0"], "--beta must be > 0"),
    ("reward_model", ["--num-pairs", "10"], "--num-pairs must be >= --batch-size"),
    ("dpo", ["--data", "missing.jsonl"], "--data missing.jsonl: no such file or folder"),
    ("sft", ["--eval-data", "e.jsonl"], "--eval-data is held-out data for --data"),
    ("pretrain", ["--block-size", "3"], "--block-size must be >= "),  # the toy corpus's longest line
    ("dpo", ["--grad-accum", "3"], "--batch-size must be a multiple of 3 (1 rank(s) x 3 micro-batch(es)"),
    ("ppo", ["--grad-accum", "3"], "--minibatch-size must be a multiple of 3"),
    ("grpo", ["--grad-accum", "3"], "--batch-size must be a multiple of 3"),
]


# a tiny model, so that a pre-training the checks failed to stop ends (and fails the test) in seconds
TINY_PRETRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--steps", "2", "--batch-size", "8",
                 "--corpus-size", "50", "--eval-size", "10", "--no-progress"]


@pytest.mark.parametrize("stage, flags, message", BAD_VALUES)
def test_bad_values_are_refused_before_the_run_folder_exists(stage, flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = TINY_PRETRAIN if stage == "pretrain" else []
    assert cli.main([stage, "--out", str(out), *tiny, *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minialign: error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("stage", ["dpo", "ppo", "grpo"])
def test_max_new_tokens_past_the_context_is_refused_before_the_run_folder_exists(stage, tmp_path, inputs, capsys):
    # the tiny model's context is 48 tokens; the toy world's review prompts have 6, its questions 9
    out = tmp_path / "run"
    flags = ["--init", inputs["sft"], "--max-new-tokens", "100", "--no-progress"]
    flags += ["--reward-model", inputs["reward_model"]] if stage == "ppo" else []
    assert cli.main([stage, "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    longest = 9 if stage == "grpo" else 6
    assert f"--max-new-tokens must be <= {48 - longest} (the model's context of 48 tokens less the longest " \
           f"prompt's {longest}), got 100" in err
    assert not out.exists()


def test_sft_refuses_a_base_model_whose_context_is_too_short_before_the_run_folder_exists(tmp_path, world, capsys):
    base = tmp_path / "short.pt"
    save_policy(GPT(GPTConfig(vocab_size=world.tokenizer.vocab_size, **{**TINY, "block_size": 12})), world.tokenizer,
                base)
    assert cli.main(["sft", "--out", str(tmp_path / "run"), "--init", str(base), "--num-examples", "64",
                     "--eval-size", "16"]) == 1
    assert f"{base} has a context of 12 tokens, fewer than the toy world's longest SFT example" \
        in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_library_configs_are_checked_too():
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        pretrain.PretrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="--kl-in must be one of loss, reward"):
        grpo_stage.GRPOConfig(kl_in="elsewhere")
    with pytest.raises(ValueError, match="--steps must be an integer"):
        TrainConfig(steps=2.5)
    cfg = TrainConfig()
    cfg.steps = 0  # a config changed after it was built is checked again when the stage starts
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        cfg.validate()


# ----------------------------------------------------------------------------------------------
# errors in one line (--debug for the traceback); broken checkpoints name the file
# ----------------------------------------------------------------------------------------------


def test_missing_input_stage_says_which_command_makes_it(tmp_path, capsys, monkeypatch):
    assert cli.main(["dpo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"make it with `minialign sft --out {tmp_path}`, or add --with-prerequisites" in err
    with pytest.raises(files.StageError, match="no sft model"):  # --debug: the exception itself
        cli.main(["dpo", "--out", str(tmp_path), "--debug"])
    monkeypatch.setenv("MINIALIGN_DEBUG", "1")
    with pytest.raises(files.StageError):
        cli.main(["dpo", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"torch", os.urandom(3000), "truncated"])
def test_broken_checkpoints_give_one_error_naming_the_file(content, tmp_path, tiny_run, capsys):
    path = tmp_path / "broken.pt"
    good = (tiny_run / "pretrain" / "model.pt").read_bytes()
    path.write_bytes(good[:len(good) // 2] if content == "truncated" else content)
    with pytest.raises(files.CheckpointError, match=f"{path} is not a readable checkpoint"):
        GPT.load(path)
    assert cli.main(["sft", "--out", str(tmp_path / "run"), "--init", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "truncated or corrupt" in err


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    old = GPT(GPTConfig(vocab_size=10, **TINY))
    old.save(path)

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        GPT(GPTConfig(vocab_size=10, **TINY)).save(path)
    monkeypatch.undo()
    reloaded = GPT.load(path)  # the previous checkpoint, intact and loadable
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), reloaded.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------------
# failures and Ctrl-C: previous results kept, status says why, the next stage refuses
# ----------------------------------------------------------------------------------------------


def test_failed_run_keeps_the_previous_results_and_the_next_stage_refuses_it(tmp_path, monkeypatch, capsys):
    pretrain.main(config("pretrain", tmp_path))
    before = {p.name: p.read_bytes() for p in (tmp_path / "pretrain").iterdir()}
    at_step(monkeypatch, "pretrain", 5, boom)
    with pytest.raises(RuntimeError, match="boom"):
        pretrain.main(config("pretrain", tmp_path, lr=1e-2, overwrite=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "pretrain").iterdir()} == before  # untouched
    s = status(tmp_path / "pretrain.partial")
    assert s["status"] == "failed" and s["error"] == "RuntimeError: boom" and s["step"] == 5

    # a stage whose only run failed is refused by the next stage, with the command that fixes it
    (tmp_path / "pretrain").rename(tmp_path / "old")
    assert "has not completed" in stage_problem(tmp_path / "pretrain")
    assert cli.main(["sft", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pretrain has not completed" in err and "is failed after step 5 of 12 (RuntimeError: boom)" in err
    assert "run `minialign pretrain --out" in err


def test_a_rerun_with_other_settings_asks_for_overwrite(tmp_path, capsys):
    pretrain.main(config("pretrain", tmp_path))
    assert cli.main(["pretrain", *_flags(config("pretrain", tmp_path, lr=0.01))]) == 1
    err = capsys.readouterr().err
    assert "holds a pretrain run made with other settings (lr: 0.003 there, 0.01 here); add --overwrite" in err
    assert "--overwrite" in err
    first = (tmp_path / "pretrain" / "model.pt").read_bytes()
    pretrain.main(config("pretrain", tmp_path, lr=1e-2, overwrite=True))
    assert (tmp_path / "pretrain" / "model.pt").read_bytes() != first
    assert json.loads((tmp_path / "pretrain" / "config.json").read_text())["lr"] == 1e-2


def test_an_input_changed_since_a_stage_ran_makes_that_stage_stale(tmp_path, tiny_run):
    shutil.copytree(tiny_run / "sft", tmp_path / "sft")
    assert stage_problem(tmp_path / "sft") is None  # a stage folder copied alone: its input is gone, not changed
    shutil.copytree(tiny_run / "pretrain", tmp_path / "pretrain")
    assert stage_problem(tmp_path / "sft") is None  # a copied run folder checks out: inputs are stored relative to it
    pretrain.main(config("pretrain", tmp_path, overwrite=True))  # a new base model under the SFT model
    problem = stage_problem(tmp_path / "sft")
    assert f"sft was made from {tmp_path / 'pretrain' / 'model.pt'} (--init), which has changed since" in problem
    with pytest.raises(files.StageError, match=f"rerun `minialign sft --out {tmp_path} "):
        dpo_stage.main(config("dpo", tmp_path))
    # a checkpoint edited after its stage completed is refused too
    with open(tmp_path / "pretrain" / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(files.StageError, match="changed after pretrain completed"):
        sft.main(config("sft", tmp_path))


def test_ctrl_c_saves_a_checkpoint_and_the_next_stage_refuses_the_run(tmp_path, monkeypatch, inputs, capsys):
    at_step(monkeypatch, "pretrain", 4, ctrl_c)
    assert cli.main(["pretrain", "--out", str(tmp_path), *_flags(config("pretrain", tmp_path))]) == 130
    err = capsys.readouterr().err
    assert "pretrain stopped after step 5 of 12; continue from step 5 with `minialign pretrain" in err
    s = status(tmp_path / "pretrain.partial")
    assert (s["status"], s["checkpoint_step"], s["resumable"]) == ("interrupted", 5, True)
    assert not (tmp_path / "pretrain").exists()
    with pytest.raises(files.StageError, match="continue it with `minialign pretrain .* --resume`"):
        sft.main(config("sft", tmp_path, init=""))
    # starting over would throw the checkpoint away: it asks; other settings cannot resume it
    with pytest.raises(files.StageError, match="continue it with --resume, or start over with --overwrite"):
        pretrain.main(config("pretrain", tmp_path))
    with pytest.raises(files.StageError, match="saved with other settings"):
        pretrain.main(config("pretrain", tmp_path, lr=0.1, resume=True))


def test_ctrl_c_after_the_last_step_lets_the_stage_complete(tmp_path, monkeypatch, capsys):
    real = pretrain.save_model

    def ctrl_c_then_save(*args):  # Ctrl-C while the trained model is being measured and saved
        signal.raise_signal(signal.SIGINT)
        return real(*args)
    monkeypatch.setattr(pretrain, "save_model", ctrl_c_then_save)
    assert cli.main(["pretrain", *_flags(config("pretrain", tmp_path))]) == 130
    err = capsys.readouterr().err
    assert "pretrain has done its 12 steps and stops once its results are saved" in err
    assert f"its results are complete in {tmp_path / 'pretrain'}; stopped there" in err
    assert stage_problem(tmp_path / "pretrain") is None and not (tmp_path / "pretrain.partial").exists()


def test_ctrl_c_in_the_pipeline_says_how_to_continue_the_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "PretrainConfig", TinyPretrain)
    at_step(monkeypatch, "pretrain", 2, ctrl_c)
    assert cli.main(["pipeline", "--out", str(tmp_path), "--seed", "1", "--stages", "pretrain", "--no-progress"]) == 130
    err = capsys.readouterr().err
    again = f"minialign pipeline --out {tmp_path} --seed 1 --no-progress --stages pretrain --resume"
    assert f"pretrain stopped after step 3 of 6; continue from step 3 with `{again}`" in err, err
    monkeypatch.undo()
    monkeypatch.setattr(pretrain, "PretrainConfig", TinyPretrain)
    assert cli.main(shlex.split(again)[1:]) == 0  # the command it names continues the run
    assert "resuming pretrain at step 3 of 6" in capsys.readouterr().out
    assert stage_problem(tmp_path / "pretrain") is None


def _flags(cfg) -> list[str]:
    """The command-line flags of a config (every field, explicitly)."""
    import dataclasses
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out += ([f"--{'' if v else 'no-'}{f.name.replace('_', '-')}"] if isinstance(v, bool)
                else [f"--{f.name.replace('_', '-')}", str(v)])
    return out


def test_a_stop_between_the_two_final_renames_is_completed_on_the_next_look(tmp_path, monkeypatch):
    run = Run(TrainConfig(out=str(tmp_path)), "demo")
    run.finish({"a": 1})
    run = Run(TrainConfig(out=str(tmp_path)), "demo")
    real, calls = os.replace, []

    def stops_before_the_second(src, dst):  # of finish's folder renames: old results aside, new in place
        if os.path.isdir(src):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(os, "replace", stops_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        run.finish({"a": 2})
    monkeypatch.undo()
    assert not (tmp_path / "demo").exists()
    assert stage_problem(tmp_path / "demo") is None  # the complete .partial is moved into place
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == {"a": 2}


def test_another_process_writing_the_stage_is_refused(tmp_path):
    run = Run(TrainConfig(out=str(tmp_path)), "demo")
    s = status(run.dir)
    s["pid"] = os.getppid()  # alive, and not this process
    (run.dir / "status.json").write_text(json.dumps(s))
    with pytest.raises(files.StageError, match="being written by another process"):
        Run(TrainConfig(out=str(tmp_path)), "demo")


# ----------------------------------------------------------------------------------------------
# resume: bit-identical to the uninterrupted run, for every stage that trains
# ----------------------------------------------------------------------------------------------


# the stages whose three runs take longer (fixed-size evaluations of sampled answers) are marked slow
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) if s in ("sft", "ppo", "grpo") else s
                                   for s in MODULES])
def test_resume_after_ctrl_c_ends_bit_identical(stage, tmp_path, monkeypatch, inputs):
    main = MODULES[stage].main
    main(config(stage, tmp_path / "whole", inputs))
    at_step(monkeypatch, stage, 2, ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="continue from step 3"):
        main(config(stage, tmp_path / "cut", inputs))
    monkeypatch.undo()
    main(config(stage, tmp_path / "cut", inputs, resume=True))
    assert_same_run(tmp_path / "whole" / stage, tmp_path / "cut" / stage)
    assert not (tmp_path / "cut" / f"{stage}.partial").exists()


def test_resume_after_a_crash_from_the_last_periodic_checkpoint(tmp_path, monkeypatch):
    pretrain.main(config("pretrain", tmp_path / "whole"))
    at_step(monkeypatch, "pretrain", 9, boom)
    with pytest.raises(RuntimeError):
        pretrain.main(config("pretrain", tmp_path / "cut", save_every=4))
    assert status(tmp_path / "cut" / "pretrain.partial")["checkpoint_step"] == 8
    monkeypatch.undo()
    pretrain.main(config("pretrain", tmp_path / "cut", save_every=4, resume=True))
    assert_same_run(tmp_path / "whole" / "pretrain", tmp_path / "cut" / "pretrain")
    # resuming a complete run does nothing and returns its summary
    summary = pretrain.main(config("pretrain", tmp_path / "cut", resume=True))
    assert summary == json.loads((tmp_path / "cut" / "pretrain" / "summary.json").read_text())


def test_seeded_runs_stay_byte_identical(tmp_path):
    pretrain.main(config("pretrain", tmp_path / "a"))
    pretrain.main(config("pretrain", tmp_path / "b"))
    assert_same_run(tmp_path / "a" / "pretrain", tmp_path / "b" / "pretrain")
    a, b = ((tmp_path / run / "pretrain" / "model.pt").read_bytes() for run in ("a", "b"))
    assert a == b


# ----------------------------------------------------------------------------------------------
# non-finite values: training stops with the step named; nothing NaN is saved
# ----------------------------------------------------------------------------------------------


def test_nan_gradient_stops_training_with_the_step_named(tmp_path, monkeypatch):
    def nan_gradient(loss):  # the loss stays finite; its gradient does not
        loss.register_hook(lambda grad: grad * float("nan"))
    at_step(monkeypatch, "pretrain", 7, nan_gradient)
    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 7 .*last good checkpoint is "
                                                 r".*resume.pt \(step 4\)"):
        pretrain.main(config("pretrain", tmp_path, save_every=4))
    partial = tmp_path / "pretrain.partial"
    assert status(partial)["status"] == "failed" and "step 7" in status(partial)["error"]
    assert not (partial / "model.pt").exists() and not (tmp_path / "pretrain").exists()
    saved = torch.load(partial / "resume.pt", weights_only=True)["state"]["model"]
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_non_finite_loss_and_weights_are_refused(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(files.NonFiniteError, match="the loss is inf at step 3"):
        optimizer_step(model, opt, model(torch.ones(1, 3)).sum() * 0 + float("inf"), 3, TrainConfig())
    gpt = GPT(GPTConfig(vocab_size=10, **TINY))
    with torch.no_grad():
        gpt.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(files.NonFiniteError, match=r"not saving .*model.pt: model.blocks.0.mlp.c_fc.weight holds NaN"):
        gpt.save(tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_non_finite_weights_are_not_exported_as_a_hugging_face_folder(tmp_path, world):
    pytest.importorskip("transformers")
    from minialign.runtime.loading import save_hf_folder
    gpt = GPT(GPTConfig(vocab_size=world.tokenizer.vocab_size, **TINY))
    with torch.no_grad():
        gpt.blocks[0].attn.c_attn.weight[1, 2] = float("inf")
    with pytest.raises(files.NonFiniteError, match=r"not saving .*model: blocks.0.attn.c_attn.weight holds NaN or inf"):
        save_hf_folder(gpt, world.tokenizer, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_loss_that_grows_past_its_bound_warns_once(tmp_path):
    run = Run(TrainConfig(out=str(tmp_path)), "demo")
    run.log(0, loss=1.0)
    run.log(1, loss=2.9)  # bound: 2 * |1.0| + 1 = 3
    with pytest.warns(DivergenceWarning, match="the loss 3.5 at step 2 is past twice its first value plus one"):
        run.log(2, loss=3.5)
    run.log(3, loss=9.0)  # once is enough
    assert len(status(run.dir)["warnings"]) == 1


# ----------------------------------------------------------------------------------------------
# library inputs: masks are 0/1, KL estimators do not broadcast, rewards are finite
# ----------------------------------------------------------------------------------------------


def test_masks_must_be_zero_or_one():
    x = torch.tensor([1.0, 3.0])
    # a mask of halves would give (0.5 + 1.5) / 1.0 = 2.0, a "mean" above both values' weights
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*\[0.5\]"):
        masked_mean(x, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_sum(x, torch.tensor([2, 0]))
    for mask in (torch.tensor([True, False]), torch.tensor([1, 0]), torch.tensor([1.0, 0.0])):
        assert masked_mean(x, mask) == 1.0  # bool, integer and float 0/1 masks all select x[0]
    check_mask(torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8))
    from minialign.ppo import gae
    with pytest.raises(ValueError, match="only 0 and 1"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.5]]))


@pytest.mark.parametrize("kl", [kl_k1, kl_k2, kl_k3])
def test_kl_estimators_do_not_broadcast(kl):
    with pytest.raises(ValueError, match=r"differ in shape .*\(3, 1\).*\(3,\)"):
        kl(torch.zeros(3, 1), torch.zeros(3))  # would broadcast to (3, 3)
    assert kl(torch.zeros(3), torch.zeros(3)).shape == (3,)


def test_rewards_must_be_finite():
    from minialign.ppo import one_step_advantages, per_token_rewards
    nan = float("nan")
    with pytest.raises(ValueError, match=r"rewards must be finite, got 1 NaN/inf value\(s\) at index \[1\]"):
        grpo.group_advantages(torch.tensor([1.0, nan, 0.0, 1.0]), 2)  # silently 0 for the group before
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="score must be finite"):
        per_token_rewards(torch.tensor([1.0, float("inf")]), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)
    with pytest.raises(ValueError, match="total_reward must be finite"):
        one_step_advantages(torch.tensor([nan, 0.0]), torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="rewards must be finite"):
        grpo.kl_penalised_rewards(torch.tensor([nan, 0.0]), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)
    for beta in (nan, -0.1):  # a NaN beta would make every per-token reward NaN; a negative one rewards the KL
        with pytest.raises(ValueError, match="beta must be >= 0"):
            per_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, beta)
        with pytest.raises(ValueError, match="beta must be >= 0"):
            grpo.kl_penalised_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, beta)


# ----------------------------------------------------------------------------------------------
# --with-prerequisites: what is missing is made, what is complete is kept, what is stale is redone
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyPretrain(pretrain.PretrainConfig):  # the defaults a prerequisite (or the pipeline) runs with, made tiny
    steps: int = 6
    batch_size: int = 8
    corpus_size: int = 200
    eval_size: int = 20
    eval_every: int = 5
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 32
    block_size: int = 48


def test_with_prerequisites_makes_missing_and_stale_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "PretrainConfig", TinyPretrain)
    sft_flags = ["--steps", "2", "--batch-size", "8", "--num-examples", "16", "--eval-size", "8", "--eval-every", "2",
                 "--no-progress"]
    assert cli.main(["sft", "--out", str(tmp_path), *sft_flags, "--with-prerequisites"]) == 0
    assert f"[{tmp_path / 'pretrain'} does not exist: running pretrain first]" in capsys.readouterr().out
    assert stage_problem(tmp_path / "pretrain") is None and stage_problem(tmp_path / "sft") is None

    made = status(tmp_path / "pretrain")["started"], (tmp_path / "pretrain" / "model.pt").read_bytes()
    assert cli.ensure_stage("pretrain", out=str(tmp_path)) == tmp_path / "pretrain" / "model.pt"
    assert (status(tmp_path / "pretrain")["started"], (tmp_path / "pretrain" / "model.pt").read_bytes()) == made

    pretrain.main(TinyPretrain(out=str(tmp_path), seed=1, overwrite=True, progress=False))  # sft is now stale
    assert "which has changed since" in stage_problem(tmp_path / "sft")
    cli.ensure_stage("sft", out=str(tmp_path), progress=False)  # rerun with the settings it was made with
    assert stage_problem(tmp_path / "sft") is None
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["num_examples"] == 16
