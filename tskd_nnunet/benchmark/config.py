"""Benchmark configuration: the method table, the shared stages, the profiles and the config file.

Everything the runner executes is data, in one place, so a renamed trainer or command is fixed here
(or overridden per config file under ``"method_defs"`` / ``"stage_defs"``) without touching the runner.

Method spec (``METHODS``)::

    "tskd": {"trainer": "DistillTrainer",        # nnUNetv2_train/-predict -tr
             "data": "labeled",                  # transfer-set scope, see DATA_SCOPES
             "stages": [],                       # shared per-fold stages that must be done first
             "needs": ["teacher_lora"],          # runs of other methods (same budget and fold) to link in
             "env": {"TSKD_TEACHER_TRAINER": "ViTLoRATeacherTrainer"},
             "train_args": [],                   # extra nnUNetv2_train arguments (dropped with --c: see runner)
             "commands": []}                     # extra commands run before training, each a list of strings

Stage spec (``STAGES``): ``{"commands": [[...]], "output": "...", "stages": [...], "root": "base"|"synthetic"}``;
a stage runs once per fold and is shared by every budget and method (see documentation/benchmarking.md).

Strings in commands, env values and outputs are ``str.format`` templates. Fields: ``{bin}`` (this
Python's bin folder), ``{python}``, ``{dataset_id}``, ``{dataset_name}``, ``{configuration}``,
``{plans}``, ``{fold}``, ``{budget}``, ``{device}``, ``{output}`` / ``{stage_dir}`` (stages),
``{stages[NAME]}`` (a stage's output for this fold), ``{foundation[KEY]}``, ``{params[KEY]}`` (profile
parameters), ``{config_dir}`` (folder of the config file), ``{workdir}``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from tskd_nnunet.atomic_io import read_json

BASELINE_LABEL = "nnUNetTrainer"

# Transfer-set scopes: which unlabeled cases a method's nnU-Net preprocessed root exposes.
# "pool" = tskd_unlabeled_pool.json of the label budget; "synthetic" = the fold's sampled extension.
DATA_SCOPES: Dict[str, Dict[str, bool]] = {
    "labeled": {"pool": False, "synthetic": False},
    "pool": {"pool": True, "synthetic": False},
    "synthetic": {"pool": False, "synthetic": True},
    "pool_synthetic": {"pool": True, "synthetic": True},
}

_TEACHER_ENV = {"TSKD_TEACHER_BACKBONE": "{foundation[backbone]}", "TSKD_TEACHER_WEIGHTS": "{stages[foundation]}",
                "TSKD_TEACHER_ARCH_OVERRIDES": "{foundation[arch_overrides]}",
                "TSKD_TEACHER_IMG_SIZE": "{foundation[img_size]}"}

METHODS: Dict[str, Dict[str, Any]] = {
    # nnUNetTrainer itself ignores TSKD_SCHEDULE; TSKDPlainTrainer is nnUNetTrainer + the schedule hook
    BASELINE_LABEL: {"trainer": "TSKDPlainTrainer", "data": "labeled",
                     "description": "plain nnU-Net (TSKDPlainTrainer = nnUNetTrainer with the schedule hook)"},
    # the real foundation model (LiteMedSAM, packaged): no pretraining stage, no weights path
    "teacher": {"trainer": "{params[teacher_trainer]}", "data": "labeled",
                "description": "LiteMedSAM (MedSAM distilled into TinyViT) fine-tuned in nnU-Net"},
    # every TS-KD arm distils over labeled + the unlabeled pool; tskd_syn adds synthetic cases on top, so
    # tskd_syn - tskd is the effect of the synthetic images alone
    "tskd": {"trainer": "DistillTrainer", "data": "pool", "needs": ["teacher"],
             "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"},
             "description": "TS-KD student, transfer set = labeled + unlabeled pool"},
    "tskd_syn": {"trainer": "DistillTrainer_syn", "data": "pool_synthetic", "needs": ["teacher"],
                 "stages": ["synthetic"], "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"},
                 "description": "TS-KD student, transfer set = labeled + pool + diffusion-synthetic cases"},
    "task_agnostic": {"trainer": "TaskAgnosticDistillTrainer", "data": "pool",
                      "env": {"TSKD_TEACHER_BACKBONE": "litemedsam"},
                      "description": "student distilled from the un-tuned foundation model's features, then fine-tuned"},
    # the in-house stand-in: a ViT-Tiny pretrained here (MAE/MoCo) as the foundation
    "teacher_lora": {"trainer": "ViTLoRATeacherTrainer", "data": "labeled", "stages": ["foundation"],
                     "env": dict(_TEACHER_ENV), "description": "in-house ViT foundation (MAE here) + LoRA"},
    "tskd_vit": {"trainer": "DistillTrainer", "data": "pool", "needs": ["teacher_lora"],
                 "env": {"TSKD_TEACHER_TRAINER": "ViTLoRATeacherTrainer"},
                 "description": "TS-KD student of the in-house ViT teacher, transfer set = labeled + pool"},
    "mae_ft": {"trainer": "TSKDPlainTrainer", "data": "labeled", "stages": ["cnn_mim"],
               "train_args": ["-pretrained_weights", "{stages[cnn_mim]}"],
               "description": "nnU-Net CNN pretrained by masked image modelling, then fine-tuned"},
    "moco_ft": {"trainer": "TSKDPlainTrainer", "data": "labeled", "stages": ["cnn_moco"],
                "train_args": ["-pretrained_weights", "{stages[cnn_moco]}"],
                "description": "nnU-Net CNN pretrained by MoCo v3, then fine-tuned"},
}

STAGES: Dict[str, Dict[str, Any]] = {
    # a ViT foundation pretrained on the fold's training images (labeled + pool, never val/test);
    # skipped when the config gives "foundation": {"weights": PATH, "backbone": NAME}
    "foundation": {"output": "{stage_dir}/foundation.pth", "commands": [[
        "{bin}/tskd_pretrain_{foundation[kind]}", "-d", "{dataset_id}", "-c", "{configuration}",
        "--arch", "{foundation[arch]}", "--resolution", "{foundation[resolution]}",
        "--steps", "{foundation[steps]}", "--batch-size", "{foundation[batch_size]}", "-f", "{fold}",
        "-o", "{output}", "-device", "{device}"]]},
    "diffusion": {"output": "{results}/{dataset_name}/tskd_diffusion__{plans}__{configuration}/fold_{fold}/"
                            "checkpoint_final.pth", "commands": [[
        "{bin}/tskd_train_diffusion", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
        "--steps", "{params[diffusion_steps]}", "--resolution", "{params[diffusion_resolution]}",
        "-device", "{device}"]]},
    # sampled into a root of its own, so no pretraining corpus ever sees synthetic cases by accident
    "synthetic": {"root": "synthetic", "stages": ["diffusion"],
                  "output": "{preprocessed}/{dataset_name}/tskd_extension/{plans}_{configuration}/fold_{fold}/synthetic",
                  "commands": [[
                      "{bin}/tskd_sample_diffusion", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
                      "-n", "{params[num_synthetic]}", "--checkpoint", "{stages[diffusion]}", "-device", "{device}"]]},
    "cnn_mim": {"output": "{stage_dir}/cnn_mim.pth", "commands": [[
        "{bin}/tskd_pretrain_cnn_mim", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
        "-tr", "TSKDPlainTrainer", "--steps", "{params[pretrain_steps]}", "-o", "{output}", "-device", "{device}"]]},
    "cnn_moco": {"output": "{stage_dir}/cnn_moco.pth", "commands": [[
        "{bin}/tskd_pretrain_cnn_moco", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
        "-tr", "TSKDPlainTrainer", "--steps", "{params[pretrain_steps]}", "-o", "{output}", "-device", "{device}"]]},
}

PROFILES: Dict[str, Dict[str, Any]] = {
    # short schedule on 2-16 CPU cores: every method gets the same epochs x iterations
    "cpu": {"device": "cpu", "schedule": "10,25,5",
            "env": {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"},
            "params": {"pretrain_steps": 300, "diffusion_steps": 1000, "diffusion_resolution": 32,
                       "num_synthetic": 100, "latency_cases": 3, "preprocess_processes": 2,
                       "teacher_trainer": "LiteMedSAMTeacherTrainer_last"}},
    # nnU-Net's own schedule (1000 epochs x 250 iterations): TSKD_SCHEDULE unset
    "gpu": {"device": "cuda", "schedule": None, "env": {},
            "params": {"pretrain_steps": 20000, "diffusion_steps": 30000, "diffusion_resolution": 64,
                       "num_synthetic": 1000, "latency_cases": 10, "preprocess_processes": 8,
                       "teacher_trainer": "LiteMedSAMTeacherTrainer"}},
}

FOUNDATION_DEFAULTS = {"kind": "mae", "arch": "vit_tiny", "backbone": None, "steps": 300, "resolution": 224,
                       "batch_size": 16, "weights": None, "arch_overrides": "", "img_size": ""}


class BenchmarkConfigError(ValueError):
    """The config file is invalid; the message names the file, the key and the fix."""


@dataclass
class BenchmarkConfig:
    path: str
    name: str
    dataset_id: int
    convert: Optional[List[str]]
    raw_root: Optional[str]
    preprocessed_root: Optional[str]
    configuration: str
    plans: str
    budgets: List[int]
    folds: List[int]
    num_folds: int
    seed: int
    methods: List[str]
    method_defs: Dict[str, Dict[str, Any]]
    stage_defs: Dict[str, Dict[str, Any]]
    foundation: Dict[str, Any]
    profiles: Dict[str, Dict[str, Any]]
    tolerance_mm: float = 2.0
    hc18_csv: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def config_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def profile(self, name: str) -> Dict[str, Any]:
        if name not in self.profiles:
            raise BenchmarkConfigError(f"unknown profile {name!r}; choose one of {sorted(self.profiles)} "
                                       f"(or add it under \"profiles\" in {self.path})")
        return self.profiles[name]

    def method_closure(self, wanted: Sequence[str]) -> List[str]:
        """``wanted`` plus every method they need, dependencies first, in config order otherwise."""
        order: List[str] = []

        def visit(m: str, chain: tuple) -> None:
            if m in chain:
                raise BenchmarkConfigError(f"{self.path}: methods depend on each other in a cycle: "
                                           f"{' -> '.join(chain + (m,))}")
            if m in order:
                return
            for dep in self.method_defs[m].get("needs", []):
                visit(dep, chain + (m,))
            order.append(m)

        for m in wanted:
            visit(m, ())
        return order


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _err(path: str, msg: str) -> BenchmarkConfigError:
    return BenchmarkConfigError(f"{path}: {msg}")


def _int_list(path: str, d: dict, key: str, default=None) -> List[int]:
    v = d.get(key, default)
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise _err(path, f"\"{key}\" must be a non-empty list of integers, e.g. \"{key}\": [20, 80]")
    if len(set(v)) != len(v):
        raise _err(path, f"\"{key}\" lists a value twice: {v}")
    return list(v)


def load_config(path: str) -> BenchmarkConfig:
    """Read and validate a benchmark config (JSON)."""
    if not os.path.isfile(path):
        raise BenchmarkConfigError(f"config file {path} not found. Fix: pass the path of a JSON config, "
                                   f"e.g. benchmarks/configs/hc18_cpu.json")
    try:
        d = read_json(path)
    except json.JSONDecodeError as e:
        raise _err(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise _err(path, "the top level must be a JSON object")
    known = {"name", "dataset", "configuration", "plans", "budgets", "folds", "num_folds", "seed", "methods",
             "method_defs", "stage_defs", "foundation", "profiles", "tolerance_mm", "hc18_csv", "comment"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise _err(path, f"unknown key(s) {unknown}; known keys are {sorted(known)}")
    ds = d.get("dataset")
    if not isinstance(ds, dict) or not isinstance(ds.get("id"), int):
        raise _err(path, "\"dataset\" must be an object with an integer \"id\", e.g. "
                         "{\"id\": 501, \"convert\": null}")
    convert = ds.get("convert")
    if convert is not None and (not isinstance(convert, list) or not convert
                                or not all(isinstance(x, str) for x in convert)):
        raise _err(path, "\"dataset.convert\" must be null or a command as a list of strings")
    method_defs = _merge(METHODS, d.get("method_defs", {}))
    stage_defs = _merge(STAGES, d.get("stage_defs", {}))
    profiles = _merge(PROFILES, d.get("profiles", {}))
    methods = d.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise _err(path, f"\"methods\" must be a non-empty list of names from {sorted(method_defs)}")
    if len(set(methods)) != len(methods):
        raise _err(path, f"\"methods\" lists a method twice: {methods}")
    for m, spec in method_defs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("trainer"), str):
            raise _err(path, f"method {m!r} needs a \"trainer\" (an nnU-Net trainer class name)")
        if spec.get("data", "labeled") not in DATA_SCOPES:
            raise _err(path, f"method {m!r}: \"data\" must be one of {sorted(DATA_SCOPES)}")
        for dep in spec.get("needs", []):
            if dep not in method_defs:
                raise _err(path, f"method {m!r} needs unknown method {dep!r}")
        for st in spec.get("stages", []):
            if st not in stage_defs:
                raise _err(path, f"method {m!r} needs unknown stage {st!r}; stages: {sorted(stage_defs)}")
    for m in methods:
        if m not in method_defs:
            raise _err(path, f"unknown method {m!r}; known: {sorted(method_defs)} "
                             f"(or define it under \"method_defs\")")
    foundation = dict(FOUNDATION_DEFAULTS)
    foundation.update(d.get("foundation") or {})
    if foundation.get("backbone") is None:
        foundation["backbone"] = foundation["arch"]
    if isinstance(foundation.get("arch_overrides"), dict):
        foundation["arch_overrides"] = json.dumps(foundation["arch_overrides"])
    budgets = _int_list(path, d, "budgets")
    if min(budgets) < 1:
        raise _err(path, "\"budgets\" must be positive numbers of labeled cases")
    num_folds = d.get("num_folds", 5)
    folds = _int_list(path, d, "folds", [0])
    if not isinstance(num_folds, int) or num_folds < 1 or any(not 0 <= f < num_folds for f in folds):
        raise _err(path, f"\"folds\" {folds} must lie in 0..num_folds-1 (num_folds = {num_folds})")
    cfg = BenchmarkConfig(
        path=os.path.abspath(path), name=str(d.get("name", os.path.splitext(os.path.basename(path))[0])),
        dataset_id=ds["id"], convert=convert, raw_root=ds.get("raw_root"), preprocessed_root=ds.get("preprocessed_root"),
        configuration=str(d.get("configuration", "2d")), plans=str(d.get("plans", "nnUNetPlans")),
        budgets=budgets, folds=folds, num_folds=num_folds, seed=int(d.get("seed", 0)), methods=methods,
        method_defs=method_defs, stage_defs=stage_defs, foundation=foundation, profiles=profiles,
        tolerance_mm=float(d.get("tolerance_mm", 2.0)), hc18_csv=d.get("hc18_csv"), raw=d)
    cfg.method_closure(methods)  # rejects cycles early
    return cfg
