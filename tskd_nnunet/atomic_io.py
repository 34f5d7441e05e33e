"""Atomic file writes (JSON, CSV, Markdown, PNG, torch checkpoints) and the one JSON reader of the package.

A reader (the resumable benchmark runner, a person tailing results) must never see a half-written
JSON, CSV, Markdown or PNG: everything is written to a temporary file in the same folder and then moved
into place with ``os.replace``, which is atomic on POSIX within one file system. Temporary files are
hidden and start with ``.tmp_`` (cleanup code may rely on that).

A folder whose files must belong together (an ONNX export: the models and the metadata that describes them) is
written with ``atomic_folder``: into a hidden folder beside it, which then replaces the old folder as a whole.

``read_json`` is the one JSON reader: it returns a default, or raises the caller's own error class
with a one-line message that names the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Type, Union


PathLike = Union[str, os.PathLike]
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix so that writers that infer the format from it (savefig) still work
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def _clean_interrupted_swaps(path: Path) -> None:
    """Leftovers of an ``atomic_folder`` whose process is gone (SIGKILL, a crash): its temporary folder is removed;
    a parked old folder is put back if the swap was cut between its two renames (``path`` missing), else removed."""
    pattern = re.compile(rf"^\.(tmp|old)_{re.escape(path.name)}\.(\d+)$")
    for p in sorted(path.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or (_pid_alive(int(m.group(2))) and int(m.group(2)) != os.getpid()):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(p, path)
        else:
            shutil.rmtree(p, ignore_errors=True)


def replace_folder(new: PathLike, path: PathLike) -> None:
    """Move the folder ``new`` onto ``path``, replacing a folder there as a whole: rename the old one aside, rename
    the new one in, then delete the old one (``os.replace`` cannot replace a non-empty folder). An interruption
    between the two renames puts the old folder back."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".old_{path.name}.{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder ``.tmp_<name>.<pid>`` beside ``path``; if the block succeeds it replaces
    ``path`` as a whole (``replace_folder``), else it is deleted and ``path`` stays as it was. A reader sees the old
    folder or the new one, never a mix of both. Leftovers of a killed earlier call are cleaned up first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_interrupted_swaps(path)
    tmp = path.parent / f".tmp_{path.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_csv(df: "pd.DataFrame", path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """torch.save through a temporary file beside ``path``: a kill never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _json_default(o: Any) -> Any:
    """numpy scalars and arrays, paths and sets as JSON; anything else is an error."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, set, frozenset)):
        return sorted(o) if isinstance(o, (set, frozenset)) else o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 2,
                      default: Callable[[Any], Any] = _json_default, **dump_kwargs: Any) -> Path:
    """``json.dump(obj)`` to ``path`` atomically (parent folders created; numpy values converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default, **dump_kwargs) + "\n")


_RAISE = object()


def read_json(path: PathLike, default: Any = _RAISE, error: Optional[Type[Exception]] = None,
              fix: str = "") -> Any:
    """The parsed JSON file at ``path``.

    - ``default`` given: returned when the file is missing, unreadable or not valid JSON (state files
      that a killed process may never have written).
    - else ``error`` given: such a file raises ``error("cannot read PATH (why). Fix: FIX")``, one line,
      without the traceback chain (for command-line tools that print one-line errors).
    - else ``OSError`` / ``json.JSONDecodeError`` (a ``ValueError``) propagate.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        if default is not _RAISE:
            return default
        if error is None:
            raise
        why = f"not valid JSON: {e}" if isinstance(e, ValueError) else (e.strerror or str(e))
        raise error(f"cannot read {path} ({why}).{f' Fix: {fix}' if fix else ''}") from None


def sha256_of(path: Union[str, Path]) -> str:
    """sha256 hex digest of a file (read in 4 MB blocks): the one file hash of the package."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
