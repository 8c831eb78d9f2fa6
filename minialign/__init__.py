"""minialign: a from-scratch, readable reference implementation of LLM alignment.

Stages: pre-training (``pretrain``), SFT (``sft``), then alignment: a Bradley-Terry reward model,
PPO with a value head, DPO and GRPO, one file each. The toy world (``toyworld``) generates every
dataset from a seed and knows the truth (entropy floor, hidden reward r*) to measure against.
"""

import importlib

from .runtime import old_paths as _old_paths

_old_paths.install()  # shim: old import path, removed once every importer uses minialign.runtime

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "ToyWorld", "WorldConfig", "__version__"]

# imported on first use (PEP 562), so that ``minialign --help`` does not wait for torch
_LAZY = {"GPT": "model", "GPTConfig": "model", "Tokenizer": "tokenizer", "ToyWorld": "toyworld",
         "WorldConfig": "toyworld"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
