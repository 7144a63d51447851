"""Command-line configs from dataclasses: every field becomes a `--kebab-case` flag, `--config FILE` sets defaults.

Precedence: dataclass default < YAML/JSON file given with `--config` < flags on the command line. The resolved
config is what a run saves, so a run can be repeated from its `config.json` alone (`--config RUN/config.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, TypeVar

import yaml

T = TypeVar("T")



class InputError(Exception):
    """Base of project errors caused by bad input that are neither OSError nor ValueError."""


# Errors that bad input (a wrong path, a corrupt file, a mismatched option) raises with a message naming what to fix.
INPUT_ERRORS = (OSError, ValueError, InputError)
TRACEBACK_ENV = "VQT_TRACEBACK"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (type without Optional, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    base, optional = _base_type(tp)
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help text
    kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])
    if base is bool:
        parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        parser.add_argument(_flag(f.name), nargs="+", type=item, **kwargs)
        return
    converter = base if base in (int, float, str) else str
    if base is Path:
        converter = Path
    parser.add_argument(_flag(f.name), type=converter, metavar=f.name.upper() if not optional else None, **kwargs)


def _read_config_file(path: str) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"--config {path}: file not found; give a YAML or JSON file of option values")
    text = Path(path).read_text()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SystemExit(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _coerce(value: Any, tp: Any) -> Any:
    base, _ = _base_type(tp)
    if value is None:
        return None
    if typing.get_origin(base) is tuple:
        # a config file may give a single value as a plain string, which tuple() would split into characters
        return (value,) if isinstance(value, str) else tuple(value)
    if base is Path:
        return Path(value)
    return value


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Build an instance of the dataclass `cls` from the command line (and an optional `--config` file)."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", help="YAML or JSON file of option values; flags given here override it")
    for f in dataclasses.fields(cls):
        _add_field(parser, f, hints[f.name])
    args = vars(parser.parse_args(argv))

    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        from_file = _read_config_file(config_file)
        unknown = sorted(set(from_file) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            parser.error(f"--config {config_file}: unknown options {unknown}")
        values.update(from_file)
    values.update(args)

    missing = [
        _flag(f.name)
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})


def config_to_dict(cfg: Any) -> dict:
    """Return a JSON-able dict of a config dataclass (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))



@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an input error escaping an entry point into a one-line `error: ...` and exit status 1.

    The message of the error is what the user needs; a traceback through torch or zarr only hides it. Set
    VQT_TRACEBACK=1 to get the traceback back when debugging.
    """
    try:
        yield
    except INPUT_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV):
            raise
        raise SystemExit(f"error: {error} (set {TRACEBACK_ENV}=1 for the traceback)") from None
