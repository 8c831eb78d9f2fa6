"""What every stage's training loop shares, written once: configs behind CLI flags, seeding,
devices and dtypes, the optimizer and its schedule, the run folder (config, JSONL metrics, PNG
plots, checkpoints) and loading a policy.

An algorithm file keeps only its own math and its own loop; everything here is plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .runtime import files
from .runtime.files import CheckpointError, ConfigError, NonFiniteError, StageError  # noqa: F401 (re-exported)
from .runtime import distributed
from .model import GPT, load_checkpoint
from .tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------
# configs: every value checked before anything is written
# ----------------------------------------------------------------------------------------------


def flag(name: str) -> str:
    """The command-line flag of a config field: ``min_lr_ratio`` -> ``--min-lr-ratio``."""
    return "--" + name.replace("_", "-")


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
    steps: int = 300             # optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1    # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global gradient norm (0 = off)
    log_every: int = 10
    progress: bool = True        # tqdm progress bars
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

    def validate(self) -> None:
        super().validate()
        check_range(self, "seed", 0, 2 ** 32 - 1)  # numpy's seeds are 32-bit
        check_range(self, "world_seed", 0, 2 ** 32 - 1)
        require(self, "device", _device_ok(self.device), "auto, cpu, cuda, cuda:N or mps")
        require(self, "dtype", self.dtype in DTYPES, "one of " + ", ".join(DTYPES))
        for name in ("steps", "batch_size", "log_every"):
            check_range(self, name, 1)
        check_range(self, "lr", 0, low_open=True)
        check_range(self, "min_lr_ratio", 0, 1)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "save_every"):
            check_range(self, name, 0)
        # the flags for real models and data: only some combinations make sense
        check_range(self, "grad_accum", 1)
        for name, micro in type(self).SPLITS.items():
            ranks, parts = distributed.world_size(), self.grad_accum if micro else 1
            require(self, name, getattr(self, name) % (ranks * parts) == 0,
                    f"a multiple of {ranks * parts} ({ranks} rank(s) x {parts} micro-batch(es) of --grad-accum)")
        if self.eval_data and not self.data:
            raise ConfigError("--eval-data is held-out data for --data; the toy world has its own held-out split")
        if self.max_length is not None and (not self.data or self.max_length < 1):
            raise ConfigError(f"--max-length {self.max_length} cuts the rows of --data (>= 1 token); "
                              "the toy world's rows all fit its model")
        require(self, "model", not (self.model and getattr(self, "init", "")),
                "left out when --init names the model to start from")
        if distributed.launched():  # one checkpoint holds one process's generators
            require(self, "save_every", self.save_every == 0, "0 under torchrun (resume works in one process)")
            require(self, "resume", not self.resume, "off under torchrun (resume works in one process)")


# settings that change how a run is watched or kept, never its numbers
RUN_CONTROL = ("out", "progress", "save_every", "resume", "overwrite")


def _device_ok(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# configs <-> command-line flags
# ----------------------------------------------------------------------------------------------


def field_comments(config_cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the config's source: the flag's help text."""
    comments = {}
    for cls in reversed(config_cls.__mro__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for name, text in re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M):
            comments[name] = text.strip()
    return comments


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``yes/no``, ``1/0``, ``on/off``) for boolean flags: ``--share-prompt false``."""
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, config_cls, only=None) -> None:
    """One ``--flag`` per dataclass field (or per field named in ``only``): type and default from
    the field, help from its comment."""
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        option = flag(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is bool:  # --x, --x true, --x false, --no-x
            parser.add_argument(option, dest=f.name, type=parse_bool, nargs="?", const=True, default=default,
                                metavar="true|false", help=f"{comments.get(f.name, '')} "
                                f"(default: {default}; --no-{option[2:]} = {option} false)".strip())
            parser.add_argument("--no-" + option[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None
        conv = type(choices[0]) if choices else tp
        if optional:
            base = conv
            conv = lambda s, base=base: None if s.lower() == "none" else base(s)  # noqa: E731
        parser.add_argument(option, dest=f.name, type=conv, default=default, choices=choices,
                            help=f"{comments.get(f.name, '')} (default: {default})".strip())


def config_from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


# ----------------------------------------------------------------------------------------------
# seeds, devices, dtypes
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """The device named (``auto``: CUDA, else MPS, else CPU); under torchrun, this rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return distributed.device_for_rank(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but CUDA is not available here (try --device cpu)")
    return distributed.device_for_rank(device)


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast for the matmuls; a no-op in float32. ``ops`` keeps log-probs float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolve_dtype(dtype))


