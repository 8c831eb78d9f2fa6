"""Configs as command-line flags: one ``--flag`` per dataclass field, its type and default from the
field, its help from the field's trailing ``# comment``, and back from the parsed flags to a config.

This module imports no torch, so ``minialign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing


def flag(name: str) -> str:
    """The command-line flag of a config field: ``min_lr_ratio`` -> ``--min-lr-ratio``."""
    return "--" + name.replace("_", "-")


def field_comments(config_cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the config's source: the flag's help text."""
    comments = {}
    for cls in reversed(config_cls.__mro__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for name, text in re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M):
            comments[name] = text.strip()
    return comments


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``yes/no``, ``1/0``, ``on/off``) for boolean flags: ``--share-prompt false``."""
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_bool_or_auto(text: str) -> bool | None:
    """``parse_bool``, and ``auto`` (or ``none``) for None, where a field leaves the choice to the run:
    ``--progress auto`` draws bars only when the output is a terminal."""
    if text.lower() in ("auto", "none"):
        return None
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


def add_config_args(parser: argparse.ArgumentParser, config_cls, only=None) -> None:
    """One ``--flag`` per dataclass field (or per field named in ``only``): type and default from
    the field, help from its comment."""
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        option = flag(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is bool:  # --x, --x true, --x false, --no-x (and --x auto where the field may be None)
            parser.add_argument(option, dest=f.name, type=parse_bool_or_auto if optional else parse_bool, nargs="?",
                                const=True, default=default, metavar="true|false" + ("|auto" if optional else ""),
                                help=f"{comments.get(f.name, '')} (default: {'auto' if default is None else default}; "
                                f"--no-{option[2:]} = {option} false)".strip())
            parser.add_argument("--no-" + option[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None
        conv = type(choices[0]) if choices else tp
        if optional:
            base = conv
            conv = lambda s, base=base: None if s.lower() == "none" else base(s)  # noqa: E731
        parser.add_argument(option, dest=f.name, type=conv, default=default, choices=choices,
                            help=f"{comments.get(f.name, '')} (default: {default})".strip())


def config_from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
