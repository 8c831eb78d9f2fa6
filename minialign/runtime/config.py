"""The settings of a run: every command's config is a dataclass whose fields are its flags, and
every value is checked (``validate``) before anything is written.

``TrainConfig`` holds what every stage has; a stage's config subclasses it. ``require``,
``check_range`` and ``check_max_new_tokens`` are the input checks, with errors that name the flag.

This module imports no torch (it asks torch only about a ``--device`` other than ``auto``, and
about torchrun's ranks once they exist), so that a config module that imports only it, and
``flags``, can refuse a bad value before torch's import (seconds of CPU) is paid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Literal

from .files import ConfigError
from .flags import flag

DTYPES = ("float32", "bfloat16", "float16")


def valid_device_name(name: str) -> bool:
    """``auto`` or a name ``torch.device`` accepts (``cpu``, ``cuda``, ``cuda:1``, ``mps``); torch is
    asked only about a name other than ``auto``."""
    if name == "auto":
        return True
    import torch
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _ranks() -> int:
    """The torchrun ranks a global batch is shared over. A process group exists only once torch's
    distributed module is imported, so a config checked before that has one rank."""
    if "torch.distributed" not in sys.modules:
        return 1
    from . import distributed
    return distributed.world_size()


def _launched() -> bool:
    """Started by torchrun with more than one rank (``distributed.launched``, without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def require(config, name: str, ok: bool, allowed: str) -> None:
    """Refuse ``config.name`` unless ``ok``, with an error that names the flag and what it allows."""
    if not ok:
        raise ConfigError(f"{flag(name)} must be {allowed}, got {getattr(config, name)!r}")


def check_range(config, name: str, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """``low <= config.name <= high`` (``<`` on an open side); None means no bound, or, as the
    field's value, "off" (``kl_target=None``)."""
    v = getattr(config, name)
    if v is None:
        return
    ok = ((low is None or (v > low if low_open else v >= low))
          and (high is None or (v < high if high_open else v <= high)))
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    else:
        allowed = f"{'>' if low_open else '>='} {low}" if high is None else f"{'<' if high_open else '<='} {high}"
    require(config, name, ok, allowed)


def check_max_new_tokens(config, prompts: list, block_size: int) -> None:
    """``--max-new-tokens`` leaves room in the model's context for the longest of ``prompts`` (token
    lists): checked once the model is loaded, before the run folder is made, rather than at the
    first sampling (nothing is ever truncated)."""
    longest = max(map(len, prompts))
    require(config, "max_new_tokens", longest + config.max_new_tokens <= block_size,
            f"<= {block_size - longest} (the model's context of {block_size} tokens less the longest prompt's "
            f"{longest})")


def check_types(config) -> None:
    """Every field holds a value of its annotated type; numbers are finite; a Literal is one of its
    choices. The command line converts flags already; this catches library callers and NaN/inf."""
    for name, tp in typing.get_type_hints(type(config)).items():
        if name not in {f.name for f in dataclasses.fields(config)}:
            continue
        v, args = getattr(config, name), typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
            if v is None:
                continue
            tp = next(a for a in args if a is not type(None))
        if typing.get_origin(tp) is typing.Literal:
            require(config, name, v in typing.get_args(tp), "one of " + ", ".join(map(str, typing.get_args(tp))))
        elif tp is bool:
            require(config, name, isinstance(v, bool), "true or false")
        elif tp is int:
            require(config, name, isinstance(v, int) and not isinstance(v, bool), "an integer")
        elif tp is float:
            require(config, name, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                    "a finite number")
        elif tp is str:
            require(config, name, isinstance(v, str), "a string")


class Config:
    """Base of every command's dataclass config: ``validate()`` runs when the config is built (and
    again when a stage starts), so a bad value is refused before any folder is touched."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and finiteness of every field; a subclass adds its ranges after ``super().validate()``."""
        check_types(self)


@dataclass
class TrainConfig(Config):
    """Settings every stage has; a stage's config subclasses this and adds its own."""
    out: str = "runs/demo"       # run folder; each stage writes into out/<stage>/
    seed: int = 0                # training randomness: init, data order, sampling
    world_seed: int = 0          # the toy world (its held-out split): fixed across stages and seeds
    device: str = "auto"         # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "float32"       # float32 | bfloat16 (autocast; log-probs and losses stay float32)
    threads: int = 0             # CPU threads for torch (0: torch's choice, $OMP_NUM_THREADS or one per core); 1 is often faster on a busy machine
    steps: int = 300             # optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1    # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global gradient norm (0 = off)
    log_every: int = 10
    progress: bool | None = None  # tqdm progress bars (auto: only when the output is a terminal, as tqdm does)
    save_every: int = 0          # steps between resumable checkpoints (0: only when stopped by Ctrl-C)
    resume: bool = False         # continue an interrupted run from its last resumable checkpoint
    overwrite: bool = False      # replace a finished run of this stage made with other settings

    # real models and your own data (docs/real_models.md); with none of these, the toy world
    model: str = ""              # a local Hugging Face model folder to start from instead of the run folder's model
    model_impl: Literal["minialign", "hf"] = "minialign"  # run --model in minialign's GPT (GPT-2 folders) or transformers
    data: str = ""               # training data (.jsonl or .parquet) in TRL's format for this stage, instead of the toy world
    eval_data: str = ""          # held-out data in the same format (for the held-out metrics)
    max_length: int | None = None  # longest prompt + response in tokens (None: the model's context); longer rows are cut as TRL does
    grad_accum: int = 1          # micro-batches per optimizer step; batch_size stays the global batch
    # the checkpoints a stage reads: config field -> the stage whose out/<stage>/model.pt is its
    # default (``stage_input``); the CLI's --with-prerequisites trains them when missing
    INPUTS: typing.ClassVar[dict[str, str]] = {}
    # the global batches that are shared out: field -> whether it is also cut into --grad-accum
    # micro-batches (else over the ranks only); each must split evenly (equal shares, equal weights)
    SPLITS: typing.ClassVar[dict[str, bool]] = {"batch_size": True}
    # the field that counts the rows of --data one step draws without replacement (None: drawn with
    # replacement); the file must hold that many, checked before the run folder exists
    ROWS_PER_STEP: typing.ClassVar[str | None] = "batch_size"

    def validate(self) -> None:
        super().validate()
        check_range(self, "seed", 0, 2 ** 32 - 1)  # numpy's seeds are 32-bit
        check_range(self, "world_seed", 0, 2 ** 32 - 1)
        require(self, "device", valid_device_name(self.device), "auto, cpu, cuda, cuda:N or mps")
        require(self, "dtype", self.dtype in DTYPES, "one of " + ", ".join(DTYPES))
        for name in ("steps", "batch_size", "log_every"):
            check_range(self, name, 1)
        check_range(self, "lr", 0, low_open=True)
        check_range(self, "min_lr_ratio", 0, 1)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "save_every", "threads"):
            check_range(self, name, 0)
        # the flags for real models and data: only some combinations make sense
        check_range(self, "grad_accum", 1)
        for name, micro in type(self).SPLITS.items():
            ranks, parts = _ranks(), self.grad_accum if micro else 1
            require(self, name, getattr(self, name) % (ranks * parts) == 0,
                    f"a multiple of {ranks * parts} ({ranks} rank(s) x {parts} micro-batch(es) of --grad-accum)")
        if self.eval_data and not self.data:
            raise ConfigError("--eval-data is held-out data for --data; the toy world has its own held-out split")
        if self.max_length is not None and (not self.data or self.max_length < 1):
            raise ConfigError(f"--max-length {self.max_length} cuts the rows of --data (>= 1 token); "
                              "the toy world's rows all fit its model")
        require(self, "model", not (self.model and getattr(self, "init", "")),
                "left out when --init names the model to start from")
        if _launched():  # one checkpoint holds one process's generators
            require(self, "save_every", self.save_every == 0, "0 under torchrun (resume works in one process)")
            require(self, "resume", not self.resume, "off under torchrun (resume works in one process)")


# settings that change how a run is watched or kept, never its numbers
RUN_CONTROL = ("out", "progress", "save_every", "resume", "overwrite")
# settings that change only how a run's sums are split over CPU threads: the same run up to the
# last bits of rounding, so a run may resume, or serve as an input, under another value
ROUNDING_ONLY = ("threads",)
