"""What the supervised stages (pre-training, SFT, the reward model) train on and what they can
measure: the toy world's data or your own ``--data`` file's, behind one interface, so that each
runner has one path.

A task has
- ``train``: the training rows as token lists: (prompts, responses) for pre-training and SFT,
  encoded pairs [(x, y_w, y_l)] for the reward model;
- ``heldout``: held-out rows of the same kind, or None (your data without ``--eval-data``);
- ``reports``: what was read from each data file ({} in the toy world), for the summary;
- what the toy world knows and a file does not: the exact entropy ``floor`` of the loss (None for
  a file); SFT's ``truth(model)`` and ``final(model, before)``, r* of the model's own samples;
  the reward model's ``evaluate(model)``, r* order, Pearson and the Bayes-optimal accuracy
  (for a file: what can be measured without r*, E4 loss, accuracy and margin).

A data file's bad row is refused when the task is built, before the run folder exists.
"""

from __future__ import annotations

from ..reward_model import encode_pairs
from ..runtime import distributed
from ..runtime.config import require
from ..runtime.datafiles import preference_data, sft_data, text_data
from ..runtime.files import ConfigError
from ..runtime.folders import input_path
from .evaluate import arithmetic_eval, pair_eval, review_eval, reward_model_eval


class DataFile:
    """Rows read from ``--data`` (and ``--eval-data``) by ``reader(path, tokenizer, block_size, max_length)``."""
    floor = None  # nothing is known of the text's entropy

    def __init__(self, reader, tokenizer, config, block_size: int):
        self.tokenizer, self.reports = tokenizer, {}
        self.train = self.read(reader, config.data, "data", block_size, config.max_length)
        self.heldout = None
        if config.eval_data:
            self.heldout = self.read(reader, config.eval_data, "eval_data", block_size, config.max_length)
        for r in self.reports.values():
            distributed.print_main(r.describe())

    def read(self, reader, path, name: str, block_size: int, max_length):
        *rows, self.reports[name] = reader(path, self.tokenizer, block_size, max_length)  # rows..., report
        return rows if len(rows) > 1 else rows[0]  # [prompts, responses], or the pairs


def longest(*splits) -> int:
    """The longest prompt + response of (prompts, responses) splits, in tokens."""
    return max(len(x) + len(y) for prompts, responses in splits for x, y in zip(prompts, responses))


# ----------------------------------------------------------------------------------------------
# pre-training: the toy corpus, or your text ({"text"})
# ----------------------------------------------------------------------------------------------


class ToyCorpus:
    """The toy world's text: a document is a "response" to the prompt ``<bos>``; the loss has an exact floor."""

    def __init__(self, world, tokenizer, config):
        def documents(lines):
            return [[tokenizer.bos_id]] * len(lines), [tokenizer.document(s)[1:] for s in lines]
        self.reports = {}
        self.train = documents(world.pretrain_corpus(config.corpus_size, seed=config.seed))
        self.heldout = documents(world.pretrain_corpus(config.eval_size, seed=config.seed + 10_000))
        self.floor = world.corpus_entropy()["nats_per_token"]
        n = longest(self.train, self.heldout)
        require(config, "block_size", n <= config.block_size, f">= {n} (the longest line of the toy corpus, in tokens)")


def pretrain_task(world, tokenizer, config, block_size: int):
    return DataFile(text_data, tokenizer, config, block_size) if config.data else ToyCorpus(world, tokenizer, config)


# ----------------------------------------------------------------------------------------------
# SFT: the toy world's instructions, or your rows ({"prompt", "completion"} or {"messages"})
# ----------------------------------------------------------------------------------------------


