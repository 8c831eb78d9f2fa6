"""Checks minialign/runtime/: config flags, the schedule, the optimizer step, the run folder, plots."""

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch

from minialign.runtime.config import TrainConfig
from minialign.runtime.devices import resolve_device
from minialign.runtime.flags import add_config_args, config_from_args
from minialign.runtime.loading import load_policy, save_policy
from minialign.runtime.optim import lr_at, make_optimizer, optimizer_step
from minialign.runtime.run import Run


@dataclass
class DemoConfig(TrainConfig):
    beta: float = 0.1
    kl_in: Literal["loss", "reward"] = "loss"
    limit: Optional[int] = None


def test_config_flags_roundtrip():
    parser = argparse.ArgumentParser()
    add_config_args(parser, DemoConfig)
    cfg = config_from_args(DemoConfig, parser.parse_args(
        ["--beta", "0.5", "--kl-in", "reward", "--no-progress", "--limit", "3", "--steps", "7"]))
    assert (cfg.beta, cfg.kl_in, cfg.progress, cfg.limit, cfg.steps) == (0.5, "reward", False, 3, 7)
    assert config_from_args(DemoConfig, parser.parse_args([])) == DemoConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kl-in", "elsewhere"])


@pytest.mark.parametrize("flags, expected", [([], None), (["--progress"], True), (["--no-progress"], False),
                                             (["--progress", "false"], False), (["--progress", "True"], True),
                                             (["--progress", "no"], False), (["--progress", "auto"], None)])
def test_boolean_flags_take_every_spelling(flags, expected):
    parser = argparse.ArgumentParser()
    add_config_args(parser, DemoConfig)
    assert parser.parse_args(flags).progress is expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--progress", "maybe"])


@pytest.mark.parametrize("asked, hidden", [(None, True), (True, False), (False, True)])
def test_progress_bars_follow_tqdm_off_when_the_output_is_not_a_terminal(asked, hidden):
    """pytest captures stderr, so it is not a terminal: by default (None) no bar is drawn there,
    as tqdm does with disable=None; --progress draws one anyway, --no-progress never."""
    from minialign.runtime.run import progress
    bar = progress(range(3), DemoConfig(progress=asked), "demo")
    assert bar.disable is hidden
    bar.close()


def test_threads_are_set_before_the_stage_runs_recorded_and_no_other_setting(tmp_path):
    from minialign.runtime.devices import set_threads
    from minialign.runtime.folders import command_line, config_changes
    from minialign.runtime.stage import stage

    seen = []

    @stage("demo")
    def main(config):
        seen.append(torch.get_num_threads())
        run = Run(config, "demo")
        run.finish({})
        return {}

    before = torch.get_num_threads()
    try:
        assert set_threads(0) == before  # 0, the default, leaves torch's own choice alone
        main(DemoConfig(out=str(tmp_path), threads=1))
        assert seen == [1]
        saved = json.loads((tmp_path / "demo" / "config.json").read_text())
        assert saved["threads"] == 1
        assert "--threads 1" in json.loads((tmp_path / "demo" / "status.json").read_text())["command"]
        torch.set_num_threads(before)
        main(DemoConfig(out=str(tmp_path)))  # another thread count is the same run, not other settings
        assert seen == [1, before] and config_changes(saved, DemoConfig(out=str(tmp_path))) == ""
        assert json.loads((tmp_path / "demo" / "config.json").read_text())["threads"] == before  # the count in use
        assert "--threads" not in command_line("demo", DemoConfig(out=str(tmp_path)))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads must be >= 0, got -1"):
        DemoConfig(threads=-1)


FAULTS_OF_A_STEP = """
import resource, statistics, sys, torch
from minialign.runtime.devices import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
from minialign.model import GPT, GPTConfig
from minialign.stages.dpo import DPOConfig
from minialign.tools.bench import random_preference_pairs
from minialign.tools.timing import dpo_step
torch.set_num_threads(1)
torch.manual_seed(0)
policy = GPT(GPTConfig(vocab_size=53, block_size=32))
reference = GPT(GPTConfig(vocab_size=53, block_size=32)).requires_grad_(False)
pairs = random_preference_pairs(53, 32, 8, 22, torch.Generator().manual_seed(0))
step = dpo_step(policy, reference, pairs, DPOConfig(batch_size=32, precompute_ref_logps=False, progress=False))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, statistics.median(faults[2:]))
"""


