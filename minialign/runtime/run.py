"""One run of a stage: ``Run`` is its folder's lifecycle (config, JSONL metrics, status, the final
rename into ``out/<stage>/``) and ``Run.loop`` its resumable training loop (``Steps``: a progress
bar, checkpoints every ``--save-every`` steps and on Ctrl-C, and the resume from them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch

from . import distributed, files
from .config import TrainConfig
from .devices import rng_state, set_rng_state
from .files import CheckpointError
from .folders import RESUME, STATUS, check_run_folder, command_line, input_fingerprints, partial_dir
from .plots import plot_metric_panels, plot_metrics

_RUNS: list[Run] = []  # the runs started and not yet finished, innermost last (the @stage decorator reads it)


class DivergenceWarning(UserWarning):
    """The training loss grew past twice its first value plus one."""


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
            # the thread count in use, not the flag's 0 ("torch's choice"): bit-identical reruns need it
            files.write_json(self.dir / "config.json", {**dataclasses.asdict(config), "threads": torch.get_num_threads()})
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
            try:
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise files.write_failed(self.metrics_path, e) from e
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

    # --- plots of the logged metrics: minialign.runtime.plots draws them -------------------------
    def plot(self, *args, **kwargs) -> Path | None:
        """``plots.plot_metrics(self, ...)``: one panel of logged metrics against the step."""
        return plot_metrics(self, *args, **kwargs)

    def plot_panels(self, *args, **kwargs) -> Path | None:
        """``plots.plot_metric_panels(self, ...)``: panels of logged metrics against the step."""
        return plot_metric_panels(self, *args, **kwargs)

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
        try:
            self.write_status()
        except OSError:  # the full disk that failed the run may refuse this too: the error says why
            pass
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


def progress(iterable, config: TrainConfig, desc: str, total: int | None = None, initial: int = 0):
    """A tqdm bar over ``iterable``, drawn by the main rank only: always with ``--progress``, never
    with ``--no-progress``, and by default (``progress`` None) only when the output is a terminal,
    tqdm's own convention (``disable=None``), so that a log file gets no carriage returns."""
    from tqdm.auto import tqdm
    disable = True if not distributed.is_main() else None if config.progress is None else not config.progress
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, dynamic_ncols=True)
