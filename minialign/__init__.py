"""minialign: a from-scratch, readable reference implementation of LLM alignment.

The files at the top of the package are the course; read them in this order:

1. ``model.py``: the tiny GPT (embeddings, causal self-attention, pre-norm blocks, tied head, KV cache)
2. ``tokenizer.py``: the toy world's tokens, special tokens and chat template
3. ``toyworld.py``: the toy world: its grammar, datasets and the hidden true reward r*, known exactly
4. ``data.py``: batches with padding and masks (``input_ids``, ``attention_mask``, ``response_mask``)
5. ``ops.py``: the shared math: token log-probs (E1), masked means, whitening, KL estimators, entropy
6. ``generation.py``: sampling with temperature / top-k / top-p, returning the log-probs
7. ``pretrain.py``: stage 1, language modelling (E0a)
8. ``sft.py``: stage 2, supervised fine-tuning on the response tokens (E0b)
9. ``reward_model.py``: the Bradley-Terry reward model (E3, E4)
10. ``ppo.py``: PPO with a value head against the reward model (E2, E5, E6, GAE)
11. ``dpo.py``: direct preference optimisation, no reward model (E7-E10)
12. ``grpo.py``: group relative policy optimisation (E11-E14)
13. ``theory.py``: what each algorithm converges to, computed exactly

Then the families beyond the source, each member a small delta of its parent:

14. ``policy_gradient.py``: REINFORCE, RLOO, REINFORCE++, DAPO, GSPO, CISPO (deltas of GRPO's step),
    ``policy_gradient_sampling.py``: the groups GRPO samples, DAPO's dynamic sampling and overlong handling
    (the batch before the loss), and ``theory_policy_gradient.py``: where each converges, computed exactly
15. ``preference.py``: cDPO, rDPO, IPO, SimPO, KTO, ORPO (deltas of DPO's loss), ``kto.py``: KTO's step
    on unpaired examples, ``best_of_n.py``: best-of-N and rejection sampling, and
    ``theory_preference.py``: their exact optima

What to skip on a first reading (the machinery, not the course):

- ``runtime/``: configs and flags, devices, the optimizer and schedule, the run folder, the
  ``@stage`` decorator, plots, model loading, files, torchrun, data files, the ``minialign`` command
- ``stages/``: the stage runners (flags, run folder, loop, plots, summary) and what they share to
  measure a run (``evaluate``) and reward functions (``rewards``)
- ``real/``: real models (the Hugging Face adapter, GPT-2 weights, ``minialign export``)
- ``tools/``: ``minialign bench`` and ``minialign exercises``
"""

import importlib

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "ToyWorld", "WorldConfig", "__version__"]

# imported on first use (PEP 562), so that ``minialign --help`` does not wait for torch
_LAZY = {"GPT": "model", "GPTConfig": "model", "Tokenizer": "tokenizer", "ToyWorld": "toyworld",
         "WorldConfig": "toyworld"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
