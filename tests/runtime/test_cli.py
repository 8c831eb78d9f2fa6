"""Checks minialign/runtime/cli.py: every command has --help; the pipeline names its stages."""

import subprocess
import sys

import pytest

from minialign.runtime.cli import STAGES, TOOLS, build_parser, main


@pytest.mark.parametrize("command", list(STAGES) + list(TOOLS) + ["pipeline"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out or command == "bench"


@pytest.mark.parametrize("command", list(STAGES) + ["pipeline"])
def test_stage_help_opens_with_what_it_does_reads_and_writes(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage, description = capsys.readouterr().out.split("options:")[0].split("\n\n", 1)
    assert usage == f"usage: minialign {command} [options]"
    assert "Config(" not in description  # not the dataclass's generated signature
    description = " ".join(description.split())
    if command != "pipeline":
        assert "Reads " in description and f"Writes OUT/{command}/" in description


def test_top_level_help_imports_neither_torch_nor_a_stage():
    code = ("import sys, contextlib, io\n"
            "from minialign.runtime.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'minialign.runtime.config', 'minialign.pretrain')\n"
            "         if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_flags_come_from_the_config():
    args = build_parser().parse_args(["sft", "--steps", "5", "--lr", "0.01", "--no-progress"])
    assert (args.steps, args.lr, args.progress) == (5, 0.01, False)
    assert build_parser({"sft"}).parse_args(["sft", "--steps", "5"]).steps == 5


@pytest.mark.parametrize("argv", [["ppo", "--kl-coef", "0.2"], ["ppo", "--kl-coef=0.2"], ["pipeline", "--kl-coef", "1"]])
def test_a_renamed_flag_says_its_new_name(argv, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == "minialign: error: --kl-coef is now --beta (the KL strength is beta in every algorithm)\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["pretrain", "--lr", "-1"], ["exercises", "check", "nothing-here"]])
def test_debug_after_any_command_shows_the_error_itself(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIALIGN_DEBUG", raising=False)
    with pytest.raises((ValueError, FileNotFoundError)):  # raised, not argparse's exit 2
        main([*argv, "--debug"])


@pytest.mark.parametrize("argv, message", [(["dpo", "--lr", "-1"], "--lr must be > 0, got -1.0"),
                                           (["grpo", "--beta", "0.1", "--steps", "0"], "--steps must be >= 1, got 0"),
                                           (["pipeline", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
                                           (["pipeline", "--stages", "rlhf"], "--stages: unknown stage(s) ['rlhf']")])
def test_a_bad_shared_flag_is_refused_before_torch_is_imported(argv, message, tmp_path):
    """A flag every stage shares is checked by TrainConfig, which needs no torch: the refusal
    does not wait seconds for torch's import (a stage's own flags, --beta, still do)."""
    code = "import sys; from minialign.runtime.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["1", "False"], done.stderr
    assert f"minialign: error: {message}" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_pipeline_rejects_unknown_stage(capsys, tmp_path):
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--stages", "pretrain,rlhf"]) == 1
    assert "--stages: unknown stage(s) ['rlhf']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pipeline_runs_the_stages_asked_for_in_dependency_order(monkeypatch, tmp_path):
    """Asked in any order, the pipeline runs each stage after the one it starts from (a stage reads
    the checkpoint of the one before it), with the shared flags passed on to every stage's config."""
    import importlib

    ran = []
    for name, (module, _, _) in STAGES.items():
        monkeypatch.setattr(importlib.import_module(module), "main",
                            lambda config, name=name: ran.append((name, config.out, config.seed)) or {})
    main(["pipeline", "--stages", "grpo,sft,reward_model,pretrain", "--out", str(tmp_path), "--seed", "3"])
    assert ran == [(s, str(tmp_path), 3) for s in ("pretrain", "sft", "reward_model", "grpo")]


@pytest.mark.parametrize("module", ["minialign", "minialign.runtime.cli"])
def test_python_m_runs_the_command(module):
    done = subprocess.run([sys.executable, "-m", module, "sft", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: minialign sft")
