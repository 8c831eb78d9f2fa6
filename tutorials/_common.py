"""What the numbered tutorials share: the run folder and the checkpoints of earlier tutorials.

The tutorials are run in order and share one run folder (``runs/tutorial`` by default). A later
tutorial needs the models of the earlier ones; if they are missing (or unfinished, or made from
a model that has changed since) it trains them first with the default settings (pre-training
then SFT, as tutorials 01 and 02 do; the README's table has their times) and says so:
``minialign.runtime.cli.ensure_stage``, what ``minialign STAGE --with-prerequisites`` does. A tutorial's own run replaces the one it made
before (``overwrite=True``), whatever flags it was given then. An experiment written to another
folder (``--out runs/my_try``) starts from the complete models of ``runs/tutorial`` when it has
none of its own, so a "Try this" run leaves the tutorials' folder as it was.

The tutorials are plain scripts and notebooks at once: ``# %%`` lines start the cells that
Jupyter, VS Code and Jupytext read (``python tutorials/make_notebooks.py`` writes them as
``notebooks/*.ipynb``). Inside a notebook ``parse_args`` takes the defaults, or the flags in the
environment variable ``MINIALIGN_TUTORIAL_ARGS`` (as on the command line, e.g.
``MINIALIGN_TUTORIAL_ARGS="--steps 20 --out runs/nb"`` before starting Jupyter): that is how the
slow test ``tests/runtime/test_notebooks.py`` runs every notebook on tiny settings (make_notebooks.TINY).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

DEFAULT_OUT = "runs/tutorial"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="run folder shared by the tutorials")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's choice, $OMP_NUM_THREADS or one per core); "
                             "1 is often faster on a busy machine")
    bars = parser.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true", default=None,
                      help="show tqdm bars (default: only when the output is a terminal)")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="never show tqdm bars")
    return parser


def bar(iterable, args: argparse.Namespace, desc: str):
    """A tutorial's own tqdm bar, with the stages' rule: ``--progress`` always, ``--no-progress``
    never, and by default only when the output is a terminal (tqdm's ``disable=None``), so that a log
    file gets no carriage returns."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=None if args.progress is None else not args.progress)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's flags; in a notebook (a kernel's own arguments are not the tutorial's)
    the flags in ``$MINIALIGN_TUTORIAL_ARGS``, the defaults where it is unset. ``--threads`` takes
    effect here, before the tutorial's first tensor operation."""
    if "ipykernel" in sys.modules:
        args = parser.parse_args(shlex.split(os.environ.get("MINIALIGN_TUTORIAL_ARGS", "")))
    else:
        args = parser.parse_args()
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    from minialign.runtime.devices import set_threads
    set_threads(args.threads)
    return args


def choose_members(parser: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The comma-separated ``--members`` in ``text``, each one of ``known``: a name that is not is
    refused at once, before any model is trained."""
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        parser.error(f"--members: unknown {unknown}; choose from {','.join(known)}" if unknown else
                     f"--members: none given; choose from {','.join(known)}")
    return chosen


def ensure(stage: str, out: str, device: str = "auto", seed: int = 0) -> Path:
    """The model of ``out/<stage>``, complete and up to date. If ``out`` has no such stage (not even
    an unfinished one), the tutorials' own ``runs/tutorial/<stage>`` when it is complete; else
    trained now into ``out`` (after its prerequisites) with the defaults, as the tutorial of that
    stage does."""
    from minialign.runtime.cli import ensure_stage
    from minialign.runtime.folders import partial_dir, stage_model, stage_problem
    own, shared = Path(out) / stage, Path(DEFAULT_OUT) / stage
    if (not own.exists() and not partial_dir(own).exists() and own.resolve() != shared.resolve()
            and stage_problem(shared) is None):
        path = stage_model(DEFAULT_OUT, stage)
        print(f"[{own} does not exist: starting from the tutorials' {path}]")
        return path
    return ensure_stage(stage, out=out, device=device, seed=seed)


def ensure_pretrained(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("pretrain", out, device, seed)


def ensure_sft(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("sft", out, device, seed)


def ensure_reward_model(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("reward_model", out, device, seed)


def banner(text: str) -> None:
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78)


def summary(tutorial: str, **figures) -> str:
    """Print the tutorial's seeded figures on one line, ``summary NN_name: key=value ...``, then
    whether each figure lies in the range the course measured over seeds.

    docs/course.md quotes these lines as the expected output under each command, and
    ``python tutorials/refresh_expected.py`` reruns the commands and rewrites them: keep every
    figure a student is asked about here, and nothing that varies from run to run (times).
    ``python tutorials/measure_ranges.py`` runs the default command over seeds 0-4 and records
    each figure's range in ``tutorials/expected_ranges.json``, which the verdict reads.
    """
    def text(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    line = f"summary {tutorial}: " + " ".join(f"{k}={text(v)}" for k, v in figures.items())
    print(line)
    for verdict in range_verdicts(tutorial, {k: text(v) for k, v in figures.items()}):
        print(verdict)
    return line


RANGES = Path(__file__).resolve().parent / "expected_ranges.json"


def _same(text: str, recorded) -> bool:
    """A printed figure and a recorded one: equal as numbers where both are numbers."""
    try:
        return float(text) == float(recorded)
    except (TypeError, ValueError):
        return str(text) == str(recorded)


def range_verdicts(tutorial: str, figures: dict[str, str], path: Path = RANGES) -> list[str]:
    """For each numeric figure with a recorded range: inside it, near it (within its width), or far.

    The ranges are of the tutorial's default settings; a run with other flags (a "Try this") is
    compared with nothing, since no range was measured for it.
    """
    import json
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    ranges = record.get("ranges", {}).get(tutorial, {})
    # a figure that no seed changed (steps, beta, the exact floor) is a setting of the measured run
    settings = {k: s["values"][0] for k, s in ranges.items() if len(set(s["values"])) == 1}
    if any(k in figures and not _same(figures[k], v) for k, v in settings.items()):
        return [f"range {tutorial}: other settings than the measured default run; no range to compare with"]
    out = []
    for key, value in figures.items():
        s = ranges.get(key)
        if s is None or "mean" not in s or key in settings:
            continue
        try:
            x = float(value)
        except ValueError:
            continue
        width = s["max"] - s["min"]
        where = ("inside" if s["min"] <= x <= s["max"] else
                 "near (within the range's width)" if s["min"] - width <= x <= s["max"] + width else "FAR OUTSIDE")
        out.append(f"range {tutorial}: {key}={value} is {where} the course's range [{s['min']:g}, {s['max']:g}] "
                   f"(mean {s['mean']:.4g}, {s['n']} seeds)")
    return out
