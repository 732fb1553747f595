"""Recipes: a YAML file parsed into a config dataclass, with command-line flags overriding it.

Every CLI of the framework (``icpo-train lsa``, ``icpo-train train``, ``icpo-infer run`` ...) goes
through :func:`parse_config`, so all recipes behave the same way: unknown keys are errors that list
the valid ones, and every field can be overridden as ``--field value`` or ``--field-name value``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A config dataclass field: its default and the help that ``--help`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


class CollectRepeated(argparse.Action):
    """A list flag that may be given several times (``--base-url A --base-url B``): the values of every
    occurrence, replacing the recipe's list rather than extending it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), *values])


def option_like(config_cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field meaning what ``config_cls``'s field ``name`` means: its help, and its default unless given."""
    source = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    if default is dataclasses.MISSING and source.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata=dict(source.metadata))
    return option(source.default if default is dataclasses.MISSING else default, source.metadata["help"])


class ConfigError(ValueError):
    """Bad user input (recipe, flag or value); the message names the field and the fix."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def load_recipe(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """Read a YAML recipe (or the YAML file of ``flag``) into a flat mapping of field names to values."""
    path = Path(path)
    check(path.is_file(), f"{flag}: file '{path}' does not exist; pass the path of a YAML file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "unreadable"
        raise ConfigError(f"{flag}: '{path}' is not valid YAML ({problem}{where}); fix that line.") from err
    check(
        isinstance(data, dict),
        f"{flag}: '{path}' must hold a mapping of field: value, got {type(data).__name__}.",
    )
    return data


def check_keys(config_cls: type, keys: Sequence[str], source: str) -> None:
    """Reject keys that are not fields of ``config_cls``, naming the valid ones."""
    valid = sorted(f.name for f in dataclasses.fields(config_cls) if f.init)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}.")


def parse_config(
    config_cls: type[T],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    main_fields: Sequence[str] | None = None,
    others: str = "",
) -> T:
    """Build ``config_cls`` from ``--config recipe.yaml`` (optional) and command-line overrides
    (``argv``; the process's own arguments when None).

    With ``main_fields``, ``--help`` lists only those fields (in that order) and ``--help-all`` every
    field; ``others`` says what the fields left out are (e.g. "transformers' TrainingArguments").
    """
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--config", default=None)
    known, argv = recipe_parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser(config_cls, prog=prog)
    parser.add_argument("--config", default=None, help="YAML recipe; command-line flags override its values.")
    _arrange_help(parser, main_fields, others, brief="--help-all" not in argv)
    if known.config:
        recipe = load_recipe(known.config)
        check_keys(config_cls, list(recipe), f"recipe '{known.config}'")
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False  # the recipe sets it
                value = recipe[action.dest]
                # YAML reads `1e-4` as a string and `2` as an int: convert as the flag would.
                if action.type is not None and not isinstance(value, (list, dict)) and value is not None:
                    try:
                        recipe[action.dest] = action.type(value)
                    except (TypeError, ValueError) as err:
                        raise ConfigError(f"recipe '{known.config}': {action.dest}={value!r}: {err}") from err
        parser.set_defaults(**recipe)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = sorted({flag for action in parser._actions for flag in action.option_strings})
        flag = next((arg.split("=")[0] for arg in unknown if arg.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.7)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown option '{flag}'.{hint} `--help` lists the options.")
    return parser.parse_args_into_dataclasses(argv)[0]


def _arrange_help(
    parser: argparse.ArgumentParser, main_fields: Sequence[str] | None, others: str, brief: bool
) -> None:
    """A short usage line; ``--config`` and then ``main_fields`` first in the help. A ``brief`` help
    leaves out the other fields, with one line saying that ``--help-all`` lists them."""
    required = [f"{a.option_strings[0]} {a.metavar or a.dest.upper()}" for a in parser._actions if a.required]
    parser.usage = " ".join([parser.prog, "[--config RECIPE.yaml]", *required, "[--FIELD VALUE ...]"])
    if main_fields is None:
        order = ["help", "config"]
    else:
        order = ["help", "help_all", "config", *main_fields]
        parser.add_argument("--help-all", action="help", help="List every option, not only the main ones.")
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_FIELD of a true default
            action.help = f"Same as --{action.dest} false."
    rank = {dest: index for index, dest in enumerate(order)}
    # argparse prints each group's actions in the order they were added: ``config`` and the main fields,
    # added after the fields, move to the front.
    for group in parser._action_groups:
        group._group_actions.sort(key=lambda action: rank.get(action.dest, len(order)))
    if main_fields is None or not brief:
        return
    left_out = [a for a in parser._actions if a.dest not in rank]
    for action in left_out:
        action.help = argparse.SUPPRESS
    parser.epilog = (
        f"These are the main options; --help-all lists all of them ({len(left_out)} more: {others})."
    )


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as JSON-serialisable data (for metrics.json and dataset cards)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program was, so that a CLI stops as on Ctrl-C and keeps what it saved."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) instead of killing."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_status(err: KeyboardInterrupt) -> tuple[str, int]:
    """How a CLI reports a stop and its exit status: SIGTERM 128 + 15, Ctrl-C 128 + 2, as a shell would."""
    return ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)
