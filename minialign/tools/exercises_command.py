"""``minialign exercises make|check``: the command around the registry and the markers of
``exercises.py``. ``make`` writes a student's copy with the marked bodies removed, ``check`` grades
it with the hand-computed tests in a subprocess, and ``--train`` runs the tutorial of each exercise
on the copy's code beside the reference."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import exercises as registry
from .exercises import PACKAGE, REPO, TUTORIALS, Exercise, check_registry, select, strip_exercises


# ----------------------------------------------------------------------------------------------
# make: the student's copy
# ----------------------------------------------------------------------------------------------


def _source_checkout() -> Path:
    if not (REPO / "tests").is_dir() or not (REPO / "tutorials").is_dir():
        raise FileNotFoundError(f"exercises need minialign's source checkout (tests/ and tutorials/ beside "
                                f"{PACKAGE}): git clone the repository and pip install -e it")
    return REPO


def make(dest, only=None, overwrite: bool = False) -> list[Exercise]:
    """Write the exercise copy to ``dest``: minialign/ with the selected bodies removed, tests/,
    tutorials/, and EXERCISES.md (the sheet). Returns the exercises written."""
    dest = Path(dest)
    exercises = select(only)
    repo = _source_checkout()
    check_registry()
    if (dest / "minialign").exists():
        if not overwrite:
            raise FileExistsError(f"{dest} already holds an exercise copy; --overwrite replaces it "
                                  "(and loses what was written there)")
        for sub in ("minialign", "tests", "tutorials"):
            shutil.rmtree(dest / sub, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, dest / "minialign", ignore=ignore)
    shutil.copytree(repo / "tests", dest / "tests", ignore=ignore)
    shutil.copytree(repo / "tutorials", dest / "tutorials", ignore=ignore)
    names = {e.name for e in exercises}
    for file in sorted({e.file for e in exercises}):
        path = dest / "minialign" / file
        path.write_text(strip_exercises(path.read_text(), names, str(path)))
    (dest / "exercises.json").write_text(json.dumps({"exercises": [e.name for e in exercises]}, indent=1) + "\n")
    (dest / "EXERCISES.md").write_text(sheet(exercises))
    return exercises


def sheet(exercises: list[Exercise]) -> str:
    """EXERCISES.md: what to write, where, and how it is checked."""
    out = ["# minialign exercises", "",
           "Each exercise below is a function body of minialign that this copy lacks: the file raises",
           "`NotImplementedError` where it was, under a hint with the equation and the shapes. Write the",
           "body, then check it with the same hand-computed tests that check minialign itself:", "",
           "    minialign exercises check .               # every exercise of this copy",
           "    minialign exercises check . dpo_loss      # one exercise (or a file: dpo, grpo, ...)",
           "    minialign exercises check . dpo --train   # then train with your code beside the reference", "",
           "Run it from this folder (or give the folder's path). A failure prints the hand-worked case",
           "and the numbers expected and received. The tests are in tests/equations/, one file per file of",
           "minialign/ (look for `@pytest.mark.exercise`); the tutorials in tutorials/ run on this copy.", "",
           "| # | exercise | equations | where | what |", "|---|---|---|---|---|"]
    for i, e in enumerate(exercises, 1):
        out.append(f"| {i} | `{e.name}` | {e.equations} | `minialign/{e.file}` | {e.title} |")
    for i, e in enumerate(exercises, 1):
        out += ["", f"## {i}. `{e.name}` ({e.equations}): {e.title}", ""]
        out += [f"$${latex}$$" for latex in e.latex]
        out += ["", f"Shapes: {e.shapes}.", "",
                f"Graded by the tests marked `exercise(\"{e.name}\")` in `{e.test_file}`; "
                f"`--train` runs `tutorials/{e.tutorial}`."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# check: the mirrored tests against the student's copy
# ----------------------------------------------------------------------------------------------


def _copy_exercises(dest: Path) -> list[str] | None:
    manifest = dest / "exercises.json"
    return json.loads(manifest.read_text())["exercises"] if manifest.is_file() else None


def run_tests(dest, exercises: list[Exercise], timeout: float = 600) -> dict:
    """Run the exercises' tests on the copy in ``dest`` (a subprocess, that copy first on the path);
    return the plugin's report: {"package": path imported, "tests": [...], "errors": [...]}."""
    dest = Path(dest).resolve()
    repo = _source_checkout()
    files = sorted({str(repo / e.test_file) for e in exercises})
    report = dest / ".exercise_report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           "--exercise", ",".join(e.name for e in exercises), "--exercise-report", str(report), *files]
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the tests ran past {timeout:.0f} s on {dest} (an endless loop?)") from None
    if not report.is_file():
        raise RuntimeError(f"pytest did not run the exercise tests (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    result = json.loads(report.read_text())
    report.unlink()
    if Path(result["package"]).resolve() != (dest / "minialign").resolve():
        raise RuntimeError(f"the tests imported minialign from {result['package']}, not the copy in {dest}")
    return result


def grade(exercises: list[Exercise], result: dict) -> list[dict]:
    """One row per exercise: passed, failed tests (with their report entries), or an import error."""
    rows = []
    for e in exercises:
        tests = [t for t in result["tests"] if e.name in t["exercises"]]
        errors = [x for x in result["errors"] if Path(x["file"]).name == Path(e.test_file).name]
        failed = [t for t in tests if t["outcome"] in ("failed", "error")]
        rows.append({"exercise": e, "tests": tests, "failed": failed, "errors": errors,
                     "passed": bool(tests) and not failed and not errors})
    return rows


_NOT_WRITTEN = re.compile(r"exercise (\w+) \(")


def status(row: dict) -> str:
    """One line for the table: passed, not written yet, waits for another exercise, or FAILED."""
    e, n = row["exercise"], len(row["tests"])
    if row["passed"]:
        return f"passed ({n} test{'s' * (n != 1)})"
    if row["errors"]:
        return f"FAILED: {Path(e.test_file).name} does not import"
    if not row["tests"]:
        return "FAILED: no test is marked for this exercise"
    missing = {m.group(1) for t in row["failed"] if t["error"] == "NotImplementedError"
               for m in [_NOT_WRITTEN.search(t["message"])] if m}
    if all(t["error"] == "NotImplementedError" for t in row["failed"]):
        if e.name in missing:
            return "not written yet (NotImplementedError)"
        return f"waits for exercise {', '.join(sorted(missing))} (NotImplementedError)"
    return f"FAILED ({len(row['failed'])} of {n} tests)"


def format_table(rows: list[dict]) -> str:
    """The table, then for each failed exercise its failing tests: the case, expected, received."""
    width = max(len(r["exercise"].name) for r in rows)
    out = [f"{'exercise':<{width}}  {'equations':<14}  result"]
    for r in rows:
        out.append(f"{r['exercise'].name:<{width}}  {r['exercise'].equations:<14}  {status(r)}")
    for r in rows:
        failed = [t for t in r["failed"] if t["error"] != "NotImplementedError"]
        if not failed and not r["errors"]:
            continue
        out += ["", f"--- {r['exercise'].name} ({r['exercise'].equations}) " + "-" * 40]
        for x in r["errors"]:   # pytest's "E" lines: where the copy fails to import, and why
            out.append(f"{Path(x['file']).name} does not import:")
            out += ["  " + line[1:].strip() for line in x["message"].splitlines() if line.startswith("E ")]
        for t in failed:
            out.append(t["nodeid"].split("tests/")[-1])
            if "hand-worked case:" in t["message"]:          # the message of tests/equations/handworked.py: expect
                out += ["  " + line for line in t["message"].splitlines()[1:]]
            else:
                if t["case"]:
                    out.append("  hand-worked case:")
                    out += [f"      {c}" for c in t["case"]]
                out += ["  " + line for line in f"{t['error']}: {t['message']}".splitlines()[:12]]
            if t["where"]:
                out.append(f"  (raised at {t['where']})")
    return "\n".join(out)


def check(dest, only=None, train: bool = False, runs: str = "runs/tutorial", train_args: str = "",
          out=print) -> int:
    """Grade the copy in ``dest``; 0 when every selected exercise passes (then ``train`` runs)."""
    dest = Path(dest)
    if not (dest / "minialign" / "__init__.py").is_file():
        raise FileNotFoundError(f"{dest} holds no exercise copy: make one with "
                                f"`minialign exercises make {dest}`")
    exercises = select(only if only else _copy_exercises(dest))
    t = time.time()
    result = run_tests(dest, exercises)
    rows = grade(exercises, result)
    passed = sum(r["passed"] for r in rows)
    out(format_table(rows))
    out(f"\n{passed} of {len(rows)} exercises passed ({time.time() - t:.1f} s; tests from "
        f"{Path(result['tests_from']).resolve()}, code from {dest.resolve() / 'minialign'})")
    if passed < len(rows):
        return 1
    if train:
        return train_compare(dest, exercises, runs, train_args, out)
    return 0


# ----------------------------------------------------------------------------------------------
# --train: the tutorial on the student's code beside the reference
# ----------------------------------------------------------------------------------------------

_PINNED = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import minialign; "
           "assert minialign.__file__.startswith(sys.argv[1]), minialign.__file__; "
           "sys.path.insert(0, sys.argv[2]); sys.argv = sys.argv[3:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_tutorial(package_parent: Path, script: Path, args: list[str], log: Path) -> int:
    """Run a tutorial with the minialign package of ``package_parent`` imported first (pinned: the
    tutorial's own path setup cannot swap it). Output goes to ``log``; returns the exit code."""
    cmd = [sys.executable, "-c", _PINNED, str(package_parent), str(script.parent), str(script), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=package_parent,
                              env={**os.environ, "PYTHONPATH": str(package_parent)}).returncode


def train_compare(dest, exercises: list[Exercise], runs: str = "runs/tutorial", train_args: str = "",
                  out=print) -> int:
    """Run each selected exercise's tutorial with the copy's code and with the reference, from the
    same prerequisite checkpoints, and print the stage's figures side by side."""
    dest = Path(dest).resolve()
    repo = _source_checkout()
    extra = shlex.split(train_args)
    tutorials = [t for t in TUTORIALS if t in {e.tutorial for e in exercises}]
    status = 0
    for name in tutorials:
        stage, needs, keys, defaults = TUTORIALS[name]
        args = defaults + extra
        sides = {"reference": (REPO, dest / "runs" / "reference"), "yours": (dest, dest / "runs" / "yours")}
        # prerequisites (the SFT model, the reward model): the tutorials' run folder if it has them,
        # else the reference run trains them; the student's run starts from the same files
        for need in needs:
            for _, folder in sides.values():
                src = Path(runs) / need
                if not (folder / need / "model.pt").is_file() and (src / "model.pt").is_file():
                    shutil.copytree(src, folder / need, dirs_exist_ok=True)
        summaries = {}
        for side, (parent, folder) in sides.items():
            if side == "yours":
                for need in needs:
                    ref = sides["reference"][1] / need
                    if not (folder / need / "model.pt").is_file():
                        shutil.copytree(ref, folder / need, dirs_exist_ok=True)
            log = folder / f"{Path(name).stem}.log"
            who = "the reference code" if side == "reference" else f"your code ({dest / 'minialign'})"
            out(f"running tutorials/{name} {' '.join(args)} with {who}; log: {log}")
            t = time.time()
            code = run_tutorial(parent, repo / "tutorials" / name, ["--out", str(folder), *args], log)
            if code != 0:
                out(f"  it failed (exit {code}); the end of its log:\n" + "\n".join(
                    "    " + line for line in log.read_text().splitlines()[-25:]))
                status = 1
                break
            summaries[side] = json.loads((folder / stage / "summary.json").read_text())
            out(f"  done in {time.time() - t:.0f} s")
        if len(summaries) == 2:
            out(f"\n{stage}: {'figure':<26} {'reference':>12} {'yours':>12}")
            for k in keys:
                ref, yours = summaries["reference"].get(k), summaries["yours"].get(k)
                out(f"{'':<{len(stage) + 1}} {k:<26} {_num(ref):>12} {_num(yours):>12}")
            out("")
    return status


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


# ----------------------------------------------------------------------------------------------
# the command line: minialign exercises make|check
# ----------------------------------------------------------------------------------------------


def add_parser(sub) -> list[argparse.ArgumentParser]:
    """The ``exercises`` command and its ``make`` and ``check``; returns those two (the CLI adds
    its shared flags to them)."""
    p = sub.add_parser("exercises", help="course exercises: make a copy with bodies to write, check it",
                       description=registry.__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="exercises_command", required=True)
    m = commands.add_parser("make", help="write a copy of minialign with the exercise bodies removed")
    m.add_argument("dir", help="folder to write the copy to")
    m.add_argument("--only", default="", help="comma-separated exercises or files (dpo,grpo); default: all")
    m.add_argument("--overwrite", action="store_true", help="replace an existing copy in DIR")
    c = commands.add_parser("check", help="grade a copy with the hand-computed tests; exit 0 if all pass")
    c.add_argument("dir", help="the folder `exercises make` wrote")
    c.add_argument("only", nargs="*", help="exercises or files to check (default: those of the copy)")
    c.add_argument("--train", action="store_true",
                   help="when all pass, run each exercise's tutorial with this copy and with the reference")
    c.add_argument("--runs", default="runs/tutorial",
                   help="run folder of earlier tutorials: --train starts from its SFT / reward model")
    c.add_argument("--train-args", default="", help="extra flags for the tutorials run by --train")
    return [m, c]


def cli_main(args: argparse.Namespace) -> int:
    if args.exercises_command == "make":
        written = make(args.dir, [t for t in args.only.split(",") if t], args.overwrite)
        print(f"wrote {args.dir}: {len(written)} exercise(s) to write, listed in {args.dir}/EXERCISES.md")
        for e in written:
            print(f"  {e.name:<26} {e.equations:<14} minialign/{e.file}")
        print(f"check them with: minialign exercises check {args.dir}")
        return 0
    return check(args.dir, args.only, args.train, args.runs, args.train_args)
