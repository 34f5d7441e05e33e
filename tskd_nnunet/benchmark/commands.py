"""The benchmark's child commands: templates filled from the config, commands run with their output in a log,
and the two errors every step reports (documentation/benchmarking.md)."""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

from tskd_nnunet.benchmark.config import BenchmarkConfigError

BIN = os.path.dirname(sys.executable)  # nnU-Net's console scripts of this environment
# the folder holding this tskd_nnunet package (a source checkout or site-packages): child commands import the
# same code as the benchmark, and settings.json says which
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# lines of a child's output worth echoing on the console (the rest stays in the log)
PROGRESS_KEYS = ("Epoch ", "Pseudo dice", "train_loss", "val_loss", "Mean Validation Dice", "Error", "error:",
                 "labeled cases")


class BenchmarkError(RuntimeError):
    """Stops the whole benchmark (bad config, data not found); one line with the fix."""


class StepFailed(RuntimeError):
    """One step of one run or stage failed; the run is recorded as failed and the matrix goes on."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fill(template: str, fields: Dict[str, Any], where: str) -> str:
    """A config template (``{params[teacher_trainer]}``, ``{fold}``, ...) filled; a bad one is a config error."""
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        raise BenchmarkConfigError(f"{where}: cannot fill template {template!r} ({type(e).__name__}: {e}). Fix: use "
                                   f"the fields listed in tskd_nnunet/benchmark/config.py") from None


def fill_cmd(cmd: Sequence[str], fields: Dict[str, Any], where: str) -> List[str]:
    return [fill(str(c), fields, where) for c in cmd]


def log_tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def error_line(tail: str) -> str:
    """The most telling line of a failed command's output (the exception message, usually last)."""
    lines = tail.splitlines()
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|Traceback|No such file|not found)", ln) and not ln.startswith("  File "):
            return ln.strip()
    return lines[-1].strip() if lines else ""


def run_logged(cmd: List[str], env: Dict[str, str], log_path: str, step: str) -> None:
    """Run a command with its output in ``log_path`` (appended) and progress lines on the console; StepFailed with
    the telling line of its output when it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print("   $ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {now()} $ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            raise StepFailed(f"{step}: cannot start {cmd[0]} ({e.strerror}); is its console entry point "
                             f"installed? (log {log_path})", str(e)) from None
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if any(k in line for k in PROGRESS_KEYS):
                print("     " + line.rstrip(), flush=True)
        rc = proc.wait()
        log.write(f"===== exit {rc}\n")
    if rc != 0:
        tail = log_tail(log_path)
        raise StepFailed(f"{step} exited {rc}: {error_line(tail)} (log {log_path})", tail)


def link(src: str, dst: str) -> None:
    """Symlink ``dst`` -> ``src``, replacing a stale link."""
    if os.path.islink(dst):
        if os.readlink(dst) == src:
            return
        os.unlink(dst)
    elif os.path.exists(dst):
        raise BenchmarkError(f"{dst} exists and is not a link; delete it so the benchmark can link {src}")
    os.symlink(src, dst)


def share_folder(dst: str, shared: str) -> None:
    """Make ``dst`` a link to ``shared``; files of an older real folder at ``dst`` move into ``shared`` first
    (those already there are kept)."""
    os.makedirs(shared, exist_ok=True)
    if os.path.isdir(dst) and not os.path.islink(dst):
        for base, _, files in os.walk(dst):
            into = os.path.join(shared, os.path.relpath(base, dst))
            os.makedirs(into, exist_ok=True)
            for f in files:
                if not os.path.exists(os.path.join(into, f)):
                    os.replace(os.path.join(base, f), os.path.join(into, f))
        shutil.rmtree(dst)
    link(shared, dst)
