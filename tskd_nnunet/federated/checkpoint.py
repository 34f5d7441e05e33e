"""The server's round checkpoints: ``WORK/rounds/round_RRRR.pt``, one per finished round, written atomically.

Each file holds the global trainable state after round R (round 0: the initial weights), the merged fingerprint
and plans hash the federation runs on, and the history so far (per-site metrics, rejections). A server started
again on the same work folder resumes after the newest readable round file (a damaged newest file is named in
the log and the one before it is used): the weights, the plans and the round counter all come from that file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from tskd_nnunet.atomic_io import atomic_torch_save

ROUND_FILE = re.compile(r"^round_(\d{4})\.pt$")


@dataclass
class RoundCheckpoint:
    round: int
    state: Dict[str, torch.Tensor]
    meta: Dict[str, Any] = field(default_factory=dict)  # merged fingerprint, plans sha256, run config
    history: List[Dict[str, Any]] = field(default_factory=list)  # one entry per round: metrics, rejections


def round_path(work_dir: str, rnd: int) -> Path:
    return Path(work_dir) / "rounds" / f"round_{rnd:04d}.pt"


def save_round(work_dir: str, ckpt: RoundCheckpoint) -> Path:
    """Write ``ckpt`` as round_RRRR.pt (temp file + rename: a kill never leaves half a file)."""
    return atomic_torch_save({"round": ckpt.round, "state": ckpt.state, "meta": ckpt.meta, "history": ckpt.history},
                             round_path(work_dir, ckpt.round))


def read_round(path: Path) -> Tuple[Optional[RoundCheckpoint], Optional[str]]:
    """(checkpoint, None) or (None, why it cannot be used)."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage: torch raises many types
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    if not isinstance(d, dict) or not {"round", "state", "meta", "history"} <= set(d):
        return None, "not a round checkpoint (needs round, state, meta, history)"
    return RoundCheckpoint(int(d["round"]), d["state"], d["meta"], d["history"]), None


def latest_round(work_dir: str, log: Callable[[str], None] = print) -> Optional[RoundCheckpoint]:
    """The newest readable round checkpoint in ``work_dir`` (None: none yet); unreadable newer ones are logged."""
    folder = Path(work_dir) / "rounds"
    if not folder.is_dir():
        return None
    rounds = sorted((int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := ROUND_FILE.match(n)))
    for rnd, path in reversed(rounds):
        ckpt, why = read_round(path)
        if ckpt is not None and ckpt.round == rnd:
            return ckpt
        log(f"WARNING: round checkpoint {path} is unreadable ({why or 'round number differs from its name'}); "
            f"trying the previous round")
    return None