@pytest.mark.slow  # two fresh processes, each importing torch
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's malloc")
def test_a_dpo_step_reuses_the_memory_the_last_one_freed():
    """With glibc's defaults a DPO step gives freed activations back to the OS and faults their
    pages in again at the next step (thousands of page faults per step); after keep_freed_memory
    the next step reuses them (a fresh process each, as a run starts: the median of steps 3-6).
    A user's own MALLOC_*_THRESHOLD_ is left alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for mode in ("glibc", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_STEP, mode], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        assert out[0] == str(mode == "keep"), out
        faults[mode] = float(out[1])
    assert faults["keep"] < faults["glibc"] / 10, faults
    env["MALLOC_TRIM_THRESHOLD_"] = "1000000"
    assert subprocess.run([sys.executable, "-c", "from minialign.runtime.devices import keep_freed_memory as k; "
                           "print(k())"], capture_output=True, text=True, env=env, check=True).stdout.strip() == "False"


def test_a_zoom_that_cuts_points_off_gets_the_whole_range_beside_it(tmp_path):
    """A loss plot zoomed on its floor (ylim) hid the first steps' loss: such a panel becomes two,
    the whole range and the zoom; a panel that hides nothing, or zooms on a region (xlim), stays one."""
    from PIL import Image
    from minialign.runtime.plots import _with_whole_range, plot_panels
    loss = {"title": "loss", "curves": [([0, 10, 20], [4.07, 1.2, 1.1], "training batch")], "ylim": (1.0, 1.6)}
    whole, zoom = _with_whole_range(loss)
    assert "ylim" not in whole and whole["title"] == "loss: the whole run" and zoom["ylim"] == (1.0, 1.6)
    assert _with_whole_range({**loss, "ylim": (0, 5)}) == [{**loss, "ylim": (0, 5)}]
    assert len(_with_whole_range({**loss, "xlim": (15, 20)})) == 1
    path = plot_panels(tmp_path / "grid.png", [loss, {"curves": []}, {"curves": []}], columns=2, width=4)
    assert Image.open(path).size == (800, 800)  # two columns of 4 in, two rows of 4 in, 100 dpi


def test_lr_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)     # (0 + 1) / 10
    assert lr_at(9, cfg) == pytest.approx(1.0)     # end of warmup
    assert lr_at(60, cfg) == pytest.approx(0.55)   # half-way: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2))
    assert lr_at(110, cfg) == pytest.approx(0.1)   # floor


def test_optimizer_step_clips_and_refuses_nan():
    model = torch.nn.Linear(3, 1)
    cfg = TrainConfig(lr=0.1, grad_clip=1.0, weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrix decays, bias not
    loss = (model(torch.full((1, 3), 100.0)) ** 2).sum()
    assert optimizer_step(model, opt, loss, 0, cfg) > 1.0  # the norm before clipping is reported
    with pytest.raises(FloatingPointError, match="nan"):
        optimizer_step(model, opt, torch.tensor(float("nan"), requires_grad=True), 1, cfg)


def test_run_folder_writes_config_metrics_and_plots(tmp_path):
    run = Run(DemoConfig(out=str(tmp_path)), "demo")
    assert run.dir == tmp_path / "demo.partial"  # the stage works aside until it completes
    run.log(0, loss=1.0)
    run.log(1, loss=0.5, acc=0.9)
    assert run.plot(["loss"], "loss.png", hlines={"floor": 0.2}).stat().st_size > 1000
    run.finish({"loss": 0.5})
    assert not (tmp_path / "demo.partial").exists()
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 0.5] and rows[1]["acc"] == 0.9
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["beta"] == 0.1
    status = json.loads((tmp_path / "demo" / "status.json").read_text())
    assert status["status"] == "complete" and set(status["outputs"]) >= {"loss.png", "summary.json"}


def test_policy_checkpoint_checks_the_tokenizer(tmp_path, tiny_model, world):
    save_policy(tiny_model, world.tokenizer, tmp_path / "p.pt")
    model, tok = load_policy(tmp_path / "p.pt", tokenizer=world.tokenizer)
    assert tok == world.tokenizer
    from minialign.tokenizer import Tokenizer
    with pytest.raises(ValueError, match="another tokenizer"):
        load_policy(tmp_path / "p.pt", tokenizer=Tokenizer(["a", "b"]))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_plots_draw_each_metric_with_its_legend_and_each_line_at_its_height(tmp_path, monkeypatch):
    """Run.plot maps a metric key to a legend in words and a label to a horizontal line's height."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn = {"lines": [], "curves": []}
    real_axhline, real_plot = Axes.axhline, Axes.plot
    monkeypatch.setattr(Axes, "axhline", lambda ax, y, **kw: drawn["lines"].append((y, kw["label"]))
                        or real_axhline(ax, y, **kw))
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: drawn["curves"].append((list(a[0]), list(a[1]),
                                                                                   kw["label"])) or real_plot(ax, *a, **kw))
    run = Run(DemoConfig(out=str(tmp_path)), "demo")
    run.log(0, loss=1.0)
    run.log(5, loss=0.5, acc=0.9)
    path = run.plot({"loss": "training loss"}, "loss.png", hlines={"floor": 0.2}, ylabel="nats",
                    caption="falls to the floor")
    assert path.is_file() and path.stat().st_size > 1000
    assert drawn["lines"] == [(0.2, "floor")]
    assert drawn["curves"] == [([0, 5], [1.0, 0.5], "training loss")]
