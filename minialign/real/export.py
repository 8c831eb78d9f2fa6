"""``minialign export RUN/STAGE DIR``: a trained model as a Hugging Face folder.

    minialign export runs/demo/dpo exported/dpo      # then: AutoModelForCausalLM.from_pretrained("exported/dpo")

A toy-world stage (``model.pt``: minialign's GPT and the toy tokenizer) becomes a GPT-2 folder
(``gpt2.save_gpt2``: config.json + model.safetensors) with the toy tokenizer as a ``transformers``
tokenizer (``hf.hf_tokenizer_from_toy``, needs the ``hf`` extra). A stage that trained from a
Hugging Face folder already wrote one (``model/``); it is copied. A reward model is written as its
trunk's folder plus ``reward_head.pt`` (the score head), which ``--reward-model`` reads back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..runtime import files
from ..runtime.loading import REWARD_HEAD, save_hf_folder
from ..runtime.folders import stage_model


def export(source, dest) -> Path:
    """Write the model of ``source`` (a stage folder, a ``model.pt`` or a ``model/`` folder) to ``dest``."""
    source, dest = Path(source), Path(dest)
    if source.is_dir() and ((source / "model.pt").is_file() or (source / "model").is_dir()):
        source = stage_model(source.parent, source.name)  # a stage folder: what it wrote
    if not source.exists():
        raise FileNotFoundError(f"nothing to export at {source}: give a stage folder (runs/demo/dpo), "
                                f"its model.pt or its model/ folder")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; export into a new folder")
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return dest
    from ..model import load_checkpoint

    ckpt = load_checkpoint(source)
    if ckpt.get("kind") == "reward_model":
        from ..reward_model import RewardModel

        rm, tok = RewardModel.load(source)
        save_hf_folder(rm.body, tok, dest)
        files.torch_save({"kind": "reward_head", "score_head": rm.score_head.state_dict()}, dest / REWARD_HEAD)
        return dest
    from ..runtime.loading import load_policy

    model, tok = load_policy(source)
    save_hf_folder(model, tok, dest)
    return dest
