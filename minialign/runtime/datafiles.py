"""Your own data: the files ``--data`` and ``--eval-data`` read, in the formats TRL users have.

One row per line of a JSONL file (or per row of a Parquet file, if ``pyarrow`` is installed;
it is not a dependency). The keys are TRL's:

| stage | a row |
|---|---|
| pretrain | ``{"text"}`` |
| sft | ``{"prompt", "completion"}``, or a conversation ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's (the response; the loss counts it only, E0b) |
| reward-model, dpo | ``{"prompt", "chosen", "rejected"}``, or ``{"chosen", "rejected"}`` with the prompt implicit (their common beginning, as TRL's ``extract_prompt``) |
| dpo ``--loss kto`` | the pairs above, or TRL's unpaired rows ``{"prompt", "completion", "label"}``: ``label`` is ``true`` (a desirable completion) or ``false`` (an undesirable one), and the file holds both |
| ppo | ``{"prompt"}`` (the reward model scores the answers) |
| grpo | ``{"prompt", "answer"}`` for the built-in verifiable reward (``rewards.py``), or any columns your ``--reward module:function`` reads |

A prompt is a string (the tokenizer's chat template wraps it) or a list of messages; a
completion, chosen or rejected answer is a string or a one-message list ``[{"role": "assistant",
"content": ...}]``. Every response ends with EOS, which the policy learns to emit.

**Bad rows are never skipped silently.** A row with a missing key, an empty response, text the
tokenizer cannot encode, more tokens than the model's context, a line that is not UTF-8, a
preference pair whose chosen and rejected answers are the same (it states no preference), or an
unpaired row whose ``label`` is not a JSON boolean is *bad*: the whole file is refused with one error that counts them and names their line numbers,
before anything is written to the run folder.

**``--max-length``** cuts long rows as TRL 1.16 does, and the report says how many it cut:

- pretrain, sft, dpo (pairs and unpaired rows): keep the start of prompt + response (``truncation_mode="keep_start"``);
  a row whose prompt alone fills ``max_length`` has nothing left to learn from and is dropped, and
  so is a dpo pair whose answers differ only past the cut (counted as ``same_when_cut``);
- reward-model: pairs with a sequence longer than ``max_length`` are dropped (TRL's
  ``RewardTrainer`` filters them, so a reward is never read from a cut answer);
- ppo, grpo: a prompt is never cut (a cut question is another question); prompts with fewer than
  ``max_new_tokens`` free tokens under ``max_length`` are dropped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file and the rows."""


class _BadRow(Exception):
    """Why one row is bad (collected, then reported together)."""


@dataclass
class Report:
    """What reading a data file did: rows read, bad rows, rows truncated or dropped by max_length."""
    path: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    max_length: int | None = None
    same_when_cut: int = 0  # preference pairs dropped because --max-length cut them to one answer
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def check(self) -> None:
        """Raise ``DataError`` naming every bad row (the first 10 with their reason)."""
        if self.bad:
            shown = "; ".join(f"{where}: {why}" for where, why in self.bad[:10])
            more = (f"; and {len(self.bad) - 10} more at " + ", ".join(w for w, _ in self.bad[10:60])
                    + (" ..." if len(self.bad) > 60 else "")) if len(self.bad) > 10 else ""
            raise DataError(f"{self.path}: {len(self.bad)} bad row(s) of {self.rows}: {shown}{more}")
        if self.kept == 0:
            raise DataError(f"{self.path}: no usable rows ({self.rows} read, {self.dropped + self.same_when_cut} "
                            f"dropped by --max-length {self.max_length})")

    def require_rows(self, needed: int, name: str) -> None:
        """Refuse the file if it holds fewer usable rows than one step draws (``needed``, the value
        of flag ``name``)."""
        if self.kept < needed:
            dropped = self.dropped + self.same_when_cut
            left = f"{self.kept} usable row(s) of {self.rows} ({dropped} dropped by --max-length " \
                   f"{self.max_length})" if dropped else f"{self.rows} row(s)"
            raise DataError(f"{self.path}: {left}, fewer than the {needed} one step draws ({name} {needed}); "
                            f"give more rows or a smaller {name}")

    def describe(self) -> str:
        text = f"{self.path}: {self.rows} rows"
        if self.truncated:
            text += f", {self.truncated} truncated to --max-length {self.max_length} (keep_start, as TRL)"
        if self.dropped:
            text += f", {self.dropped} dropped (too long for --max-length {self.max_length})"
        if self.same_when_cut:
            text += (f", {self.same_when_cut} pairs dropped (chosen and rejected differ only past --max-length "
                     f"{self.max_length}: cut, they state no preference)")
        return text

    def as_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
                "dropped": self.dropped, "max_length": self.max_length,
                **({"same_when_cut": self.same_when_cut} if self.same_when_cut else {})}


