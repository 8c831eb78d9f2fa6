"""Where a stage's models come from, and where the model it trains goes.

Two kinds of model folder, one interface (``hf.CausalLM``) for the algorithms:

- **toy-world checkpoints** ``model.pt``: minialign's GPT and the toy tokenizer, what every
  stage writes when it starts from the toy world (``save_policy``, ``load_policy``).
- **Hugging Face folders** (``config.json``, weights, tokenizer files), given with
  ``--model PATH``. ``--model-impl hf`` runs them through ``transformers`` (any causal LM:
  GPT-2, Llama, Qwen, ...); ``--model-impl minialign`` (the default) loads the weights into
  minialign's own GPT (GPT-2 folders only, ``gpt2.load_gpt2``) with the folder's tokenizer.
  A stage that started from a folder writes a folder, ``out/<stage>/model/``: the next stage,
  ``transformers`` and ``minialign export`` read it.

The reference policy, the reward model's trunk and PPO's critic are loaded the same way as the
policy, so they follow the same ``--model-impl``. Nothing here downloads: folders are local.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..model import GPT, load_checkpoint
from ..tokenizer import Tokenizer, checkpoint_tokenizer
from . import distributed, files
from .folders import input_path

REWARD_HEAD = "reward_head.pt"  # the score head of a reward model saved as a folder


# ----------------------------------------------------------------------------------------------
# toy-world checkpoints: minialign's GPT and the toy tokenizer in one model.pt
# ----------------------------------------------------------------------------------------------


def save_policy(model: GPT, tokenizer: Tokenizer, path) -> None:
    """The GPT and its toy tokenizer in one checkpoint, atomically (``load_policy`` reads it)."""
    model.save(path, tokenizer=tokenizer.state_dict())


def load_policy(path, device="cpu", tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """A GPT and the tokenizer it was trained with; ``tokenizer``, if given, must be the same."""
    ckpt = load_checkpoint(path)
    saved_tok = checkpoint_tokenizer(ckpt, path, tokenizer)
    model = GPT.from_checkpoint(ckpt, source=str(path))
    return model.to(device), saved_tok


# ----------------------------------------------------------------------------------------------
# any model: a toy checkpoint or a Hugging Face folder
# ----------------------------------------------------------------------------------------------


def load_model(path, impl: str = "minialign", device="cpu", toy_tokenizer: Tokenizer | None = None):
    """(model, tokenizer) from a toy checkpoint ``model.pt`` or a Hugging Face folder.

    ``impl`` picks the implementation for a folder (``hf``: transformers; ``minialign``: the
    own GPT, GPT-2 only). A toy checkpoint runs in the own GPT; its tokenizer must equal
    ``toy_tokenizer`` if that is given.
    """
    path = Path(path)
    if impl not in ("minialign", "hf"):
        raise ValueError(f"model_impl must be 'minialign' or 'hf', got {impl!r}")
    if path.is_dir():
        from ..real.hf import HFTokenizer, check_tokenizer_fits, load_hf

        if impl == "hf":
            return load_hf(path, device)
        from ..real.gpt2 import load_gpt2

        model = load_gpt2(path, device).train()
        tok = HFTokenizer.from_pretrained(path)
        check_tokenizer_fits(model, tok, path)
        return model, tok
    if impl == "hf":
        raise ValueError(f"{path} is a minialign checkpoint: it runs with --model-impl minialign "
                         f"(`minialign export` writes it as a Hugging Face folder for --model-impl hf)")
    return load_policy(path, device, toy_tokenizer)


def load_reference(path, impl: str = "minialign", device="cpu", toy_tokenizer: Tokenizer | None = None):
    """pi_ref: ``load_model``'s model, frozen (no gradients, eval mode), without its tokenizer."""
    reference, _ = load_model(path, impl, device, toy_tokenizer)
    return reference.eval().requires_grad_(False)


