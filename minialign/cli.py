"""The ``minialign`` command: one subcommand per stage, and ``pipeline`` to run them all.

    minialign pretrain --out runs/demo        # stage 1: base model
    minialign sft --out runs/demo             # stage 2: instruct model
    minialign pipeline --out runs/demo        # every stage below, in order, into one folder
    minialign export runs/demo/dpo DIR        # a trained model as a Hugging Face folder
    torchrun --nproc_per_node 2 -m minialign.cli dpo ...   # any stage on several processes (DDP)
    minialign exercises make course/          # a copy with the equations' bodies to write

Each stage module has a dataclass config (its flags) and ``main(config) -> summary``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from . import distributed, exercises
from .train import add_config_args, config_from_args

# stage name -> (module, config class, one-line help); ``pipeline`` runs them in this order
STAGES = {
    "pretrain": ("minialign.pretrain", "PretrainConfig", "stage 1: pre-train a base model (E0a)"),
    "sft": ("minialign.sft", "SFTConfig", "stage 2: supervised fine-tuning (E0b)"),
    "reward_model": ("minialign.reward_model", "RewardModelConfig", "alignment: Bradley-Terry reward model (E3, E4)"),
    "dpo": ("minialign.dpo", "DPOConfig", "alignment: direct preference optimisation (E7-E10)"),
    "ppo": ("minialign.ppo", "PPOConfig", "alignment: PPO with a value head against the reward model (E2, E5, E6)"),
    "grpo": ("minialign.grpo", "GRPOConfig", "alignment: group relative policy optimisation (E11-E14)"),
}
# other commands that are not pipeline stages: name -> (module, config class, help)
TOOLS = {
    "bench": ("minialign.bench", "BenchConfig", "print speed figures (throughput, MFU, KV cache)"),
}
PIPELINE_SHARED = ("out", "seed", "world_seed", "device", "dtype", "progress")


def _load(module: str, cls: str):
    mod = importlib.import_module(module)
    return mod, getattr(mod, cls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minialign", description="Readable LLM alignment: "
                                     "pre-training, SFT, reward model, PPO, DPO, GRPO on a toy world.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cls, help_) in {**STAGES, **TOOLS}.items():
        _, config_cls = _load(module, cls)
        aliases = [name.replace("_", "-")] if "_" in name else []  # reward-model = reward_model
        p = sub.add_parser(name, aliases=aliases, help=help_, description=(config_cls.__doc__ or help_).strip())
        add_config_args(p, config_cls)
    p = sub.add_parser("pipeline", help="run every stage in order into one run folder: "
                       + ", ".join(STAGES), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of the stages, run in pipeline order")
    p = sub.add_parser("export", help="write a trained model as a Hugging Face folder",
                       description="Write the model of a stage folder (e.g. runs/demo/dpo) as a Hugging Face "
                                   "folder that transformers loads (GPT-2 format for minialign's GPT).")
    p.add_argument("source", help="a stage folder (RUN/STAGE), its model.pt or its model/ folder")
    p.add_argument("dest", help="the new folder to write")
    exercises.add_parser(sub)
    return parser


def run_pipeline(args) -> dict:
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    summaries = {}
    for name in STAGES:
        if name not in wanted:
            continue
        mod, config_cls = _load(*STAGES[name][:2])
        shared = {k: getattr(args, k) for k in PIPELINE_SHARED}
        config = config_cls(**{k: v for k, v in shared.items() if k in {f.name for f in dataclasses.fields(config_cls)}})
        print(f"\n=== {name}: {STAGES[name][2]} -> {args.out}/{name}")
        summaries[name] = mod.main(config)
        print(json.dumps(_brief(summaries[name]), indent=2))
    return summaries


def _brief(summary: dict) -> dict:
    """The summary without long lists (sample texts), for printing."""
    return {k: v for k, v in summary.items() if not isinstance(v, list)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pipeline":
        run_pipeline(args)
        return 0
    if args.command == "export":
        from .export import export

        print(f"wrote {export(args.source, args.dest)}")
        return 0
    if args.command == "exercises":
        return exercises.cli_main(args)
    module, cls, _ = {**STAGES, **TOOLS}[args.command.replace("-", "_")]
    mod, config_cls = _load(module, cls)
    with distributed.process_group(getattr(args, "device", "auto")):  # torchrun: join its ranks
        summary = mod.main(config_from_args(config_cls, args))
    distributed.print_main(json.dumps(_brief(summary) if isinstance(summary, dict) else summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