# ----------------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or scalars)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   step: int, config: TrainConfig) -> float:
    """Backward, clip, step at the scheduled learning rate; returns the pre-clip gradient norm.

    A NaN or inf loss or gradient stops training (``NonFiniteError`` naming the step) before the
    optimizer touches the weights, so nothing non-finite reaches a checkpoint.
    """
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is {loss.item()} at step {step}; stopping before it spreads")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _clip_and_step(model, optimizer, step, config)


def accumulated_step(model: torch.nn.Module, parallel: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     micro_batches: list, loss_of, step: int, config: TrainConfig) -> tuple[float, list]:
    """``optimizer_step`` for a global batch in micro-batches, on this rank and the others.

    ``parallel`` is ``distributed.wrap(model)`` (the model itself in one process);
    ``loss_of(micro_batch) -> (mean loss, units, total units, extra)`` as ``distributed.accumulate``.
    Returns the pre-clip gradient norm and each micro-batch's ``extra``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    try:
        extras = distributed.accumulate(parallel, micro_batches, loss_of)
    except FloatingPointError as e:  # a NaN or inf loss, refused before its backward
        raise NonFiniteError(f"at step {step}: {e}") from e
    return _clip_and_step(model, optimizer, step, config), extras


@dataclasses.dataclass
class Update:
    """What one optimizer step reports: the pre-clip gradient norm and each micro-batch's ``extra``."""
    grad_norm: float
    extras: list


def gradient_update(model: torch.nn.Module, parallel: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, step: int):
    """The hook an algorithm's step calls for each optimizer step: ``update(rows, loss_of) -> Update``.

    It splits this rank's ``rows`` into ``config.grad_accum`` micro-batches and runs
    ``accumulated_step`` at step ``step``'s learning rate, so that the optimizer, the schedule,
    the micro-batching and DDP stay out of the algorithm files; ``loss_of`` is as in
    ``distributed.accumulate``.
    """
    def update(rows, loss_of) -> Update:
        grad_norm, extras = accumulated_step(model, parallel, optimizer, distributed.split(rows, config.grad_accum),
                                             loss_of, step, config)
        return Update(grad_norm, extras)
    return update


def _clip_and_step(model, optimizer, step: int, config: TrainConfig) -> float:
    """Clip the gradients and step; a NaN or inf gradient stops here, before the weights change."""
    params = [p for p in model.parameters() if p.grad is not None]
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if not torch.isfinite(norm):
        raise NonFiniteError(f"the gradient norm is {float(norm)} at step {step} (a NaN or inf gradient); "
                             "the weights were not updated")
    optimizer.step()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# the run folder: a stage's results, written so that they never lie
# ----------------------------------------------------------------------------------------------

STATUS, RESUME = "status.json", "resume.pt"


class DivergenceWarning(UserWarning):
    """The training loss grew past twice its first value plus one."""


def partial_dir(folder) -> Path:
    """Where a stage works until it completes: ``out/<stage>.partial`` beside ``out/<stage>``."""
    folder = Path(folder) if Path(folder).name else Path(folder).absolute()  # "." has no name
    return folder.with_name(folder.name + ".partial")


def command_line(stage: str, config: TrainConfig) -> str:
    """The command that makes this run: ``minialign <stage> --out OUT`` and every flag that differs
    from its default (run-control flags left out)."""
    defaults = type(config)()
    words = ["minialign", stage.replace("_", "-"), "--out", config.out]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in RUN_CONTROL or value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            words.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:
            words += [flag(f.name), "none" if value is None else str(value)]
    return shlex.join(words)


def config_changes(saved: dict | None, config: TrainConfig) -> str:
    """The settings (not run-control) in which ``config`` differs from a saved config.json, as
    ``"beta: 0.1 there, 0.5 here"``; empty if none. A field the saved config lacks counts as its default."""
    if saved is None:
        return "no config.json there"
    defaults = type(config)()
    diffs = [f"{f.name}: {saved.get(f.name, getattr(defaults, f.name))!r} there, {getattr(config, f.name)!r} here"
             for f in dataclasses.fields(config) if f.name not in RUN_CONTROL
             and saved.get(f.name, getattr(defaults, f.name)) != getattr(config, f.name)]
    return "; ".join(diffs)


