"""What every script shares: one-line errors for user mistakes and the resolved-config table."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from utils.config import DetectConfig, TrainConfig
from utils.settings import check_ranges

# Mistakes in flags, files or data: printed as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's main; user errors print `error: ...` and exit 2, other OS errors exit 1, Ctrl-C exits 130."""
    try:
        main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:      # a failed write (full disk, read-only or blocked --out): one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def format_rows(rows: list[list[object]], header: list[str] | None = None) -> str:
    """Left-aligned plain-text table."""
    table = ([header] if header else []) + [[str(c) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_config(title: str, values: dict) -> None:
    """Print the resolved configuration of a run as a two-column table."""
    print(f"{title}\n" + format_rows([[k, v] for k, v in values.items()], ["setting", "value"]))


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    """--plugin FILE (repeatable), with train.py's help text."""
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "plugin")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help=help_text)


def detect_config(args: argparse.Namespace, defaults: DetectConfig | None = None) -> DetectConfig:
    """The --conf / --nms-iou flags given (else `defaults`), range-checked."""
    base = defaults or DetectConfig()
    config = DetectConfig(**{f.name: getattr(args, f.name, getattr(base, f.name)) for f in dataclasses.fields(DetectConfig)})
    check_ranges(config)
    return config


def spec_text(spec: dict) -> str:
    """{'type': 'cbam', 'reduction': 8} -> 'cbam:reduction=8' (the --attention syntax)."""
    return ":".join([spec["type"], *(f"{k}={v}" for k, v in spec.items() if k != "type")])
