"""Rewards that GRPO computes itself, with no reward model: verifiable ones, or your own function.

A reward function has TRL's signature: it takes the prompts and the decoded completions (one
entry per sampled answer) and, as keyword arguments, every other column of the data rows
(``answer``, ...) plus ``finished`` (True where the answer ended with EOS), and returns one
float per answer::

    def my_reward(prompts, completions, **kwargs) -> list[float]: ...

``minialign grpo --reward my_module:my_reward`` imports it (``my_module`` from the working
directory or the Python path, or a file ``path/to/file.py:my_reward``).

The built-in reward for ``{"prompt", "answer"}`` rows, ``exact_match_reward``, is 1 when the
final number of the completion equals the final number of the answer (GSM8K writes the answer
after ``####``), else 0; an answer cut off before its EOS scores 0, as in the toy world.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from ..runtime.files import MinialignError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> Decimal | None:
    """The last number in ``text`` (after ``####`` if present, as GSM8K writes its answers)."""
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return Decimal(numbers[-1].replace(",", ""))
    except InvalidOperation:
        return None


def exact_match_reward(prompts, completions, answer, finished=None, **kwargs) -> list[float]:
    """1.0 where the completion's final number equals the answer's (72 = 72.0 = 72.00), else 0.0."""
    finished = finished if finished is not None else [True] * len(completions)
    out = []
    for y, a, done in zip(completions, answer, finished):
        want, got = final_number(a), final_number(y)
        out.append(float(done and want is not None and got == want))
    return out


def toy_reward(world):
    """The toy world's hidden reward r*(x, y) as a reward function (GRPO's arithmetic reward)."""
    def reward(prompts, completions, finished, **kwargs) -> list[float]:
        return [world.true_reward(p, y, f) for p, y, f in zip(prompts, completions, finished)]
    return reward


def load_reward(spec: str):
    """``module:function`` (or ``file.py:function``) -> the function."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--reward {spec!r}: expected module:function (or path/to/file.py:function)")
    module_name, fn_name = spec.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
    elif "" not in sys.path:
        sys.path.insert(0, "")  # the working directory, as `python -m` has it
    try:
        if module_name.endswith(".py"):
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module: whatever its import raised
        raise RewardFunctionError(f"--reward {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {module_name} has no function {fn_name}")
    return fn


class RewardFunctionError(MinialignError, ValueError):
    """A reward function that raised, or returned something other than one finite float per
    answer; the message names the function and says what a reward function must look like."""


SHAPE = ("a reward function is `def f(prompts, completions, **kwargs) -> list[float]`: one finite float per "
         "completion; the data's other columns and `finished` come as keyword arguments")


def function_name(fn) -> str:
    """``module:function`` of a reward function (what ``--reward`` names)."""
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', None) or repr(fn)}"


def score_answers(reward_fn, rows: list[dict], completions: list[str], finished: list[bool],
                  device=None) -> torch.Tensor:
    """(B,) float32 rewards of B answers; ``rows[i]`` is the data row answer i replies to.

    A reward function that raises, or returns anything but one finite number per answer, is a
    ``RewardFunctionError`` naming it, not a NaN in the advantages or minialign's own error.
    """
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids")}
    name = function_name(reward_fn)
    try:
        values = reward_fn(prompts=[r["prompt"] for r in rows], completions=completions, finished=finished,
                           **columns)
    except Exception as e:  # noqa: BLE001 - the user's code: whatever it raised, say whose it is
        raise RewardFunctionError(f"the reward function {name} raised {type(e).__name__}: {e}; {SHAPE}") from e
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardFunctionError(f"the reward function {name} returned {_show(values)}, not a list of "
                                  f"{len(completions)} rewards; {SHAPE}")
    if len(values) != len(completions):
        raise RewardFunctionError(f"the reward function {name} returned {len(values)} rewards for "
                                  f"{len(completions)} answers; {SHAPE}")
    floats = []
    for i, v in enumerate(values):
        try:
            floats.append(float(v))
        except (TypeError, ValueError):
            raise RewardFunctionError(f"the reward function {name} returned {_show(v)} for answer {i}, not a "
                                      f"number; {SHAPE}") from None
    bad = [i for i, v in enumerate(floats) if not math.isfinite(v)]
    if bad:
        raise RewardFunctionError(f"the reward function {name} returned non-finite rewards for answers {bad[:8]} "
                                  f"({_show(floats[bad[0]])} for answer {bad[0]}); {SHAPE}")
    return torch.tensor(floats, device=device)


def _show(value) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} (a {type(value).__name__})"


def check_reward_function(reward_fn, rows: list[dict]) -> None:
    """Call ``reward_fn`` once on the first two rows (each answered by its own ``answer``, or by
    "42"), so that a mistake in it is reported before the run folder exists."""
    rows = rows[:2]
    completions = [r["answer"] if isinstance(r.get("answer"), str) else "42" for r in rows]
    score_answers(reward_fn, rows, completions, [True] * len(rows))
