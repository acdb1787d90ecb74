"""`EngineArgs`: every engine setting under one flat name, derived from the config dataclasses.

The flat names are the config fields' names (`block_size`, `max_num_seqs`, ...). The flags of
`kubeinfer serve` and `kubeinfer bench` are those names with - for _, and `LLM(**kwargs)` takes them
as keywords; both go through `EngineArgs`, so the default, the choices, the help text and the
conversion of a value come from one place, each field's `setting(...)` in config.py. Flags that are
the server's own (host, port, API key, ...) stay in server/serve.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from kubeinfer.engine.config import (DEFAULT_MODEL, CacheConfig, DeviceConfig, EngineConfig,
                                     ModelConfig, ParallelConfig, SchedulerConfig, int_in_range)
from kubeinfer.engine.errors import ConfigError

# (EngineConfig attribute, its dataclass, the --help section its flags are listed under)
_SECTIONS = (
    ("model", ModelConfig, "model"),
    ("cache", CacheConfig, "KV cache"),
    ("scheduler", SchedulerConfig, "scheduler"),
    ("parallel", ParallelConfig, "parallelism and device"),
    ("device", DeviceConfig, "parallelism and device"),
)


@dataclasses.dataclass(frozen=True)
class EngineField:
    """One engine setting: a field of one of the config dataclasses."""

    name: str  # the keyword; the flag is --name-with-dashes
    section: str  # the EngineConfig attribute that holds it
    title: str  # the --help section
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def meta(self) -> Any:
        return self.field.metadata

    @property
    def type_name(self) -> str:
        """The annotation without `| None`: int, float, bool, str or a tuple type."""
        return str(self.field.type).replace(" ", "").removesuffix("|None")

    @property
    def optional(self) -> bool:
        return str(self.field.type).replace(" ", "").endswith("|None")


def _collect() -> dict[str, EngineField]:
    found: dict[str, EngineField] = {}
    for section, cls, title in _SECTIONS:
        for f in dataclasses.fields(cls):
            if f.name in found:  # a flat name must say which field it sets
                raise RuntimeError(f"config field {f.name!r} is defined twice")
            found[f.name] = EngineField(f.name, section, title, f)
    return found


ENGINE_FIELDS: dict[str, EngineField] = _collect()

_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "True or False"), "str": ((str,), "a string")}


def _check_type(f: EngineField, value: Any) -> None:
    """A keyword's value must have the field's type (flags are typed by argparse already)."""
    if value is None and f.optional:
        return
    kinds = _KINDS.get(f.type_name)
    if kinds is None:  # tuples: their `convert` built them from what the user gave
        return
    types, what = kinds
    if isinstance(value, types) and (f.type_name == "bool" or not isinstance(value, bool)):
        return
    example = f", e.g. {f.name}={f.default!r}" if f.default is not None else ""
    raise ConfigError(f"{f.name}={value!r} is not valid: expected {what}"
                      f"{' or None' if f.optional else ''}{example}")


def _unknown_message(unknown: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, ENGINE_FIELDS, n=3)
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (f"unknown engine argument{'s' if len(parts) > 1 else ''} {', '.join(parts)}; the "
            "arguments are the flags of `kubeinfer serve --help` with _ for -, such as "
            "max_model_len or gpu_memory_utilization")


class EngineArgs:
    """The user's engine settings by flat name; `create_engine_config()` builds the EngineConfig.

    `EngineArgs(**kwargs)` raises ConfigError for an unknown name (with the close matches) or a
    value of the wrong type; the config dataclasses then check the values themselves.
    """

    def __init__(self, **kwargs: Any):
        unknown = [k for k in kwargs if k not in ENGINE_FIELDS]
        if unknown:
            raise ConfigError(_unknown_message(unknown))
        values = {}
        for name, f in ENGINE_FIELDS.items():
            value = kwargs.get(name, f.default)
            if f.meta["convert"] is not None:
                value = f.meta["convert"](value)
            _check_type(f, value)
            values[name] = value
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if name == "_values":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"EngineArgs has no setting {name!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineArgs) and self._values == other._values

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self._values.items()
                            if v != ENGINE_FIELDS[k].default)
        return f"EngineArgs({changed})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def create_engine_config(self) -> EngineConfig:
        """The validated EngineConfig; raises ConfigError with a message a user can act on."""
        parts = {}
        for section, cls, _ in _SECTIONS:
            parts[section] = cls(**{f.name: self._values[f.name] for f in ENGINE_FIELDS.values()
                                    if f.section == section})
        return EngineConfig(**parts)

    # ---- the command line ----------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Every engine flag, grouped by config section; the model is a positional MODEL or --model."""
        parser.add_argument("model", nargs="?", default=None,
                            help=f"local folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
        parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                            help="same as the positional MODEL")
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in ENGINE_FIELDS.values():
            if f.name == "model":
                continue
            if f.title not in groups:
                groups[f.title] = parser.add_argument_group(f.title)
            groups[f.title].add_argument(f.flag, *f.meta["aliases"], dest=f.name, **_flag_options(f))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The parsed flags of `add_cli_args`; raises ConfigError for what argparse cannot check."""
        positional, flag = args.model, args.model_flag
        if positional and flag and positional != flag:
            raise ConfigError(f"the model is given twice ({positional!r} as MODEL and {flag!r} with "
                              "--model): give it once")
        values = {name: getattr(args, name) for name in ENGINE_FIELDS if name != "model"}
        return cls(model=flag or positional, **values)


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a config parser: its ConfigError becomes argparse's usage error."""
    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse_flag


def int_arg(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type for an integer in [low, high] whose error names the range."""
    return argparse_type(int_in_range(low, high, what))


def _flag_options(f: EngineField) -> dict[str, Any]:
    meta = f.meta
    shown = not (f.default is None or f.default is False or f.default == ()) \
        and "default" not in meta["help"]
    options: dict[str, Any] = {
        "default": f.default,
        "help": meta["help"] + (f" (default: {f.default})" if shown else "")}
    if f.type_name == "bool":
        # a setting that is on by default needs its --no- form; one that is off keeps vLLM's
        # plain switch (--trust-remote-code, --enforce-eager)
        if f.default is False:
            options["action"] = "store_true"
        else:
            options["action"] = argparse.BooleanOptionalAction
        return options
    if meta["parse"] is not None:
        options["type"] = argparse_type(meta["parse"])
    elif f.type_name in ("int", "float"):
        options["type"] = int if f.type_name == "int" else float
    for key in ("choices", "nargs", "metavar"):
        if meta[key]:
            options[key] = meta[key]
    return options
