"""Runnable recipes built from the library: each is a settings dataclass, a function, and a CLI.

- :mod:`minqwen.recipes.train_tiny`: a tiny Qwen2 trained from scratch (``python -m minqwen train``).
- :mod:`minqwen.recipes.lora_demo`: LoRA on the real 0.5B (``python -m minqwen lora-demo``).
- :mod:`minqwen.recipes.extrapolation`: a tiny Qwen2 trained at a short context and tested far past it with
  each long-context method (``python -m minqwen.recipes.extrapolation``).

A recipe's settings dataclass is its command line: :func:`add_dataclass_arguments` makes one
``--flag`` per field (help from the field's ``metadata["help"]``), :func:`dataclass_from_args`
builds the dataclass back from the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, TypeVar

Settings = TypeVar("Settings")


def parse_bool(text: str) -> bool:
    """``--flag true`` / ``--flag false`` (also 1/0, yes/no, on/off); anything else is a usage error.

    argparse's ``type=bool`` would call ``bool("False")``, which is True.
    """
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


PARSERS: dict[type, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float, str: str}


def add_dataclass_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One ``--field-name`` flag per field of ``settings_class`` (bool, int, float or str fields)."""
    types = typing.get_type_hints(settings_class)
    for f in dataclasses.fields(settings_class):
        if types[f.name] not in PARSERS:
            raise TypeError(f"{settings_class.__name__}.{f.name}: a flag needs a bool, int, float or str field, got {types[f.name]}")
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=PARSERS[types[f.name]], default=f.default,
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )


def dataclass_from_args(settings_class: Callable[..., Settings], args: argparse.Namespace) -> Settings:
    """The dataclass the parsed flags describe (its ``__post_init__`` checks the values)."""
    return settings_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)})
