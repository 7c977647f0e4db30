"""Output folders: numbered run and prediction folders."""
from __future__ import annotations

from pathlib import Path


def numbered_dir(base: Path, exist_ok: bool = False) -> Path:
    """`base`, or base2, base3, ... the first that does not exist yet (or `base` itself with exist_ok)."""
    path, n = base, 2
    while path.exists() and not exist_ok:
        path, n = base.with_name(f"{base.name}{n}"), n + 1
    return path
