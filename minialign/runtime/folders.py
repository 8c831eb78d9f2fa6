"""The rules of the run folder: where a stage works until it completes (``out/<stage>.partial``),
which models it reads (``input_path``, checked by ``stage_input``), whether a stage folder can be
trusted as an input (``stage_problem``: completed, and nothing it holds or was made from has
changed since), and whether a new run may start there (``check_run_folder``: no finished run with
other settings is lost, no resumable run thrown away).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
from pathlib import Path

from . import files
from .config import ROUNDING_ONLY, RUN_CONTROL, TrainConfig
from .files import ConfigError, StageError
from .flags import flag

STATUS, RESUME = "status.json", "resume.pt"


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
    """The settings (not run-control, nor the thread count) in which ``config`` differs from a saved
    config.json, as ``"beta: 0.1 there, 0.5 here"``; empty if none. A field the saved config lacks
    counts as its default."""
    if saved is None:
        return "no config.json there"
    defaults = type(config)()
    diffs = [f"{f.name}: {saved.get(f.name, getattr(defaults, f.name))!r} there, {getattr(config, f.name)!r} here"
             for f in dataclasses.fields(config) if f.name not in RUN_CONTROL + ROUNDING_ONLY
             and saved.get(f.name, getattr(defaults, f.name)) != getattr(config, f.name)]
    return "; ".join(diffs)


def check_writable(folder, name: str = "--out") -> None:
    """Refuse a folder that this process cannot create or write into (read-only, not its
    user's), before any work is done; ``name`` is the flag or argument that gave it."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {folder}: this user cannot write in {existing} (a read-only file system, or "
                          f"another user's folder); choose another folder")


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
    changed = output_changed(folder, status)
    if changed:
        return (f"{changed} after {folder.name} completed ({STATUS} holds the sha256 of every file it wrote); "
                f"rerun `{command}`")
    for field, rec in status.get("inputs", {}).items():
        # an input that is gone (a stage folder copied on its own) leaves the stage as it was made;
        # one that is there with other contents means a newer model is upstream of this one
        source = folder.parent / rec["path"]  # an absolute path stays absolute
        if source.exists() and files.fingerprint(source) != rec["sha256"]:
            return f"{folder.name} was made from {source} ({flag(field)}), which has changed since; rerun `{command}`"
    return None


def output_changed(folder: Path, status: dict) -> str | None:
    """The first output of a completed stage (checkpoints, ``config.json``, ``metrics.jsonl``,
    ``summary.json``, plots: every file ``status.json`` fingerprints) that is gone or has other
    contents, as ``"runs/x/sft/config.json changed"``; None if every one is as it was written."""
    for name, sha in status.get("outputs", {}).items():
        path = folder / name
        if not path.exists():
            return f"{path} was deleted"
        if files.fingerprint(path) != sha:
            return f"{path} changed"
    return None


def _finish_swap(folder: Path) -> None:
    """Complete a ``Run.finish`` that was killed after it marked the partial folder complete: before
    its first rename (the previous results still in ``folder``), between its two renames (no
    ``folder``), or before it removed the previous results (a ``.<stage>.old-PID`` folder)."""
    partial = partial_dir(folder)
    status = files.read_json(partial / STATUS) or {}
    if status.get("status") == "complete" and not (status.get("host") == socket.gethostname()
                                                   and _alive(status.get("pid"))):
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(partial, folder)
    for old in folder.parent.glob(f".{folder.name}.old-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and _alive(int(pid))):  # the finishing process is gone: the swap is done
            shutil.rmtree(old, ignore_errors=True)


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
    # a completed run whose files were edited since holds nothing trustworthy that a rerun would lose
    if final.exists() and not config.overwrite and not output_changed(final, files.read_json(final / STATUS) or {}):
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
