"""What each job of the benchmark does, one function per step (step.py calls them; the Snakefile runs step.py):
a per-fold stage, a run's training, prediction, evaluation, measurement and commit. Each run keeps its
``state.json`` (written atomically) with its status, attempts, per-step seconds and, for failures, the error."""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List

from tskd_nnunet.atomic_io import atomic_write_csv, atomic_write_json, read_json
from tskd_nnunet.benchmark import data_roots, model_transfer
from tskd_nnunet.benchmark.commands import BIN, StepFailed, fill_cmd, link, now, run_logged, say
from tskd_nnunet.benchmark.committed import overlay_arrays
from tskd_nnunet.benchmark.config import DATA_SCOPES, Budget
from tskd_nnunet.benchmark.layout import STATE
from tskd_nnunet.benchmark.provenance import run_settings

if TYPE_CHECKING:
    from tskd_nnunet.benchmark.runner import BenchmarkRunner


def save_state(r: "BenchmarkRunner", budget: Budget, method: str, fold: int, state: Dict[str, Any]) -> None:
    atomic_write_json(os.path.join(r.run_dir(budget, method, fold), STATE), state)


# ---------------------------------------------------------------- per-fold stages (MAE, MoCo, diffusion, sampling)
def run_stage(r: "BenchmarkRunner", stage: str, fold: int) -> None:
    """Run a per-fold stage unless its state is done and its output exists; StepFailed with the reason."""
    if not r.stage_needed(stage):
        path = r.stage_output(stage, fold)
        if not os.path.isfile(path):
            raise StepFailed(f"foundation weights {path} not found. Fix: correct \"foundation\": {{\"weights\"}} "
                             f"in {r.cfg.path}")
        return
    spec = r.cfg.stage_defs[stage]
    sdir, output = r.stage_dir(stage, fold), r.stage_output(stage, fold)
    state_path = os.path.join(sdir, STATE)
    state = read_json(state_path, {}) or {}
    if state.get("status") == "done" and os.path.exists(output):
        return
    root = data_roots.prepare_shared_root(r, spec.get("root", "base"))
    cmds = [fill_cmd(c, r.fields(fold, stage_dir=sdir, output=output, preprocessed=root), f"stage {stage}")
            for c in spec.get("commands", [])]
    env = r.train_env(root, r.shared_results, {})
    env.pop("TSKD_SCHEDULE", None)  # the schedule is for nnU-Net trainings only
    state = {"stage": stage, "fold": fold, "status": "running", "started": now(),
             "attempts": int(state.get("attempts", 0)) + 1, "commands": cmds}
    atomic_write_json(state_path, state)
    say(f"stage {stage} fold {fold}")
    t0 = time.time()
    try:
        for i, cmd in enumerate(cmds):
            run_logged(cmd, env, os.path.join(sdir, "stage.log"), f"stage {stage} command {i + 1}")
        if not os.path.exists(output):
            raise StepFailed(f"stage {stage} finished but its output {output} does not exist. Fix: make the "
                             f"command write it or correct \"output\" of stage {stage}")
    except StepFailed as e:
        atomic_write_json(state_path, {**state, "status": "failed", "finished": now(), "error": str(e),
                                       "error_tail": e.tail})
        raise StepFailed(f"stage {stage} failed: {e}", e.tail) from None
    atomic_write_json(state_path, {**state, "status": "done", "finished": now(), "seconds": time.time() - t0,
                                   "output": output})


# ---------------------------------------------------------------- a run: train, predict, evaluate, measure, commit
def _link_dependencies(r: "BenchmarkRunner", budget: Budget, method: str) -> None:
    """Make each needed method's model folder visible in this method's nnUNet_results (e.g. the teacher for
    DistillTrainer, found by nnU-Net's folder convention), so every method keeps its own results root."""
    own = os.path.basename(r.model_dir(budget, method))
    ds = os.path.join(r.method_results(budget, method), r.dataset_name)
    os.makedirs(ds, exist_ok=True)
    for dep in r.cfg.method_defs[method].get("needs", []):
        src = r.model_dir(budget, dep)
        if os.path.basename(src) == own:
            raise StepFailed(f"method {method} and the method it needs, {dep}, use the same trainer "
                             f"{r.cfg.method_defs[method]['trainer']}; give one of them another trainer")
        link(src, os.path.join(ds, os.path.basename(src)))