def stage_model(out: str, stage: str) -> Path:
    """What ``stage`` wrote in run folder ``out``: ``model.pt`` (toy) or ``model/`` (a HF folder)."""
    stage_dir = Path(out) / stage
    for candidate in (stage_dir / "model.pt", stage_dir / "model"):
        if candidate.exists():
            return candidate
    return stage_dir / "model.pt"  # missing: the checks say so, naming this path


def input_path(config: TrainConfig, field: str) -> Path:
    """The model a stage reads through ``field`` (``init``, ``reward_model``): the flag's path, or
    what the stage that ``INPUTS`` names wrote in the run folder. ``init`` is the model a stage
    starts from, so ``--model`` (a Hugging Face folder) takes its place."""
    if field == "init" and config.model:
        return Path(config.model)
    value = getattr(config, field)
    return Path(value) if value else stage_model(config.out, type(config).INPUTS[field])


def stage_input(config: TrainConfig, field: str) -> Path:
    """``input_path``, refused unless the stage that wrote it completed and nothing it was made
    from has changed since; the error says which command makes it."""
    path, stage = input_path(config, field), type(config).INPUTS[field]
    given = getattr(config, field) or (field == "init" and config.model)
    folder = path.parent
    recorded = (folder / STATUS).is_file() or (partial_dir(folder) / STATUS).is_file()
    make = f"`minialign {stage.replace('_', '-')} --out {shlex.quote(config.out)}`"
    if not recorded and not path.exists():
        raise StageError(f"no {stage} model at {path}: make it with {make}"
                         + ("" if given else ", or add --with-prerequisites to this command"))
    if recorded or not given:  # a model given by hand outside a run folder is taken as it is
        problem = stage_problem(folder)
        if problem:
            raise StageError(f"cannot use {path}: {problem}")
    if not path.exists():
        raise StageError(f"no {stage} model at {path}: make it with {make}")
    return path


def stage_problem(folder) -> str | None:
    """Why the stage folder ``folder`` cannot be used as an input; None if it completed and neither
    its checkpoints nor the files it was made from have changed since."""
    folder = Path(folder)
    _finish_swap(folder)
    status = files.read_json(folder / STATUS)
    if status is None:
        partial = files.read_json(partial_dir(folder) / STATUS)
        if partial is not None:
            error = f" ({partial['error']})" if partial.get("error") else ""
            command = files.recorded_command(partial_dir(folder))
            fix = f"continue it with `{command} --resume`" if partial.get("resumable") else f"run `{command}`"
            return (f"{folder.name} has not completed: {partial_dir(folder)} is {partial['status']} after "
                    f"step {partial.get('step', 0)} of {partial.get('steps')}{error}; {fix}")
        if folder.exists():
            return (f"{folder} has no {STATUS} (written by an older minialign?), so nothing says that it "
                    "completed; rerun the stage")
        return f"{folder} does not exist"
    command = files.recorded_command(folder)
    if status.get("status") != "complete":
        return f"{folder} is {status.get('status')}; run `{command}`"
    for name, sha in status.get("outputs", {}).items():  # the checkpoints: model.pt, a model/ folder, ...
        path = folder / name
        if (name.endswith(".pt") or path.is_dir()) and path.exists() and files.fingerprint(path) != sha:
            return (f"{folder / name} changed after {folder.name} completed (its sha256 differs from the one "
                    f"in {STATUS}); rerun `{command}`")
    for field, rec in status.get("inputs", {}).items():
        # an input that is gone (a stage folder copied on its own) leaves the stage as it was made;
        # one that is there with other contents means a newer model is upstream of this one
        source = folder.parent / rec["path"]  # an absolute path stays absolute
        if source.exists() and files.fingerprint(source) != rec["sha256"]:
            return f"{folder.name} was made from {source} ({flag(field)}), which has changed since; rerun `{command}`"
    return None


