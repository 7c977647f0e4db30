"""CUDA MPS for the study's own runs: a private control daemon (pipe and log directories of its own, no root),
started before the runs and always stopped after them.

With MPS, the kernels of several processes share the GPU at once instead of taking turns by time slice, which
is what small models that leave most of the GPU idle need. The daemon is checked by a probe process that makes
a CUDA context through it; when that fails (MPS not allowed here, a foreign daemon, a compute mode that forbids
it) `auto` goes on without MPS and `on` is an error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from utils.log import get_logger

log = get_logger(__name__)
CONTROL = "nvidia-cuda-mps-control"
SOCKET_PATH_MAX = 100     # a Unix socket path holds ~108 bytes; MPS adds its socket names to the pipe directory
PROBE = "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize()"


def mps_available() -> bool:
    return shutil.which(CONTROL) is not None


def check_mode(mode: str, on_cuda: bool) -> None:
    """--mps on needs CUDA and the control binary: refused before anything is started or written."""
    if mode == "on" and not on_cuda:
        raise ValueError("--mps on: no CUDA device here; use --mps auto or off")
    if mode == "on" and not mps_available():
        raise ValueError(f"--mps on: {CONTROL} is not on PATH (it comes with the NVIDIA driver); use --mps auto or off")


class MPS:
    """Context manager: `env` is what the runs need to reach the daemon ({} when MPS is not used)."""

    def __init__(self, folder: Path, mode: str, on_cuda: bool, jobs: int):
        self.folder, self.mode = folder, mode
        self.wanted = mode == "on" or (mode == "auto" and on_cuda and jobs > 1 and mps_available())
        self.env: dict[str, str] = {}
        self._own_pipe: Path | None = None

    def __enter__(self) -> MPS:
        if self.wanted:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log_dir = self.folder / "mps" / "log"
        pipe_dir = self.folder / "mps" / "pipe"
        if len(str(pipe_dir.resolve())) > SOCKET_PATH_MAX - 20:      # too long for a socket: a short private one
            self._own_pipe = pipe_dir = Path(tempfile.mkdtemp(prefix="mps-"))
        for d in (log_dir, pipe_dir):
            d.mkdir(parents=True, exist_ok=True)
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir.resolve()), "CUDA_MPS_LOG_DIRECTORY": str(log_dir.resolve())}
        started = self._control(["-d"], env)
        probe = started and self._probe(env)
        if started and probe:
            self.env = env
            log.info("CUDA MPS on for the study's runs (pipes %s, logs %s)", pipe_dir, log_dir)
            return
        if started:
            self._control([], env, "quit\n")
        why = f"see {log_dir}" if started else f"{CONTROL} -d failed"
        if self.mode == "on":
            self._cleanup()
            raise ValueError(f"--mps on: CUDA MPS could not be used ({why})")
        log.warning("CUDA MPS not used (%s); the runs share the GPU by time slices", why)
        self._cleanup()

    def _probe(self, env: dict[str, str]) -> bool:
        try:
            return subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                                  timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _control(self, args: list[str], env: dict[str, str], stdin: str | None = None) -> bool:
        try:
            return subprocess.run([CONTROL, *args], env={**os.environ, **env}, input=stdin, text=True,
                                  capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def stop(self) -> None:
        """Quit the daemon (it stops its server); safe to call more than once."""
        if self.env:
            if not self._control([], self.env, "quit\n"):
                log.warning("CUDA MPS did not quit cleanly; stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY=%s %s",
                            self.env["CUDA_MPS_PIPE_DIRECTORY"], CONTROL)
            else:
                log.info("CUDA MPS stopped")
            self.env = {}
        self._cleanup()

    def _cleanup(self) -> None:
        if self._own_pipe is not None:
            shutil.rmtree(self._own_pipe, ignore_errors=True)
            self._own_pipe = None