def load_policy_and_reference(config, device, toy_tokenizer: Tokenizer | None = None):
    """(policy, pi_ref, tokenizer) of a stage that trains away from pi_ref: the model it starts from
    (``--init``, a ``--model`` folder, else the run folder's model of the stage ``INPUTS`` names)
    read once; pi_ref is a frozen copy of it (no gradients, eval mode)."""
    policy, tokenizer = load_model(input_path(config, "init"), config.model_impl, device, toy_tokenizer)
    return policy, copy.deepcopy(policy).eval().requires_grad_(False), tokenizer


def save_model(model, tokenizer, stage_dir) -> Path | None:
    """Write the trained policy into ``stage_dir`` (rank 0 only): ``model.pt`` for a toy model,
    else a Hugging Face folder ``model/`` that ``transformers`` loads."""
    if not distributed.is_main():
        return None
    stage_dir = Path(stage_dir)
    if isinstance(tokenizer, Tokenizer):
        save_policy(model, tokenizer, stage_dir / "model.pt")
        return stage_dir / "model.pt"
    folder = stage_dir / "model"
    save_hf_folder(model, tokenizer, folder)
    return folder


def save_hf_folder(model, tokenizer, folder) -> Path:
    """``model`` (own GPT or ``HFCausalLM``) and its tokenizer as a Hugging Face folder."""
    from ..real.gpt2 import save_gpt2

    folder = Path(folder)
    files.refuse_non_finite(model.state_dict(), folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, Tokenizer):  # the toy tokenizer, as a transformers tokenizer
        from ..real.hf import hf_tokenizer_from_toy

        hf_tok = hf_tokenizer_from_toy(tokenizer)
    else:
        hf_tok = tokenizer.tokenizer
    if isinstance(model, GPT):
        save_gpt2(model, folder, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                  pad_token_id=hf_tok.pad_token_id)
    else:
        model.save_pretrained(folder)
    hf_tok.save_pretrained(str(folder))
    return folder


def same_tokenizer(a, b) -> bool:
    """Two tokenizers that give every text the same ids (toy: equal vocabularies; HF: equal vocab
    and special tokens)."""
    if isinstance(a, Tokenizer) or isinstance(b, Tokenizer):
        return isinstance(a, Tokenizer) and isinstance(b, Tokenizer) and a == b
    return (a.tokenizer.get_vocab() == b.tokenizer.get_vocab() and (a.eos_id, a.pad_id, a.bos_id)
            == (b.eos_id, b.pad_id, b.bos_id) and a.use_chat_template == b.use_chat_template)


# ----------------------------------------------------------------------------------------------
# reward models: a toy checkpoint, or a folder (the trunk as a model folder + the score head)
# ----------------------------------------------------------------------------------------------


def save_reward_model(rm, tokenizer, stage_dir) -> Path | None:
    """``model.pt`` for a GPT trunk with the toy tokenizer; else ``model/`` (the trunk as a Hugging
    Face folder) with the score head in ``model/reward_head.pt``. Rank 0 only."""
    if not distributed.is_main():
        return None
    stage_dir = Path(stage_dir)
    if isinstance(tokenizer, Tokenizer) and isinstance(rm.body, GPT):
        rm.save(stage_dir / "model.pt", tokenizer)
        return stage_dir / "model.pt"
    folder = save_hf_folder(rm.body, tokenizer, stage_dir / "model")
    head = {k: v.detach().cpu() for k, v in rm.score_head.state_dict().items()}
    files.torch_save({"kind": "reward_head", "score_head": head}, folder / REWARD_HEAD)
    return folder


def load_reward_model(path, impl: str = "minialign", device="cpu"):
    """(reward model, tokenizer) from ``save_reward_model``'s output (file or folder), frozen."""
    from ..reward_model import RewardModel

    path = Path(path)
    if path.is_dir():
        head_path = path / REWARD_HEAD
        if not head_path.is_file():
            raise FileNotFoundError(f"{path} has no {REWARD_HEAD}: not a reward model folder "
                                    f"(train one with `minialign reward-model --model ...`)")
        body, tok = load_model(path, impl, device)
        rm = RewardModel(body)
        ckpt = files.torch_load(head_path)
        rm.score_head.load_state_dict(ckpt["score_head"])
        rm = rm.to(device)
    else:
        rm, tok = RewardModel.load(path, device)
    rm.eval().requires_grad_(False)
    return rm, tok
