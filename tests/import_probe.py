"""Which modules a snippet of project code loads, run in a fresh interpreter (imports are process-wide)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(code: str, modules: list[str]) -> dict[str, bool]:
    """Run `code` in a new Python at the project root; for each module name, whether it was imported."""
    probe = code + "\nimport sys\nprint(' '.join(str(m in sys.modules) for m in %r))\n" % (modules,)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(zip(modules, (word == "True" for word in out.stdout.split()[-len(modules):])))