class ToyInstructions:
    """The toy world's instructions and responses; r* judges the model's own samples."""

    def __init__(self, world, tokenizer, config, block_size: int):
        def pairs(rows):
            return [tokenizer.prompt(r["prompt"]) for r in rows], [tokenizer.response(r["response"]) for r in rows]
        self.world, self.tokenizer, self.seed, self.reports = world, tokenizer, config.seed, {}
        self.train = pairs(world.sft_dataset(config.num_examples, seed=config.seed))
        self.heldout = pairs(world.sft_dataset(config.eval_size, seed=config.seed + 10_000))
        n = longest(self.train, self.heldout)
        if n > block_size:  # refused before the run folder exists; nothing is truncated
            raise ConfigError(f"{input_path(config, 'init')} has a context of {block_size} tokens, fewer than the "
                              f"toy world's longest SFT example ({n}); pre-train it with --block-size {n} or more")
        self.floor = world.sft_entropy()["nats_per_token"]

    def truth(self, model) -> dict:
        """What the hidden reward says of the model's own samples (8 per review prompt, 4 per question)."""
        return {"true_reward": review_eval(model, self.tokenizer, self.world, samples_per_prompt=8,
                                          seed=self.seed)["true_reward"],
                "heldout_accuracy": arithmetic_eval(model, self.tokenizer, self.world, "heldout", 4,
                                                    seed=self.seed)["accuracy"]}

    def final(self, model, before: dict) -> dict:
        """``truth`` before and after, on more samples (32 per review prompt, 16 per question)."""
        ev = review_eval(model, self.tokenizer, self.world, samples_per_prompt=32, seed=self.seed)
        acc = arithmetic_eval(model, self.tokenizer, self.world, "heldout", 16, seed=self.seed)["accuracy"]
        return {"true_reward_before": before["true_reward"], "true_reward": ev["true_reward"],
                "malformed": ev["malformed"], "heldout_accuracy_before": before["heldout_accuracy"],
                "heldout_accuracy": acc, "examples": ev["examples"]}


class InstructionFile(DataFile):
    """Your rows: nothing is known of their answers but the loss."""

    def truth(self, model) -> dict:
        return {}

    def final(self, model, before: dict) -> dict:
        return {}


def sft_task(world, tokenizer, config, block_size: int):
    return (InstructionFile(sft_data, tokenizer, config, block_size) if config.data else
            ToyInstructions(world, tokenizer, config, block_size))


# ----------------------------------------------------------------------------------------------
# the reward model: the toy world's preference pairs, or yours ({"prompt", "chosen", "rejected"})
# ----------------------------------------------------------------------------------------------


class ToyPairs:
    """The toy world's pairs, labelled by sampling E3 with r*; held out: fresh pairs, judged against r*."""
    floor = None

    def __init__(self, world, tokenizer, config):
        self.world, self.tokenizer, self.reports = world, tokenizer, {}
        self.train = encode_pairs(world.preference_dataset(config.num_pairs, seed=config.seed), tokenizer)
        self.heldout_rows = world.preference_dataset(config.eval_pairs, seed=config.seed + 10_000)
        self.heldout = encode_pairs(self.heldout_rows, tokenizer)

    def evaluate(self, model) -> dict:
        return reward_model_eval(model, self.world, self.tokenizer, self.heldout_rows, self.heldout)


class PairFile(DataFile):
    """Your pairs; held out: ``--eval-data``'s, measured without r*: E4 loss, accuracy and margin."""

    def evaluate(self, model) -> dict:
        return {} if self.heldout is None else pair_eval(model, self.heldout, self.tokenizer.pad_id)[0]


def pairs_of(path, tokenizer, block_size: int, max_length):
    """``datafiles.preference_data`` as encoded pairs [(x, y_w, y_l)], nothing truncated."""
    data, report = preference_data(path, tokenizer, block_size, max_length, truncate=False)
    return list(zip(data["prompt"], data["chosen"], data["rejected"])), report


def reward_model_task(world, tokenizer, config, block_size: int):
    return PairFile(pairs_of, tokenizer, config, block_size) if config.data else ToyPairs(world, tokenizer, config)
