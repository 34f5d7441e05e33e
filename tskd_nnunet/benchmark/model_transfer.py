"""A run's model across work directories and machines: the model of a needed run (the teacher) made available to
the runs that distil from it (restored from its committed weights, or trained again), a committed run's weights
added when they were not committed with it, and unfinished trainings parked in the committed folder and continued
elsewhere (documentation/benchmarking.md, "Teachers that survive a fresh machine", "--park")."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

from tskd_nnunet.atomic_io import atomic_write_json, read_json
from tskd_nnunet.benchmark.commands import BenchmarkError, StepFailed, now, say
from tskd_nnunet.benchmark.committed_model import (CommittedModelError, committed_model, pack_model, park_checkpoint,
                                                   restore_model, unpark_checkpoint)
from tskd_nnunet.benchmark.config import Budget
from tskd_nnunet.benchmark.layout import CHECKPOINTS
from tskd_nnunet.benchmark.provenance import sha256_file

if TYPE_CHECKING:
    from tskd_nnunet.benchmark.runner import BenchmarkRunner

# trains a run's model (actions.train_model); passed in so that this module does not import the actions
TrainFn = Callable[["BenchmarkRunner", Budget, str, int, Dict[str, Any], str], None]


def dependency_ready(r: "BenchmarkRunner", budget: Budget, dep: str, fold: int, for_method: str,
                     train_model: TrainFn) -> None:
    """The model of a needed run (the teacher) must exist in this work directory. A dependency done here has it;
    one whose results are committed (another machine) gets its model restored from the committed weights, or
    trained again with the same settings (its committed results stay as they are); anything else fails."""
    ckpt = r.checkpoint(budget, dep, fold)
    committed = r.store is not None and r.store.is_done(dep, budget, fold)
    if os.path.isfile(ckpt) and (committed or r.run_complete(budget, dep, fold)):
        if committed:
            backfill_model(r, budget, dep, fold)
        return
    if not committed:
        st = r.run_state(budget, dep, fold)
        raise StepFailed(f"needs {dep} (budget {budget}, fold {fold}), which is "
                         f"{st.get('status', 'not run')}: {st.get('error', '')}".rstrip(": "))
    settings = r.committed_settings(budget, dep, fold)  # same trainer, plans, schedule, or stop
    if committed_model(r.store.run_dir(dep, budget, fold), settings) is not None:
        return _restore(r, budget, dep, fold, settings, for_method)
    say(f"{dep} | budget {budget} | fold {fold}: results committed, but {for_method} needs its model, which is not "
        f"in this work directory: training it again (same trainer, plans, schedule; its committed results are kept)")
    dstate: Dict[str, Any] = {"method": dep, "purpose": f"model for {for_method}", "started": now(), "timings": {}}
    try:
        train_model(r, budget, dep, fold, dstate, os.path.join(r.run_dir(budget, dep, fold), "logs"))
    except StepFailed as e:
        raise StepFailed(f"needs {dep} (budget {budget}, fold {fold}), committed but without its model "
                         f"here; training it again failed: {e}", e.tail) from None
    atomic_write_json(os.path.join(r.run_dir(budget, dep, fold), "retrained.json"),
                      {**dstate, "status": "done", "finished": now(), "checkpoint_sha256": sha256_file(ckpt)})


def _restore(r: "BenchmarkRunner", budget: Budget, dep: str, fold: int, settings: Dict[str, Any],
             for_method: str) -> None:
    """Rebuild a needed run's model folder from its committed weights, if it was made on this work directory's
    labeled cases and plans; StepFailed (one line with the fix) otherwise."""
    run_dir = r.store.run_dir(dep, budget, fold)
    splits, _ = r.splits()[budget]
    differ = [what for what, here, there in (
        ("labeled cases", sorted(splits[fold]["train"]), settings.get("labeled_cases")),
        ("plans", r.plans_configuration(r.plans_root(budget, dep, fold)), settings.get("plans_configuration")))
        if here != there]
    if differ:
        raise StepFailed(f"the committed {dep} model in {run_dir} was trained on other {' and '.join(differ)} than "
                         f"this work directory's. Fix: delete {run_dir} to retrain it here, or run the config "
                         f"(seed, budget, plans) it was made with")
    try:
        sha = restore_model(run_dir, settings, r.model_dir(budget, dep), fold)
    except CommittedModelError as e:
        raise StepFailed(str(e)) from None
    say(f"{dep} | budget {budget} | fold {fold}: model restored for {for_method} from the committed weights "
        f"{os.path.join(run_dir, settings['model']['file'])} (sha256 {sha[:12]}..., same trainer, plans, schedule "
        f"and labeled cases); not retrained")
    atomic_write_json(os.path.join(r.run_dir(budget, dep, fold), "restored.json"),
                      {"from": run_dir, "model_sha256": sha, "purpose": f"model for {for_method}", "restored": now()})


def backfill_model(r: "BenchmarkRunner", budget: Budget, dep: str, fold: int) -> None:
    """A run committed before its weights travelled with it (committed_model) gets them now, from this work
    directory's checkpoint, if that is the very checkpoint its results were made with."""
    run_dir = r.store.run_dir(dep, budget, fold)
    settings = r.store.settings(dep, budget, fold) or {}
    ckpt = r.checkpoint(budget, dep, fold)
    if (not r.needed_by_others(dep) or "model" in settings or not os.path.isfile(ckpt)
            or settings.get("checkpoint_sha256") != sha256_file(ckpt)):
        return
    tmp = os.path.join(run_dir, f".model.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        rec = pack_model(r.model_dir(budget, dep), fold, tmp)
        if rec.get("committed"):
            os.replace(os.path.join(tmp, "model"), os.path.join(run_dir, "model"))
        atomic_write_json(os.path.join(run_dir, "settings.json"), {**settings, "model": rec})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"{dep} | budget {budget} | fold {fold}: its committed results now carry its weights "
        f"({rec.get('bytes', 0) / 2**20:.1f} MB, {'committed' if rec.get('committed') else rec.get('why')})")


