"""Seeded runs of every stage on tiny settings, reduced to what must not change when code moves:
the sha256 of each saved model and every number and text of each ``summary.json`` (times aside).

    python tests/runtime/seeded_runs.py record   # write tests/runtime/seeded_runs.json for this machine
    python tests/runtime/seeded_runs.py compare  # run again and list every difference (exit 1 if any)

Bit-identical results hold on one machine, with one thread count and one torch version (the
float reduction order depends on all three), so the record keeps one entry per machine it was made
on, and ``tests/runtime/test_seeded_runs.py`` compares where the record has this machine's entry. A
refactor is checked by recording before it and comparing after it, on the same machine; ``record``
replaces this machine's entry and keeps the others.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

RECORD = Path(__file__).with_name("seeded_runs.json")
TINY = ["--device", "cpu", "--no-progress", "--seed", "3"]
MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48"]
ROLLOUT = ["--eval-every", "2", "--max-new-tokens", "6"]

# (case, stage, flags): the main chain first (each stage reads the one before from the same --out),
# then the options the tutorials and the docs use, each from the main chain's models
CASES = [
    ("pretrain", "pretrain", [*MODEL, "--steps", "6", "--batch-size", "16", "--corpus-size", "800",
                              "--eval-size", "64", "--eval-every", "3"]),
    ("sft", "sft", ["--steps", "6", "--batch-size", "16", "--num-examples", "200", "--eval-size", "32",
                    "--eval-every", "3"]),
    ("reward_model", "reward-model", ["--steps", "4", "--batch-size", "8", "--num-pairs", "64",
                                      "--eval-pairs", "16", "--eval-every", "2"]),
    ("dpo", "dpo", ["--steps", "4", "--batch-size", "8", "--num-pairs", "32", "--eval-pairs", "8",
                    "--eval-samples-per-prompt", "2", *ROLLOUT]),
    ("ppo", "ppo", ["--steps", "3", "--batch-size", "8", "--minibatch-size", "4", "--eval-samples", "2",
                    "--final-eval-samples", "2", *ROLLOUT]),
    ("grpo", "grpo", ["--steps", "3", "--questions", "4", "--group-size", "4", "--batch-size", "8",
                      "--eval-samples", "2", "--final-eval-samples", "2", *ROLLOUT]),
    ("dpo_plain", "dpo", ["--steps", "3", "--batch-size", "8", "--num-pairs", "32", "--eval-pairs", "8",
                          "--eval-samples-per-prompt", "2", "--beta", "1.0", "--no-precompute-ref-logps",
                          "--no-share-prompt", "--grad-accum", "2", *ROLLOUT]),
    ("ppo_source", "ppo", ["--steps", "2", "--batch-size", "8", "--minibatch-size", "4", "--eval-samples", "2",
                           "--final-eval-samples", "2", "--advantage", "source", "--shared-trunk", *ROLLOUT]),
    ("grpo_kl_reward", "grpo", ["--steps", "3", "--questions", "4", "--group-size", "4", "--batch-size", "16",
                                "--eval-samples", "2", "--final-eval-samples", "2", "--kl-in", "reward",
                                "--aggregation", "token_mean", "--no-scale-by-std", "--ref-reset-every", "2",
                                "--inner-updates", "2", "--no-share-prompt", *ROLLOUT]),
    # your own data files (written by ``write_data`` from the toy world): PPO's prompts, GRPO's
    # questions with and without held-out ones
    ("ppo_data", "ppo", ["--steps", "2", "--batch-size", "8", "--minibatch-size", "4", "--data", "{data}/prompts.jsonl",
                         *ROLLOUT]),
    ("grpo_data", "grpo", ["--steps", "3", "--questions", "4", "--group-size", "4", "--batch-size", "8",
                           "--eval-samples", "2", "--final-eval-samples", "2", "--data", "{data}/qa.jsonl",
                           "--eval-data", "{data}/qa_eval.jsonl", *ROLLOUT]),
    ("grpo_data_no_eval", "grpo", ["--steps", "2", "--questions", "4", "--group-size", "4", "--batch-size", "8",
                                   "--data", "{data}/qa.jsonl", *ROLLOUT]),
]
FOLLOWS = {"dpo_plain": "dpo", "ppo_source": "ppo", "grpo_kl_reward": "grpo",  # case -> stage folder it stands for
           "ppo_data": "ppo", "grpo_data": "grpo", "grpo_data_no_eval": "grpo"}
TIME_KEYS = ("seconds", "time", "wall")
# summary keys renamed since the record was made, {old: new}, passed to ``differences`` (for one name
# per thing the summaries kept their keys; the metrics.jsonl keys renamed, which this record does
# not hold, are listed below for the reader)
RENAMED: dict[str, str] = {}
METRICS_RENAMED = {
    "ppo": {"eval_true_reward": "true_reward", "eval_malformed": "malformed", "true_reward": "rollout/true_reward"},
    "grpo": {"heldout_accuracy": "heldout/accuracy"},
}


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def records() -> list[dict]:
    """Every machine's entry in the record: [{"machine": ..., "results": ...}]."""
    return json.loads(RECORD.read_text())["records"] if RECORD.exists() else []


