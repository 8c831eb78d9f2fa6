"""Run every tutorial over several seeds and record each headline figure as a measured range.

A tutorial's figures depend on the seed, and a little on the CPU and the thread count (the order
of float additions differs), so the course quotes each figure as the mean and the range over
seeds, never one run's number. This script makes those ranges::

    python tutorials/measure_ranges.py                  # seeds 0-4, every tutorial (docs/measurements.md: its time)
    python tutorials/measure_ranges.py --only 06_grpo   # one tutorial (its prerequisites are kept)
    python tutorials/measure_ranges.py --write          # rewrite the pages' tables from the record

Each seed has a run folder of its own (``runs/seeds/seed<s>``): tutorial 01 there pre-trains with
that seed, 02 fine-tunes that model, and so on, as a student's chain would. The record is
``tutorials/expected_ranges.json``; it is written after every run, so an interrupted sweep keeps
what it measured and a rerun skips it. Every tutorial's ``summary`` line then says, figure by
figure, whether the student's own run falls inside the range (``_common.summary``).

The pages quote the record, never a figure copied by hand: the README and ``docs/course.md`` hold the
whole table between ``<!-- ranges: start -->`` and ``<!-- ranges: end -->``, and a doc page holds one
tutorial's figures between ``<!-- ranges: NN_name -->`` and ``<!-- /ranges -->``, and a sentence
quotes one figure as ``<!--r NN_name key-->`` (its range), ``<!--r NN_name key@seed-->`` (one
seed's value) or ``<!--r NN_name seconds-->`` (the mean wall time of a run) before the text and
``<!--/r-->`` after it. Every sweep rewrites them, and a test checks that they match the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "tutorials" / "expected_ranges.json"
TUTORIALS = [p.stem for p in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))]
README_START, README_END = "<!-- ranges: start -->", "<!-- ranges: end -->"


def parse_summary(line: str) -> tuple[str, dict[str, str]]:
    """``summary 04_dpo: a=1.0 b=x`` -> ("04_dpo", {"a": "1.0", "b": "x"})."""
    head, _, rest = line.partition(":")
    return head.split()[1], dict(re.findall(r"([\w.]+)=(\S+)", rest))


def as_number(text: str):
    """A figure as a float, or None for a word or a list (``kl_in=loss``, ``betas=0.1/1/10``)."""
    try:
        return float(text)
    except ValueError:
        return None


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def machine() -> dict:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def runs_of(record: dict, name: str) -> dict[int, dict]:
    """One tutorial's recorded runs, by seed."""
    return {int(key.split("@")[1]): run for key, run in record["runs"].items() if key.split("@")[0] == name}


def load() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {"runs": {}}