def _partial_record(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> Dict[str, Any]:
    """What a parked checkpoint must agree on with the run that continues it."""
    splits, _ = r.splits()[budget]
    return {**r.identity(budget, method), "labeled_cases": sorted(splits[fold]["train"]), "dataset": r.dataset_name}


def park(r: "BenchmarkRunner", only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None) -> int:
    """Copy the latest checkpoint of every unfinished training into the committed folder's partial/, so a later
    session on a new machine continues it (nnU-Net's --c) instead of starting over. Returns how many."""
    if r.store is None:
        raise BenchmarkError("--park needs a committed folder (the config's \"committed\" or --committed)")
    n = 0
    for b, f, m in r.matrix(only, budgets):
        latest = os.path.join(os.path.dirname(r.checkpoint(b, m, f)), "checkpoint_latest.pth")
        if r.store.is_done(m, b, f) or os.path.isfile(r.checkpoint(b, m, f)) or not os.path.isfile(latest):
            continue
        rec = park_checkpoint(latest, r.partial_dir(b, m, f), _partial_record(r, b, m, f))
        say(f"{m} | budget {b} | fold {f}: parked epoch {rec['epoch']} ({rec['bytes'] / 2**20:.0f} MB) in "
            f"{r.partial_dir(b, m, f)}; commit it, and a later run continues from there")
        n += 1
    return n


def unpark(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> None:
    """Continue a parked run: its checkpoint goes back into the (empty) fold folder before nnUNetv2_train."""
    fold_dir = os.path.dirname(r.checkpoint(budget, method, fold))
    if r.store is None or any(os.path.isfile(os.path.join(fold_dir, c)) for c in CHECKPOINTS):
        return
    dest = r.partial_dir(budget, method, fold)
    rec = read_json(os.path.join(dest, "partial.json"), None)
    if not rec:
        return
    differ = [k for k, v in _partial_record(r, budget, method, fold).items() if rec.get(k) != v]
    if differ:
        raise StepFailed(f"the parked checkpoint in {dest} was made with other {', '.join(differ)}. Fix: delete "
                         f"{dest} to train this run from the start")
    try:
        unpark_checkpoint(dest, fold_dir)
    except CommittedModelError as e:
        raise StepFailed(str(e)) from None
    say(f"{method} | budget {budget} | fold {fold}: continuing the parked run from epoch {rec['epoch']} "
        f"({dest}, sha256 {rec['sha256'][:12]}...)")
