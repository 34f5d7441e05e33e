"""The benchmark's plan: a (method x label budget x fold) matrix of one config, profile and work directory, with
each run's trainer, environment, exact commands, identity and status. The Snakemake rules are made from it
(workflow.py, Snakefile) and every job runs one step of it (step.py → actions.py); ``tskd_benchmark`` (cli.py) is
the command line.

Per run: ``nnUNetv2_train`` (``--c`` when a checkpoint exists) → ``nnUNetv2_predict`` on the raw dataset's imagesTs
→ Dice/NSD/HD95 (+ HC18 head circumference, + organ volumes) per test case → parameter count and latency → the run's
committed results (per-case CSV, settings JSON, overlays) → the report, rebuilt from the committed results alone.
A run whose results are committed is done on any machine, even with an empty work directory. Same labeled cases
for every method: each budget gets its own nnU-Net preprocessed root (data_roots.py), and the test set is
imagesTs/labelsTs for all. Layout and decisions: documentation/benchmarking.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tskd_nnunet.atomic_io import read_json
from tskd_nnunet.benchmark.commands import BIN, CODE_ROOT, BenchmarkError, fill, fill_cmd
from tskd_nnunet.benchmark.config import ALL, Budget, BenchmarkConfig, BenchmarkConfigError, baseline_method
from tskd_nnunet.benchmark.layout import CHECKPOINTS, STATE, WorkdirLayout
from tskd_nnunet.data.label_budget import LabelBudgetError, make_label_budget_splits, read_training_cases

Splits = Dict[Budget, Tuple[List[dict], List[List[str]]]]  # per budget: (splits per fold, unlabeled pool per fold)


class BenchmarkRunner(WorkdirLayout):
    """The runs, stages and commands of one config in one work directory."""

    def __init__(self, cfg: BenchmarkConfig, profile: str, workdir: str, committed: Optional[str] = None):
        super().__init__(cfg, profile, workdir, committed)
        self.device = str(self.profile.get("device", "cpu"))
        self.params = dict(self.profile.get("params", {}))
        self._splits: Optional[Splits] = None

    # ---------------------------------------------------------------- a method's trainer and model
    def trainer(self, method: str) -> str:
        """The method's nnU-Net trainer class (a template: e.g. the profile's teacher_trainer)."""
        return fill(self.cfg.method_defs[method]["trainer"], self.fields(), f"method {method} trainer")

    def model_dir(self, budget: Budget, method: str) -> str:
        return os.path.join(self.method_results(budget, method), self.dataset_name,
                            f"{self.trainer(method)}__{self.cfg.plans}__{self.cfg.configuration}")

    def checkpoint(self, budget: Budget, method: str, fold: int) -> str:
        return os.path.join(self.model_dir(budget, method), f"fold_{fold}", "checkpoint_final.pth")

    def schedule(self, method: str) -> Optional[str]:
        """TSKD_SCHEDULE of a method's training: its own ``"schedule"`` (e.g. a student trained longer than its
        teacher, which stays the profile's run), else the profile's (None: nnU-Net's full schedule)."""
        return self.cfg.method_defs[method].get("schedule", self.profile.get("schedule"))

    def needed_by_others(self, method: str) -> bool:
        """True when another method distils from this one's model (its weights are committed with its results)."""
        planned = {m for b in self.cfg.budgets for m in self.cfg.methods_at(b, profile=self.profile_name)}
        return any(method in self.cfg.method_defs[m].get("needs", []) for m in planned)

    # ---------------------------------------------------------------- environment and templates
    def base_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("TSKD_SCHEDULE", None)
        env.pop("nnUNet_n_proc_DA", None)
        env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
        # nnU-Net's commands import our trainers: from the same tskd_nnunet as this process (a source checkout
        # run with python -m would otherwise train with an older installed copy)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if CODE_ROOT not in paths:
            env["PYTHONPATH"] = os.pathsep.join([CODE_ROOT] + paths)
        env.update(nnUNet_raw=self.raw_root, nnUNet_preprocessed=self.base_pp_root, nnUNet_results=self.shared_results)
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

    def method_root(self, budget: Budget, method: str, fold: int) -> str:
        """The nnU-Net preprocessed root a method's run trains on."""
        spec = self.cfg.method_defs[method]
        if spec.get("plan_on") == "labeled":
            return os.path.join(self.labeled_only_base(budget, fold), "nnUNet_preprocessed")
        return self.budget_root(budget, spec.get("data", "labeled"))

    def method_env(self, budget: Budget, method: str, fold: int) -> Dict[str, str]:
        """The environment of a run's nnU-Net commands: its root, its results folder, the method's env."""
        spec = self.cfg.method_defs[method]
        own = {"TSKD_SCHEDULE": spec["schedule"]} if spec.get("schedule") else {}
        return self.train_env(self.method_root(budget, method, fold), self.method_results(budget, method),
                              {**own, **{k: fill(str(v), self.fields(fold, budget), f"method {method} env")
                                         for k, v in spec.get("env", {}).items()}})

    def fields(self, fold: Optional[int] = None, budget: Optional[Budget] = None, **extra: Any) -> Dict[str, Any]:
        """What the config's templates may use (documented in config.py)."""
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

    # ---------------------------------------------------------------- stages and plans
    def stage_needed(self, stage: str) -> bool:
        return not (stage == "foundation" and self.cfg.foundation.get("weights"))

    def stage_output(self, stage: str, fold: int) -> str:
        if stage == "foundation" and self.cfg.foundation.get("weights"):
            return os.path.abspath(fill(str(self.cfg.foundation["weights"]), {"config_dir": self.cfg.config_dir},
                                        self.cfg.path))
        spec = self.cfg.stage_defs[stage]
        return fill(spec["output"], {**self.fields(), "fold": fold, "stage_dir": self.stage_dir(stage, fold),
                                     "preprocessed": self.shared_root(spec.get("root", "base")), "output": ""},
                    f"stage {stage}")

    def stage_commands(self, stage: str, fold: int) -> List[List[str]]:
        fields = self.fields(fold, stage_dir=self.stage_dir(stage, fold), output=self.stage_output(stage, fold),
                             preprocessed=self.shared_root(self.cfg.stage_defs[stage].get("root", "base")))
        return [fill_cmd(c, fields, stage) for c in self.cfg.stage_defs[stage].get("commands", [])]

    def plan_commands(self, fields: Dict[str, Any]) -> List[List[str]]:
        """The config's ``plan_commands``, else nnU-Net's ``nnUNetv2_plan_and_preprocess -c CONFIGURATION``."""
        if self.cfg.plan_commands:
            return [fill_cmd(c, fields, f"{self.cfg.path} plan_commands") for c in self.cfg.plan_commands]
        if self.cfg.plans != "nnUNetPlans":
            raise BenchmarkError(f"plans {self.cfg.plans} not found in {self.base_pp_root}/{self.dataset_name}. "
                                 f"Fix: plan them yourself (nnUNetv2_plan_experiment ...), give \"plan_commands\" "
                                 f"or use nnUNetPlans")
        return [[os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(self.cfg.dataset_id),
                 "-c", self.cfg.configuration, "-np", str(self.params.get("preprocess_processes", 1)),
                 "--verify_dataset_integrity"]]

    def plans_file(self, pp_root: Optional[str] = None) -> str:
        return os.path.join(pp_root or self.base_pp_root, self.dataset_name, f"{self.cfg.plans}.json")

    def planned(self, pp_root: Optional[str] = None) -> bool:
        pp_root = pp_root or self.base_pp_root
        plans = read_json(self.plans_file(pp_root), None)
        if not plans or self.cfg.configuration not in plans.get("configurations", {}):
            return False
        conf = plans["configurations"][self.cfg.configuration]
        folder = os.path.join(pp_root, self.dataset_name,
                              conf.get("data_identifier") or f"{self.cfg.plans}_{self.cfg.configuration}")
        return os.path.isdir(folder) and len(os.listdir(folder)) > 0

    def plans_configuration(self, pp_root: Optional[str] = None) -> Dict[str, Any]:
        """batch size, patch size, spacing of the configuration in a plans file ({} when not planned)."""
        plans = read_json(self.plans_file(pp_root), None) or {}
        conf = plans.get("configurations", {}).get(self.cfg.configuration, {})
        inherit = conf.get("inherits_from")
        if inherit:  # nnU-Net's plans inheritance: the parent's values unless overridden
            conf = {**plans["configurations"].get(inherit, {}), **conf}
        return {k: conf[k] for k in ("batch_size", "patch_size", "spacing", "median_image_size_in_voxels")
                if k in conf}

    def plans_root(self, budget: Budget, method: str, fold: int) -> str:
        """The preprocessed root whose plans a run trained with (its own for plain_labeled_only)."""
        if self.cfg.method_defs[method].get("plan_on") == "labeled":
            return os.path.join(self.labeled_only_base(budget, fold), "nnUNet_preprocessed")
        return self.base_pp_root

    def splits(self) -> Splits:
        """Per budget: (splits per fold, unlabeled pool per fold), validated against each other. Budget "all":
        every training case outside the fold's validation set is labeled, the pool is empty."""
        if self._splits is None:
            numeric = [b for b in self.cfg.budgets if b != ALL]
            try:
                cases, patient_of = read_training_cases(Path(self.raw_dataset))
                out = {b: make_label_budget_splits(cases, patient_of, b, self.cfg.num_folds, self.cfg.seed,
                                                   spread=self.cfg.spread) for b in numeric}
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

    # ---------------------------------------------------------------- runs
    def train_command(self, budget: Budget, method: str, fold: int) -> List[str]:
        spec = self.cfg.method_defs[method]
        fold_dir = os.path.dirname(self.checkpoint(budget, method, fold))
        cmd = [os.path.join(BIN, "nnUNetv2_train"), str(self.cfg.dataset_id), self.cfg.configuration, str(fold),
               "-tr", self.trainer(method), "-p", self.cfg.plans, "-device", self.device]
        extra = fill_cmd(spec.get("train_args", []), self.fields(fold, budget), f"method {method} train_args")
        if any(os.path.isfile(os.path.join(fold_dir, c)) for c in CHECKPOINTS):
            # continue from the checkpoint; nnU-Net refuses --c with -pretrained_weights (the checkpoint holds them)
            drop = {i + d for i, a in enumerate(extra) if a == "-pretrained_weights" for d in (0, 1)}
            extra = [a for i, a in enumerate(extra) if i not in drop] + ["--c"]
        return cmd + extra

    def identity(self, budget: Budget, method: str) -> Dict[str, Any]:
        """What a committed result of this run must have been made with (committed.IDENTITY_KEYS)."""
        spec = self.cfg.method_defs[method]
        return {"trainer": self.trainer(method), "plans": self.cfg.plans, "configuration": self.cfg.configuration,
                "schedule": self.schedule(method), "device": self.device,
                "data_scope": spec.get("data", "labeled"), "plan_on": spec.get("plan_on", "all")}

    def committed_settings(self, budget: Budget, method: str, fold: int) -> Optional[Dict[str, Any]]:
        """The committed settings of this run, or None; BenchmarkError when they were made differently."""
        s = self.store.settings(method, budget, fold) if self.store is not None else None
        if s is None:
            return None
        differ = [f"{k} {s.get(k)!r} (this config: {v!r})" for k, v in self.identity(budget, method).items()
                  if s.get(k) != v]
        if differ:
            raise BenchmarkError(f"the committed result {self.store.run_dir(method, budget, fold)} was made with "
                                 f"{'; '.join(differ)}. Fix: delete that folder to redo the run with this config, or "
                                 f"pass --committed with another folder")
        return s

    def run_complete(self, budget: Budget, method: str, fold: int) -> bool:
        rdir = self.run_dir(budget, method, fold)
        return (self.run_state(budget, method, fold).get("status") == "done"
                and os.path.isfile(self.checkpoint(budget, method, fold))
                and self.predictions_complete(os.path.join(rdir, "predictions"))
                and os.path.isfile(os.path.join(rdir, "scores.csv")))

    def run_status(self, b: Budget, m: str, f: int) -> str:
        if self.store is not None and self.store.is_done(m, b, f):
            return "committed"
        if self.run_complete(b, m, f):
            return "done"
        return self.run_state(b, m, f).get("status", "pending")

    def matrix(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None
               ) -> List[Tuple[Budget, int, str]]:
        """(budget, fold, method) in run order: per budget the methods listed there (restricted to ``only``)
        and what they need, dependencies first."""
        return [(b, f, m) for b in self.cfg.budgets if budgets is None or b in budgets
                for f in self.cfg.folds for m in self.cfg.methods_at(b, only, self.profile_name)]

    # ---------------------------------------------------------------- what --dry-run prints, matrix.json
    def describe(self, only: Optional[Sequence[str]] = None, budgets: Optional[Sequence[Budget]] = None) -> str:
        """The planned matrix, stage by stage and run by run, with each one's status and command."""
        matrix = self.matrix(only, budgets)
        lines = [f"Benchmark {self.cfg.name}: dataset {self.dataset_name} ({self.cfg.configuration}, "
                 f"{self.cfg.plans}), profile {self.profile_name} (device {self.device}, TSKD_SCHEDULE="
                 f"{self.profile.get('schedule') or 'unset: nnU-Net full schedule'}), workdir {self.workdir}",
                 f"raw: {self.raw_root}; shared preprocessed data: {self.base_pp_root}",
                 f"committed results: {self.store.root if self.store else 'none (only this work directory)'}"]
        if self.cfg.convert is not None:
            lines.append(f"convert: {'done' if os.path.isdir(self.raw_dataset) else 'pending'}: "
                         f"{' '.join(fill_cmd(self.cfg.convert, self.fields(), 'convert'))}")
        plan_status = "done" if self.planned() else "pending"
        try:
            plan_cmds = self.plan_commands(self.fields())
        except BenchmarkError as e:
            plan_cmds, plan_status = [], f"error: {e}"
        lines.append(f"plan_and_preprocess: {plan_status}" + "".join(f"\n  $ {' '.join(c)}" for c in plan_cmds))
        stages: List[str] = []
        for m in dict.fromkeys(m for _, _, m in matrix):
            todo = list(self.cfg.method_defs[m].get("stages", []))
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
                status = (read_json(os.path.join(self.stage_dir(st, f), STATE), {}) or {}).get("status", "pending")
                lines += [f"stage {st} fold {f}: {status}: {' '.join(c)}" for c in self.stage_commands(st, f)]
        lines.append(f"runs ({len(matrix)}):")
        for b, f, m in matrix:
            spec = self.cfg.method_defs[m]
            env = {k: fill(str(v), self.fields(f, b), m) for k, v in spec.get("env", {}).items()}
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


def parse_budgets(values: Optional[List[str]], cfg: BenchmarkConfig) -> Optional[List[Budget]]:
    """``--budgets 10 all`` as the config's budgets; a budget the config lacks is a config error."""
    if not values:
        return None
    out = []
    for v in values:
        match = [b for b in cfg.budgets if str(b) == str(v).strip()]
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
        return os.path.abspath(fill(cfg.committed, {"config_dir": cfg.config_dir, "name": cfg.name,
                                                      "profile": profile}, f"{cfg.path} committed"))
    return None