# ----------------------------------------------------------------------------------------------
# reading rows
# ----------------------------------------------------------------------------------------------


def read_rows(path) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(rows, bad): each row with where it is (``line 3`` of a JSONL file, ``row 3`` of a Parquet
    file), and the rows that are not JSON objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                            f"or convert the file to JSONL") from None
        return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)], []
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a .jsonl (one JSON object per line) or .parquet file")
    rows, bad = [], []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is a bad row, named like the others
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((f"line {lineno}", f"not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line)"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((f"line {lineno}", f"malformed JSON ({e.msg})"))
                continue
            if not isinstance(row, dict):
                bad.append((f"line {lineno}", f"expected a JSON object, got {type(row).__name__}"))
                continue
            rows.append((f"line {lineno}", row))
    return rows, bad


@contextlib.contextmanager
def rows_per_step(path, needed: int, name: str):
    """While a stage runs: reading its ``--data`` file ``path`` refuses it if fewer than ``needed``
    usable rows (the value of flag ``name``: the rows one step draws without replacement) are left
    once bad rows are named and ``--max-length`` has dropped what it drops. The ``@stage``
    decorator sets it; the stage reads its data before its run folder exists, so a small file is
    refused before that."""
    key = Path(path).resolve()
    _ROWS_PER_STEP[key] = (needed, name)
    try:
        yield
    finally:
        _ROWS_PER_STEP.pop(key, None)


_ROWS_PER_STEP: dict[Path, tuple[int, str]] = {}  # --data file -> (rows one step draws, flag), while a stage runs


def _read(path, max_length: int | None, context: int, parse) -> tuple[list, Report]:
    """Read ``path`` and turn each row into an example with ``parse(row, report) -> example or
    None`` (None: dropped); collect the bad rows and refuse the file if there are any."""
    if max_length is not None and not 1 <= max_length <= context:
        raise DataError(f"--max-length {max_length} must be in [1, the model's context {context}]")
    rows, bad = read_rows(path)
    report = Report(str(path), rows=len(rows) + len(bad), max_length=max_length, bad=bad)
    examples = []
    for where, row in rows:
        try:
            example = parse(row, report)
        except _BadRow as e:
            report.bad.append((where, str(e)))
            continue
        if example is not None:
            examples.append(example)
    report.bad.sort(key=lambda b: int(b[0].split()[1]))
    report.kept = len(examples)
    report.check()
    if Path(path).resolve() in _ROWS_PER_STEP:
        report.require_rows(*_ROWS_PER_STEP[Path(path).resolve()])
    return examples, report


# ----------------------------------------------------------------------------------------------
# fields
# ----------------------------------------------------------------------------------------------


def _field(row: dict, key: str):
    if key not in row or row[key] is None:
        raise _BadRow(f"no {key!r} (keys: {sorted(row)})")
    return row[key]


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise _BadRow(f"{key!r} must be a string or a non-empty list of {{'role', 'content'}} messages")
    return value


def _tokenize(fn, *args) -> list[int]:
    try:
        return fn(*args)
    except ValueError as e:  # the toy tokenizer meets an unknown word; a chat template refuses roles
        raise _BadRow(str(e)) from None


def prompt_ids(tok, value, key: str = "prompt") -> list[int]:
    """A prompt string (through the chat template) or a list of messages -> token ids."""
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"empty {key!r}")
        return _tokenize(tok.prompt, value)
    return _tokenize(tok.chat_prompt, _messages(value, key))


def response_ids(tok, value, key: str) -> list[int]:
    """A response string, or one assistant message -> token ids ending with EOS."""
    if isinstance(value, list):
        messages = _messages(value, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _BadRow(f"{key!r} as messages must be one assistant message, got roles "
                          f"{[m['role'] for m in messages]}")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {key!r}: an empty response teaches nothing")
    return _tokenize(tok.response, value)


def _fit(prompt: list[int], response: list[int], context: int, max_length: int | None) -> list[int] | None:
    """keep_start truncation of prompt + response: the response, cut to fit ``max_length``, or
    None if the prompt alone fills it (nothing left to learn). Without ``max_length``, a row
    longer than the model's context is a bad row."""
    n = len(prompt) + len(response)
    limit = max_length or context
    if n <= limit:
        return response
    if max_length is None:
        raise _BadRow(f"{n} tokens, more than the model's context of {context} (set --max-length to cut)")
    if len(prompt) >= limit:
        return None
    return response[:limit - len(prompt)]


def _count(report: Report, responses: list[list[int]], fitted: list) -> bool:
    """Count a row as dropped or truncated; True if it is kept."""
    if any(f is None for f in fitted):
        report.dropped += 1
        return False
    report.truncated += any(len(f) < len(y) for f, y in zip(fitted, responses))
    return True


def _implicit_prompt(chosen, rejected):
    """TRL's ``extract_prompt``: the shared beginning of chosen and rejected is the prompt."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if 0 < k and chosen[k - 1] == " ":  # the answers keep their leading space
            k -= 1
        return chosen[:k], chosen[k:], rejected[k:]
    raise _BadRow("'chosen' and 'rejected' must both be strings or both message lists")


# ----------------------------------------------------------------------------------------------
# one reader per stage
# ----------------------------------------------------------------------------------------------


def text_data(path, tok, context: int, max_length: int | None = None):
    """Pre-training rows ``{"text"}`` -> (prompts, responses, report): a document is the response
    to a one-token prompt (``<bos>``, or EOS for tokenizers without one, as GPT-2)."""
    start = [tok.bos_id if tok.bos_id is not None else tok.eos_id]

    def parse(row, report):
        y = response_ids(tok, _field(row, "text"), "text")
        fitted = _fit(start, y, context, max_length)
        return (start, fitted) if _count(report, [y], [fitted]) else None

    examples, report = _read(path, max_length, context, parse)
    return [p for p, _ in examples], [y for _, y in examples], report


def sft_data(path, tok, context: int, max_length: int | None = None):
    """SFT rows ``{"prompt", "completion"}`` or ``{"messages"}`` -> (prompts, responses, report)."""

    def parse(row, report):
        if "messages" in row:
            messages = _messages(row["messages"], "messages")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise _BadRow("'messages' must end with an assistant message that answers the ones before")
            x = _tokenize(tok.chat_prompt, messages[:-1])
            y = response_ids(tok, messages[-1]["content"], "messages[-1]")
        else:
            x = prompt_ids(tok, _field(row, "prompt"))
            y = response_ids(tok, _field(row, "completion"), "completion")
        fitted = _fit(x, y, context, max_length)
        return (x, fitted) if _count(report, [y], [fitted]) else None

    examples, report = _read(path, max_length, context, parse)
    return [p for p, _ in examples], [y for _, y in examples], report


def preference_format(path) -> str:
    """``"unpaired"`` if the file's rows are TRL's unpaired examples (its first row has a ``label``),
    else ``"pairs"``. Only the first row (a Parquet file's columns) is read; the reader checks the rest."""
    path = Path(path)
    if not path.is_file():
        return "pairs"  # the reader names the missing file
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return "pairs"  # the reader says what reading Parquet needs
        return "unpaired" if "label" in pq.ParquetFile(path).schema_arrow.names else "pairs"
    with path.open("rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a bad line: the reader names it
            if isinstance(row, dict):
                return "unpaired" if "label" in row else "pairs"
    return "pairs"


def _refuse_unpaired(path) -> None:
    if preference_format(path) == "unpaired":
        raise DataError(f"{path}: its rows are unpaired examples {{prompt, completion, label}} (TRL's KTO format); "
                        f"this needs preference pairs {{prompt, chosen, rejected}} (only the training --data of "
                        f"`minialign dpo --loss kto` may be unpaired)")


def preference_data(path, tok, context: int, max_length: int | None = None, truncate: bool = True):
    """Preference rows -> ({"prompt", "chosen", "rejected"} token lists, report).

    ``truncate=True`` (DPO): keep_start per sequence; ``False`` (reward model): a pair with a
    sequence longer than ``max_length`` is dropped, as TRL's reward trainer does. A file of
    unpaired rows (``unpaired_data``) is refused with one line that says so.
    """
    _refuse_unpaired(path)

    def parse(row, report):
        chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
        prompt = row.get("prompt")
        if prompt is None:
            prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
            if not prompt:
                raise _BadRow("no 'prompt', and 'chosen' and 'rejected' share no beginning to take as one")
        x = prompt_ids(tok, prompt)
        y_w, y_l = response_ids(tok, chosen, "chosen"), response_ids(tok, rejected, "rejected")
        if y_w == y_l:
            raise _BadRow("'chosen' and 'rejected' are the same answer: the pair states no preference")
        if truncate:
            fitted = [_fit(x, y_w, context, max_length), _fit(x, y_l, context, max_length)]
            if fitted[0] is not None and fitted[0] == fitted[1]:  # they differ only past the cut
                report.same_when_cut += 1
                return None
            return (x, *fitted) if _count(report, [y_w, y_l], fitted) else None
        longest = len(x) + max(len(y_w), len(y_l))
        if longest > (max_length or context):
            if max_length is None:
                raise _BadRow(f"{longest} tokens, more than the model's context of {context} "
                              f"(set --max-length to drop such pairs)")
            report.dropped += 1
            return None
        return x, y_w, y_l

    examples, report = _read(path, max_length, context, parse)
    x, y_w, y_l = (list(t) for t in zip(*examples))
    return {"prompt": x, "chosen": y_w, "rejected": y_l}, report


def unpaired_data(path, tok, context: int, max_length: int | None = None):
    """KTO's unpaired rows ``{"prompt", "completion", "label"}`` -> ({"prompt", "completion"} token
    lists and ``"desirable"``, the labels as bools; report). keep_start truncation as for SFT.

    ``label`` must be a JSON boolean (TRL's column is ``bool``): ``1`` or ``"true"`` is a bad row,
    not a guess. A file whose rows are all desirable or all undesirable is refused: TRL trains on
    one (with a warning), but KTO then has nothing to set against its examples, and the paper's
    advice on the class weights, lambda_D n_D / (lambda_U n_U) in [1, 4/3], cannot hold.
    """
    def parse(row, report):
        if "chosen" in row or "rejected" in row:
            raise _BadRow("a preference pair among unpaired rows: give every row as {prompt, completion, label}")
        label = _field(row, "label")
        if not isinstance(label, bool):
            raise _BadRow(f"'label' must be true (desirable) or false (undesirable), got {label!r}")
        x = prompt_ids(tok, _field(row, "prompt"))
        y = response_ids(tok, _field(row, "completion"), "completion")
        fitted = _fit(x, y, context, max_length)
        return (x, fitted, label) if _count(report, [y], [fitted]) else None

    examples, report = _read(path, max_length, context, parse)
    x, y, label = (list(t) for t in zip(*examples))
    n_desirable = sum(label)
    if n_desirable in (0, len(label)):
        raise DataError(f"{path}: all {len(label)} usable rows are labelled {str(label[0]).lower()}; KTO needs "
                        f"desirable (true) and undesirable (false) examples both")
    return {"prompt": x, "completion": y, "desirable": label}, report


def prompt_data(path, tok, context: int, max_new_tokens: int, max_length: int | None = None,
                required: tuple[str, ...] = ()):
    """Prompt rows (PPO, GRPO) -> (questions, report). A question is the row's columns plus
    ``prompt_ids``; ``required`` columns must be present (GRPO's built-in reward needs ``answer``)."""
    def parse(row, report):
        x = prompt_ids(tok, _field(row, "prompt"))
        for key in required:
            value = _field(row, key)
            if isinstance(value, str) and not value.strip():
                raise _BadRow(f"empty {key!r}")
        limit = report.max_length or context
        if len(x) + max_new_tokens > limit:
            if report.max_length is None:
                raise _BadRow(f"prompt of {len(x)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                              f"model's context of {context} (set --max-length to drop such prompts)")
            report.dropped += 1
            return None
        return {**row, "prompt_ids": x}

    return _read(path, max_length, context, parse)
