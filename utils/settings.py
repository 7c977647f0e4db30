"""How a setting is declared, checked and turned into command-line flags (for the dataclasses of utils/config.py).

`setting(...)` is a dataclass field carrying its help text, range and flag; `add_flags` makes one argparse
flag per field, `check_ranges` refuses a value out of range with one line naming the flag, and `from_flat`
builds a dataclass from a flat dict of given values. A leaf module: it imports nothing of the project.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field, fields
from typing import Any


def setting(default: Any, help: str, *, flag: str | None = None, type: Any = None, choices: tuple | None = None,
            low: float | None = None, high: float | None = None, above: float | None = None,
            multiple: int | None = None, resume: bool = False, cli: bool = True, shown: str | None = None,
            metavar: str | None = None) -> Any:
    """A dataclass field with what its command-line flag needs.

    flag: the flag's name when it differs from the field's; type: the value parser (default: the
    default's type); low/high: inclusive bounds, above: exclusive lower bound; multiple: the value
    (or each element) must be a multiple of it; resume: a resumed run may change it; cli: False for
    fields filled from data, never from a flag; shown: the default as the help text says it.
    """
    meta = dict(help=help, flag=flag, type=type, choices=choices, low=low, high=high, above=above,
                multiple=multiple, resume=resume, cli=cli, shown=shown, metavar=metavar)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy_nested(default), metadata=meta)
    return field(default=default, metadata=meta)


def copy_nested(value: Any) -> Any:
    """A deep copy of nested lists and dicts (defaults must not be shared between instances)."""
    if isinstance(value, dict):
        return {k: copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_nested(v) for v in value]
    return value


def flag_name(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--freeze-epochs` for freeze_epochs."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def check_ranges(config: Any) -> None:
    """Every field's bounds and choices; a bad value raises ValueError naming the flag and the valid range."""
    for f in fields(config):
        value, m = getattr(config, f.name), f.metadata
        if value is None or isinstance(value, bool) or not m:
            continue
        name = flag_name(f)
        if m.get("choices") and value not in m["choices"]:
            raise ValueError(f"{name} {value}: choose one of {', '.join(map(str, m['choices']))}")
        for v in (value if isinstance(value, list) else [value]):
            if not isinstance(v, (int, float)):
                continue
            low, high = m.get("low"), m.get("high")
            if low is not None and v < low or high is not None and v > high:
                bound = (f"between {low} and {high}" if low is not None and high is not None
                         else f"at least {low}" if low is not None else f"at most {high}")
                raise ValueError(f"{name} {v}: must be {bound}")
            if m.get("above") is not None and v <= m["above"]:
                raise ValueError(f"{name} {v}: must be greater than {m['above']}")
            if m.get("multiple") and v % m["multiple"]:
                near = max(m["multiple"], round(v / m["multiple"]) * m["multiple"])
                raise ValueError(f"{name} {v}: must be a multiple of {m['multiple']} (e.g. {near})")


def add_flags(parser: argparse.ArgumentParser, *classes: type, defaults: Any = None) -> None:
    """One flag per command-line field of each dataclass; values not given stay absent from the namespace.

    `defaults`: an instance whose values the help text shows instead of the class defaults.
    """
    for cls in classes:
        group = parser.add_argument_group(cls.__doc__.split(":")[0].strip().lower() if cls.__doc__ else cls.__name__)
        for f in fields(cls):
            m = f.metadata
            if not m.get("cli", True):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(defaults, cls):
                default = getattr(defaults, f.name)
            shown = (m.get("shown") if not isinstance(defaults, cls) else None) or ("none" if default is None else default)
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                          help=f"{m['help']} (default {shown})")
            if m.get("metavar"):
                kwargs["metavar"] = m["metavar"]
            kind = m.get("type") or type(default)
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list) and m.get("type") is str:
                kwargs.update(action="append", type=str)         # repeatable: --plugin a.py --plugin b.py
            else:
                kwargs["type"] = kind
                if m.get("choices"):
                    kwargs["choices"] = m["choices"]
            group.add_argument(flag_name(f), **kwargs)


def split_given(given: dict, *classes: type) -> list[dict]:
    """The given flag values grouped per dataclass, by field name."""
    return [{f.name: given[f.name] for f in fields(cls) if f.name in given} for cls in classes]


def from_flat(cls: type, values: dict) -> Any:
    """An instance of a dataclass from a flat dict holding (at least) some of its fields; others keep defaults."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: copy_nested(v) for k, v in values.items() if k in names})


def resume_flags(*classes: type) -> set[str]:
    """Fields a resumed run may change."""
    return {f.name for cls in classes for f in fields(cls) if f.metadata.get("resume")}