def _finish_swap(folder: Path) -> None:
    """Complete a ``Run.finish`` that was stopped between its two renames."""
    partial = partial_dir(folder)
    if not folder.exists() and (files.read_json(partial / STATUS) or {}).get("status") == "complete":
        os.replace(partial, folder)


def input_fingerprints(config: TrainConfig) -> dict:
    """{field: {"path", "sha256"}} of the checkpoints a stage reads; paths inside the run folder
    are stored relative to it, so a copied run folder still checks out."""
    out = {}
    paths = {field: input_path(config, field) for field in type(config).INPUTS}
    for field in ("model", "data", "eval_data"):  # files given by hand (--model may be init's already)
        if getattr(config, field) and Path(getattr(config, field)) not in paths.values():
            paths[field] = Path(getattr(config, field))
    for field, path in paths.items():
        if path.exists():
            try:
                rel = str(path.resolve().relative_to(Path(config.out).resolve()))
            except ValueError:
                rel = str(path.resolve())
            out[field] = {"path": rel, "sha256": files.fingerprint(path)}
    return out


def check_run_folder(config: TrainConfig, stage: str) -> bool:
    """Refuse a run that would lose results (a finished run with other settings, an interrupted
    run that could resume); True if this run will continue from a resumable checkpoint."""
    final = Path(config.out) / stage
    partial = partial_dir(final)
    _finish_swap(final)
    status = files.read_json(partial / STATUS) or {}
    if status.get("status") == "running" and status.get("host") == socket.gethostname() and _alive(status.get("pid")):
        raise StageError(f"{partial} is being written by another process (pid {status['pid']})")
    if (partial / RESUME).is_file():
        if config.resume:
            changes = config_changes(files.read_json(partial / "config.json"), config)
            if changes:
                raise StageError(f"the checkpoint in {partial} was saved with other settings ({changes}); resume "
                                 "with the same flags, or start over with --overwrite")
            if status.get("inputs") != input_fingerprints(config):
                raise StageError(f"an input of the interrupted run in {partial} has changed since it started; "
                                 "start over with --overwrite")
            return True
        if not config.overwrite:
            raise StageError(f"{partial} holds an interrupted {stage} run (resumable at step "
                             f"{status.get('checkpoint_step')} of {status.get('steps')}): continue it with --resume, "
                             "or start over with --overwrite")
    if final.exists() and not config.overwrite:
        changes = config_changes(files.read_json(final / "config.json"), config)
        if changes:
            raise StageError(f"{final} holds a {stage} run made with other settings ({changes}); add --overwrite "
                             "to replace it once this run completes, or choose another --out")
    return False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Run:
    """A stage's run folder, written so that it never lies.

    The stage works in ``out/<stage>.partial/`` (``config.json``, ``metrics.jsonl``, plots,
    checkpoints, and ``status.json``: running, failed or interrupted, with the error and the
    step). ``finish`` writes the summary, marks the run complete with the fingerprints of its
    inputs and outputs, and only then renames the folder to ``out/<stage>/``, replacing the
    previous results. A run that fails or is stopped leaves those previous results untouched.

    ``loop`` runs the training loop's steps with a progress bar and makes it resumable: every
    ``save_every`` steps, and when Ctrl-C asks to stop, it saves the loop's state (model,
    optimizer, data order, every random generator, metric history) to ``resume.pt``; with
    ``resume`` a new run continues from there and ends as the uninterrupted run would have.
    """

    def __init__(self, config: TrainConfig, stage: str):
        self.config, self.stage = config, stage
        self.final = Path(config.out) / stage
        self.dir = partial_dir(self.final)
        self.checkpoint = self.dir / RESUME
        self.command = command_line(stage, config)
        self.inputs = input_fingerprints(config)
        self.writes = distributed.is_main()  # under torchrun only rank 0 writes; the others keep rows in memory
        resuming = check_run_folder(config, stage)
        # under torchrun every rank checks the folder before rank 0 writes into it: a rank that
        # checked later would find rank 0's "running" status and take it for another run
        distributed.barrier()
        if not resuming and self.writes:
            if config.resume:
                print(f"nothing to resume in {self.dir}: {stage} starts from step 0")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            files.write_json(self.dir / "config.json", dataclasses.asdict(config))
            (self.dir / "metrics.jsonl").write_text("")
        self.metrics_path = self.dir / "metrics.jsonl"
        self.resume_from = self.checkpoint if resuming else None
        self.checkpoint_step = (files.read_json(self.dir / STATUS) or {}).get("checkpoint_step") if resuming else None
        self.start = time.time()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.rows: list[dict] = []
        self.step, self.steps, self.status, self.error, self.warnings = 0, config.steps, "running", None, []
        self.interrupted, self.in_loop = False, False
        self.write_status()
        _RUNS.append(self)

    def log(self, step: int, **metrics) -> dict:
        row = {"step": step, "time": round(time.time() - self.start, 3)}
        row.update({k: float(v) for k, v in metrics.items()})
        self.rows.append(row)
        if self.writes:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self._watch_divergence(row)
        return row

    def _watch_divergence(self, row: dict) -> None:
        """Warn once when the training loss grows past twice its first value plus one."""
        losses = [r["loss"] for r in self.rows if "loss" in r]
        if "loss" not in row or self.warnings:
            return
        bound = 2 * abs(losses[0]) + 1
        if row["loss"] > bound:
            message = (f"{self.stage}: the loss {row['loss']:.4g} at step {row['step']} is past twice its first "
                       f"value plus one ({bound:.4g}): training may be diverging (a lower --lr?)")
            self.warnings.append(message)
            self.write_status()
            warnings.warn(message, DivergenceWarning, stacklevel=3)

    def plot(self, keys, filename: str, title: str = "", hlines: dict | None = None, ylabel: str = "",
             ylim: tuple | None = None, caption: str = "", xlabel: str = "step") -> Path | None:
        """One panel of logged metrics against the step: ``keys`` maps each metric to its legend in
        words (a list of keys is drawn with the keys as labels); ``hlines`` maps a label to a
        horizontal line; ``ylabel`` and ``xlabel`` name the unit; ``caption`` says what to see."""
        panel = {"metrics": keys, "title": title, "ylabel": ylabel, "xlabel": xlabel,
                 "hlines": [(y, label) for label, y in (hlines or {}).items()], "ylim": ylim}
        return self.plot_panels(filename, [panel], caption)

    def plot_panels(self, filename: str, panels: list[dict], caption: str = "", title: str = "") -> Path | None:
        """``plot_panels`` of logged metrics: a panel's ``metrics`` ({key: legend}) are drawn
        against the step, beside any explicit ``curves`` it has. Only the writing rank draws."""
        if not self.writes:
            return None
        drawn = []
        for panel in panels:
            metrics = panel.get("metrics") or {}
            labels = metrics if isinstance(metrics, dict) else {k: k for k in metrics}
            curves = [self.series(key) + (label,) for key, label in labels.items()]
            drawn.append({**panel, "curves": curves + list(panel.get("curves", []))})
        return plot_panels(self.dir / filename, drawn, caption, title)

    def series(self, key: str) -> tuple[list, list]:
        """(steps, values) of a logged metric, over the rows that have it."""
        pts = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    # --- resumable training loops -------------------------------------------------------------
    def loop(self, steps: int, desc: str, **state) -> "Steps":
        """``range(steps)`` with a progress bar, resumable: ``state`` names everything the loop
        changes (models, optimizer, batch iterators, generators, lists the loop appends to)."""
        return Steps(self, steps, desc, state)

    def save_checkpoint(self, step: int, state: dict) -> None:
        """The loop's state after ``step`` steps, atomically, in ``resume.pt``."""
        if not self.writes:
            return
        files.torch_save({"step": step, "state": {k: _state_of(v) for k, v in state.items()}, "rng": rng_state(),
                          "rows": self.rows, "elapsed": time.time() - self.start}, self.checkpoint)
        self.checkpoint_step = step
        self.write_status()

    def load_checkpoint(self, state: dict) -> int:
        """Load ``resume.pt`` into the loop's ``state``; return the step to continue from."""
        ckpt = files.torch_load(self.checkpoint)
        if set(ckpt["state"]) != set(state):
            raise CheckpointError(f"{self.checkpoint} holds {sorted(ckpt['state'])}, this loop needs {sorted(state)}; "
                                  "start over with --overwrite")
        for name, obj in state.items():
            _load_into(obj, ckpt["state"][name])
        set_rng_state(ckpt["rng"])
        self.rows = ckpt["rows"]  # the metrics logged after the checkpoint are dropped
        if self.writes:
            files.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.start = time.time() - ckpt["elapsed"]
        self.resume_from, self.step = None, ckpt["step"]
        print(f"resuming {self.stage} at step {ckpt['step']} of {self.steps} from {self.checkpoint}")
        return ckpt["step"]

    # --- the end: complete, failed or interrupted ---------------------------------------------
    def write_status(self, **extra) -> None:
        if not self.writes:
            return
        files.write_json(self.dir / STATUS, {
            "stage": self.stage, "status": self.status, "command": self.command, "error": self.error,
            "step": self.step, "steps": self.steps, "resumable": self.checkpoint.is_file(),
            "checkpoint_step": self.checkpoint_step if self.checkpoint.is_file() else None,
            "inputs": self.inputs, "warnings": self.warnings, "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
            **extra})

    def finish(self, summary: dict) -> None:
        """Write the summary, mark the run complete, and move it into ``out/<stage>/``."""
        _RUNS.remove(self)
        if self.writes:
            self._complete(summary)
        distributed.barrier()  # the other ranks read out/<stage> only once it is there
        self.dir, self.metrics_path = self.final, self.final / "metrics.jsonl"

    def _complete(self, summary: dict) -> None:
        files.write_json(self.dir / "summary.json", summary)
        self.checkpoint.unlink(missing_ok=True)
        self.status, self.step = "complete", self.steps
        outputs = {p.name: files.fingerprint(p) for p in sorted(self.dir.iterdir()) if p.name != STATUS}
        self.write_status(outputs=outputs)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.dir, self.final)  # the two renames: see _finish_swap for a stop between them
        shutil.rmtree(old, ignore_errors=True)

    def fail(self, error: BaseException) -> None:
        """Record why the run stopped: ``interrupted`` (Ctrl-C) or ``failed`` (with the error)."""
        self.status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.error = " ".join(f"{type(error).__name__}: {error}".split()) if self.status == "failed" else None
        self.write_status()
        if self in _RUNS:
            _RUNS.remove(self)


