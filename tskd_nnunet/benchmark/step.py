"""One job of the benchmark, as a rule of the Snakefile runs it (any machine: local, or a SLURM node):

    python -m tskd_nnunet.benchmark.step RULE KEY... --config CONFIG --profile P --workdir DIR
                                                     (--committed DIR | --no-committed)

The work is done by actions.py / data_roots.py; each step ends by writing the file the workflow names as its output
(tskd_nnunet.benchmark.workflow), so Snakemake knows it is done. A failing step of a run records the failure
(the run's state.json, the committed folder's failed/) and exits 1 with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from tskd_nnunet.atomic_io import atomic_write_json
from tskd_nnunet.benchmark import actions, data_roots
from tskd_nnunet.benchmark.commands import BenchmarkError, StepFailed, now, say
from tskd_nnunet.benchmark.config import BenchmarkConfigError
from tskd_nnunet.benchmark.workflow import BenchmarkWorkflow, workflow_from_config


def _marker(rule: str, fn: Callable[..., Any]) -> Callable[..., None]:
    """A step whose done-file is a marker written after ``fn``."""
    def step(wf: BenchmarkWorkflow, *key: Any) -> None:
        info = fn(wf.r, *key)
        atomic_write_json(wf.path(rule, *key), {"status": "done", "finished": now(), **(info or {})})
    return step


def _timed(key: str, fn: Callable[..., Optional[Dict[str, Any]]]) -> Callable[..., None]:
    """A run's step that adds its seconds (and what it returns) to the run's state.json."""
    def step(wf: BenchmarkWorkflow, b: Any, m: str, f: int) -> None:
        r, t0 = wf.r, time.time()
        more = fn(r, b, m, f) or {}
        state = r.run_state(b, m, f)
        state.setdefault("timings", {})[key] = round(time.time() - t0, 1)
        actions.save_state(r, b, m, f, {**state, **more})
    return step


def _commit(wf: BenchmarkWorkflow, b: Any, m: str, f: int) -> None:
    where = actions.commit(wf.r, b, m, f)
    if where:
        say(f"{m} | budget {b} | fold {f}: committed: {where}")
    else:  # no committed folder: the run's own done-file
        atomic_write_json(wf.path("commit", b, m, f), {"status": "done", "finished": now()})


def _plan(r: Any) -> None:
    data_roots.ensure_converted(r)  # a dataset converted beforehand is checked here (test set present)
    data_roots.ensure_planned(r)


def _train(r: Any, b: Any, m: str, f: int) -> Optional[Dict[str, Any]]:
    actions.train(r, b, m, f)
    return {"committed": True} if r.committed_settings(b, m, f) is not None else None


STEPS: Dict[str, Callable[..., None]] = {
    "convert": _marker("convert", data_roots.ensure_converted),
    "plan": _marker("plan", _plan),
    "budget": _marker("budget", lambda r, b, scope: {"root": data_roots.prepare_budget_root(r, b, scope)}),
    "labeled_only": lambda wf, b, f: data_roots.prepare_labeled_only(wf.r, b, f),  # writes its own state.json
    "stage": _marker("stage", actions.run_stage),
    "train": _marker("train", _train),
    "predict": _timed("predict_s", actions.predict),
    "evaluate": _timed("evaluate_s", actions.evaluate),
    "measure": _timed("measure_s", actions.measure),
    "commit": _commit,
}


def _record_failure(r: Any, b: Any, m: str, f: int, msg: str, tail: str) -> None:
    """The run's state.json and the committed folder's failed/ say why. A committed run stays done: when making
    its model available fails (a changed weights file), the runs that needed it are the ones that failed."""
    runs = [m]
    if r.store is not None and r.store.is_done(m, b, f):
        runs = [x for x in r.cfg.methods_at(b, profile=r.profile_name) if m in r.cfg.method_defs[x].get("needs", [])]
    for x in runs:
        failed = {**r.run_state(b, x, f), "method": x, "trainer": r.trainer(x), "budget": b, "fold": f,
                  "status": "failed", "finished": now(), "error": msg if x == m else f"needs {m}: {msg}",
                  "error_tail": tail}
        actions.save_state(r, b, x, f, failed)
        if r.store is not None:
            r.store.write_failure(x, b, f, {k: failed.get(k) for k in (
                "method", "trainer", "budget", "fold", "attempts", "started", "finished", "error")})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tskd_nnunet.benchmark.step", description=__doc__.split("\n\n")[0])
    p.add_argument("rule", choices=sorted(STEPS))
    p.add_argument("key", nargs="*", help="budget method fold | stage fold | budget scope | budget fold")
    p.add_argument("--config", required=True)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--workdir", required=True)
    p.add_argument("--committed", default=None)
    p.add_argument("--no-committed", action="store_true")
    a = p.parse_args(argv)
    run_key = None
    try:
        wf = workflow_from_config({"config": a.config, "profile": a.profile, "workdir": a.workdir,
                                   "committed": a.committed, "no_committed": a.no_committed})
        key: List[Any] = list(a.key)
        if key and a.rule != "stage":
            key[0] = wf.budget_of(key[0])
        if key:
            key[-1] = int(key[-1]) if key[-1].isdigit() else key[-1]
        if len(key) == 3:
            run_key = tuple(key)
        for k, v in (("nnUNet_raw", wf.r.raw_root), ("nnUNet_preprocessed", wf.r.base_pp_root),
                     ("nnUNet_results", wf.r.shared_results)):
            os.environ.setdefault(k, v)  # quiets nnU-Net's import-time warnings in this process
        STEPS[a.rule](wf, *key)
    except (StepFailed, BenchmarkError, BenchmarkConfigError, OSError, ValueError, KeyError) as e:
        msg = f"{a.rule} failed: {type(e).__name__ + ': ' if isinstance(e, (OSError, KeyError)) else ''}{e}"
        if run_key is not None:
            _record_failure(wf.r, *run_key, msg, getattr(e, "tail", ""))
        print(f"tskd_benchmark: {' '.join(a.key)}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
