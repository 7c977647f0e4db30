"""The project's logging: library modules log, scripts print; both reach the terminal the same way.

Every module logs through `get_logger(__name__)`, a child of the `detector` logger. Its one handler
writes information to standard output and warnings (prefixed `warning: `) to standard error, looked
up when a record is written, so redirected or captured streams receive them. An application that
embeds the detector configures `logging.getLogger("detector")` as it likes.
"""
from __future__ import annotations

import logging
import sys

ROOT = "detector"


class _TerminalHandler(logging.Handler):
    """INFO to the current sys.stdout, WARNING and above to the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"warning: {message}", file=sys.stderr)
            else:
                print(message, file=sys.stdout)
        except Exception:  # noqa: BLE001 (logging must never break the run)
            self.handleError(record)


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        root.addHandler(_TerminalHandler())
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`detector.<module>`), with the terminal handler installed once."""
    _root()
    return logging.getLogger(f"{ROOT}.{name}")