class Steps:
    """The steps of a ``Run.loop``: a progress bar over ``range(start, steps)``, where ``start`` is 0
    or the step of the checkpoint being resumed. After each step: a resumable checkpoint every
    ``save_every`` steps, and, if Ctrl-C asked to stop, a checkpoint and ``KeyboardInterrupt``."""

    def __init__(self, run: Run, steps: int, desc: str, state: dict):
        self.run, self.steps, self.desc, self.state, self.bar = run, steps, desc, state, None

    def __iter__(self):
        run, every = self.run, self.run.config.save_every
        start = run.load_checkpoint(self.state) if run.resume_from is not None else 0
        self.bar = progress(range(start, self.steps), run.config, self.desc, total=self.steps, initial=start)
        run.in_loop = True
        try:
            for step in self.bar:
                yield step
                run.step = step + 1
                more = step + 1 < self.steps  # after the last step the stage finishes instead
                if more and (run.interrupted or (every and (step + 1) % every == 0)):
                    run.save_checkpoint(step + 1, self.state)
                if more and run.interrupted:
                    raise KeyboardInterrupt
        finally:
            run.in_loop = False
            self.bar.close()

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)


def _state_of(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, (list, dict)):
        return copy.deepcopy(obj)
    return obj.state_dict()  # modules, optimizers, batch iterators, controllers


