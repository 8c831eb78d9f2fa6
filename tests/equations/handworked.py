"""``expect``: compare a result with numbers worked out by hand, and say which case failed.

The equation tests write their arithmetic in comments right above the check::

    # E9, pair 1: z = 0.5 - (-0.5) = 1,  -log sigma(1) = 0.313262
    #     pair 2: z = -0.5,             -log sigma(-0.5) = 0.974077; mean 0.643669
    expect(loss, 0.643669, abs=1e-5)

When the numbers disagree, the error quotes that comment block (the hand-worked case) and both
numbers, expected and received. ``minialign exercises check`` prints it as it is, so a student
whose DPO loss has its sign flipped reads the case and sees 0.643669 expected, -0.643669 received.
It lives beside the tests (``from handworked import expect``): a student's exercise copy is graded
with the reference's tests and this helper, never with code from the copy.
"""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path

import torch


def expect(received, expected, abs: float = 1e-6, rel: float = 0.0) -> None:
    """Assert ``|received - expected| <= abs + rel * |expected|`` elementwise (equal shapes).

    ``received``: a tensor or a number (or a list of numbers); ``expected``: the hand-computed
    number(s). NaN matches only NaN. On failure, an ``AssertionError`` names the test, quotes the
    comment block above the call and prints both values.
    """
    r = _as_float64(received)
    e = _as_float64(expected)
    if r.numel() == 1 and e.numel() == 1:
        r, e = r.reshape(()), e.reshape(())
    if r.shape != e.shape:
        problem = f"shape: expected {tuple(e.shape)}, received {tuple(r.shape)}"
    else:
        close = torch.isclose(r, e, rtol=rel, atol=abs, equal_nan=True)
        if bool(close.all()):
            return
        bad = (~close).nonzero()[0].tolist()
        where = f" (first difference at index {bad})" if r.dim() else ""
        problem = f"tolerance: abs {abs:g}" + (f", rel {rel:g}" if rel else "") + where
    frame = inspect.currentframe().f_back
    raise AssertionError(_message(frame, _fmt(e), _fmt(r), problem))


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _fmt(t: torch.Tensor) -> str:
    """Numbers as a person writes them: 7 significant digits, nested lists for tensors."""
    def one(v):
        return f"{v:.7g}"

    def nested(x):
        return one(x) if not isinstance(x, list) else "[" + ", ".join(nested(v) for v in x) + "]"
    values = t.tolist()
    if t.numel() > 24:
        flat = t.flatten().tolist()
        return f"{tuple(t.shape)} tensor starting [" + ", ".join(one(v) for v in flat[:12]) + ", ...]"
    return nested(values)


def _message(frame, expected: str, received: str, problem: str) -> str:
    path, line = frame.f_code.co_filename, frame.f_lineno
    name = frame.f_code.co_name
    case = hand_worked_case(path, line)
    where = f"{name} ({Path(path).parent.name}/{Path(path).name}, line {line})"
    lines = [where, "hand-worked case:"]
    lines += [f"    {c}" for c in case] or ["    (no comment above the check: see the test)"]
    lines += [f"expected: {expected}", f"received: {received}", f"({problem})"]
    return "\n".join(lines)


def hand_worked_case(path: str, line: int) -> list[str]:
    """The hand-worked case of the check at ``line`` of the test file ``path``: the nearest block
    of comment lines above its statement, within the same test function (code lines between, such
    as the call that computes the result, are skipped)."""
    source = _source(path)
    if source is None:
        return []
    lines = source.splitlines()
    start, floor = _statement_start(path, line), _function_start(path, line)

    def comment(i):                              # 1-based line number
        return lines[i - 1].strip().startswith("#")
    i = start - 1
    while i > floor and not comment(i):          # skip the code between the block and the check
        i -= 1
    block = []
    while i > floor and comment(i):
        block.append(lines[i - 1].strip()[1:])
        i -= 1
    block = block[::-1]
    # drop the one space after "#" that every line shares, keep the alignment beyond it
    return [b[1:] if b.startswith(" ") else b for b in block]


@functools.lru_cache(maxsize=64)
def _source(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def _statement_starts(path: str) -> tuple[tuple[int, int], ...]:
    """(first line, last line) of every statement in the file, innermost last."""
    return tuple((n.lineno, n.end_lineno) for n in ast.walk(ast.parse(_source(path) or ""))
                 if isinstance(n, ast.stmt))


def _function_start(path: str, line: int) -> int:
    """The ``def`` line of the innermost function around ``line`` (0: none)."""
    tree = ast.parse(_source(path) or "")
    spans = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.lineno <= line <= n.end_lineno]
    return max(spans, default=0)


def _statement_start(path: str, line: int) -> int:
    """First line of the innermost statement that spans ``line`` (a call may span several lines)."""
    spans = [s for s in _statement_starts(path) if s[0] <= line <= s[1]]
    # the innermost statement starts last (a test function's body lies inside its def)
    return max((s[0] for s in spans), default=line)
