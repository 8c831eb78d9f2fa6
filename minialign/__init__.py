"""minialign: a from-scratch, readable reference implementation of LLM alignment.

Stages: pre-training (``pretrain``), SFT (``sft``), then alignment: a Bradley-Terry reward model,
PPO with a value head, DPO and GRPO, one file each. The toy world (``toyworld``) generates every
dataset from a seed and knows the truth (entropy floor, hidden reward r*) to measure against.
"""

from .model import GPT, GPTConfig
from .tokenizer import Tokenizer
from .toyworld import ToyWorld, WorldConfig

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "ToyWorld", "WorldConfig", "__version__"]
