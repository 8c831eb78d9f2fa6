"""Checks minialign/cli.py: every command has --help; the pipeline names its stages."""

import pytest

from minialign.cli import STAGES, TOOLS, build_parser, main


@pytest.mark.parametrize("command", list(STAGES) + list(TOOLS) + ["pipeline"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out or command == "bench"


def test_stage_flags_come_from_the_config():
    args = build_parser().parse_args(["sft", "--steps", "5", "--lr", "0.01", "--no-progress"])
    assert (args.steps, args.lr, args.progress) == (5, 0.01, False)


def test_pipeline_rejects_unknown_stage():
    with pytest.raises(SystemExit, match="unknown stage"):
        main(["pipeline", "--stages", "pretrain,rlhf"])


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
