"""One job of the benchmark, as a rule of the Snakefile runs it (any machine: local, or a SLURM node):

    python -m tskd_nnunet.benchmark.step RULE KEY... --config CONFIG --profile P --workdir DIR
                                                     (--committed DIR | --no-committed)

The runner's own code does the work; each step ends by writing the file the workflow names as its output
(tskd_nnunet.benchmark.workflow), so Snakemake knows it is done. A failing step of a run records the failure
(the run's state.json, the committed folder's failed/) and exits 1 with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from tskd_nnunet.atomic_io import atomic_write_json, read_json
from tskd_nnunet.benchmark.config import DATA_SCOPES, BenchmarkConfigError, Budget
from tskd_nnunet.benchmark.runner import STATE, BenchmarkError, BenchmarkRunner, StepFailed, _now, _say
from tskd_nnunet.benchmark.workflow import BenchmarkWorkflow, workflow_from_config


def _done(wf: BenchmarkWorkflow, rule: str, *key: Any, **info: Any) -> None:
    atomic_write_json(wf.path(rule, *key), {"status": "done", "finished": _now(), **info})


def _state(r: BenchmarkRunner, b: Budget, m: str, f: int) -> Dict[str, Any]:
    return read_json(os.path.join(r.run_dir(b, m, f), STATE), {}) or {}


def _save(r: BenchmarkRunner, b: Budget, m: str, f: int, state: Dict[str, Any]) -> None:
    atomic_write_json(os.path.join(r.run_dir(b, m, f), STATE), state)


def train(wf: BenchmarkWorkflow, b: Budget, m: str, f: int) -> None:
    """A committed run's model for the runs that need it (restored or retrained); any other run trained."""
    r = wf.r
    if r.committed_settings(b, m, f) is not None:
        r._dependency_ready(b, m, f, "the runs that need it")
        return _done(wf, "train", b, m, f, committed=True)
    spec, old = r.cfg.method_defs[m], _state(r, b, m, f)
    splits, pools = r.splits()[b]
    state = {"method": m, "trainer": r.trainer(m), "budget": b, "fold": f, "status": "running",
             "attempts": int(old.get("attempts", 0)) + 1, "started": _now(), "profile": r.profile_name,
             "device": r.device, "schedule": r.schedule(m), "data": spec.get("data", "labeled"),
             "n_labeled": len(splits[f]["train"]), "n_val": len(splits[f]["val"]),
             "n_pool": len(pools[f]) if DATA_SCOPES[spec.get("data", "labeled")]["pool"] else 0, "timings": {}}
    _save(r, b, m, f, state)
    _say(f"{m} | budget {b} | fold {f}: training (attempt {state['attempts']}, {state['n_labeled']} labeled cases)")
    r._train(b, m, f, state, os.path.join(r.run_dir(b, m, f), "logs"))
    _save(r, b, m, f, state)
    _done(wf, "train", b, m, f)


def _timed(key: str, fn: Callable[..., Optional[Dict[str, Any]]]) -> Callable[..., None]:
    """A run's step that adds its seconds (and what it returns) to the run's state.json."""
    def step(wf: BenchmarkWorkflow, b: Budget, m: str, f: int) -> None:
        r, t0 = wf.r, time.time()
        more = fn(r, b, m, f) or {}
        state = _state(r, b, m, f)
        state.setdefault("timings", {})[key] = round(time.time() - t0, 1)
        _save(r, b, m, f, {**state, **more})
    return step


def _logs(r: BenchmarkRunner, b: Budget, m: str, f: int) -> str:
    return os.path.join(r.run_dir(b, m, f), "logs")


def commit(wf: BenchmarkWorkflow, b: Budget, m: str, f: int) -> None:
    r = wf.r
    state = {**_state(r, b, m, f), "status": "done", "finished": _now()}
    _save(r, b, m, f, state)
    if r.store is not None:
        _say(f"{m} | budget {b} | fold {f}: committed: {r.commit(b, m, f, state)}")
        r.store.write_matrix(r.matrix_record())
    else:
        _done(wf, "commit", b, m, f)


def _marker(rule: str, fn: Callable[..., Any]) -> Callable[..., None]:
    def step(wf: BenchmarkWorkflow, *key: Any) -> None:
        fn(wf.r, *key)
        _done(wf, rule, *key)
    return step


STEPS: Dict[str, Callable[..., None]] = {
    "convert": _marker("convert", lambda r: r.ensure_converted()),
    "plan": _marker("plan", lambda r: (r.ensure_converted(), r.ensure_planned())),
    "budget": _marker("budget", lambda r, b, scope: r.prepare_budget_root(b, scope)),
    "labeled_only": lambda wf, b, f: wf.r.prepare_labeled_only(b, f),  # writes its own state.json
    "stage": _marker("stage", lambda r, st, f: r.ensure_stage(st, f)),
    "train": train,
    "predict": _timed("predict_s", lambda r, b, m, f: r._predict(b, m, f, r.method_env(b, m, f), _logs(r, b, m, f))),
    "evaluate": _timed("evaluate_s", lambda r, b, m, f: r._evaluate(r.run_dir(b, m, f))),
    "measure": _timed("measure_s", lambda r, b, m, f: r._measure(b, m, f, r.method_env(b, m, f), _logs(r, b, m, f))),
    "commit": commit,
}


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
        if key and a.rule not in ("stage",):
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
            b, m, f = run_key
            failed = {**_state(wf.r, b, m, f), "status": "failed", "finished": _now(), "error": msg,
                      "error_tail": getattr(e, "tail", "")}
            _save(wf.r, b, m, f, failed)
            if wf.r.store is not None:
                wf.r.store.write_failure(m, b, f, {k: failed.get(k) for k in (
                    "method", "trainer", "budget", "fold", "attempts", "started", "finished", "error")})
        print(f"tskd_benchmark: {' '.join(a.key)}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