def this_machines_record() -> dict | None:
    """The results recorded on this machine (CPU, threads, torch, python), or None."""
    return next((r["results"] for r in records() if r["machine"] == machine()), None)


def _numbers_and_text(value, prefix=""):
    """Every leaf of a summary as {dotted key: value}, times left out."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not any(t in k for t in TIME_KEYS):
                out.update(_numbers_and_text(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_numbers_and_text(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_data(folder: Path) -> Path:
    """The data files of the ``--data`` cases, in TRL's formats, from the toy world."""
    from minialign.toyworld import ToyWorld, write_jsonl
    world = ToyWorld()
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in world.review_prompts()])
    questions = world.arithmetic_questions("train")[:8]
    write_jsonl(folder / "qa.jsonl", [{"prompt": q["prompt"], "answer": f"so it is #### {q['answer']}"}
                                      for q in questions])
    write_jsonl(folder / "qa_eval.jsonl", world.arithmetic_questions("heldout")[:4])
    return folder


def run_all(root: Path, cases=CASES) -> dict:
    """Run every case under ``root``; {case: {"files": {name: sha256}, "summary": {key: value}}}.
    ``root`` is written as ROOT in the summaries (a data report names its file)."""
    from minialign.runtime.cli import main
    chain = root / "chain"
    data = write_data(root / "data")
    results = {}
    for case, stage, flags in cases:
        flags = [f.replace("{data}", str(data)) for f in flags]
        out = chain if case not in FOLLOWS else root / case
        extra = []
        if case in FOLLOWS:
            extra = ["--init", str(chain / "sft" / "model.pt")]
            if stage == "ppo":
                extra += ["--reward-model", str(chain / "reward_model" / "model.pt")]
        code = main([stage, "--out", str(out), *TINY, *flags, *extra])
        if code != 0:
            raise RuntimeError(f"seeded case {case} ({stage}) failed with exit code {code}")
        folder = out / stage.replace("-", "_")
        files = {p.name: _sha(p) for p in sorted(folder.glob("*.pt")) if p.name != "resume.pt"}
        summary = json.loads((folder / "summary.json").read_text())
        summary = {k: v.replace(str(root), "ROOT") if isinstance(v, str) else v
                   for k, v in _numbers_and_text(summary).items()}
        results[case] = {"files": files, "summary": summary}
    return results


def differences(before: dict, after: dict, renamed: dict | None = None) -> list[str]:
    """Every file hash or summary value that differs; ``renamed`` maps an old summary key to its new name."""
    renamed = renamed or {}
    out = []
    for case, old in before.items():
        new = after.get(case)
        if new is None:
            out.append(f"{case}: not run")
            continue
        if old["files"] != new["files"]:
            out.append(f"{case}: saved files differ: {old['files']} != {new['files']}")
        for key, value in old["summary"].items():
            key_now = renamed.get(key, key)
            if key_now not in new["summary"]:
                out.append(f"{case}: summary key {key} is gone")
            elif new["summary"][key_now] != value:
                out.append(f"{case}: summary {key}: {value!r} != {new['summary'][key_now]!r}")
        for key in new["summary"].keys() - {renamed.get(k, k) for k in old["summary"]}:
            out.append(f"{case}: summary key {key} is new")
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("record", "compare"):
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp))
    if argv[0] == "record":
        others = [r for r in records() if r["machine"] != machine()]
        RECORD.write_text(json.dumps({"records": others + [{"machine": machine(), "results": results}]},
                                     indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}: {len(results)} seeded cases on {machine()} (and {len(others)} other machines)")
        return 0
    recorded = this_machines_record()
    if recorded is None:
        print(f"the record holds {[r['machine'] for r in records()]}, this is {machine()}: nothing to compare")
        return 2
    diff = differences(recorded, results, RENAMED)
    print("\n".join(diff) or f"all {len(results)} seeded cases are identical to the record")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
