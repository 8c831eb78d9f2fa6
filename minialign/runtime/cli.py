"""The ``minialign`` command: one subcommand per stage, and ``pipeline`` to run them all.

    minialign pretrain --out runs/demo        # stage 1: base model
    minialign sft --out runs/demo             # stage 2: instruct model
    minialign dpo --out runs/demo --with-prerequisites   # trains pretrain and sft first if needed
    minialign pipeline --out runs/demo        # every stage below, in order, into one folder
    minialign export runs/demo/dpo DIR        # a trained model as a Hugging Face folder
    torchrun --nproc_per_node 2 -m minialign dpo ...   # any stage on several processes (DDP)
    minialign exercises make course/          # a copy with the equations' bodies to write

Each stage module has a dataclass config (its flags, checked by its ``validate()``) and a
``main(config) -> summary`` wrapped by ``runtime.stage.stage``. A command's module (and torch) is imported
only when that command runs or prints its help, so ``minialign --help`` answers at once.

An expected error (a bad flag value, a missing or corrupt checkpoint, an input stage that did not
complete, no CUDA) is printed as one line and the command exits 1; ``--debug`` (or
``MINIALIGN_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from . import files
from ..tools import exercises_command

# stage name -> (module, config class, one-line help); ``pipeline`` runs them in this order
STAGES = {
    "pretrain": ("minialign.stages.pretrain", "PretrainConfig", "stage 1: pre-train a base model (E0a)"),
    "sft": ("minialign.stages.sft", "SFTConfig", "stage 2: supervised fine-tuning (E0b)"),
    "reward_model": ("minialign.stages.reward_model", "RewardModelConfig", "alignment: Bradley-Terry reward model (E3, E4)"),
    "dpo": ("minialign.stages.dpo", "DPOConfig", "alignment: direct preference optimisation (E7-E10), or a relative (--loss)"),
    "ppo": ("minialign.stages.ppo", "PPOConfig", "alignment: PPO with a value head against the reward model (E2, E5, E6)"),
    "grpo": ("minialign.stages.grpo", "GRPOConfig", "alignment: group relative policy optimisation (E11-E14)"),
    "rejection_sampling": ("minialign.stages.rejection_sampling", "RejectionSamplingConfig",
                           "baseline: best-of-N and rejection-sampling fine-tuning (expert iteration)"),
}
# the stages ``pipeline`` runs, in order: the source's; a family's stage runs on its own
PIPELINE = ("pretrain", "sft", "reward_model", "dpo", "ppo", "grpo")
# other commands that are not pipeline stages: name -> (module, config class, help)
TOOLS = {
    "bench": ("minialign.tools.bench", "BenchConfig", "print speed figures (throughput, MFU, KV cache)"),
}
# the pipeline's flags: the settings every stage shares (TrainConfig's fields of these names)
PIPELINE_SHARED = ("out", "seed", "world_seed", "device", "dtype", "threads", "progress", "save_every", "resume",
                   "overwrite")
# what a prerequisite stage inherits from the stage that needs it
PREREQUISITE_SHARED = ("out", "seed", "world_seed", "device", "dtype", "threads", "progress", "save_every")


def _load(module: str, cls: str):
    mod = importlib.import_module(module)
    return mod, getattr(mod, cls)


def _canonical(command: str | None) -> str | None:
    return None if command is None else command.replace("-", "_")


def add_debug_flag(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``--debug`` on the top level (default False) and on each command (SUPPRESS: a command's
    parser must not reset the value the top level parsed)."""
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of an error instead of one line (or MINIALIGN_DEBUG=1)")


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``minialign`` parser. Only the commands in ``commands`` (default: every one) get their
    flags, which imports their module; ``minialign --help`` builds it with none."""
    parser = argparse.ArgumentParser(
        prog="minialign", description="Readable LLM alignment: pre-training, SFT, reward model, PPO, DPO, "
        "GRPO on a toy world.", epilog="`minialign COMMAND --help` says what a command reads and writes, "
        "and lists its flags.")
    add_debug_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, cls, help_) in {**STAGES, **TOOLS}.items():
        aliases = [name.replace("_", "-")] if "_" in name else []  # reward-model = reward_model
        p = sub.add_parser(name, aliases=aliases, help=help_)
        if commands is None or name in commands:
            _, config_cls = _load(module, cls)
            _add_command_args(p, config_cls, help_, prerequisites=name in STAGES)
    p = sub.add_parser("pipeline", help="run every stage in order into one run folder: " + ", ".join(PIPELINE))
    if commands is None or "pipeline" in commands:
        from ..runtime.config import TrainConfig
        _add_command_args(p, TrainConfig, only=PIPELINE_SHARED, prerequisites=True)
        p.description = (f"Run the stages in order ({', '.join(PIPELINE)}) into OUT/<stage>/,\n"
                         "each with its defaults and the shared flags below. With --resume, a stage already\n"
                         "complete with these settings is skipped and an interrupted one continues from its\n"
                         "last checkpoint.")
        p.add_argument("--stages", default=",".join(PIPELINE),
                       help="comma-separated subset of the stages, run in pipeline order (default: %(default)s)")
    p = sub.add_parser("export", help="write a trained model as a Hugging Face folder",
                       description="Write the model of a stage folder (e.g. runs/demo/dpo) as a Hugging Face "
                                   "folder that transformers loads (GPT-2 format for minialign's GPT).")
    p.add_argument("source", help="a stage folder (RUN/STAGE), its model.pt or its model/ folder")
    p.add_argument("dest", help="the new folder to write")
    add_debug_flag(p)
    for p in exercises_command.add_parser(sub):
        add_debug_flag(p)
    return parser


def _add_command_args(p, config_cls, help_: str = "", only=None, prerequisites: bool = False) -> None:
    from ..runtime.flags import add_config_args
    doc = inspect.cleandoc(config_cls.__doc__ or "")
    if help_ and (not doc or doc.startswith(config_cls.__name__ + "(")):  # the dataclass's generated signature
        doc = help_
    p.description, p.usage = doc, "%(prog)s [options]"  # the help opens with what the command does
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(p, config_cls, only)
    if prerequisites and (only is not None or config_cls.INPUTS):
        p.add_argument("--with-prerequisites", action="store_true",
                       help="first train the input stages that are missing, unfinished or out of date")
    add_debug_flag(p)


# ----------------------------------------------------------------------------------------------
# running stages and their prerequisites
# ----------------------------------------------------------------------------------------------


def ensure_stage(name: str, **shared) -> Path:
    """``out/<name>/model.pt``, complete and up to date: if it is missing, unfinished or made from
    inputs that changed, train it now (its own inputs first). A missing stage runs with its
    defaults and ``shared`` settings, an interrupted one resumes, a stale one reruns with the
    settings recorded in its folder."""
    from ..runtime.folders import RESUME, partial_dir, stage_model, stage_problem
    final = Path(shared["out"]) / name
    problem = stage_problem(final)
    if problem is None:
        return stage_model(shared["out"], name)
    mod, config_cls = _load(*STAGES[name][:2])
    fields = {f.name for f in dataclasses.fields(config_cls)}
    recorded = files.read_json(partial_dir(final) / "config.json") or files.read_json(final / "config.json")
    settings = {k: v for k, v in shared.items() if k in fields}
    if recorded is not None:  # the settings it was (being) made with, watched and threaded as this run is
        settings = {**{k: v for k, v in recorded.items() if k in fields}, "out": shared["out"],
                    "progress": shared.get("progress"), "threads": shared.get("threads", 0)}
    resume = (partial_dir(final) / RESUME).is_file()
    config = config_cls(**{**settings, "resume": resume, "overwrite": not resume})
    print(f"[{problem}: running {name} first]")
    run_stage(name, config, with_prerequisites=True)
    return stage_model(shared["out"], name)


def run_stage(name: str, config, with_prerequisites: bool = False) -> dict:
    """Run stage ``name`` with ``config``; with ``with_prerequisites``, first its missing inputs."""
    mod, _ = _load(*STAGES[name][:2])
    if with_prerequisites:
        shared = {k: getattr(config, k) for k in PREREQUISITE_SHARED}
        for field, stage in type(config).INPUTS.items():
            if not getattr(config, field):  # a checkpoint given by hand is the user's to make
                ensure_stage(stage, **shared)
    return mod.main(config)


def pipeline_stages(args) -> list[str]:
    """The stages ``--stages`` names, in pipeline order, once the pipeline's flags are checked:
    they are ``TrainConfig`` fields, so this needs no torch and a bad value is refused at once."""
    from ..runtime.config import TrainConfig
    wanted = [s.strip().replace("-", "_") for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in PIPELINE]
    if unknown:
        raise files.ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {list(PIPELINE)}")
    TrainConfig(**{k: getattr(args, k) for k in PIPELINE_SHARED})
    return [s for s in PIPELINE if s in wanted]


def run_pipeline(args) -> dict:
    from ..runtime.stage import StageInterrupted, resume_hint
    shared = {k: getattr(args, k) for k in PIPELINE_SHARED}
    configs = {}
    for name in pipeline_stages(args):  # every config checked before any stage runs
        _, config_cls = _load(*STAGES[name][:2])
        fields = {f.name for f in dataclasses.fields(config_cls)}
        configs[name] = config_cls(**{k: v for k, v in shared.items() if k in fields})
    summaries = {}
    for name, config in configs.items():
        print(f"\n=== {name}: {STAGES[name][2]} -> {args.out}/{name}")
        try:
            summaries[name] = run_stage(name, config, args.with_prerequisites)
        except StageInterrupted as e:  # continue with the pipeline, which skips the stages complete
            again = pipeline_command(args)
            raise StageInterrupted(resume_hint(e.run, again) if e.run else
                                   f"{e}; continue the pipeline with `{again} --resume`", e.run) from None
        print(json.dumps(_brief(summaries[name]), indent=2))
    return summaries


def pipeline_command(args) -> str:
    """The ``minialign pipeline`` command that ``args`` came from (its flags that differ from their
    defaults, and the progress bars as asked), for the message that says how to continue it."""
    from ..runtime.config import TrainConfig
    from ..runtime.folders import command_line
    words = [command_line("pipeline", TrainConfig(**{k: getattr(args, k) for k in PIPELINE_SHARED}))]
    if args.progress is not None:
        words.append("--progress" if args.progress else "--no-progress")
    if args.stages != ",".join(PIPELINE):
        words.append(f"--stages {shlex.quote(args.stages)}")
    if args.with_prerequisites:
        words.append("--with-prerequisites")
    return " ".join(words)


def _brief(summary: dict) -> dict:
    """The summary without long lists (sample texts), for printing."""
    return {k: v for k, v in summary.items() if not isinstance(v, list)}


# ----------------------------------------------------------------------------------------------
# the command line: one line per expected error
# ----------------------------------------------------------------------------------------------

# errors whose message is written for the user: printed alone, without a traceback
EXPECTED = (files.MinialignError, ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def error_line(e: BaseException) -> str:
    """One line for an error: its message if it is an expected one, else its type and a hint."""
    text = " ".join(str(e).split())
    if isinstance(e, EXPECTED):
        return text
    if isinstance(e, OSError) and e.filename and e.strerror:  # the file system refused: say what, and where
        return f"{e.filename}: {e.strerror}"
    return f"{type(e).__name__}: {text} (unexpected: run again with --debug to see the traceback)"


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    return _canonical(next((a for a in argv if not a.startswith("-")), None))


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"minialign: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MINIALIGN_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return _run(argv)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"minialign: interrupted{': ' + ' '.join(str(e).split()) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        print(f"minialign: error: {error_line(e)}", file=sys.stderr)
        return 1


# flags renamed since the first release: the old spelling gets its new name, not argparse's usage
RENAMED = {"--kl-coef": "--beta (the KL strength is beta in every algorithm)"}


# TrainConfig's fields whose checks also read other fields (how a stage's batches split, --data):
# only the stage's own config, with its own defaults, checks them
CROSS_CHECKED = ("batch_size", "grad_accum", "data", "eval_data", "max_length", "model")


class _Unparsed(Exception):
    """The flags did not parse; the command's own parser will say why."""


