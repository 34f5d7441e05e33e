"""Committed benchmark results: one folder per finished run, meant to be committed to git.

    <ROOT>/                           e.g. documentation/benchmarks/hc18_cpu
      matrix.json                     the planned runs and the benchmark's settings (rewritten by every runner call)
      runs/<method>_b<budget>_f<fold>/
        cases.csv                     per test case and class: dice, nsd, hd95, voxels, volumes (ml), HC (mm), patient
        settings.json                 status "done", trainer, plans/configuration/batch, schedule, transfer-set counts,
                                      labeled case ids, teacher and own checkpoint sha256, commit, minutes, params,
                                      latency, versions
        overlays.npz                  worst / median / best test case (by Dice): image, reference, prediction,
                                      downsampled to <= 256 pixels (the report's overlay grid)
      failed/<method>_b<budget>_f<fold>.json   the last failure of a run not done yet (removed once it is done)
      report.md, *.csv, *.png         rebuilt from the files above alone (``tskd_report --from-committed ROOT``)

A run folder appears atomically (written beside, then renamed) and is never overwritten: the runner
treats it as done on any machine, with any work directory. The report needs nothing but this folder.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from tskd_nnunet.atomic_io import atomic_write_json, read_json

RUNS = "runs"
FAILED = "failed"
CASES = "cases.csv"
SETTINGS = "settings.json"
OVERLAYS = "overlays.npz"
MATRIX = "matrix.json"
OVERLAY_MAX_SIDE = 256
# settings that must agree between a committed run and the run the current config would make; anything
# else (commit, minutes, machine) may differ
IDENTITY_KEYS = ("trainer", "plans", "configuration", "schedule", "device", "data_scope", "plan_on")


def run_name(method: str, budget: Any, fold: Any) -> str:
    return f"{method}_b{budget}_f{fold}"


class CommittedStore:
    """Read and write the committed results of one benchmark (one config and profile)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def run_dir(self, method: str, budget: Any, fold: Any) -> str:
        return os.path.join(self.root, RUNS, run_name(method, budget, fold))

    def failure_file(self, method: str, budget: Any, fold: Any) -> str:
        return os.path.join(self.root, FAILED, run_name(method, budget, fold) + ".json")

    def settings(self, method: str, budget: Any, fold: Any) -> Optional[Dict[str, Any]]:
        """The settings of a committed, finished run, or None."""
        d = self.run_dir(method, budget, fold)
        s = read_json(os.path.join(d, SETTINGS), None)
        if not isinstance(s, dict) or s.get("status") != "done" or not os.path.isfile(os.path.join(d, CASES)):
            return None
        return s

    def is_done(self, method: str, budget: Any, fold: Any) -> bool:
        return self.settings(method, budget, fold) is not None

    def write_run(self, method: str, budget: Any, fold: Any, cases: pd.DataFrame, settings: Dict[str, Any],
                  overlays: Optional[Dict[str, np.ndarray]] = None,
                  extra: Optional[Callable[[str], Dict[str, Any]]] = None) -> str:
        """Write one finished run (atomically: a folder written beside and renamed). Never overwrites a done run.
        ``extra(folder)`` writes more files into the run's folder (the model) and returns settings to add."""
        final = self.run_dir(method, budget, fold)
        if self.is_done(method, budget, fold):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            cases.to_csv(os.path.join(tmp, CASES), index=False)
            if overlays:
                with open(os.path.join(tmp, OVERLAYS), "wb") as f:
                    np.savez_compressed(f, **overlays)
            more = extra(tmp) if extra is not None else {}
            atomic_write_json(os.path.join(tmp, SETTINGS), {**settings, **more, "status": "done"})
            if os.path.exists(final):  # an unfinished leftover (no settings): moved aside, replaced, then deleted
                aside = f"{tmp}.old"
                os.replace(final, aside)
                os.replace(tmp, final)
                shutil.rmtree(aside)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fail = self.failure_file(method, budget, fold)
        if os.path.exists(fail):
            os.remove(fail)
        return final

    def write_failure(self, method: str, budget: Any, fold: Any, info: Dict[str, Any]) -> None:
        atomic_write_json(self.failure_file(method, budget, fold), {**info, "status": "failed"})

    def write_matrix(self, matrix: Dict[str, Any]) -> None:
        atomic_write_json(os.path.join(self.root, MATRIX), matrix)

    def read_matrix(self) -> Optional[Dict[str, Any]]:
        m = read_json(os.path.join(self.root, MATRIX), None)
        return m if isinstance(m, dict) else None

    # ------------------------------------------------------------------ reading everything
    def done_runs(self) -> List[Dict[str, Any]]:
        folder = os.path.join(self.root, RUNS)
        out = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            s = read_json(os.path.join(folder, name, SETTINGS), None)
            if isinstance(s, dict) and s.get("status") == "done" and os.path.isfile(os.path.join(folder, name, CASES)):
                out.append({**s, "_dir": os.path.join(folder, name)})
        return out

    def load(self) -> Tuple[pd.DataFrame, pd.DataFrame]:
        """(results, runs) in the report's format: every committed run, the planned ones not committed as
        missing (from matrix.json), the last failure of a run not done as failed."""
        results, runs, seen = [], [], set()
        for s in self.done_runs():
            key = (str(s["method"]), str(s["budget"]), str(s["fold"]))
            seen.add(key)
            df = pd.read_csv(os.path.join(s["_dir"], CASES))
            results.append(df.assign(dataset=s.get("dataset", "dataset"), method=s["method"], budget=s["budget"],
                                     fold=s["fold"]))
            runs.append({"dataset": s.get("dataset", "dataset"), "method": s["method"], "budget": s["budget"],
                         "fold": s["fold"], "status": "done", "params": s.get("params"),
                         "latency_ms": s.get("latency_ms"), "error": "", "trainer": s.get("trainer")})
        matrix = self.read_matrix() or {}
        dataset = matrix.get("dataset", "dataset")
        for r in matrix.get("runs", []):
            key = (str(r["method"]), str(r["budget"]), str(r["fold"]))
            if key in seen:
                continue
            seen.add(key)
            fail = read_json(self.failure_file(*key), None)
            runs.append({"dataset": dataset, "method": r["method"], "budget": r["budget"], "fold": r["fold"],
                         "status": "failed" if fail else "missing", "params": None, "latency_ms": None,
                         "error": (fail or {}).get("error", ""), "trainer": r.get("trainer")})
        # the report lists methods in the config's order (matrix.json), not in the folders' alphabetical one
        order = {m: i for i, m in enumerate(dict.fromkeys(str(r["method"]) for r in matrix.get("runs", [])))}
        runs.sort(key=lambda r: order.get(str(r["method"]), len(order)))
        res = pd.concat(results, ignore_index=True) if results else pd.DataFrame(
            columns=["dataset", "method", "budget", "fold", "case", "class", "dice", "nsd", "hd95"])
        return res, pd.DataFrame(runs, columns=["dataset", "method", "budget", "fold", "status", "params",
                                                "latency_ms", "error", "trainer"])

    def overlay_loader(self):
        """An overlay loader for report.write_report reading the committed overlays.npz files."""
        from tskd_nnunet.benchmark.plots import OverlayItem

        cache: Dict[str, Any] = {}

        def load(key: Dict[str, Any]):
            path = os.path.join(self.run_dir(str(key["method"]), key["budget"], key.get("fold", 0)), OVERLAYS)
            if path not in cache:
                cache[path] = dict(np.load(path, allow_pickle=False)) if os.path.isfile(path) else None
            z = cache[path]
            if z is None:
                return None
            cases = [str(c) for c in z["cases"]]
            if str(key["case"]) not in cases:
                return None
            i = cases.index(str(key["case"]))
            return OverlayItem(z[f"image_{i}"], z[f"reference_{i}"], z[f"prediction_{i}"])

        return load


