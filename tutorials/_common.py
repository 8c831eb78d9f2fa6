"""What the numbered tutorials share: the run folder and the checkpoints of earlier tutorials.

The tutorials are run in order and share one run folder (``runs/tutorial`` by default). A later
tutorial needs the models of the earlier ones; if they are missing it trains them first with the
default settings (pre-training then SFT, about 4-5 minutes on a 2-core CPU) and says so.
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


def ensure_pretrained(out: str, device: str = "auto", seed: int = 0) -> Path:
    """``out/pretrain/model.pt``, trained now (tutorial 01's defaults) if it is missing."""
    path = Path(out) / "pretrain" / "model.pt"
    if not path.is_file():
        from minialign.pretrain import PretrainConfig, main as pretrain
        print(f"[{path} is missing: running pre-training first, as tutorial 01 does]")
        pretrain(PretrainConfig(out=out, device=device, seed=seed))
    return path


def ensure_sft(out: str, device: str = "auto", seed: int = 0) -> Path:
    """``out/sft/model.pt``, trained now (tutorials 01 and 02's defaults) if it is missing."""
    path = Path(out) / "sft" / "model.pt"
    if not path.is_file():
        ensure_pretrained(out, device, seed)
        from minialign.sft import SFTConfig, main as sft
        print(f"[{path} is missing: running SFT first, as tutorial 02 does]")
        sft(SFTConfig(out=out, device=device, seed=seed))
    return path


def ensure_reward_model(out: str, device: str = "auto", seed: int = 0) -> Path:
    """``out/reward_model/model.pt``, trained now (tutorial 03's defaults) if it is missing."""
    path = Path(out) / "reward_model" / "model.pt"
    if not path.is_file():
        ensure_sft(out, device, seed)
        from minialign.reward_model import RewardModelConfig, main as train_reward_model
        print(f"[{path} is missing: training the reward model first, as tutorial 03 does]")
        train_reward_model(RewardModelConfig(out=out, device=device, seed=seed))
    return path


def banner(text: str) -> None:
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78)
