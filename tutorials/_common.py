"""What the numbered tutorials share: the run folder and the checkpoints of earlier tutorials.

The tutorials are run in order and share one run folder (``runs/tutorial`` by default). A later
tutorial needs the models of the earlier ones; if they are missing (or unfinished, or made from
a model that has changed since) it trains them first with the default settings (pre-training
then SFT, about 4-5 minutes on a 2-core CPU) and says so: ``minialign.cli.ensure_stage``, what
``minialign STAGE --with-prerequisites`` does. A tutorial's own run replaces the one it made
before (``overwrite=True``), whatever flags it was given then.
"""

from __future__ import annotations

import argparse
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
    return parser


def ensure(stage: str, out: str, device: str = "auto", seed: int = 0) -> Path:
    """``out/<stage>/model.pt``, complete and up to date: trained now (after its prerequisites)
    if it is missing, with the defaults, as the tutorial of that stage does."""
    from minialign.cli import ensure_stage
    return ensure_stage(stage, out=out, device=device, seed=seed)


def ensure_pretrained(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("pretrain", out, device, seed)


def ensure_sft(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("sft", out, device, seed)


def ensure_reward_model(out: str, device: str = "auto", seed: int = 0) -> Path:
    return ensure("reward_model", out, device, seed)


def banner(text: str) -> None:
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78)
