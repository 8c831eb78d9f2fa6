"""The tutorials' plots for the site: which plot is shown where the text talks about it, and the one
command that makes them.

    python docs_site/figures.py            # runs the tutorials whose plots runs/tutorial lacks (their
                                           # seeded defaults, the figures the docs quote), then copies
                                           # every plot the site shows into docs/figures/
    python docs_site/figures.py --no-run   # copy only: fails naming the tutorials still to run
    python docs_site/figures.py --tiny     # tiny settings into build/tiny_tutorial (a minute): checks
                                           # the wiring, not the documented figures; captions say so

``docs/figures/`` is generated (ignored by git) and read by ``mkdocs build`` (or the folder that
``$MINIALIGN_SITE_FIGURES`` names: tests/runtime/test_notebooks.py builds the site with its notebooks'
plots): ``docs_site/hooks.py`` puts each plot of ``FIGURES`` below the paragraph that names it and
stops the build with the command to run when one is missing. With the defaults, the tutorials
take the times of the README's table; ``--tiny`` runs each on the settings of the CI's notebook test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = ROOT / "docs" / "figures"
MANIFEST = FIGURES_DIR / "figures.json"
TINY_OUT = ROOT / "build" / "tiny_tutorial"

# the stage folder each tutorial writes its plots to (under its --out)
TUTORIAL_OF_STAGE = {
    "pretrain": "01_pretrain.py", "sft": "02_sft.py", "reward_model": "03_reward_model.py",
    "dpo": "04_dpo.py", "ppo": "05_ppo.py", "grpo": "06_grpo.py", "theory": "07_theory_lab.py",
    "real_model": "08_real_model.py", "compare": "09_compare.py", "family": "10_family.py",
    "preference_family": "11_preference_family.py",
}


@dataclass(frozen=True)
class Figure:
    page: str                # docs/<page>
    anchor: str              # text that occurs exactly once on the page: the plots go below its paragraph
    plots: tuple[str, ...]   # <stage>/<name>.png, as the tutorial writes them under runs/tutorial

    @property
    def tutorials(self) -> list[str]:
        return sorted({TUTORIAL_OF_STAGE[p.split("/")[0]] for p in self.plots})


FIGURES = [
    Figure("pretraining_and_sft.md", "floor (`runs/tutorial/pretrain/loss.png`)", ("pretrain/loss.png",)),
    Figure("pretraining_and_sft.md", "(`loss.png`), and, judged by the hidden truth (`truth.png`)",
           ("sft/loss.png", "sft/truth.png")),
    Figure("reward_model.md", "`pearson.png` and `scatter.png`",
           ("reward_model/loss.png", "reward_model/accuracy.png", "reward_model/pearson.png",
            "reward_model/scatter.png")),
    Figure("ppo.md", "Plots: `reward.png`",
           ("ppo/reward.png", "ppo/kl.png", "ppo/objective.png", "ppo/ppo_stats.png", "ppo/losses.png")),
    Figure("ppo.md", "levels off (`overview.png`)", ("ppo/overview.png",)),
    Figure("dpo.md", "- Plots: `loss.png` (from $\\ln 2$)",
           ("dpo/loss.png", "dpo/rewards.png", "dpo/logps.png", "dpo/truth.png")),
    Figure("dpo.md", "the KL each run spent (`reward_vs_kl.png`)", ("dpo/reward_vs_kl.png",)),
    Figure("grpo.md", "(`overview.png`: accuracy, answer length", ("grpo/overview.png",)),
    Figure("theory.md", "Plots: `frontier_graded.png`, `frontier_verifiable.png`",
           ("theory/frontier_graded.png", "theory/frontier_verifiable.png")),
    Figure("theory.md", "Plot: `estimators.png`", ("theory/estimators.png",)),
    Figure("theory.md", "Plots: `frontier_*.png`, `convergence_*.png`",
           ("theory/convergence_graded.png", "theory/convergence_verifiable.png",
            "theory/policies_graded.png", "theory/policies_verifiable.png")),
    Figure("course.md", "In `runs/tutorial/ppo/overview.png`", ("ppo/overview.png",)),
    Figure("course.md", "In `runs/tutorial/compare/reward_vs_kl.png`", ("compare/reward_vs_kl.png",)),
    Figure("policy_gradient.md", "and writes `runs/tutorial/family/accuracy_vs_kl.png`", ("family/accuracy_vs_kl.png",)),
    Figure("preference.md", "`runs/tutorial/preference_family/reward_vs_kl.png`, the numbers",
           ("preference_family/reward_vs_kl.png",)),
    Figure("measurements.md", "its plot is\n`runs/tutorial/dpo/reward_vs_kl.png`", ("dpo/reward_vs_kl.png",)),
]


def plots() -> list[str]:
    return sorted({p for f in FIGURES for p in f.plots})


def tutorials_for(missing: list[str]) -> list[str]:
    """The tutorials that write ``missing``, in course order (a later one needs the earlier models)."""
    return sorted({TUTORIAL_OF_STAGE[p.split("/")[0]] for p in missing})


def tiny_args(tutorial: str) -> list[str]:
    sys.path.insert(0, str(ROOT / "tutorials"))
    from make_notebooks import TINY
    return shlex.split(TINY[Path(tutorial).stem])


def run(tutorial: str, flags: list[str]) -> None:
    command = [sys.executable, str(ROOT / "tutorials" / tutorial), *flags]
    print("$", shlex.join(["python", f"tutorials/{tutorial}", *flags]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/tutorial", help="the tutorials' run folder to copy from")
    parser.add_argument("--no-run", action="store_true", help="copy only; run no tutorial")
    parser.add_argument("--tiny", action="store_true",
                        help=f"run every tutorial on tiny settings into {TINY_OUT.relative_to(ROOT)} and copy those")
    args = parser.parse_args(argv)
    runs = TINY_OUT if args.tiny else ROOT / args.runs
    if args.tiny and not args.no_run:                 # --tiny --no-run: copy the tiny run made before
        shutil.rmtree(TINY_OUT, ignore_errors=True)
        for tutorial in tutorials_for(plots()):
            run(tutorial, tiny_args(tutorial) + ["--out", str(TINY_OUT)])
    missing = [p for p in plots() if not (runs / p).is_file()]
    if missing and not args.no_run:
        for tutorial in tutorials_for(missing):
            run(tutorial, [] if args.runs == "runs/tutorial" else ["--out", args.runs])
        missing = [p for p in plots() if not (runs / p).is_file()]
    if missing:
        raise SystemExit(f"{runs} lacks {missing}: run " +
                         "; ".join(f"python tutorials/{t}" for t in tutorials_for(missing)))
    settings = "tiny" if args.tiny else "defaults"
    copy_plots(runs, FIGURES_DIR, settings)
    print(f"copied {len(plots())} plots ({settings}) from {runs} into {FIGURES_DIR.relative_to(ROOT)}/")
    return 0


def copy_plots(runs: Path, dest: Path, settings: str) -> None:
    """The plots of FIGURES from a run folder into ``dest`` (replaced), with the manifest the
    captions read: ``settings`` is "defaults" (the documented figures) or "tiny"."""
    shutil.rmtree(dest, ignore_errors=True)
    for p in plots():
        (dest / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(runs / p, dest / p)
    (dest / MANIFEST.name).write_text(json.dumps({"settings": settings, "plots": plots()}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
