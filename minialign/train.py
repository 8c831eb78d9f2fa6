"""What every stage's training loop shares, written once: configs behind CLI flags, seeding,
devices and dtypes, the optimizer and its schedule, the run folder (config, JSONL metrics, PNG
plots, checkpoints) and loading a policy.

An algorithm file keeps only its own math and its own loop; everything here is plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import random
import re
import textwrap
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import distributed
from .model import GPT, load_checkpoint
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
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
    # real models and your own data (docs/real_models.md); with none of these, the toy world
    model: str = ""              # a local Hugging Face model folder to start from instead of the run folder's model
    model_impl: Literal["minialign", "hf"] = "minialign"  # run --model in minialign's GPT (GPT-2 folders) or transformers
    data: str = ""               # training data (.jsonl or .parquet) in TRL's format for this stage, instead of the toy world
    eval_data: str = ""          # held-out data in the same format (for the held-out metrics)
    max_length: int | None = None  # longest prompt + response in tokens (None: the model's context); longer rows are cut as TRL does
    grad_accum: int = 1          # micro-batches per optimizer step; batch_size stays the global batch

    def __post_init__(self):
        """The flags for real models and data that only make sense together (checked before any run
        folder is touched)."""
        if self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data is held-out data for --data; the toy world has its own held-out split")
        if self.max_length is not None and (not self.data or self.max_length < 1):
            raise ValueError(f"--max-length {self.max_length} cuts the rows of --data (>= 1 token); "
                             "the toy world's rows all fit its model")


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


def add_config_args(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--flag`` per dataclass field: type and default from the field, help from its comment."""
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is bool:  # --x, --x true, --x false, --no-x
            parser.add_argument(flag, dest=f.name, type=parse_bool, nargs="?", const=True, default=default,
                                metavar="true|false", help=f"{comments.get(f.name, '')} "
                                f"(default: {default}; --no-{flag[2:]} = {flag} false)".strip())
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None
        conv = type(choices[0]) if choices else tp
        if optional:
            base = conv
            conv = lambda s, base=base: None if s.lower() == "none" else base(s)  # noqa: E731
        parser.add_argument(flag, dest=f.name, type=conv, default=default, choices=choices,
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
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return distributed.device_for_rank(device)


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {list(dtypes)}, got {name!r}")
    return dtypes[name]


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
    """Backward, clip, step at the scheduled learning rate; returns the pre-clip gradient norm."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping before it spreads")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return _clip_and_step(model, optimizer, config)


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
    extras = distributed.accumulate(parallel, micro_batches, loss_of)
    return _clip_and_step(model, optimizer, config), extras


def _clip_and_step(model, optimizer, config: TrainConfig) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# the run folder: config, metrics, plots, checkpoints
# ----------------------------------------------------------------------------------------------


class Run:
    """``out/<stage>/`` with ``config.json``, ``metrics.jsonl``, plots and ``model.pt``.

    Under torchrun only rank 0 writes (``writes``); the other ranks keep their rows in memory.
    """

    def __init__(self, config: TrainConfig, stage: str):
        self.dir = Path(config.out) / stage
        self.writes = distributed.is_main()
        self.metrics_path = self.dir / "metrics.jsonl"
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("")  # a rerun starts a fresh log
            (self.dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        self.start = time.time()
        self.rows: list[dict] = []

    def log(self, step: int, **metrics) -> dict:
        row = {"step": step, "time": round(time.time() - self.start, 3)}
        row.update({k: float(v) for k, v in metrics.items()})
        self.rows.append(row)
        if self.writes:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def plot(self, keys, filename: str, title: str = "", hlines: dict | None = None, ylabel: str = "",
             ylim: tuple | None = None, caption: str = "", xlabel: str = "step") -> Path | None:
        """One panel of logged metrics against the step: ``keys`` maps each metric to its legend in
        words (a list of keys is drawn with the keys as labels); ``hlines`` maps a label to a
        horizontal line; ``ylabel`` and ``xlabel`` name the unit; ``caption`` says what to see."""
        panel = {"metrics": keys, "title": title, "ylabel": ylabel, "xlabel": xlabel,
                 "hlines": list((hlines or {}).items()), "ylim": ylim}
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

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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


def progress(iterable, config: TrainConfig, desc: str, total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not (config.progress and distributed.is_main()),
                dynamic_ncols=True)


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
