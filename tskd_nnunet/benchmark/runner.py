"""``tskd_benchmark``: run a (method x label budget x fold) matrix through nnU-Net's commands and ours.

    tskd_benchmark CONFIG.json [--profile cpu|gpu] [--workdir DIR] [--only METHOD ...] [--dry-run]

Per run: ``nnUNetv2_train`` (``--c`` when a checkpoint exists) → ``nnUNetv2_predict`` on the raw
dataset's imagesTs → Dice/NSD/HD95 (+ HC18 head circumference) per test case → parameter count and
latency (tskd_nnunet.benchmark.measure) → ``report/`` via tskd_nnunet.benchmark.report.write_report.

Resumable: every run and shared stage has a ``state.json`` (written atomically); a run whose state
is done and whose checkpoint, predictions and scores exist is skipped; a killed run starts again and
nnU-Net continues from its latest checkpoint. Same labeled cases for every method: each budget gets its
own nnU-Net preprocessed root (symlinks to the shared preprocessed data + that budget's
``splits_final.json``), and the test set is imagesTs/labelsTs for all. Layout and decisions:
documentation/benchmarking.md.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tskd_nnunet.benchmark.config import (BASELINE_LABEL, DATA_SCOPES, BenchmarkConfig, BenchmarkConfigError,
                                          load_config)

BIN = os.path.dirname(sys.executable)
STATE = "state.json"
from tskd_nnunet.atomic_io import atomic_write_json, read_json  # noqa: E402
from tskd_nnunet.data.preprocessed_files import POOL_FILE  # noqa: E402
# the one HC18 case-id -> CSV-name mapper, shared with tskd_evaluate --hc18-csv
from tskd_nnunet.evaluation.clinical import hc18_case_to_filename  # noqa: E402,F401
SPLITS_FILE = "splits_final.json"
EXTENSION_DIR = "tskd_extension"
# files of a budget root that are the budget's own; everything else links to the shared preprocessed data
OWN_ENTRIES = {SPLITS_FILE, POOL_FILE, EXTENSION_DIR}
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
PROGRESS_KEYS = ("Epoch ", "Pseudo dice", "train_loss", "val_loss", "Mean Validation Dice", "Error", "error:",
                 "labeled cases")


class BenchmarkError(RuntimeError):
    """Stops the whole benchmark (bad config, data not found, workdir busy); one line with the fix."""


class StepFailed(RuntimeError):
    """One step of one run or stage failed; the run is recorded as failed and the matrix goes on."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


# ---------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fmt(template: str, fields: Dict[str, Any], where: str) -> str:
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        raise BenchmarkConfigError(f"{where}: cannot fill template {template!r} ({type(e).__name__}: {e}). Fix: use "
                                   f"the fields listed in tskd_nnunet/benchmark/config.py") from None


def _fmt_cmd(cmd: Sequence[str], fields: Dict[str, Any], where: str) -> List[str]:
    return [_fmt(str(c), fields, where) for c in cmd]


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _error_line(tail: str) -> str:
    """The most telling line of a failed command's output (the exception message, usually last)."""
    lines = tail.splitlines()
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|Traceback|No such file|not found)", ln) and not ln.startswith("  File "):
            return ln.strip()
    return lines[-1].strip() if lines else ""


