"""State of one study run on disk, the train.py command that starts or resumes it, and its recorded outcome.

A run folder is an ordinary train.py run folder plus `study_run.json` (done or failed, seconds, the error), the
child's `stdout.log` / `stderr.log`, and its test evaluation's `test_detections.npz`, `test_eval.json` and
`test_stdout.log` / `test_stderr.log`. Finished runs are skipped, interrupted ones (a last.pt but no outcome)
resumed with `train.py --resume last.pt`, failed ones skipped unless retried.
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.engine.folders import write_text
from utils.study.plan import RunSpec

STATE_FILE = "study_run.json"
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass
class RunState:
    """pending | interrupted | done | failed, with the training seconds so far and the error of a failed run."""

    status: str
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 0


def read_state(folder: Path) -> RunState:
    """What the study knows of a run folder."""
    recorded = {}
    if (folder / STATE_FILE).is_file():
        try:
            recorded = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            recorded = {}
    seconds, attempts = float(recorded.get("seconds") or 0.0), int(recorded.get("attempts") or 0)
    status = recorded.get("status")
    if status == "done" and (folder / "best.pt").is_file():
        return RunState("done", seconds, None, attempts)
    if status == "failed":
        return RunState("failed", seconds, recorded.get("error"), attempts)
    if (folder / "last.pt").is_file():
        return RunState("interrupted", seconds, None, attempts)
    return RunState("pending", seconds, None, attempts)


def last_epoch(folder: Path) -> int:
    """Epochs finished in the run's last.pt (0 when it cannot be read)."""
    try:
        return int(torch.load(folder / "last.pt", map_location="cpu", weights_only=True).get("epoch", 0))
    except Exception:      # a torn or foreign file: start over rather than stop the study
        return 0


def _plugin_flags(plugins: list[str]) -> list[str]:
    return [a for p in plugins for a in ("--plugin", str(p))]


def train_command(run: RunSpec, python: str, train_script: Path, shared_flags: list[str], device_flag: str,
                  resume: bool, epochs: int, plugins: list[str]) -> list[str]:
    """train.py for a fresh run (shared flags, the variant's flags, seed, folder) or the resume of its last.pt
    (with the run's --plugin files, which a resume must be given again)."""
    if resume:
        return [python, str(train_script), "--resume", str(run.folder / "last.pt"), "--epochs", str(epochs),
                "--device", device_flag, *_plugin_flags(plugins)]
    return [python, str(train_script), *shared_flags, *run.variant.flags, "--seed", str(run.seed),
            "--save-dir", str(run.folder.parent), "--name", run.folder.name, "--exist-ok", "--device", device_flag]


def evaluation_command(python: str, best: Path, data: str, split: str, device_flag: str, resamples: int,
                       plugins: list[str]) -> list[str]:
    """utils.tools.study_eval for one run: its test evaluation, run after its training. The module is imported
    from this repository first, whatever the working directory holds (`python -m` would look there first)."""
    start = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module('utils.tools.study_eval', run_name='__main__', alter_sys=True)")
    return [python, "-c", start, str(REPOSITORY), "--best", str(best), "--data", data, "--split", split,
            "--device", device_flag, "--resamples", str(resamples), *_plugin_flags(plugins)]


def error_line(stderr: str, returncode: int, program: str = "train.py") -> str:
    """The run's one-line error: its last `error: ...` line, else the last line of a traceback, else the exit."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (out of host memory?)" if -returncode == signal.SIGKILL else "")
    tail = [line for line in lines if not line.startswith(("File ", "^", "~"))]
    return tail[-1] if tail else f"{program} exited with status {returncode}"


def record(folder: Path, state: RunState) -> None:
    """Write the run's outcome (checked write)."""
    write_text(folder / STATE_FILE, json.dumps({"status": state.status, "seconds": round(state.seconds, 2),
                                                "error": state.error, "attempts": state.attempts}, indent=1))
