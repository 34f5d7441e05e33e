"""Atomic file writes (JSON, CSV, Markdown, PNG, torch checkpoints) and the one JSON reader of the package.

A reader (the resumable benchmark runner, a person tailing results) must never see a half-written
JSON, CSV, Markdown or PNG: everything is written to a temporary file in the same folder and then moved
into place with ``os.replace``, which is atomic on POSIX within one file system. Temporary files are
hidden and start with ``.tmp_`` (cleanup code may rely on that).

``read_json`` is the one JSON reader: it returns a default, or raises the caller's own error class
with a one-line message that names the file and the fix.
"""
from __future__ import annotations

import json
import os
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
