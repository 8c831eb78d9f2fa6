"""The ``@stage`` decorator of a stage's ``main(config)``: every check before anything is written,
the run's status on an error, and Ctrl-C: the first one stops the training loop after the current
step with a resumable checkpoint, and the message says how to resume.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import types
from pathlib import Path

from . import distributed, files
from .config import TrainConfig
from .datafiles import rows_per_step
from .devices import keep_freed_memory, resolve_device, set_threads
from .files import ConfigError, NonFiniteError, WriteError
from .flags import flag
from .folders import RESUME, check_run_folder, check_writable, config_changes, partial_dir, stage_input, stage_problem
from .run import _RUNS, Run


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a stage; the message says from which step and with which command to resume.
    ``run`` is the interrupted run (None when it had completed), from which ``minialign pipeline``
    words the same message with its own command (``resume_hint``)."""

    def __init__(self, message: str, run: Run | None = None):
        super().__init__(message)
        self.run = run


def stage(name: str):
    """Decorator for a stage's ``main(config)``.

    Before ``main`` runs: the config is validated, torch's CPU threads set (``--threads``), glibc
    asked to keep freed memory (``keep_freed_memory``), the device checked, the input stages checked (complete, unchanged), and the run folder checked (no
    finished run with other settings overwritten, no resumable run thrown away); with ``resume`` a
    stage already complete with these settings returns its summary. While it runs, the first Ctrl-C
    stops the training loop after the current step with a resumable checkpoint. If it raises, the
    run's status says why.
    """
    def decorate(main):
        @functools.wraps(main)
        def run_stage(config: TrainConfig):
            config.validate()
            set_threads(config.threads)
            keep_freed_memory()  # a step's freed activations stay in the process for the next step
            resolve_device(config.device)
            check_writable(config.out)
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
            rows = type(config).ROWS_PER_STEP  # a --data file smaller than a step is refused as it is read
            with _stop_loops_on_ctrl_c() as ctrl_c, (rows_per_step(config.data, getattr(config, rows), flag(rows))
                                                     if config.data and rows else contextlib.nullcontext()):
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
                        raise StageInterrupted(resume_hint(runs[-1]), runs[-1]) from None
                    if runs and isinstance(e, NonFiniteError):
                        raise NonFiniteError(f"{_found_at(e, runs[-1])}{e}. {_last_good(runs[-1])}") from e
                    if isinstance(e, WriteError):
                        raise WriteError(f"{e} {name} stopped; {_previous(final)}") from e
                    raise
        return run_stage
    return decorate


def resume_hint(run: Run, command: str = "") -> str:
    """Where ``run`` stopped, and the command that continues it: ``command`` (the pipeline's) or,
    by default, the stage's own."""
    stopped = f"{run.stage} stopped after step {run.step} of {run.steps}"
    if run.checkpoint.is_file():
        return f"{stopped}; continue from step {run.checkpoint_step} with `{command or run.command} --resume`"
    if command:  # the stage starts over; the stages already complete are kept
        return f"{stopped} with no resumable checkpoint (--save-every); continue with `{command} --resume`"
    return f"{stopped} with no resumable checkpoint (--save-every)"


def _previous(final: Path) -> str:
    """What a failed run left of the stage's previous results (a run replaces them only when it completes)."""
    if final.exists():
        return f"{final} still holds the previous results, untouched"
    return f"there were no previous results in {final}, and nothing was put there"


def _found_at(error: NonFiniteError, run: Run) -> str:
    """Where a NaN or inf turned up (the step), unless the error says so already."""
    if error.step is not None:
        return ""
    # run.step counts the steps done: the loop's step index while its body runs
    return f"at step {run.step}: " if run.step < run.steps else f"after the last step ({run.steps}): "


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
