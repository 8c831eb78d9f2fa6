"""Shared fixtures: a tiny world and tiny pre-trained / SFT checkpoints, built once per session."""

import pytest
import torch

from minialign.model import GPT, GPTConfig
from minialign.toyworld import ToyWorld, WorldConfig

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=48)


@pytest.fixture(scope="session")
def world():
    return ToyWorld(WorldConfig(seed=0))


@pytest.fixture
def tiny_model(world):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=world.tokenizer.vocab_size, **TINY))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder holding ``pretrain/model.pt`` and ``sft/model.pt`` of a tiny model (seconds).

    Algorithm tests start from ``<tiny_run>/sft/model.pt`` with ``out=<their own tmp folder>``.
    """
    from minialign.pretrain import PretrainConfig, main as pretrain
    from minialign.sft import SFTConfig, main as sft

    out = tmp_path_factory.mktemp("tiny_run")
    pretrain(PretrainConfig(out=str(out), steps=40, batch_size=32, corpus_size=2000, eval_size=100,
                            eval_every=20, progress=False, device="cpu", **TINY))
    sft(SFTConfig(out=str(out), steps=30, batch_size=32, num_examples=500, eval_size=100,
                  eval_every=15, progress=False, device="cpu"))
    return out