class _QuietParser(argparse.ArgumentParser):
    def error(self, message):
        raise _Unparsed(message)


def check_shared_flags(argv: list[str]) -> None:
    """Refuse a bad value of a flag that every stage shares (``--lr -1``, ``--steps 0``) before the
    stage's module is imported, and torch with it (seconds of CPU): ``TrainConfig`` checks the
    flags typed, without torch, with the message the stage's own config gives them. The stage's
    config checks everything again, its own flags and the cross-checked ones included."""
    from ..runtime.config import TrainConfig
    from ..runtime.flags import add_config_args
    if {"-h", "--help"} & set(argv):
        return
    parser = _QuietParser(add_help=False, allow_abbrev=False)
    add_config_args(parser, TrainConfig, only=[f.name for f in dataclasses.fields(TrainConfig)
                                                if f.name not in CROSS_CHECKED])
    try:
        typed, _ = parser.parse_known_args(argv)
    except _Unparsed:
        return
    defaults = TrainConfig()
    TrainConfig(**{k: v for k, v in vars(typed).items() if v != getattr(defaults, k)})


def _run(argv: list[str]) -> int:
    for word in argv:
        old = word.split("=", 1)[0]
        if old in RENAMED:
            raise files.ConfigError(f"{old} is now {RENAMED[old]}")  # main prints it as one line
    command = _command_in(argv)
    if command in STAGES:
        check_shared_flags(argv)
    commands = {command} if command in {*STAGES, *TOOLS, "pipeline"} else set()
    args = build_parser(commands).parse_args(argv)
    name = _canonical(args.command)
    if name == "export":
        from ..real.export import export
        print(f"wrote {export(args.source, args.dest)}")
        return 0
    if name == "exercises":
        return exercises_command.cli_main(args)
    if name == "pipeline":
        pipeline_stages(args)  # a bad flag is refused here, before torch is imported
    from . import distributed
    from ..runtime.devices import set_threads
    from ..runtime.flags import config_from_args
    set_threads(getattr(args, "threads", 0))  # before torchrun's process group, the first work torch does
    with distributed.process_group(getattr(args, "device", "auto")):  # torchrun: join its ranks
        if name == "pipeline":
            run_pipeline(args)
            return 0
        mod, config_cls = _load(*{**STAGES, **TOOLS}[name][:2])
        config = config_from_args(config_cls, args)  # ConfigError here: a flag's value is out of range
        if name in STAGES:
            summary = run_stage(name, config, getattr(args, "with_prerequisites", False))
        else:
            summary = mod.main(config)
    distributed.print_main(json.dumps(_brief(summary) if isinstance(summary, dict) else summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