def _load_into(obj, state) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, list):
        obj[:] = state
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    else:
        obj.load_state_dict(state)


def rng_state() -> dict:
    """Every global random generator: python, numpy, torch's CPU one and (if in use) CUDA's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# a stage's main(config): every check before anything is written; status on error or Ctrl-C
# ----------------------------------------------------------------------------------------------

_RUNS: list[Run] = []  # the runs started and not yet finished, innermost last


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a stage; the message says from which step and with which command to resume."""


def stage(name: str):
    """Decorator for a stage's ``main(config)``.

    Before ``main`` runs: the config is validated, the device checked, the input stages checked
    (complete, unchanged), and the run folder checked (no finished run with other settings
    overwritten, no resumable run thrown away); with ``resume`` a stage already complete with these
    settings returns its summary. While it runs, the first Ctrl-C stops the training loop after
    the current step with a resumable checkpoint. If it raises, the run's status says why.
    """
    def decorate(main):
        @functools.wraps(main)
        def run_stage(config: TrainConfig):
            config.validate()
            resolve_device(config.device)
            for field in ("model", "data", "eval_data"):  # given by hand: they must be there
                if getattr(config, field) and not Path(getattr(config, field)).exists():
                    raise ConfigError(f"{flag(field)} {getattr(config, field)}: no such file or folder")
            for field in type(config).INPUTS:
                stage_input(config, field)
            final = Path(config.out) / name
            if config.resume and not (partial_dir(final) / RESUME).is_file() and stage_problem(final) is None \
                    and not config_changes(files.read_json(final / "config.json"), config):
                print(f"{final} is already complete with these settings: nothing to resume")
                return files.read_json(final / "summary.json")
            check_run_folder(config, name)
            started = len(_RUNS)
            with _stop_loops_on_ctrl_c() as ctrl_c:
                try:
                    summary = main(config)
                    if ctrl_c.after_training:  # the run completed first; a pipeline stops here
                        raise StageInterrupted(f"{name} had done its {config.steps} steps when Ctrl-C came: its "
                                               f"results are complete in {final}; stopped there")
                    return summary
                except BaseException as e:
                    runs = _RUNS[started:]
                    for run in runs:
                        run.fail(e)
                    if runs and isinstance(e, KeyboardInterrupt):
                        raise StageInterrupted(_resume_hint(runs[-1])) from None
                    if runs and isinstance(e, NonFiniteError):
                        raise NonFiniteError(f"{e}. {_last_good(runs[-1])}") from e
                    raise
        return run_stage
    return decorate


