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
from ..runtime.files import StageError
from ..runtime.folders import STATUS, check_writable, partial_dir, stage_model, stage_problem


def export(source, dest) -> Path:
    """Write the model of ``source`` (a stage folder, a ``model.pt`` or a ``model/`` folder) to ``dest``."""
    source, dest = exportable(source), Path(dest)
    check_writable(dest, "the destination")
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


def exportable(source) -> Path:
    """The model file or folder that ``source`` names, refused unless it is one a completed stage
    wrote, unchanged since (``folders.stage_problem``), or a model folder given by hand (a
    ``config.json`` beside its weights). The error says what is wrong in one line."""
    source = Path(source)
    give = "give a stage folder (runs/demo/dpo), its model.pt or its model/ folder"
    # a file or a Hugging Face folder (a stage folder holds a config.json too, and a status.json)
    model_or_file = source.is_file() or ((source / "config.json").is_file() and not (source / STATUS).is_file())
    stage_dir = source.parent if model_or_file else source
    recorded = (stage_dir / STATUS).is_file() or (partial_dir(stage_dir) / STATUS).is_file()
    if not source.exists() and not recorded:
        raise FileNotFoundError(f"nothing to export: {source} does not exist (has its stage run?); {give}")
    if recorded:  # a stage folder, or a model inside one: the stage must have completed, unchanged since
        problem = stage_problem(stage_dir)
        if problem:
            raise StageError(f"cannot export {source}: {problem}")
        if source == stage_dir:
            source = stage_model(stage_dir.parent, stage_dir.name)  # what the stage wrote
    if source.is_dir() and not model_or_file and not recorded:
        raise FileNotFoundError(f"cannot export {source}: it is neither a stage folder (no {STATUS}) nor a model "
                                f"folder (no config.json); {give}")
    if not source.exists():
        raise FileNotFoundError(f"cannot export {source}: no such file; {give}")
    return source