def run_logged(cmd: List[str], env: Dict[str, str], log_path: str, step: str) -> None:
    """Run a command with its output in ``log_path`` (appended) and progress lines on the console."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print("   $ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {_now()} $ {' '.join(cmd)}\n")
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
        tail = _tail(log_path)
        raise StepFailed(f"{step} exited {rc}: {_error_line(tail)} (log {log_path})", tail)


def _link(src: str, dst: str) -> None:
    """Symlink ``dst`` -> ``src``, replacing a stale link."""
    if os.path.islink(dst):
        if os.readlink(dst) == src:
            return
        os.unlink(dst)
    elif os.path.exists(dst):
        raise BenchmarkError(f"{dst} exists and is not a link; delete it so the benchmark can link {src}")
    os.symlink(src, dst)


# ---------------------------------------------------------------------------------------------- runner
class BenchmarkRunner:
    """Plans and runs the matrix of one config in one work directory."""

    def __init__(self, cfg: BenchmarkConfig, profile: str, workdir: str, dry_run: bool = False,
                 skip_failed: bool = False):
        self.cfg = cfg
        self.profile_name = profile
        self.profile = cfg.profile(profile)
        self.workdir = os.path.abspath(workdir)
        self.dry_run = dry_run
        self.skip_failed = skip_failed
        self.device = str(self.profile.get("device", "cpu"))
        self.params = dict(self.profile.get("params", {}))
        if cfg.convert is not None:
            self.raw_root = os.path.join(self.workdir, "nnUNet_raw")
            self.base_pp_root = os.path.join(self.workdir, "nnUNet_preprocessed")
        else:
            self.raw_root = self._root_from(cfg.raw_root, "nnUNet_raw")
            self.base_pp_root = self._root_from(cfg.preprocessed_root, "nnUNet_preprocessed")
        self._stage_result: Dict[Tuple[str, int], Tuple[bool, str]] = {}
        self._splits: Optional[Dict[int, Tuple[List[dict], List[List[str]]]]] = None
        self.dataset_name = self._find_dataset_name()

    # ---------------------------------------------------------------- locations
    def _root_from(self, configured: Optional[str], var: str) -> str:
        value = configured or os.environ.get(var)
        if not value:
            raise BenchmarkError(f"{var} is not set and the config has \"convert\": null. Fix: export {var}=... "
                                 f"or give \"dataset\": {{\"{var.split('_')[1]}_root\": ...}} in {self.cfg.path}")
        return os.path.abspath(_fmt(value, {"config_dir": self.cfg.config_dir}, self.cfg.path))

    def _find_dataset_name(self) -> str:
        prefix = f"Dataset{self.cfg.dataset_id:03d}_"
        found = sorted(n for n in (os.listdir(self.raw_root) if os.path.isdir(self.raw_root) else [])
                       if n.startswith(prefix) and ".tmp-" not in n and ".old-" not in n)
        if len(found) > 1:
            raise BenchmarkError(f"several raw folders for dataset {self.cfg.dataset_id} in {self.raw_root}: "
                                 f"{found}; remove all but one")
        return found[0] if found else prefix + "<after conversion>"

    @property
    def raw_dataset(self) -> str:
        return os.path.join(self.raw_root, self.dataset_name)

    def budget_root(self, budget: int, scope: str) -> str:
        return os.path.join(self.workdir, "budgets", f"b{budget}", scope, "nnUNet_preprocessed")

    def shared_root(self, kind: str) -> str:
        return os.path.join(self.workdir, "shared", kind, "nnUNet_preprocessed")

    @property
    def shared_results(self) -> str:
        return os.path.join(self.workdir, "shared", "nnUNet_results")

    def method_results(self, budget: int, method: str) -> str:
        return os.path.join(self.workdir, "runs", f"b{budget}", method, "nnUNet_results")

    def run_dir(self, budget: int, method: str, fold: int) -> str:
        return os.path.join(self.workdir, "runs", f"b{budget}", method, f"fold_{fold}")

    def trainer(self, method: str) -> str:
        """The method's nnU-Net trainer class (a template: e.g. the profile's teacher_trainer)."""
        return _fmt(self.cfg.method_defs[method]["trainer"], self.fields(), f"method {method} trainer")

    def model_dir(self, budget: int, method: str) -> str:
        trainer = self.trainer(method)
        return os.path.join(self.method_results(budget, method), self.dataset_name,
                            f"{trainer}__{self.cfg.plans}__{self.cfg.configuration}")

    def stage_dir(self, stage: str, fold: int) -> str:
        return os.path.join(self.workdir, "stages", stage, f"fold_{fold}")

    # ---------------------------------------------------------------- environment and templates
    def base_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("TSKD_SCHEDULE", None)
        env.pop("nnUNet_n_proc_DA", None)
        env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
        env["nnUNet_raw"] = self.raw_root
        env["nnUNet_preprocessed"] = self.base_pp_root
        env["nnUNet_results"] = self.shared_results
        return env

    def train_env(self, preprocessed: str, results: str, extra: Dict[str, str]) -> Dict[str, str]:
        env = self.base_env()
        env.update({k: str(v) for k, v in self.profile.get("env", {}).items()})
        if self.profile.get("schedule"):
            env["TSKD_SCHEDULE"] = str(self.profile["schedule"])
        env["nnUNet_preprocessed"] = preprocessed
        env["nnUNet_results"] = results
        for k, v in extra.items():
            if v == "":
                env.pop(k, None)  # an empty template value means "leave unset"
            else:
                env[k] = v
        return env

    def fields(self, fold: Optional[int] = None, budget: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
        f: Dict[str, Any] = {
            "bin": BIN, "python": sys.executable, "dataset_id": self.cfg.dataset_id, "dataset_name": self.dataset_name,
            "configuration": self.cfg.configuration, "plans": self.cfg.plans, "device": self.device,
            "params": self.params, "foundation": self.cfg.foundation, "config_dir": self.cfg.config_dir,
            "workdir": self.workdir, "results": self.shared_results, "raw": self.raw_root,
            "fold": "" if fold is None else fold, "budget": "" if budget is None else budget}
        if fold is not None:
            f["stages"] = {s: self.stage_output(s, fold) for s in self.cfg.stage_defs}
        f.update(extra)
        return f

    def stage_output(self, stage: str, fold: int) -> str:
        if stage == "foundation" and self.cfg.foundation.get("weights"):
            return os.path.abspath(_fmt(str(self.cfg.foundation["weights"]), {"config_dir": self.cfg.config_dir},
                                        self.cfg.path))
        spec = self.cfg.stage_defs[stage]
        root = self.shared_root(spec.get("root", "base"))
        return _fmt(spec["output"], {**self.fields(), "fold": fold, "stage_dir": self.stage_dir(stage, fold),
                                     "preprocessed": root, "output": ""}, f"stage {stage}")

    # ---------------------------------------------------------------- dataset stages
    def _stage_marker(self, name: str) -> str:
        return os.path.join(self.workdir, "stages", f"{name}.json")

    def ensure_dataset(self) -> None:
        """Convert (if configured) and plan+preprocess (if the plans or data are missing)."""
        logs = os.path.join(self.workdir, "logs")
        if self.cfg.convert is not None and not os.path.isdir(self.raw_dataset):
            cmd = _fmt_cmd(self.cfg.convert, self.fields(), f"{self.cfg.path} dataset.convert")
            _say(f"convert dataset {self.cfg.dataset_id}")
            env = self.base_env()
            try:
                run_logged(cmd, env, os.path.join(logs, "convert.log"), "convert")
            except StepFailed as e:
                raise BenchmarkError(str(e)) from None
            self.dataset_name = self._find_dataset_name()
            if not os.path.isdir(self.raw_dataset):
                raise BenchmarkError(f"the convert command finished but {self.raw_root} holds no "
                                     f"Dataset{self.cfg.dataset_id:03d}_* folder. Fix: make it write dataset id "
                                     f"{self.cfg.dataset_id} into $nnUNet_raw")
            atomic_write_json(self._stage_marker("convert"), {"status": "done", "finished": _now(), "command": cmd})
        if not os.path.isdir(self.raw_dataset):
            raise BenchmarkError(f"no Dataset{self.cfg.dataset_id:03d}_* folder in {self.raw_root}. Fix: convert the "
                                 f"dataset first or give \"dataset\": {{\"convert\": [...]}} in {self.cfg.path}")
        for sub in ("imagesTs", "labelsTs"):
            if not os.path.isdir(os.path.join(self.raw_dataset, sub)):
                raise BenchmarkError(f"{os.path.join(self.raw_dataset, sub)} is missing: the benchmark's test set is "
                                     f"the raw dataset's imagesTs/labelsTs. Fix: convert with a test split")
        if not self._planned():
            cmd = [os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(self.cfg.dataset_id),
                   "-c", self.cfg.configuration, "-np", str(self.params.get("preprocess_processes", 1)),
                   "--verify_dataset_integrity"]
            if self.cfg.plans != "nnUNetPlans":
                raise BenchmarkError(f"plans {self.cfg.plans} not found in {self.base_pp_root}/{self.dataset_name}. "
                                     f"Fix: plan them yourself (nnUNetv2_plan_experiment ...) or use nnUNetPlans")
            _say("nnUNetv2_plan_and_preprocess")
            try:
                run_logged(cmd, self.base_env(), os.path.join(logs, "plan_and_preprocess.log"), "plan_and_preprocess")
            except StepFailed as e:
                raise BenchmarkError(str(e)) from None
            if not self._planned():
                raise BenchmarkError(f"nnUNetv2_plan_and_preprocess finished but configuration "
                                     f"{self.cfg.configuration} is not in {self._plans_file()}")
            atomic_write_json(self._stage_marker("plan_and_preprocess"), {"status": "done", "finished": _now(),
                                                                          "command": cmd})

    def _plans_file(self) -> str:
        return os.path.join(self.base_pp_root, self.dataset_name, f"{self.cfg.plans}.json")

    def _planned(self) -> bool:
        plans = read_json(self._plans_file(), None)
        if not plans or self.cfg.configuration not in plans.get("configurations", {}):
            return False
        conf = plans["configurations"][self.cfg.configuration]
        ident = conf.get("data_identifier") or f"{self.cfg.plans}_{self.cfg.configuration}"
        folder = os.path.join(self.base_pp_root, self.dataset_name, ident)
        return os.path.isdir(folder) and len(os.listdir(folder)) > 0

    # ---------------------------------------------------------------- label budgets
    def splits(self) -> Dict[int, Tuple[List[dict], List[List[str]]]]:
        """Per budget: (splits per fold, unlabeled pool per fold), validated against each other."""
        if self._splits is None:
            from dataset_conversion.common import ConversionError
            from dataset_conversion.label_budget import make_label_budget_splits, read_training_cases
            from pathlib import Path
            try:
                cases, patient_of = read_training_cases(Path(self.raw_dataset))
                out = {b: make_label_budget_splits(cases, patient_of, b, self.cfg.num_folds, self.cfg.seed)
                       for b in self.cfg.budgets}
            except ConversionError as e:
                raise BenchmarkError(f"label budget: {e}") from None
            first = out[self.cfg.budgets[0]][0]
            for b, (sp, _) in out.items():  # the same validation cases at every budget (one seed, one partition)
                for k in range(self.cfg.num_folds):
                    if sorted(sp[k]["val"]) != sorted(first[k]["val"]):
                        raise BenchmarkError(f"budget {b} fold {k} validates on other cases than budget "
                                             f"{self.cfg.budgets[0]}; this should not happen, report it")
            self._splits = out
        return self._splits

    def _write_root(self, root: str, splits: List[dict], pools: List[List[str]], extension: Optional[str]) -> None:
        """A preprocessed root: links to the shared preprocessed dataset + its own splits and pool."""
        src = os.path.join(self.base_pp_root, self.dataset_name)
        dst = os.path.join(root, self.dataset_name)
        os.makedirs(dst, exist_ok=True)
        for entry in os.listdir(src):
            if entry not in OWN_ENTRIES and ".tmp" not in entry:
                _link(os.path.join(src, entry), os.path.join(dst, entry))
        if read_json(os.path.join(dst, SPLITS_FILE), None) != splits:
            atomic_write_json(os.path.join(dst, SPLITS_FILE), splits)
        if read_json(os.path.join(dst, POOL_FILE), None) != pools:
            atomic_write_json(os.path.join(dst, POOL_FILE), pools)
        if extension is not None:
            os.makedirs(extension, exist_ok=True)
            _link(extension, os.path.join(dst, EXTENSION_DIR))

    def prepare_budget_root(self, budget: int, scope: str) -> str:
        splits, pools = self.splits()[budget]
        flags = DATA_SCOPES[scope]
        root = self.budget_root(budget, scope)
        ext = os.path.join(self.shared_root("synthetic"), self.dataset_name, EXTENSION_DIR) if flags["synthetic"] else None
        self._write_root(root, splits, pools if flags["pool"] else [[] for _ in pools], ext)
        return root

    def prepare_shared_root(self, kind: str) -> str:
        """Roots of the per-fold stages: the first budget's splits, its full pool (all non-validation
        training cases are train or pool at every budget), never an extension unless it is the target."""
        splits, pools = self.splits()[self.cfg.budgets[0]]
        root = self.shared_root(kind)
        self._write_root(root, splits, pools, None)
        return root

    # ---------------------------------------------------------------- stages
    def stage_needed(self, stage: str) -> bool:
        return not (stage == "foundation" and self.cfg.foundation.get("weights"))

    def ensure_stage(self, stage: str, fold: int) -> None:
        """Run a per-fold stage unless done; raises StepFailed (remembered for this invocation)."""
        key = (stage, fold)
        if key in self._stage_result:
            ok, msg = self._stage_result[key]
            if not ok:
                raise StepFailed(msg)
            return
        try:
            self._run_stage(stage, fold)
            self._stage_result[key] = (True, "")
        except StepFailed as e:
            self._stage_result[key] = (False, str(e))
            raise

    def _run_stage(self, stage: str, fold: int) -> None:
        if not self.stage_needed(stage):
            path = self.stage_output(stage, fold)
            if not os.path.isfile(path):
                raise StepFailed(f"foundation weights {path} not found. Fix: correct \"foundation\": {{\"weights\"}} "
                                 f"in {self.cfg.path}")
            return
        spec = self.cfg.stage_defs[stage]
        for dep in spec.get("stages", []):
            self.ensure_stage(dep, fold)
        sdir = self.stage_dir(stage, fold)
        state_path = os.path.join(sdir, STATE)
        output = self.stage_output(stage, fold)
        state = read_json(state_path, {}) or {}
        if state.get("status") == "done" and os.path.exists(output):
            return
        root = self.prepare_shared_root(spec.get("root", "base"))
        fields = self.fields(fold, stage_dir=sdir, output=output, preprocessed=root)
        cmds = [_fmt_cmd(c, fields, f"stage {stage}") for c in spec.get("commands", [])]
        env = self.train_env(root, self.shared_results, {})
        env.pop("TSKD_SCHEDULE", None)  # the schedule is for nnU-Net trainings only
        state = {"stage": stage, "fold": fold, "status": "running", "started": _now(),
                 "attempts": int(state.get("attempts", 0)) + 1, "commands": cmds}
        atomic_write_json(state_path, state)
        _say(f"stage {stage} fold {fold}")
        t0 = time.time()
        try:
            for i, cmd in enumerate(cmds):
                run_logged(cmd, env, os.path.join(sdir, "stage.log"), f"stage {stage} command {i + 1}")
            if not os.path.exists(output):
                raise StepFailed(f"stage {stage} finished but its output {output} does not exist. Fix: make the "
                                 f"command write it or correct \"output\" of stage {stage}")
        except StepFailed as e:
            atomic_write_json(state_path, {**state, "status": "failed", "finished": _now(), "error": str(e),
                                           "error_tail": e.tail})
            raise StepFailed(f"stage {stage} failed: {e}", e.tail) from None
        atomic_write_json(state_path, {**state, "status": "done", "finished": _now(), "seconds": time.time() - t0,
                                       "output": output})

    # ---------------------------------------------------------------- runs
    def run_complete(self, budget: int, method: str, fold: int) -> bool:
        rdir = self.run_dir(budget, method, fold)
        state = read_json(os.path.join(rdir, STATE), {}) or {}
        return (state.get("status") == "done"
                and os.path.isfile(os.path.join(self.model_dir(budget, method), f"fold_{fold}", "checkpoint_final.pth"))
                and self._predictions_complete(os.path.join(rdir, "predictions"))
                and os.path.isfile(os.path.join(rdir, "scores.csv")))

    def test_cases(self) -> List[str]:
        fe = self.file_ending()
        return sorted(f[: -len(fe)] for f in os.listdir(os.path.join(self.raw_dataset, "labelsTs")) if f.endswith(fe))

    def file_ending(self) -> str:
        dj = read_json(os.path.join(self.raw_dataset, "dataset.json"), None)
        if not dj or "file_ending" not in dj:
            raise BenchmarkError(f"{self.raw_dataset}/dataset.json is missing or has no file_ending")
        return dj["file_ending"]

    def _predictions_complete(self, folder: str) -> bool:
        if not os.path.isdir(folder):
            return False
        fe = self.file_ending()
        have = set(os.listdir(folder))
        return all(c + fe in have for c in self.test_cases())

    def train_command(self, budget: int, method: str, fold: int) -> List[str]:
        spec = self.cfg.method_defs[method]
        fold_dir = os.path.join(self.model_dir(budget, method), f"fold_{fold}")
        resume = any(os.path.isfile(os.path.join(fold_dir, c)) for c in CHECKPOINTS)
        cmd = [os.path.join(BIN, "nnUNetv2_train"), str(self.cfg.dataset_id), self.cfg.configuration, str(fold),
               "-tr", self.trainer(method), "-p", self.cfg.plans, "-device", self.device]
        extra = _fmt_cmd(spec.get("train_args", []), self.fields(fold, budget), f"method {method} train_args")
        if resume:
            # nnU-Net refuses --c together with -pretrained_weights: the checkpoint already holds them
            cleaned, skip = [], False
            for a in extra:
                if skip:
                    skip = False
                    continue
                if a == "-pretrained_weights":
                    skip = True
                    continue
                cleaned.append(a)
            extra = cleaned + ["--c"]
        return cmd + extra

    def run_one(self, budget: int, method: str, fold: int) -> str:
        """Run (or skip, or resume) one run; returns its final status."""
        rdir = self.run_dir(budget, method, fold)
        state_path = os.path.join(rdir, STATE)
        old = read_json(state_path, {}) or {}
        tag = f"{method} | budget {budget} | fold {fold}"
        if self.run_complete(budget, method, fold):
            _say(f"{tag}: done, skipped")
            return "done"
        if old.get("status") == "failed" and self.skip_failed:
            _say(f"{tag}: failed before, skipped (--skip-failed)")
            return "failed"
        spec = self.cfg.method_defs[method]
        splits, _ = self.splits()[budget]
        state: Dict[str, Any] = {
            "method": method, "trainer": self.trainer(method), "budget": budget, "fold": fold, "status": "running",
            "attempts": int(old.get("attempts", 0)) + 1, "started": _now(), "profile": self.profile_name,
            "device": self.device, "schedule": self.profile.get("schedule"), "data": spec.get("data", "labeled"),
            "n_labeled": len(splits[fold]["train"]), "n_val": len(splits[fold]["val"]), "timings": {}}
        atomic_write_json(state_path, state)
        _say(f"{tag}: {'resuming' if old else 'starting'} (attempt {state['attempts']}, "
             f"{state['n_labeled']} labeled cases)")
        logs = os.path.join(rdir, "logs")
        try:
            for st in spec.get("stages", []):
                self.ensure_stage(st, fold)
            for dep in spec.get("needs", []):
                if not self.run_complete(budget, dep, fold):
                    dep_state = read_json(os.path.join(self.run_dir(budget, dep, fold), STATE), {}) or {}
                    raise StepFailed(f"needs {dep} (budget {budget}, fold {fold}), which is "
                                     f"{dep_state.get('status', 'not run')}: {dep_state.get('error', '')}".rstrip(": "))
            root = self.prepare_budget_root(budget, spec.get("data", "labeled"))
            results = self.method_results(budget, method)
            self._link_dependencies(budget, method)
            env = self.train_env(root, results, {k: _fmt(str(v), self.fields(fold, budget), f"method {method} env")
                                                 for k, v in spec.get("env", {}).items()})
            fold_dir = os.path.join(self.model_dir(budget, method), f"fold_{fold}")
            t0 = time.time()
            for i, c in enumerate(spec.get("commands", [])):
                run_logged(_fmt_cmd(c, self.fields(fold, budget), f"method {method}"), env,
                           os.path.join(logs, "commands.log"), f"{method} command {i + 1}")
            if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
                run_logged(self.train_command(budget, method, fold), env, os.path.join(logs, "train.log"),
                           "nnUNetv2_train")
                if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
                    raise StepFailed(f"nnUNetv2_train finished without {fold_dir}/checkpoint_final.pth "
                                     f"(log {os.path.join(logs, 'train.log')})")
            state["timings"]["train_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            self._predict(budget, method, fold, env, logs)
            state["timings"]["predict_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            self._evaluate(rdir)
            state["timings"]["evaluate_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            state.update(self._measure(budget, method, fold, env, logs))
            state["timings"]["measure_s"] = round(time.time() - t0, 1)
        except (StepFailed, BenchmarkConfigError) as e:
            tail = getattr(e, "tail", "")
            atomic_write_json(state_path, {**state, "status": "failed", "finished": _now(), "error": str(e),
                                           "error_tail": tail})
            _say(f"{tag}: FAILED: {e}")
            return "failed"
        atomic_write_json(state_path, {**state, "status": "done", "finished": _now()})
        _say(f"{tag}: done ({state.get('params', 0) / 1e6:.2f} M parameters, "
             f"{state.get('latency_ms', float('nan')):.1f} ms/case)")
        return "done"

    def _link_dependencies(self, budget: int, method: str) -> None:
        """Make each needed method's model folder visible in this method's nnUNet_results (e.g. the
        teacher for DistillTrainer), so every method keeps its own results root."""
        own = os.path.basename(self.model_dir(budget, method))
        ds = os.path.join(self.method_results(budget, method), self.dataset_name)
        os.makedirs(ds, exist_ok=True)
        for dep in self.cfg.method_defs[method].get("needs", []):
            src = self.model_dir(budget, dep)
            if os.path.basename(src) == own:
                raise StepFailed(f"method {method} and the method it needs, {dep}, use the same trainer "
                                 f"{self.cfg.method_defs[method]['trainer']}; give one of them another trainer")
            _link(src, os.path.join(ds, os.path.basename(src)))

    def _predict(self, budget: int, method: str, fold: int, env: Dict[str, str], logs: str) -> None:
        out = os.path.join(self.run_dir(budget, method, fold), "predictions")
        if self._predictions_complete(out):
            return
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        n = str(self.params.get("predict_processes", 1))
        cmd = [os.path.join(BIN, "nnUNetv2_predict"), "-i", os.path.join(self.raw_dataset, "imagesTs"), "-o", tmp,
               "-d", str(self.cfg.dataset_id), "-c", self.cfg.configuration, "-p", self.cfg.plans,
               "-tr", self.trainer(method), "-f", str(fold), "-device", self.device,
               "-npp", n, "-nps", n, "--disable_progress_bar"]
        run_logged(cmd, env, os.path.join(logs, "predict.log"), "nnUNetv2_predict")
        if not self._predictions_complete(tmp):
            raise StepFailed(f"nnUNetv2_predict did not write every test case into {tmp}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)

    def _evaluate(self, rdir: str) -> None:
        from tskd_nnunet.atomic_io import atomic_write_csv
        from tskd_nnunet.evaluation.evaluate import evaluate_folders_with_dataset_json

        pred = os.path.join(rdir, "predictions")
        try:
            df = evaluate_folders_with_dataset_json(os.path.join(self.raw_dataset, "labelsTs"), pred,
                                                    os.path.join(self.raw_dataset, "dataset.json"),
                                                    tolerance_mm=self.cfg.tolerance_mm)
            if self.cfg.hc18_csv:
                from tskd_nnunet.evaluation.clinical import evaluate_hc18_folder
                csv = os.path.abspath(_fmt(self.cfg.hc18_csv, self.fields(), self.cfg.path))
                hc = evaluate_hc18_folder(pred, csv, self.file_ending(), case_to_filename=hc18_case_to_filename)
                df = df.merge(hc, on="case", how="left")
        except (OSError, ValueError, KeyError) as e:
            raise StepFailed(f"evaluation of {pred} failed: {type(e).__name__}: {e}") from None
        atomic_write_csv(df, os.path.join(rdir, "scores.csv"))

    def _measure(self, budget: int, method: str, fold: int, env: Dict[str, str], logs: str) -> Dict[str, Any]:
        out = os.path.join(self.run_dir(budget, method, fold), "measure.json")
        cmd = [sys.executable, "-m", "tskd_nnunet.benchmark.measure", self.model_dir(budget, method), str(fold),
               os.path.join(self.raw_dataset, "imagesTs"), "-o", out, "--file-ending", self.file_ending(),
               "-n", str(self.params.get("latency_cases", 3)), "-device", self.device]
        run_logged(cmd, env, os.path.join(logs, "measure.log"), "measure")
        m = read_json(out, None)
        if not m:
            raise StepFailed(f"measure wrote no {out}")
        return {k: m[k] for k in ("params", "params_checkpoint", "latency_ms", "latency_cases", "torch_threads")
                if k in m}

    # ---------------------------------------------------------------- matrix, dry run, report
    def matrix(self, methods: Sequence[str]) -> List[Tuple[int, int, str]]:
        return [(b, f, m) for b in self.cfg.budgets for f in self.cfg.folds for m in methods]

    def describe(self, methods: Sequence[str]) -> str:
        """The planned matrix, stage by stage and run by run, with each one's status and command."""
        lines = [f"Benchmark {self.cfg.name}: dataset {self.dataset_name} ({self.cfg.configuration}, "
                 f"{self.cfg.plans}), profile {self.profile_name} (device {self.device}, TSKD_SCHEDULE="
                 f"{self.profile.get('schedule') or 'unset: nnU-Net full schedule'}), workdir {self.workdir}",
                 f"raw: {self.raw_root}; shared preprocessed data: {self.base_pp_root}"]
        if self.cfg.convert is not None:
            done = os.path.isdir(self.raw_dataset)
            lines.append(f"convert: {'done' if done else 'pending'}: {' '.join(_fmt_cmd(self.cfg.convert, self.fields(), 'convert'))}")
        lines.append(f"plan_and_preprocess: {'done' if self._planned() else 'pending'}")
        stages = []
        for m in methods:
            for st in self.cfg.method_defs[m].get("stages", []):
                todo = [st]
                while todo:
                    s = todo.pop()
                    if s not in stages:
                        stages.append(s)
                        todo += self.cfg.stage_defs[s].get("stages", [])
        for st in reversed(stages):
            for f in self.cfg.folds:
                if not self.stage_needed(st):
                    lines.append(f"stage {st} fold {f}: given weights {self.stage_output(st, f)}")
                    continue
                sdir = self.stage_dir(st, f)
                status = (read_json(os.path.join(sdir, STATE), {}) or {}).get("status", "pending")
                fields = self.fields(f, stage_dir=sdir, output=self.stage_output(st, f),
                                     preprocessed=self.shared_root(self.cfg.stage_defs[st].get("root", "base")))
                for c in self.cfg.stage_defs[st].get("commands", []):
                    lines.append(f"stage {st} fold {f}: {status}: {' '.join(_fmt_cmd(c, fields, st))}")
        lines.append(f"runs ({len(self.matrix(methods))}):")
        for b, f, m in self.matrix(methods):
            spec = self.cfg.method_defs[m]
            st = read_json(os.path.join(self.run_dir(b, m, f), STATE), {}) or {}
            status = "done" if self.run_complete(b, m, f) else st.get("status", "pending")
            env = {k: _fmt(str(v), self.fields(f, b), m) for k, v in spec.get("env", {}).items()}
            env_s = " ".join(f"{k}={v}" for k, v in env.items() if v != "")
            lines.append(f"  budget {b:>4} fold {f} {m:<14} [{status}] data={spec.get('data', 'labeled')}"
                         f"{' needs=' + ','.join(spec['needs']) if spec.get('needs') else ''}: "
                         f"{env_s + ' ' if env_s else ''}{' '.join(self.train_command(b, m, f))}")
        return "\n".join(lines)

    def collect(self, methods: Sequence[str]):
        """(results_df, runs_df) in the report's format, from the state files and scores CSVs."""
        import pandas as pd

        results, runs = [], []
        for b, f, m in self.matrix(methods):
            rdir = self.run_dir(b, m, f)
            st = read_json(os.path.join(rdir, STATE), {}) or {}
            if self.run_complete(b, m, f):
                status = "done"
                df = pd.read_csv(os.path.join(rdir, "scores.csv"))
                results.append(df.assign(dataset=self.dataset_name, method=m, budget=b, fold=f))
            elif st.get("status") == "failed":
                status = "failed"
            else:
                status = "missing"  # never started, or killed while running
            runs.append({"dataset": self.dataset_name, "method": m, "budget": b, "fold": f, "status": status,
                         "params": st.get("params") if status == "done" else None,
                         "latency_ms": st.get("latency_ms") if status == "done" else None,
                         "error": st.get("error", "") if status == "failed" else "",
                         "trainer": self.trainer(m), "n_labeled": st.get("n_labeled"),
                         "attempts": st.get("attempts"), "device": self.device})
        res = pd.concat(results, ignore_index=True) if results else pd.DataFrame(
            columns=["dataset", "method", "budget", "fold", "case", "class", "dice", "nsd", "hd95"])
        # bookkeeping and all-empty columns (2D volumes) are not endpoints
        drop = [c for c in res.columns if c in ("ref_voxels", "pred_voxels", "hc_pred_mm", "hc_ref_mm")
                or (c not in ("dice", "nsd", "hd95") and res[c].isna().all())]
        return res.drop(columns=drop), pd.DataFrame(runs)

    def overlay_loader(self, key: Dict[str, Any]):
        from tskd_nnunet.benchmark.plots import OverlayItem

        fe = self.file_ending()
        pred = os.path.join(self.run_dir(int(key["budget"]), str(key["method"]), int(key["fold"])), "predictions",
                            f"{key['case']}{fe}")
        if not os.path.isfile(pred):
            return None
        return OverlayItem(os.path.join(self.raw_dataset, "imagesTs", f"{key['case']}_0000{fe}"),
                           os.path.join(self.raw_dataset, "labelsTs", f"{key['case']}{fe}"), pred)

    def report(self, methods: Sequence[str]) -> str:
        from tskd_nnunet.benchmark.report import write_report

        results, runs = self.collect(methods)
        out = os.path.join(self.workdir, "report")
        written = write_report(results, runs, out, baseline=BASELINE_LABEL, overlay_loader=self.overlay_loader,
                               title=f"Benchmark {self.cfg.name} (profile {self.profile_name}, device {self.device})")
        return str(written["report.md"])

    def run(self, methods: Sequence[str]) -> Dict[str, int]:
        """Run every (budget, fold, method) in order; returns how many ended done / failed."""
        self.ensure_dataset()
        for k, v in (("nnUNet_raw", self.raw_root), ("nnUNet_preprocessed", self.base_pp_root),
                     ("nnUNet_results", self.shared_results)):
            os.environ.setdefault(k, v)  # quiets nnU-Net's import-time warnings in this process
        counts = {"done": 0, "failed": 0}
        for b, f, m in self.matrix(methods):
            counts[self.run_one(b, m, f)] += 1
        return counts


