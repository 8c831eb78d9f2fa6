"""Seeded runs of every stage and every tutorial on tiny settings, reduced to what must not change
when code moves: the sha256 of each saved model and every number and text of each ``summary.json``
(times aside), and of each tutorial's ``summary NN_name:`` line.

    python tests/runtime/seeded_runs.py record   # write tests/runtime/seeded_runs.json for this machine
    python tests/runtime/seeded_runs.py compare  # run again and list every difference (exit 1 if any)
    python tests/runtime/seeded_runs.py compare stages      # only the stages (or only: tutorials)

The tutorials run as scripts, in order, into one run folder (tutorial 02 fine-tunes 01's model,
and so on), each with its tiny settings of ``tutorials/make_notebooks.py`` (``TINY``, which the
notebook test runs too) and its default seed.

Bit-identical results hold on one machine, with one thread count and one torch version (the
float reduction order depends on all three), so the record keeps one entry per machine it was made
on, and ``tests/runtime/test_seeded_runs.py`` compares where the record has this machine's entry. A
refactor is checked by recording before it and comparing after it, on the same machine; ``record``
replaces this machine's entry and keeps the others.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

RECORD = Path(__file__).with_name("seeded_runs.json")
REPO = Path(__file__).resolve().parents[2]
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


MODEL_FILES = ("*.pt", "*.safetensors")  # a stage's model.pt (value_head.pt) and a real-model folder's weights


def tutorial_cases() -> list[tuple[str, list[str]]]:
    """(case, flags) of every numbered tutorial, in order, with its tiny settings (make_notebooks.TINY)."""
    sys.path.insert(0, str(REPO / "tutorials"))
    from make_notebooks import TINY, TUTORIALS
    return [(f"tutorial_{path.stem}", shlex.split(TINY[path.stem])) for path in TUTORIALS]


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


def _leaves(summary_json: Path, root: Path) -> dict:
    """A summary.json's leaves, ``root`` written as ROOT (a summary names its data file and --init)."""
    return {k: v.replace(str(root), "ROOT") if isinstance(v, str) else v
            for k, v in _numbers_and_text(json.loads(summary_json.read_text())).items()}


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
        results[case] = {"files": files, "summary": _leaves(folder / "summary.json", root)}
    return results


def _written(folder: Path) -> dict[str, int]:
    """{path relative to ``folder``: mtime in ns} of every model file and summary.json below it."""
    paths = [p for pattern in (*MODEL_FILES, "summary.json") for p in folder.rglob(pattern) if p.name != "resume.pt"]
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in paths}


def summary_line(printed: str) -> dict[str, str]:
    """The figures of a tutorial's ``summary NN_name: k=v ...`` line (as printed: text)."""
    line = next(line for line in printed.splitlines() if line.startswith("summary "))
    return dict(word.split("=", 1) for word in line.split(":", 1)[1].split())


def run_tutorials(root: Path, cases=None) -> dict:
    """Run the tutorials in order into ``root/tutorial``, each as a student runs it (a script, on
    the CPU, with its default seed); {case: {"files": {path: sha256}, "summary": {key: value}}} of
    what each wrote: the models and summary.json files it saved (``dpo/summary.json:kl``) and its
    summary line (``line:kl``). Tutorial 08 needs ``transformers`` (the [hf] extra) and is left
    out without it."""
    out = root / "tutorial"
    out.mkdir(parents=True, exist_ok=True)
    # the tutorials import this checkout (and tutorial 08's `python -m minialign` does too)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = {}
    for case, flags in cases or tutorial_cases():
        name = case.removeprefix("tutorial_")
        if name == "08_real_model" and importlib.util.find_spec("transformers") is None:
            continue
        before = _written(out)
        # cwd=root: a tutorial without its own earlier models would take runs/tutorial's (_common.ensure)
        # torch's own thread count, as in this process (machine()); --threads is left out
        proc = subprocess.run([sys.executable, str(REPO / "tutorials" / f"{name}.py"), *flags, "--out", str(out),
                               "--device", "cpu", "--no-progress"], cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"seeded case {case} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
        written = sorted(p for p, t in _written(out).items() if before.get(p) != t)
        summary = {f"line:{k}": v for k, v in summary_line(proc.stdout).items()}
        for path in written:
            if path.endswith("summary.json"):
                summary.update({f"{path}:{k}": v for k, v in _leaves(out / path, root).items()})
        results[case] = {"files": {p: _sha(out / p) for p in written if not p.endswith("summary.json")},
                         "summary": summary}
    return results


PARTS = {"stages": run_all, "tutorials": run_tutorials}


def recorded_for(results: dict, recorded: dict) -> tuple[dict, list[str]]:
    """This machine's record of the cases in ``results``, and the cases it has no record of (an entry
    made before they were added): those are not compared."""
    return ({c: recorded[c] for c in results if c in recorded}, [c for c in results if c not in recorded])


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
    if not argv or argv[0] not in ("record", "compare") or not set(argv[1:]) <= set(PARTS):
        print(__doc__)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in argv[1:] or PARTS:
            results.update(PARTS[part](Path(tmp) / part))
    if argv[0] == "record":
        others = [r for r in records() if r["machine"] != machine()]
        results = {**(this_machines_record() or {}), **results}
        RECORD.write_text(json.dumps({"records": others + [{"machine": machine(), "results": results}]},
                                     indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}: {len(results)} seeded cases on {machine()} (and {len(others)} other machines)")
        return 0
    if this_machines_record() is None:
        print(f"the record holds {[r['machine'] for r in records()]}, this is {machine()}: nothing to compare")
        return 2
    recorded, unrecorded = recorded_for(results, this_machines_record())
    if unrecorded:
        print(f"not in this machine's record, not compared: {', '.join(unrecorded)}")
    diff = differences(recorded, results, RENAMED)
    print("\n".join(diff) or f"all {len(recorded)} recorded seeded cases are identical to the record")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
