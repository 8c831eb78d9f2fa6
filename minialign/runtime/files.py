"""Files a run can trust: atomic writes, fingerprints, and the errors the command line reports.

A file is written under a temporary name in its own folder, flushed to disk, then renamed over
its target (``os.replace`` is atomic): a reader, or a crash in the middle of ``torch.save``, sees
the old file or the new one, never half of one.

The errors below are the *expected* ones: a bad flag value, a missing or corrupt checkpoint, an
input stage that did not finish, a NaN. Their messages say what is wrong and what to do, so the
``minialign`` command prints them in one line (``--debug`` shows the traceback). They subclass the
built-in error a caller would catch (``ValueError``, ``FloatingPointError``, ...).

This module imports no torch, so ``minialign --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class MinialignError(Exception):
    """An expected error whose message says what is wrong and how to fix it."""


class ConfigError(MinialignError, ValueError):
    """A config value outside its allowed range; the message names the flag."""


class CheckpointError(MinialignError, ValueError):
    """A checkpoint that is truncated, corrupt or not minialign's; the message names the file."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class StageError(MinialignError, RuntimeError):
    """An input stage that is missing, unfinished, or changed since it was used; or a stage folder
    that a run would overwrite. The message says which command to run."""


class NonFiniteError(MinialignError, FloatingPointError):
    """A NaN or inf in the loss, the gradients, the weights or the logits; the message names the
    step (``step``, when the place that found it knows it; else the stage adds it)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class WriteError(MinialignError, OSError):
    """A file that could not be written (a full disk, a file-size limit, a read-only folder); the
    message names it and says that the file it would have replaced is untouched."""


def write_failed(path, error: BaseException) -> WriteError:
    """The one-line error for a failed write of ``path`` (an ``OSError``, or the ``RuntimeError``
    that ``torch.save`` raises when the disk fills: "unexpected pos ...")."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return WriteError(f"writing {path} failed ({reason[:120]}): is the disk full, or a file-size limit "
                      f"(ulimit -f) reached?")


def atomic_write(path, write) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    If ``write`` fails (or the process dies) the previous ``path`` is untouched; a failure to
    write is a ``WriteError`` that names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, MinialignError):
            raise
        raise write_failed(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def torch_save(obj, path) -> Path:
    """``torch.save``, atomically, refusing to write a NaN or inf into a checkpoint."""
    import torch
    refuse_non_finite(obj, path)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def refuse_non_finite(obj, path) -> None:
    """Refuse to write ``obj`` (a state dict, or nested dicts and lists of tensors) to ``path`` if a
    floating-point tensor in it holds NaN or inf: a checkpoint is never saved broken."""
    bad = _non_finite(obj)
    if bad:
        raise NonFiniteError(f"not saving {path}: {bad} holds NaN or inf values")


def torch_load(path, map_location="cpu"):
    """``torch.load(weights_only=True)`` (no code runs from the file) with one clear error, naming
    the file and how to recreate it, for every way a file can fail to load (empty, truncated,
    garbage: ``EOFError``, a zip error, an unpickling error, ...)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"no checkpoint at {path}; {recreate_hint(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raised, the file is unreadable
        raise CheckpointError(f"{path} is not a readable checkpoint ({path.stat().st_size} bytes; torch.load "
                              f"raised {type(e).__name__}): it is truncated or corrupt; "
                              f"{recreate_hint(path)}") from e


def _non_finite(obj, key: str = "") -> str | None:
    """The key of the first floating-point tensor in a nested dict/list holding NaN or inf."""
    import torch
    if isinstance(obj, torch.Tensor):
        return key or "a tensor" if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _non_finite(v, f"{key}.{k}" if key else str(k))
        if bad:
            return bad
    return None


def read_json(path) -> dict | None:
    """The JSON object in ``path``, or None if there is no such file (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fingerprint(path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def recorded_command(folder) -> str | None:
    """The command recorded in ``folder/status.json``, its ``--out`` pointed at where the folder
    is now (a run folder may have been copied or moved since)."""
    import shlex
    words = shlex.split((read_json(Path(folder) / "status.json") or {}).get("command") or "")
    if "--out" in words[:-1]:
        words[words.index("--out") + 1] = str(Path(folder).parent)
    return shlex.join(words) if words else None


def recreate_hint(path) -> str:
    """How to make ``path`` again: the command recorded in the ``status.json`` beside it, if any."""
    command = recorded_command(Path(path).parent)
    return f"recreate it with `{command}`" if command else "recreate it by rerunning the command that wrote it"