class WorkdirLock:
    """One runner per work directory: two would train the same run twice."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, ".lock")
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            pid = self.fh.read().strip()
            self.fh.close()
            raise BenchmarkError(f"another tskd_benchmark (pid {pid or '?'}) is running in {os.path.dirname(self.path)}."
                                 f" Fix: wait for it or use another --workdir") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tskd_benchmark", description=__doc__.split("\n\n")[0],
                                epilog="Layout, resumption and decisions: documentation/benchmarking.md")
    p.add_argument("config", help="benchmark config (JSON), e.g. benchmarks/configs/hc18_cpu.json")
    p.add_argument("--profile", default="cpu", help="cpu (short TSKD_SCHEDULE, -device cpu) or gpu (nnU-Net's full "
                                                    "schedule, -device cuda), or one defined in the config")
    p.add_argument("--workdir", default=None, help="where runs, logs and the report go (default benchmark_work/<name>_<profile>)")
    p.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                   help="run only these methods (and the methods they need)")
    p.add_argument("--dry-run", action="store_true", help="print the planned stages and runs with their status; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from what is finished; run nothing")
    p.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        methods = list(cfg.methods)
        if a.only:
            bad = [m for m in a.only if m not in cfg.method_defs]
            if bad:
                raise BenchmarkConfigError(f"--only {bad}: unknown method(s); known: {sorted(cfg.method_defs)}")
            methods = list(a.only)
        methods = cfg.method_closure(methods)
        workdir = a.workdir or os.path.join("benchmark_work", f"{cfg.name}_{a.profile}")
        runner = BenchmarkRunner(cfg, a.profile, workdir, dry_run=a.dry_run, skip_failed=a.skip_failed)
        if a.dry_run:
            print(runner.describe(methods))
            return 0
        with WorkdirLock(runner.workdir):
            if a.report_only:
                report = runner.report(cfg.method_closure(cfg.methods))
                print(f"Report: {report}")
                return 0
            counts = runner.run(methods)
            report = runner.report(cfg.method_closure(cfg.methods))
    except (BenchmarkError, BenchmarkConfigError) as e:
        print(f"tskd_benchmark: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{counts['done']} runs done, {counts['failed']} failed. Report: {report}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