def train_model(r: "BenchmarkRunner", budget: Budget, method: str, fold: int, state: Dict[str, Any],
                logs: str) -> None:
    """Stages, needed models, data root, the method's commands, then nnUNetv2_train unless checkpoint_final exists
    (``--c`` when a checkpoint does: nnU-Net continues a killed training)."""
    spec = r.cfg.method_defs[method]
    for st in spec.get("stages", []):
        run_stage(r, st, fold)
    for dep in spec.get("needs", []):
        model_transfer.dependency_ready(r, budget, dep, fold, method, train_model)
    if spec.get("plan_on") == "labeled":
        root = data_roots.prepare_labeled_only(r, budget, fold)
    else:
        root = data_roots.prepare_budget_root(r, budget, spec.get("data", "labeled"))
    _link_dependencies(r, budget, method)
    env = r.method_env(budget, method, fold)
    t0 = time.time()
    for i, c in enumerate(spec.get("commands", [])):
        run_logged(fill_cmd(c, r.fields(fold, budget), f"method {method}"), env, os.path.join(logs, "commands.log"),
                   f"{method} command {i + 1}")
    ckpt = r.checkpoint(budget, method, fold)
    if not os.path.isfile(ckpt):
        model_transfer.unpark(r, budget, method, fold)
        run_logged(r.train_command(budget, method, fold), env, os.path.join(logs, "train.log"), "nnUNetv2_train")
        if not os.path.isfile(ckpt):
            raise StepFailed(f"nnUNetv2_train finished without {ckpt} (log {os.path.join(logs, 'train.log')})")
    state["timings"]["train_s"] = round(time.time() - t0, 1)
    state["preprocessed_root"] = root


