"""The data every run reads: the converted dataset, nnU-Net's plans, the label-budget splits, and one preprocessed
root per budget and data scope (links to the shared preprocessed data + that budget's splits and pool), plus
plain_labeled_only's own dataset (documentation/benchmarking.md, "Label budgets")."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from tskd_nnunet.atomic_io import atomic_write_json, read_json
from tskd_nnunet.benchmark.commands import (BenchmarkError, StepFailed, fill_cmd, link, now, run_logged, say,
                                            share_folder)
from tskd_nnunet.benchmark.config import DATA_SCOPES, Budget
from tskd_nnunet.benchmark.layout import STATE
from tskd_nnunet.data.preprocessed_files import EXTENSION_DIR, POOL_FILE, TARGETS_DIR
from tskd_nnunet.data.splits import SPLITS_FILE, write_splits

if TYPE_CHECKING:
    from tskd_nnunet.benchmark.runner import BenchmarkRunner

# files of a budget root that are the budget's own; everything else links to the shared preprocessed data
# (the teacher-target cache links to one folder of the work dir: WorkdirLayout.targets_root)
OWN_ENTRIES = {SPLITS_FILE, POOL_FILE, EXTENSION_DIR, TARGETS_DIR}


def ensure_converted(r: "BenchmarkRunner") -> None:
    """Convert (if configured and not done); BenchmarkError when the raw dataset or its test set is missing."""
    if r.cfg.convert is not None and not os.path.isdir(r.raw_dataset):
        cmd = fill_cmd(r.cfg.convert, r.fields(), f"{r.cfg.path} dataset.convert")
        say(f"convert dataset {r.cfg.dataset_id}")
        try:
            run_logged(cmd, r.base_env(), os.path.join(r.workdir, "logs", "convert.log"), "convert")
        except StepFailed as e:
            raise BenchmarkError(str(e)) from None
        r.dataset_name = r.find_dataset_name()
        if not os.path.isdir(r.raw_dataset):
            raise BenchmarkError(f"the convert command finished but {r.raw_root} holds no "
                                 f"Dataset{r.cfg.dataset_id:03d}_* folder. Fix: make it write dataset id "
                                 f"{r.cfg.dataset_id} into $nnUNet_raw")
        atomic_write_json(r.marker("convert"), {"status": "done", "finished": now(), "command": cmd})
    if not os.path.isdir(r.raw_dataset):
        raise BenchmarkError(f"no Dataset{r.cfg.dataset_id:03d}_* folder in {r.raw_root}. Fix: convert the "
                             f"dataset first or give \"dataset\": {{\"convert\": [...]}} in {r.cfg.path}")
    for sub in ("imagesTs", "labelsTs"):
        if not os.path.isdir(os.path.join(r.raw_dataset, sub)):
            raise BenchmarkError(f"{os.path.join(r.raw_dataset, sub)} is missing: the benchmark's test set is "
                                 f"the raw dataset's imagesTs/labelsTs. Fix: convert with a test split")


def ensure_planned(r: "BenchmarkRunner") -> None:
    """Plan and preprocess the converted dataset unless its plans and data exist."""
    if not r.planned():
        say(f"plan and preprocess dataset {r.cfg.dataset_id} ({r.cfg.configuration})")
        cmds = run_plan(r, r.raw_root, r.base_pp_root, r.fields(),
                        os.path.join(r.workdir, "logs", "plan_and_preprocess.log"))
        atomic_write_json(r.marker("plan_and_preprocess"), {"status": "done", "finished": now(), "commands": cmds})


def run_plan(r: "BenchmarkRunner", raw_root: str, pp_root: str, fields: Dict[str, Any], log: str) -> List[List[str]]:
    """Run the plan commands with ``nnUNet_raw``/``nnUNet_preprocessed`` = the given roots; BenchmarkError on
    failure (every run needs the plans)."""
    cmds = r.plan_commands(fields)
    env = r.base_env()
    env["nnUNet_raw"], env["nnUNet_preprocessed"] = raw_root, pp_root
    try:
        for i, cmd in enumerate(cmds):
            run_logged(cmd, env, log, f"plan command {i + 1}")
    except StepFailed as e:
        raise BenchmarkError(str(e)) from None
    if not r.planned(pp_root):
        raise BenchmarkError(f"the plan commands finished but configuration {r.cfg.configuration} is not in "
                             f"{r.plans_file(pp_root)} (or its preprocessed data is missing). Fix: make "
                             f"\"plan_commands\" of {r.cfg.path} plan and preprocess it")
    return cmds


def prepare_labeled_only(r: "BenchmarkRunner", budget: Budget, fold: int) -> str:
    """A dataset of the budget's labeled images alone (links to the raw files), planned by the plan commands
    with nnU-Net's own batch size (``{plan_batch}`` = auto): what a user with only these labels has. Its
    splits train on the labeled cases (validation = the same cases; test = imagesTs as for every method).
    Returns its preprocessed root."""
    labeled = sorted(r.splits()[budget][0][fold]["train"])
    base = r.labeled_only_base(budget, fold)
    raw_root, pp_root = os.path.join(base, "nnUNet_raw"), os.path.join(base, "nnUNet_preprocessed")
    marker = os.path.join(base, STATE)
    st = read_json(marker, {}) or {}
    if st.get("status") == "done" and st.get("labeled") == labeled and r.planned(pp_root):
        return pp_root
    say(f"labeled-only dataset: budget {budget}, fold {fold} ({len(labeled)} labeled cases), planned alone")
    for d in (raw_root, pp_root):
        shutil.rmtree(d, ignore_errors=True)
    src, dst = r.raw_dataset, os.path.join(raw_root, r.dataset_name)
    dj = read_json(os.path.join(src, "dataset.json"))
    fe = dj["file_ending"]
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(dst, sub))
    for case in labeled:
        for k in range(len(dj["channel_names"])):
            name = f"{case}_{k:04d}{fe}"
            os.symlink(os.path.join(src, "imagesTr", name), os.path.join(dst, "imagesTr", name))
        os.symlink(os.path.join(src, "labelsTr", case + fe), os.path.join(dst, "labelsTr", case + fe))
    atomic_write_json(os.path.join(dst, "dataset.json"), {**dj, "numTraining": len(labeled)})
    pmap = read_json(os.path.join(src, "case_patient_map.json"), None)
    if isinstance(pmap, dict):
        atomic_write_json(os.path.join(dst, "case_patient_map.json"), {c: pmap[c] for c in labeled if c in pmap})
    cmds = run_plan(r, raw_root, pp_root, r.fields(fold, budget, plan_batch="auto"), os.path.join(base, "plan.log"))
    ds_pp = os.path.join(pp_root, r.dataset_name)
    write_splits(ds_pp, [{"train": labeled, "val": labeled} for _ in range(r.cfg.num_folds)])
    atomic_write_json(os.path.join(ds_pp, POOL_FILE), [[] for _ in range(r.cfg.num_folds)])
    atomic_write_json(marker, {"status": "done", "finished": now(), "labeled": labeled, "commands": cmds})
    return pp_root


def _write_root(r: "BenchmarkRunner", root: str, splits: List[dict], pools: List[List[str]],
                extension: Optional[str]) -> None:
    """A preprocessed root: links to the shared preprocessed dataset + its own splits and pool."""
    src = os.path.join(r.base_pp_root, r.dataset_name)
    dst = os.path.join(root, r.dataset_name)
    os.makedirs(dst, exist_ok=True)
    for entry in os.listdir(src):
        if entry not in OWN_ENTRIES and ".tmp" not in entry:
            link(os.path.join(src, entry), os.path.join(dst, entry))
    share_folder(os.path.join(dst, TARGETS_DIR), r.targets_root)
    write_splits(dst, splits)
    if read_json(os.path.join(dst, POOL_FILE), None) != pools:
        atomic_write_json(os.path.join(dst, POOL_FILE), pools)
    if extension is not None:
        os.makedirs(extension, exist_ok=True)
        link(extension, os.path.join(dst, EXTENSION_DIR))


def prepare_budget_root(r: "BenchmarkRunner", budget: Budget, scope: str) -> str:
    splits, pools = r.splits()[budget]
    flags = DATA_SCOPES[scope]
    root = r.budget_root(budget, scope)
    ext = os.path.join(r.shared_root("synthetic"), r.dataset_name, EXTENSION_DIR) if flags["synthetic"] else None
    _write_root(r, root, splits, pools if flags["pool"] else [[] for _ in pools], ext)
    return root


def prepare_shared_root(r: "BenchmarkRunner", kind: str) -> str:
    """Roots of the per-fold stages: the first budget's splits, its full pool (all non-validation
    training cases are train or pool at every budget), never an extension unless it is the target."""
    splits, pools = r.splits()[r.cfg.budgets[0]]  # numeric: "all" sorts last
    root = r.shared_root(kind)
    _write_root(r, root, splits, pools, None)
    return root
