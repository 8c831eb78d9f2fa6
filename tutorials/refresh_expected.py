"""Rerun every command that docs/course.md quotes an expected output for, and rewrite those outputs.

In the course, an expected output is a fenced block of ``summary NN_name: ...`` lines (printed by
``_common.summary`` at the end of a tutorial) that follows the fenced block holding its command::

    ```
    python tutorials/04_dpo.py --betas 0.1
    ```
    ```
    summary 04_dpo: ...
    ```

This script runs each such command from the repository root, one at a time, and replaces the
block with the ``summary`` lines the command printed now. Seeded runs print the same lines on the
same machine, so after a change that moves the numbers (a new float summation order, a new
default) the figures pass is this one command:

    python tutorials/refresh_expected.py                 # every command (tens of minutes)
    python tutorials/refresh_expected.py --only 04_dpo   # the commands of one tutorial
    python tutorials/refresh_expected.py --list          # what would run
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```\n", re.M | re.S)


def pairs(text: str) -> list[tuple[str, re.Match]]:
    """(command, the match of its expected-output block) for each command block followed by one."""
    blocks = list(FENCE.finditer(text))
    out = []
    for command, expected in zip(blocks, blocks[1:]):
        lines = command.group(1).strip().splitlines()
        if (len(lines) == 1 and lines[0].startswith(("python tutorials/", "minialign "))
                and expected.group(1).startswith("summary ")):
            out.append((lines[0], expected))
    return out


def run(command: str) -> list[str]:
    args = shlex.split(command)
    if args[0] == "python":
        args[0] = sys.executable
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`{command}` failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("summary ")]
    if not lines:
        raise SystemExit(f"`{command}` printed no summary line")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", default=str(ROOT / "docs" / "course.md"))
    parser.add_argument("--only", default="", help="run only the commands that contain this text")
    parser.add_argument("--list", action="store_true", help="list the commands and stop")
    args = parser.parse_args()
    page = Path(args.page)
    todo = [c for c, _ in pairs(page.read_text()) if args.only in c]
    for command in todo:
        if args.list:
            print(command)
            continue
        t = time.time()
        lines = run(command)
        text = page.read_text()          # reread: rewrite one block at a time, so an interruption keeps the rest
        for c, block in pairs(text):
            if c == command:
                text = text[:block.start(1)] + "\n".join(lines) + "\n" + text[block.end(1):]
        page.write_text(text)
        print(f"{time.time() - t:6.0f} s  {command}\n" + "\n".join(f"         {line}" for line in lines))


if __name__ == "__main__":
    main()
