"""Checks minialign/cli.py: every command has --help; the pipeline names its stages."""

import subprocess
import sys

import pytest

from minialign.cli import STAGES, TOOLS, build_parser, main


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
    if command != "pipeline":
        assert "Reads " in description and f"Writes OUT/{command}/" in description


def test_top_level_help_imports_neither_torch_nor_a_stage():
    code = ("import sys, contextlib, io\n"
            "from minialign.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'minialign.train', 'minialign.pretrain') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_flags_come_from_the_config():
    args = build_parser().parse_args(["sft", "--steps", "5", "--lr", "0.01", "--no-progress"])
    assert (args.steps, args.lr, args.progress) == (5, 0.01, False)
    assert build_parser({"sft"}).parse_args(["sft", "--steps", "5"]).steps == 5


def test_pipeline_rejects_unknown_stage(capsys, tmp_path):
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--stages", "pretrain,rlhf"]) == 1
    assert "--stages: unknown stage(s) ['rlhf']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pipeline_order_starts_with_the_foundation():
    assert list(STAGES)[:2] == ["pretrain", "sft"]