# ---------------------------------------------------------------------------------------------- overlays
def _downsample(a: np.ndarray, step: int) -> np.ndarray:
    return a[::step, ::step] if a.ndim == 2 else a[:, ::step, ::step]


def overlay_arrays(items: Sequence[Tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                   max_side: int = OVERLAY_MAX_SIDE) -> Dict[str, np.ndarray]:
    """The overlays.npz content of (case, image, reference, prediction) tuples: 2D (the slice with the largest
    reference for 3D), strided to at most ``max_side`` pixels, image as uint8 (0.5-99.5 percentile window)."""
    from tskd_nnunet.benchmark.plots import _to_2d

    out: Dict[str, np.ndarray] = {"cases": np.array([c for c, *_ in items], dtype=str)}
    for i, (_, img, ref, pred) in enumerate(items):
        img, ref, pred = _to_2d(np.asarray(img, dtype=np.float32), np.asarray(ref), np.asarray(pred))
        step = max(1, int(math.ceil(max(ref.shape) / max_side)))
        img, ref, pred = _downsample(img, step), _downsample(ref, step), _downsample(pred, step)
        lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
        img8 = np.clip((img - lo) / (hi - lo if hi > lo else 1.0) * 255.0, 0, 255).astype(np.uint8)
        out[f"image_{i}"] = img8
        out[f"reference_{i}"] = ref.astype(np.uint8)
        out[f"prediction_{i}"] = pred.astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------- report
def _short(sha: Optional[str]) -> str:
    return sha[:12] if isinstance(sha, str) and sha else "–"


def settings_table(runs: List[Dict[str, Any]]) -> str:
    """Markdown: the settings of every committed run (what the report's numbers were made with)."""
    from tskd_nnunet.benchmark.report import md_table

    def minutes(s, k):
        v = (s.get("minutes") or {}).get(k)
        return "–" if v is None else f"{v:.1f}"

    rows = []
    for s in sorted(runs, key=lambda s: (str(s.get("budget")), str(s.get("method")), str(s.get("fold")))):
        ts = s.get("transfer_set") or {}
        ts = {**ts, **(ts.get("drawn") or {})}  # what the trainer drew from, where it said so
        teacher = s.get("teacher") or {}
        tsha = _short(teacher.get("checkpoint_sha256"))
        if teacher and teacher.get("same_as_committed") is False:
            tsha += " (retrained: committed teacher " + _short(teacher.get("committed_checkpoint_sha256")) + ")"
        pc = s.get("plans_configuration") or {}
        commit = s.get("commit") or {}
        rows.append([str(s.get("method")), str(s.get("budget")), str(s.get("fold")), str(s.get("trainer")),
                     f"{s.get('configuration')} (batch {pc.get('batch_size', '?')}, patch "
                     f"{'x'.join(map(str, pc.get('patch_size', []))) or '?'})",
                     str(s.get("schedule")),
                     f"{ts.get('labeled', '?')} / {ts.get('pool', 0)} / {ts.get('synthetic', 0)}",
                     tsha, _short(s.get("checkpoint_sha256")),
                     f"{commit.get('sha', '?')[:10] if commit.get('sha') else '?'}{' +dirty' if commit.get('dirty') else ''}",
                     minutes(s, "train"), minutes(s, "total"), str(s.get("finished", ""))])
    header = ["method", "budget", "fold", "trainer", "plans", "schedule (ep,it,val)",
              "labeled / pool / synthetic", "teacher sha256", "own sha256", "commit", "train min", "total min",
              "finished"]
    return "\n".join(["## Run settings", "",
                      "From each run's committed settings.json (schedule = TSKD_SCHEDULE epochs, iterations per "
                      "epoch, validation iterations; transfer set = the cases the run's preprocessed root exposes; "
                      "sha256 = checkpoint_final.pth; minutes of the last attempt on that machine).", "",
                      md_table(header, rows), ""])


def open_committed(root: str) -> CommittedStore:
    """The store of an existing committed folder (FileNotFoundError naming it otherwise)."""
    store = CommittedStore(root)
    if not os.path.isdir(store.root):
        raise FileNotFoundError(f"{store.root} does not exist: no committed results there")
    return store


def write_committed_report(root: str, out_dir: Optional[str] = None, n_resamples: int = 10000,
                           seed: int = 0) -> Dict[str, Any]:
    """Rebuild the report (Markdown + CSV + PNG) from a committed folder alone; returns the written paths."""
    from tskd_nnunet.benchmark.report import BASELINE, write_report

    store = open_committed(root)
    results, runs = store.load()
    matrix = store.read_matrix() or {}
    done = store.done_runs()
    title = matrix.get("title") or f"Benchmark {os.path.basename(store.root)} (committed results)"
    return write_report(results, runs, out_dir or store.root, baseline=matrix.get("baseline", BASELINE),
                        overlay_loader=store.overlay_loader(), n_resamples=n_resamples, seed=seed, title=title,
                        notes=list(matrix.get("notes", [])), extra_sections=[settings_table(done)] if done else [])