def _resume_hint(run: Run) -> str:
    if run.checkpoint.is_file():
        return (f"{run.stage} stopped after step {run.step} of {run.steps}; continue from step {run.checkpoint_step} "
                f"with `{run.command} --resume`")
    return f"{run.stage} stopped after step {run.step} of {run.steps} with no resumable checkpoint (--save-every)"


def _last_good(run: Run) -> str:
    kept = f"; {run.final} still holds the previous results" if run.final.exists() else ""
    if run.checkpoint.is_file():
        return f"The last good checkpoint is {run.checkpoint} (step {run.checkpoint_step}){kept}"
    return f"No checkpoint of this run was saved (--save-every 0){kept}"


@contextlib.contextmanager
def _stop_loops_on_ctrl_c():
    """The first Ctrl-C inside a ``Run.loop`` asks it to stop after the current step (a
    checkpoint, then ``KeyboardInterrupt``). One after the loop's last step lets the stage finish
    measuring and saving (stopping then would throw the whole run away) and sets
    ``after_training``. A second Ctrl-C, or one before the loop, stops at once."""
    ctrl_c = types.SimpleNamespace(after_training=False)

    def handler(signum, frame):
        run = _RUNS[-1] if _RUNS else None
        trained = run is not None and not run.in_loop and run.step == run.steps
        if run is None or run.interrupted or not (run.in_loop or trained):
            raise KeyboardInterrupt
        run.interrupted, ctrl_c.after_training = True, trained
        if trained:
            print(f"\nCtrl-C: {run.stage} has done its {run.steps} steps and stops once its results are saved "
                  "(Ctrl-C again to stop now and lose them)", file=sys.stderr)
        else:
            print(f"\nCtrl-C: {run.stage} stops after this step with a resumable checkpoint "
                  "(Ctrl-C again to stop now)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread() or distributed.launched():
        # under torchrun every rank gets the signal at its own moment: stopping "after this step"
        # could leave one rank waiting for the others' gradients, so Ctrl-C stops at once there
        yield ctrl_c
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# plots: every figure of the stages and the tutorials is drawn by these two functions
# ----------------------------------------------------------------------------------------------


def plot_panels(path, panels: list[dict], caption: str = "", title: str = "", width: float = 5.0,
                height: float = 4.0) -> Path:
    """Panels side by side in one PNG, with a one-line caption under them that says what to see.

    One panel per unit. Each panel is a dict with ``title``, ``xlabel`` and ``ylabel`` (each naming
    its unit) and ``curves``, a list of ``(x, y, label)`` or ``(x, y, label, fmt)`` whose labels are
    words, not metric keys; optional ``hlines`` (a list of ``(y, label)``), ``bars`` (a list of
    ``(x, heights, label)``), ``xlim``, ``ylim``, ``xscale``, ``yscale``, ``xticks`` (positions,
    labels) and ``legend`` (a matplotlib legend location, or False). A series of at most 30 points
    drawn without a ``fmt`` gets markers, so that each measurement shows.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(width * len(panels), 6.5)  # a lone panel gets room for its caption
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for x, y, label, *fmt in panel.get("curves", []):
            if len(x):
                style = {} if fmt or len(x) > 30 else {"marker": "o"}
                ax.plot(x, y, *fmt, label=label, **style)
        bars = panel.get("bars", [])
        for i, (x, heights, label) in enumerate(bars):
            w = 0.8 / len(bars)
            ax.bar([xi + (i - (len(bars) - 1) / 2) * w for xi in x], heights, w, label=label)
        for y, label in panel.get("hlines", []):
            ax.axhline(y, linestyle="--", color="gray", label=label)
        for key in ("xscale", "yscale"):
            if panel.get(key):
                getattr(ax, f"set_{key}")(panel[key])
        if panel.get("xlim") is not None:
            ax.set_xlim(*panel["xlim"])
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        if panel.get("xticks") is not None:
            ax.set_xticks(*panel["xticks"])
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("legend", "best") and ax.get_legend_handles_labels()[0]:
            ax.legend(loc=panel.get("legend", "best"), fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path, caption)
    plt.close(fig)
    return Path(path)


def _save(fig, path, caption: str) -> None:
    """Write ``fig`` with ``caption`` in italics under it, wrapped to the figure's width."""
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * 15)) if caption else []
    if lines:
        fig.text(0.5, 0.02, "\n".join(lines), ha="center", va="bottom", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, (0.08 + 0.17 * len(lines)) / height if lines else 0, 1, 1))
    fig.savefig(path, dpi=100)