def train(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> None:
    """A run's training step; a committed run only makes its model available to the runs that need it."""
    if r.committed_settings(budget, method, fold) is not None:
        needers = [m for m in r.cfg.methods_at(budget, profile=r.profile_name)
                   if method in r.cfg.method_defs[m].get("needs", [])]
        model_transfer.dependency_ready(r, budget, method, fold, ", ".join(needers) or "the runs that need it",
                                        train_model)
        return
    spec, old = r.cfg.method_defs[method], r.run_state(budget, method, fold)
    splits, pools = r.splits()[budget]
    scope = spec.get("data", "labeled")
    state = {"method": method, "trainer": r.trainer(method), "budget": budget, "fold": fold, "status": "running",
             "attempts": int(old.get("attempts", 0)) + 1, "started": now(), "profile": r.profile_name,
             "device": r.device, "schedule": r.schedule(method), "data": scope,
             "n_labeled": len(splits[fold]["train"]), "n_val": len(splits[fold]["val"]),
             "n_pool": len(pools[fold]) if DATA_SCOPES[scope]["pool"] else 0, "timings": {}}
    save_state(r, budget, method, fold, state)
    say(f"{method} | budget {budget} | fold {fold}: {'resuming' if old else 'starting'} (attempt "
        f"{state['attempts']}, {state['n_labeled']} labeled cases)")
    train_model(r, budget, method, fold, state, os.path.join(r.run_dir(budget, method, fold), "logs"))
    save_state(r, budget, method, fold, state)


def predict(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> None:
    """nnUNetv2_predict on imagesTs into predictions.tmp, renamed to predictions/ once every test case is there."""
    out = os.path.join(r.run_dir(budget, method, fold), "predictions")
    if r.predictions_complete(out):
        return
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    n = str(r.params.get("predict_processes", 1))
    cmd = [os.path.join(BIN, "nnUNetv2_predict"), "-i", os.path.join(r.raw_dataset, "imagesTs"), "-o", tmp,
           "-d", str(r.cfg.dataset_id), "-c", r.cfg.configuration, "-p", r.cfg.plans, "-tr", r.trainer(method),
           "-f", str(fold), "-device", r.device, "-npp", n, "-nps", n, "--disable_progress_bar"]
    run_logged(cmd, r.method_env(budget, method, fold), os.path.join(r.run_dir(budget, method, fold), "logs",
                                                                     "predict.log"), "nnUNetv2_predict")
    if not r.predictions_complete(tmp):
        raise StepFailed(f"nnUNetv2_predict did not write every test case into {tmp}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def evaluate(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> None:
    """scores.csv: Dice/NSD/HD95 per test case and class (+ HC18 head circumference, + slab volumes, + patient)."""
    from tskd_nnunet.evaluation.clinical import evaluate_test_folder
    from tskd_nnunet.evaluation.evaluate import read_seg_2d_or_3d, reader_for

    rdir = r.run_dir(budget, method, fold)
    pred, labels = os.path.join(rdir, "predictions"), os.path.join(r.raw_dataset, "labelsTs")
    try:
        csv = os.path.abspath(fill_cmd([r.cfg.hc18_csv], r.fields(), r.cfg.path)[0]) if r.cfg.hc18_csv else None
        df = evaluate_test_folder(labels, pred, os.path.join(r.raw_dataset, "dataset.json"), r.cfg.tolerance_mm, csv)
        if r.cfg.slice_thickness_mm and "ref_voxels" in df and df["ref_volume_ml"].isna().all():
            # 2D slices of volumes: each slice is a slab of the slice thickness, so a patient's organ volume is the
            # sum over its slices (report.volume_errors)
            fe, rw = r.file_ending(), reader_for(r.file_ending())
            area = {}
            for case in df["case"].unique():
                seg, spacing = read_seg_2d_or_3d(rw, os.path.join(labels, case + fe))
                if seg.ndim != 2:
                    raise ValueError(f"slice_thickness_mm is for 2D cases; {case} is {seg.ndim}D")
                area[case] = float(spacing[0]) * float(spacing[1])
            ml = df["case"].map(area) * r.cfg.slice_thickness_mm / 1000.0
            df["ref_volume_ml"] = df["ref_voxels"] * ml
            df["pred_volume_ml"] = df["pred_voxels"] * ml
        pmap = read_json(os.path.join(r.raw_dataset, "case_patient_map.json"), None)
        if isinstance(pmap, dict):
            df["patient"] = df["case"].map(lambda c: pmap.get(c, c))
    except (OSError, ValueError, KeyError) as e:
        raise StepFailed(f"evaluation of {pred} failed: {type(e).__name__}: {e}") from None
    atomic_write_csv(df, os.path.join(rdir, "scores.csv"))


def measure(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> Dict[str, Any]:
    """Parameters and latency per case (tskd_nnunet.benchmark.measure, in its own process: it imports torch)."""
    out = os.path.join(r.run_dir(budget, method, fold), "measure.json")
    cmd = [sys.executable, "-m", "tskd_nnunet.benchmark.measure", r.model_dir(budget, method), str(fold),
           os.path.join(r.raw_dataset, "imagesTs"), "-o", out, "--file-ending", r.file_ending(),
           "-n", str(r.params.get("latency_cases", 3)), "-device", r.device]
    run_logged(cmd, r.method_env(budget, method, fold), os.path.join(r.run_dir(budget, method, fold), "logs",
                                                                     "measure.log"), "measure")
    m = read_json(out, None)
    if not m:
        raise StepFailed(f"measure wrote no {out}")
    return {k: m[k] for k in ("params", "params_checkpoint", "latency_ms", "latency_cases", "torch_threads") if k in m}


def commit(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> str:
    """The run is done: its state says so, and with a committed folder its per-case results, settings, overlays
    (and, for a teacher, its weights) go there atomically. Returns the committed folder ('' without one)."""
    state = {**r.run_state(budget, method, fold), "status": "done", "finished": now()}
    save_state(r, budget, method, fold, state)
    if r.store is None:
        return ""
    import pandas as pd

    from tskd_nnunet.benchmark.committed_model import pack_model
    from tskd_nnunet.benchmark.plots import _read, select_worst_median_best

    rdir = r.run_dir(budget, method, fold)
    cases = pd.read_csv(os.path.join(rdir, "scores.csv"))
    fe = r.file_ending()
    items: List[Any] = []
    for _, case in select_worst_median_best(cases.groupby("case")["dice"].mean()):
        if not any(c == case for c, *_ in items):
            items.append((case, _read(os.path.join(r.raw_dataset, "imagesTs", f"{case}_0000{fe}"), False),
                          _read(os.path.join(r.raw_dataset, "labelsTs", case + fe), True),
                          _read(os.path.join(rdir, "predictions", case + fe), True)))

    def model(folder: str) -> Dict[str, Any]:  # a teacher's weights travel with its results (committed_model)
        return {"model": pack_model(r.model_dir(budget, method), fold, folder)} if r.needed_by_others(method) else {}

    final = r.store.write_run(method, budget, fold, cases, run_settings(r, budget, method, fold, state),
                              overlay_arrays(items) if items else None, extra=model)
    shutil.rmtree(r.partial_dir(budget, method, fold), ignore_errors=True)  # a parked start, now finished
    r.store.write_matrix(r.matrix_record())
    return final