def save(record: dict) -> None:
    figures = {}
    for key, run in record["runs"].items():
        name = key.split("@")[0]
        for k, v in run["figures"].items():
            figures.setdefault(name, {}).setdefault(k, []).append(v)
    record["ranges"] = {}
    for name, table in sorted(figures.items()):
        record["ranges"][name] = {}
        for k, texts in table.items():
            numbers = [as_number(t) for t in texts]
            record["ranges"][name][k] = stats(numbers) if None not in numbers else {"values": texts}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def run_one(name: str, seed: int) -> dict:
    out = f"runs/seeds/seed{seed}"
    command = [sys.executable, f"tutorials/{name}.py", "--seed", str(seed), "--out", out]
    t = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(command[1:])}` failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"summary {name}:")]
    if not lines:
        raise SystemExit(f"`{' '.join(command[1:])}` printed no summary line")
    return {"figures": parse_summary(lines[-1])[1], "seconds": round(time.time() - t, 1),
            "command": f"python tutorials/{name}.py --seed {seed} --out {out}", "machine": machine()}


def fmt(s: dict) -> str:
    if "mean" not in s:
        return "/".join(dict.fromkeys(s["values"]))
    if s["min"] == s["max"]:  # a setting or an exact figure (steps, the entropy floor): the same in every run
        return f"{s['min']:g}"
    if 0 < max(abs(s["min"]), abs(s["max"])) < 1e-3:  # a float32 rounding difference: its exponent is the figure
        return f"{s['mean']:.1e} [{s['min']:.1e}, {s['max']:.1e}]"
    digits = 4 if max(abs(s["min"]), abs(s["max"])) < 10 and any(len(v.split(".")[-1]) > 3 for v in map(str, s["values"])) else 3
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def machine_label(run: dict) -> str:
    m = run["machine"]
    threads = f"{m.get('threads')} thread" + "s" * (m.get("threads") != 1)
    return f"{m.get('cpu')} ({m.get('cores')} cores, {threads}, torch {m.get('torch')})"


def readme_table(record: dict) -> str:
    rows = ["| tutorial | seeds | wall time per run (mean) | figure: mean [min, max] over the seeds |", "|---|---|---|---|"]
    for name, table in record["ranges"].items():
        runs = runs_of(record, name).values()
        seconds = statistics.fmean(r["seconds"] for r in runs)
        figures = "; ".join(f"{k} {fmt(s)}" for k, s in table.items())
        rows.append(f"| {name} | {len(runs)} | {seconds:.0f} s | {figures} |")
    machines = {}
    for key, run in record["runs"].items():
        machines.setdefault(machine_label(run), []).append(key.split("@")[0])
    where = "; ".join(f"{', '.join(dict.fromkeys(names))} on {label}" for label, names in machines.items())
    return "\n".join(rows) + f"\n\nMeasured by `python tutorials/measure_ranges.py`: {where}."


def seeds_of(record: dict, name: str) -> str:
    seeds = sorted(runs_of(record, name))
    return f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else \
        "seeds " + ", ".join(map(str, seeds))


def tutorial_table(record: dict, name: str) -> str:
    """One tutorial's figures for its doc page: seed by seed, then mean [min, max] over the seeds."""
    if name not in record["ranges"]:
        raise SystemExit(f"a page asks for the ranges of {name}, which the record does not have")
    runs = runs_of(record, name)
    seeds = sorted(runs)
    where = dict.fromkeys(machine_label(runs[s]) for s in seeds)
    rows = ["| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
            "|---" * (len(seeds) + 2) + "|"]
    for k, s in record["ranges"][name].items():
        each = [runs[seed]["figures"].get(k, "-") for seed in seeds]
        rows.append(f"| {k} | " + " | ".join(each) + f" | {fmt(s) if 'mean' in s else '-'} |")
    return "\n".join(rows) + (f"\n\nMeasured by `python tutorials/measure_ranges.py --only {name}` on "
                              f"{' and '.join(where)}, each seed its own chain of run folders.")


def rewrite_pages(record: dict, pages=None) -> dict[Path, str]:
    """The text of every page that quotes the record, with its blocks rewritten from it."""
    pages = pages or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {}
    for path in pages:
        text = path.read_text()
        if README_START in text:
            a, b = text.index(README_START) + len(README_START), text.index(README_END)
            text = text[:a] + "\n" + readme_table(record) + "\n" + text[b:]
        text = PAGE_BLOCK.sub(lambda m: m.group(1) + tutorial_table(record, m.group(2)) + "\n" + m.group(3), text)
        text = FIGURE.sub(lambda m: m.group(1) + figure(record, *m.group(2, 3, 4)) + m.group(5), text)
        texts[path] = text
    return texts


PAGE_BLOCK = re.compile(r"(<!-- ranges: (\d\d_\w+) -->\n).*?(<!-- /ranges -->)", re.S)
# One figure in a sentence: <!--r 06_grpo accuracy-->mean [min, max]<!--/r-->, or with @seed that seed's value.
FIGURE = re.compile(r"(<!--r (\d\d_\w+) ([\w.]+)(?:@(\d+))?-->).*?(<!--/r-->)", re.S)


def figure(record: dict, name: str, key: str, seed: str | None) -> str:
    """The text a ``<!--r name key[@seed]-->`` tag stands for; ``seconds`` is the mean wall time per run."""
    if key == "seconds" and seed is None:
        seconds = [r["seconds"] for r in runs_of(record, name).values()]
        if not seconds:
            raise SystemExit(f"a page quotes the wall time of {name}, which the record does not have")
        return f"{statistics.fmean(seconds):.0f} s"
    if seed is not None:
        run = record["runs"].get(f"{name}@{seed}")
        if run is None or key not in run["figures"]:
            raise SystemExit(f"a page quotes {name}'s {key} of seed {seed}, which the record does not have")
        return run["figures"][key]
    s = record["ranges"].get(name, {}).get(key)
    if s is None or "mean" not in s:
        raise SystemExit(f"a page quotes the range of {name}'s {key}, which the record does not have")
    return fmt(s)


def write_pages(record: dict) -> None:
    for path, text in rewrite_pages(record).items():
        if text != path.read_text():
            path.write_text(text)
            print(f"rewrote the ranges in {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--only", default="", help="comma-separated tutorials (their prerequisites stay)")
    parser.add_argument("--write", action="store_true", help="only rewrite the pages' tables from the record")
    args = parser.parse_args()
    record = load()
    if not args.write:
        wanted = [t for t in TUTORIALS if not args.only or t in args.only.split(",")]
        for name in wanted:          # tutorial by tutorial: a partial sweep has whole ranges
            for seed in range(args.seeds):
                key = f"{name}@{seed}"
                if key in record["runs"]:
                    continue
                record["runs"][key] = run_one(name, seed)
                save(record)
                print(f"{record['runs'][key]['seconds']:6.0f} s  {key}: {record['runs'][key]['figures']}", flush=True)
        save(record)
    write_pages(record)


if __name__ == "__main__":
    main()