def plot_scatter(path, x, y, xlabel: str, ylabel: str, title: str = "", caption: str = "",
                 jitter: float = 0.0) -> Path:
    """One point per item, ``y`` against ``x`` (``jitter`` spreads an ``x`` that takes few values)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    dx = np.random.default_rng(0).uniform(-jitter, jitter, len(x)) if jitter else 0.0
    ax.scatter(np.asarray(x) + dx, y, s=6, alpha=0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path, caption)
    plt.close(fig)
    return Path(path)


def standardise(values: list[float]) -> list[float]:
    """(v - mean) / std over the list (all 0 if the values are all equal): two series of different
    units on one axis, when only their trends compare."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def progress(iterable, config: TrainConfig, desc: str, total: int | None = None, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, initial=initial,
                disable=not (config.progress and distributed.is_main()), dynamic_ncols=True)


def save_policy(model: GPT, tokenizer: Tokenizer, path) -> None:
    model.save(path, tokenizer=tokenizer.state_dict())


def checkpoint_tokenizer(ckpt: dict, path, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer saved in a checkpoint, checked against ``tokenizer`` (if given) and the model."""
    if "tokenizer" not in ckpt:
        raise ValueError(f"{path} has no tokenizer state; save it with train.save_policy")
    saved_tok = Tokenizer.from_state_dict(ckpt["tokenizer"])
    if tokenizer is not None and saved_tok != tokenizer:
        raise ValueError(f"{path} was trained with another tokenizer ({saved_tok.vocab_size} tokens) "
                         f"than the one given ({tokenizer.vocab_size} tokens)")
    if ckpt["config"]["vocab_size"] != saved_tok.vocab_size:
        raise ValueError(f"{path}: model vocab_size {ckpt['config']['vocab_size']} != tokenizer's "
                         f"{saved_tok.vocab_size}")
    return saved_tok


def load_policy(path, device="cpu", tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """A GPT and the tokenizer it was trained with; ``tokenizer``, if given, must be the same."""
    ckpt = load_checkpoint(path)
    saved_tok = checkpoint_tokenizer(ckpt, path, tokenizer)
    model = GPT.from_checkpoint(ckpt, source=str(path))
    return model.to(device), saved_tok
