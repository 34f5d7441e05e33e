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
             "commands": [],                     # extra commands run before training, each a list of strings
             "baseline": False,                  # the report's baseline arm (exactly one method)
             "contrasts": [["tskd", "what it shows"]],  # report: paired difference this arm - that arm
             "student_of": "teacher",            # report: lead kept of this teacher's lead over the baseline
             "schedule": "50,50,5"}              # its own TSKD_SCHEDULE instead of the profile's (optional)

The method's name is its report label (committed results and reports name arms by it), e.g. the baseline arm
``nnUNetTrainer`` trains with ``TSKDPlainTrainer``. Everything the runner, the report and the plots know of an arm
is read from this table (:func:`baseline_method`, :func:`report_contrasts`, :func:`lead_kept_arms`).

Stage spec (``STAGES``): ``{"commands": [[...]], "output": "...", "stages": [...], "root": "base"|"synthetic"}``;
a stage runs once per fold and is shared by every budget and method (see documentation/benchmarking.md).

Strings in commands, env values and outputs are ``str.format`` templates. Fields: ``{bin}`` (this
Python's bin folder), ``{python}``, ``{dataset_id}``, ``{dataset_name}``, ``{configuration}``,
``{plans}``, ``{fold}``, ``{budget}``, ``{device}``, ``{output}`` / ``{stage_dir}`` (stages),
``{stages[NAME]}`` (a stage's output for this fold), ``{foundation[KEY]}``, ``{params[KEY]}`` (profile
parameters), ``{config_dir}`` (folder of the config file), ``{workdir}``, ``{name}``, ``{profile}`` and, in
``plan_commands``, ``{plan_batch}`` (the config's ``batch_size``, or ``auto`` when a method is planned on its
labeled images alone: nnU-Net's own batch rule).

Budgets are numbers of labeled training cases, or ``"all"``: every training case outside the fold's
validation set (the reference run "plain nnU-Net on all training labels" of the gap closed). ``"methods"``
is a list (every budget runs every method) or an object ``{"10": [...], "20": [...], "all": [...]}``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from tskd_nnunet.atomic_io import read_json


class BenchmarkConfigError(ValueError):
    """The config file is invalid; the message names the file, the key and the fix."""


ALL = "all"  # the budget "every training case outside validation"

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
    "nnUNetTrainer": {"trainer": "TSKDPlainTrainer", "data": "labeled", "baseline": True,
                     "description": "plain nnU-Net (TSKDPlainTrainer = nnUNetTrainer with the schedule hook)"},
    # the real foundation model (LiteMedSAM, packaged): no pretraining stage, no weights path
    "teacher": {"trainer": "{params[teacher_trainer]}", "data": "labeled",
                "description": "LiteMedSAM (MedSAM distilled into TinyViT) fine-tuned in nnU-Net"},
    # every TS-KD arm distils over labeled + the unlabeled pool; tskd_syn adds synthetic cases on top, so
    # tskd_syn - tskd is the effect of the synthetic images alone
    # the student recipe is the profile's student_trainer (chosen from measurements: documentation/benchmarking.md)
    "tskd": {"trainer": "{params[student_trainer]}", "data": "pool", "needs": ["teacher"],
             "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"}, "student_of": "teacher",
             "contrasts": [["task_agnostic", "task-specific vs task-agnostic distillation (same foundation, same data)"],
                           ["self_train", "what the foundation model adds beyond nnU-Net self-training (same recipe, "
                                          "pool)"],
                           ["teacher", "student − its teacher"]],
             "description": "TS-KD student, transfer set = labeled + unlabeled pool"},
    # nnU-Net's own recipe for unlabeled data (train, predict the pool, retrain): the same student recipe and
    # transfer set, distilled from the plain nnU-Net of the same budget; tskd - self_train = what the
    # foundation model adds beyond self-training
    "self_train": {"trainer": "{params[student_trainer]}", "data": "pool", "needs": ["nnUNetTrainer"],
                   "env": {"TSKD_TEACHER_TRAINER": "TSKDPlainTrainer"},
                   "description": "self-training: the same student recipe distilled from plain nnU-Net (same pool)"},
    # the ensemble teacher: LiteMedSAM and plain nnU-Net probabilities averaged (cached targets)
    "tskd_ens": {"trainer": "{params[student_trainer]}", "data": "pool", "needs": ["teacher", "nnUNetTrainer"],
                 "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]},TSKDPlainTrainer"}, "student_of": "teacher",
                 "contrasts": [["tskd", "plain nnU-Net averaged into the teacher (ensemble) vs the foundation teacher "
                                        "alone"]],
                 "description": "TS-KD student of the ensemble teacher (LiteMedSAM + plain nnU-Net, averaged)"},
    # pixel KL + soft Dice against the teacher's probabilities: on CHAOS the KL alone left every small organ
    # unlearned at the cpu_short schedule (documentation/benchmarking.md, session 9)
    "tskd_dice": {"trainer": "DistillTrainer_dice", "data": "pool", "needs": ["teacher"],
                  "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"}, "student_of": "teacher",
                  "contrasts": [["tskd", "soft Dice vs the teacher added to the pixel KD"]],
                  "description": "TS-KD student, pixel KD + soft Dice vs the teacher, transfer set = labeled + pool"},
    # the teacher as annotator: its argmax through CE + soft Dice (nnU-Net's own loss) on every transfer-set case
    "tskd_hard": {"trainer": "DistillTrainer_hard", "data": "pool", "needs": ["teacher"],
                  "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"}, "student_of": "teacher",
                  "contrasts": [["tskd", "the teacher's hard labels (CE + Dice) instead of its probabilities"]],
                  "description": "TS-KD student on the teacher's hard labels (CE + soft Dice), transfer set = labeled + pool"},
    "tskd_syn": {"trainer": "DistillTrainer_pool_syn", "data": "pool_synthetic", "needs": ["teacher"],
                 "stages": ["synthetic"], "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"},
                 "contrasts": [["tskd", "effect of the synthetic images alone"]],
                 "description": "TS-KD student, transfer set = labeled + pool + diffusion-synthetic cases"},
    # the same transfer set with the synthetic cases held to a fifth of each batch (uniform sampling gives 1,000
    # synthetic images beside 256 real ones 80%): separates "synthetic images hurt" from "they crowd out real ones"
    "tskd_syn_cap": {"trainer": "DistillTrainer_pool_syn", "data": "pool_synthetic", "needs": ["teacher"],
                     "stages": ["synthetic"], "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}",
                                                      "TSKD_SYNTHETIC_FRACTION": "0.2"},
                     "contrasts": [["tskd", "synthetic images at a 20% batch share"]],
                     "description": "TS-KD + synthetic, synthetic cases capped at 20% of each batch"},
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
    # what a user has today: a dataset of the labeled images alone, planned by nnU-Net (its own batch rule:
    # at most 5% of the dataset), instead of the plans every other arm shares (planned on labeled + pool,
    # batch fixed by the config)
    "plain_labeled_only": {"trainer": "TSKDPlainTrainer", "data": "labeled", "plan_on": "labeled",
                           "description": "plain nnU-Net planned on the labeled images alone (nnU-Net's own "
                                          "batch size): what a user has today"},
}

def baseline_method(method_defs: Dict[str, Dict[str, Any]] = METHODS) -> str:
    """The report's baseline arm: the one method marked ``"baseline": true``."""
    found = [m for m, spec in method_defs.items() if spec.get("baseline")]
    if len(found) != 1:
        raise BenchmarkConfigError(f"exactly one method must be the baseline (\"baseline\": true), found {found}")
    return found[0]


def report_contrasts(method_defs: Dict[str, Dict[str, Any]] = METHODS) -> List[Tuple[str, str, str]]:
    """(arm, minus arm, what it shows) of every method's ``contrasts``, in method order."""
    return [(m, other, what) for m, spec in method_defs.items() for other, what in spec.get("contrasts", [])]


def lead_kept_arms(method_defs: Dict[str, Dict[str, Any]] = METHODS) -> Dict[str, List[str]]:
    """teacher arm -> its students whose lead kept the report shows (``student_of``)."""
    out: Dict[str, List[str]] = {}
    for m, spec in method_defs.items():
        if spec.get("student_of"):
            out.setdefault(spec["student_of"], []).append(m)
    return out


BASELINE_LABEL = baseline_method()


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
        "--steps", "{params[diffusion_steps]}", "-device", "{device}"]]},  # at the patch size (working resolution)
    # sampled into a root of its own, so no pretraining corpus ever sees synthetic cases by accident
    "synthetic": {"root": "synthetic", "stages": ["diffusion"],
                  "output": "{preprocessed}/{dataset_name}/tskd_extension/{plans}_{configuration}/fold_{fold}/synthetic",
                  "commands": [[
                      "{bin}/tskd_sample_diffusion", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
                      "-n", "{params[num_synthetic]}", "--sampler", "{params[diffusion_sampler]}",
                      "--steps", "{params[diffusion_sampling_steps]}", "--checkpoint", "{stages[diffusion]}",
                      "-device", "{device}"]]},
    "cnn_mim": {"output": "{stage_dir}/cnn_mim.pth", "commands": [[
        "{bin}/tskd_pretrain_cnn_mim", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
        "-tr", "TSKDPlainTrainer", "--steps", "{params[pretrain_steps]}", "-o", "{output}", "-device", "{device}"]]},
    "cnn_moco": {"output": "{stage_dir}/cnn_moco.pth", "commands": [[
        "{bin}/tskd_pretrain_cnn_moco", "{dataset_id}", "{configuration}", "{fold}", "-p", "{plans}",
        "-tr", "TSKDPlainTrainer", "--steps", "{params[pretrain_steps]}", "-o", "{output}", "-device", "{device}"]]},
}

PROFILES: Dict[str, Dict[str, Any]] = {
    # the equal-schedule CPU profile: 25 epochs x 50 iterations = 1,250 steps at batch 8 (+5 validation) for every
    # arm, teacher included; one (dataset, budget) chain fits a session (why: documentation/benchmarking.md, Profiles)
    "cpu": {"device": "cpu", "schedule": "25,50,5",
            "env": {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"},
            "params": {"pretrain_steps": 300, "diffusion_steps": 1000, "diffusion_sampler": "unipc",
                       "diffusion_sampling_steps": 10, "num_synthetic": 1000, "latency_cases": 3,
                       "preprocess_processes": 2,
                       "teacher_trainer": "LiteMedSAMTeacherTrainer_last", "student_trainer": "DistillTrainer_hard"}},
    # nnU-Net's own schedule (1000 epochs x 250 iterations): TSKD_SCHEDULE unset
    "gpu": {"device": "cuda", "schedule": None, "env": {},
            "params": {"pretrain_steps": 20000, "diffusion_steps": 30000, "diffusion_sampler": "ddim",
                       "diffusion_sampling_steps": 50,
                       "num_synthetic": 1000, "latency_cases": 10, "preprocess_processes": 8,
                       "teacher_trainer": "LiteMedSAMTeacherTrainer", "student_trainer": "DistillTrainer_hard"}},
}
# the HC18 teacher study's schedule (20 x 15): allowed for the real benchmark only once it ranks the arms as the
# cpu profile does (its results go to a committed folder of their own, <name>_cpu_short)
PROFILES["cpu_short"] = {**copy.deepcopy(PROFILES["cpu"]), "schedule": "20,15,4"}
# the KL student every cpu_short run was made with (its committed results keep their trainer)
PROFILES["cpu_short"]["params"]["student_trainer"] = "DistillTrainer"
# the learning curve's far point: plain nnU-Net at twice the cpu profile's length (2,500 iterations)
PROFILES["cpu_long"] = {**copy.deepcopy(PROFILES["cpu"]), "schedule": "50,50,5"}
# the equal-schedule matrix on a GPU (benchmarks/gpu_campaign.sh): the cpu profile's schedule and parameters,
# -device cuda; its results are committed apart (<name>_cpu_cuda)
PROFILES["cpu_cuda"] = {**copy.deepcopy(PROFILES["cpu"]), "device": "cuda", "env": {}}

FOUNDATION_DEFAULTS = {"kind": "mae", "arch": "vit_tiny", "backbone": None, "steps": 300, "resolution": 224,
                       "batch_size": 16, "weights": None, "arch_overrides": "", "img_size": ""}


Budget = Union[int, str]


def budget_tag(budget: Budget) -> str:
    """``b20`` / ``ball``: the budget's part of folder names."""
    return f"b{budget}"


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
    budgets: List[Budget]
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
    # methods listed per budget (before adding what they need); every budget lists ``methods`` when the config
    # gives a plain list
    budget_methods: Dict[Budget, List[str]] = field(default_factory=dict)
    # profile -> its own budget_methods (a profile's "methods"), e.g. the equal-schedule cpu matrix
    profile_methods: Dict[str, Dict[Budget, List[str]]] = field(default_factory=dict)
    spread: bool = False
    plan_commands: Optional[List[List[str]]] = None
    batch_size: Optional[int] = None
    committed: Optional[str] = None
    slice_thickness_mm: Optional[float] = None
    notes: List[str] = field(default_factory=list)

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

    def methods_at(self, budget: Budget, only: Optional[Sequence[str]] = None,
                   profile: Optional[str] = None) -> List[str]:
        """The methods run at ``budget`` (those listed there, restricted to ``only``), plus what they need; a
        profile with methods of its own runs those."""
        listed = self.profile_methods.get(profile, self.budget_methods).get(budget, [])
        return self.method_closure([m for m in listed if only is None or m in only])


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _err(path: str, msg: str) -> BenchmarkConfigError:
    return BenchmarkConfigError(f"{path}: {msg}")


def _int_list(path: str, d: dict, key: str, default=None, allow_all: bool = False) -> List[Any]:
    v = d.get(key, default)
    ok = isinstance(v, list) and v and all((isinstance(x, int) and not isinstance(x, bool)) or (allow_all and x == ALL)
                                           for x in v)
    if not ok:
        extra = f" (and \"{ALL}\")" if allow_all else ""
        raise _err(path, f"\"{key}\" must be a non-empty list of integers{extra}, e.g. \"{key}\": [20, 80]")
    if len(set(v)) != len(v):
        raise _err(path, f"\"{key}\" lists a value twice: {v}")
    return list(v)


def _budget_key(path: str, key: str, budgets: Sequence[Budget]) -> Budget:
    for b in budgets:
        if str(b) == str(key).strip():
            return b
    raise _err(path, f"\"methods\" names budget {key!r}, which is not in \"budgets\" {budgets}")


def _command_list(path: str, value: Any, key: str) -> Optional[List[List[str]]]:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, list) and c and all(isinstance(x, str) for x in c) for c in value)):
        raise _err(path, f"\"{key}\" must be null or a list of commands, each a list of strings")
    return [list(c) for c in value]


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
             "method_defs", "stage_defs", "foundation", "profiles", "tolerance_mm", "hc18_csv", "comment",
             "spread", "plan_commands", "batch_size", "committed", "slice_thickness_mm", "notes"}
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
    for m, spec in method_defs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("trainer"), str):
            raise _err(path, f"method {m!r} needs a \"trainer\" (an nnU-Net trainer class name)")
        if spec.get("data", "labeled") not in DATA_SCOPES:
            raise _err(path, f"method {m!r}: \"data\" must be one of {sorted(DATA_SCOPES)}")
        if spec.get("plan_on", "all") not in ("all", "labeled"):
            raise _err(path, f"method {m!r}: \"plan_on\" must be \"all\" (the shared plans, default) or "
                             f"\"labeled\" (a dataset of the labeled images alone, planned by nnU-Net)")
        if spec.get("plan_on") == "labeled" and (spec.get("data", "labeled") != "labeled" or spec.get("needs")
                                                 or spec.get("stages")):
            raise _err(path, f"method {m!r}: \"plan_on\": \"labeled\" is for plain methods (data \"labeled\", "
                             f"no needs, no stages)")
        for dep in spec.get("needs", []):
            if dep not in method_defs:
                raise _err(path, f"method {m!r} needs unknown method {dep!r}")
        for st in spec.get("stages", []):
            if st not in stage_defs:
                raise _err(path, f"method {m!r} needs unknown stage {st!r}; stages: {sorted(stage_defs)}")
        if spec.get("schedule") is not None and not isinstance(spec["schedule"], str):
            raise _err(path, f"method {m!r}: \"schedule\" must be a TSKD_SCHEDULE string, e.g. \"50,50,5\" "
                             f"(epochs, iterations per epoch, validation iterations)")
        for other in [o for o, _ in spec.get("contrasts", [])] + [spec.get("student_of") or m]:
            if other not in method_defs:
                raise _err(path, f"method {m!r}: its \"contrasts\" / \"student_of\" name unknown method {other!r}")
    try:
        baseline_method(method_defs)
    except BenchmarkConfigError as e:
        raise _err(path, str(e)) from None
    budgets = _int_list(path, d, "budgets", allow_all=True)
    if any(b != ALL and b < 1 for b in budgets):
        raise _err(path, "\"budgets\" must be positive numbers of labeled cases (or \"all\")")
    budgets = sorted([b for b in budgets if b != ALL]) + [b for b in budgets if b == ALL]
    if budgets == [ALL]:
        raise _err(path, "\"budgets\" needs at least one number of labeled cases besides \"all\"")
    budget_methods = _parse_methods(path, d.get("methods"), budgets, method_defs, "\"methods\"", every_budget=True)
    methods = list(dict.fromkeys(m for lst in budget_methods.values() for m in lst))
    # a profile may run its own matrix (e.g. the equal-schedule cpu profile): "profiles": {"cpu": {"methods": ...}}
    profile_methods = {name: _parse_methods(path, prof["methods"], budgets, method_defs,
                                            f"\"profiles\".{name}.methods", every_budget=False)
                       for name, prof in profiles.items() if isinstance(prof, dict) and prof.get("methods")}
    foundation = dict(FOUNDATION_DEFAULTS)
    foundation.update(d.get("foundation") or {})
    if foundation.get("backbone") is None:
        foundation["backbone"] = foundation["arch"]
    if isinstance(foundation.get("arch_overrides"), dict):
        foundation["arch_overrides"] = json.dumps(foundation["arch_overrides"])
    num_folds = d.get("num_folds", 5)
    folds = _int_list(path, d, "folds", [0])
    if not isinstance(num_folds, int) or num_folds < 1 or any(not 0 <= f < num_folds for f in folds):
        raise _err(path, f"\"folds\" {folds} must lie in 0..num_folds-1 (num_folds = {num_folds})")
    batch = d.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise _err(path, "\"batch_size\" must be null or a positive integer (the batch of the plans variant, "
                         "filled into {plan_batch} of \"plan_commands\")")
    thickness = d.get("slice_thickness_mm")
    if thickness is not None and (not isinstance(thickness, (int, float)) or isinstance(thickness, bool)
                                  or thickness <= 0):
        raise _err(path, "\"slice_thickness_mm\" must be null or a positive number (mm between 2D slices, for "
                         "organ volumes summed over a patient's slices)")
    committed = d.get("committed")
    if committed is not None and not isinstance(committed, str):
        raise _err(path, "\"committed\" must be null or a folder (template), e.g. "
                         "\"{config_dir}/../../documentation/benchmarks/{name}_{profile}\"")
    notes = d.get("notes", [])
    if isinstance(notes, str):
        notes = [notes]
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _err(path, "\"notes\" must be a list of strings (printed at the top of the report)")
    if not isinstance(d.get("spread", False), bool):
        raise _err(path, "\"spread\" must be true or false (labeled cases from as many patients as possible)")
    cfg = BenchmarkConfig(
        path=os.path.abspath(path), name=str(d.get("name", os.path.splitext(os.path.basename(path))[0])),
        dataset_id=ds["id"], convert=convert, raw_root=ds.get("raw_root"), preprocessed_root=ds.get("preprocessed_root"),
        configuration=str(d.get("configuration", "2d")), plans=str(d.get("plans", "nnUNetPlans")),
        budgets=budgets, folds=folds, num_folds=num_folds, seed=int(d.get("seed", 0)), methods=methods,
        method_defs=method_defs, stage_defs=stage_defs, foundation=foundation, profiles=profiles,
        tolerance_mm=float(d.get("tolerance_mm", 2.0)), hc18_csv=d.get("hc18_csv"), raw=d,
        budget_methods=budget_methods, profile_methods=profile_methods, spread=bool(d.get("spread", False)),
        plan_commands=_command_list(path, d.get("plan_commands"), "plan_commands"), batch_size=batch,
        committed=committed, slice_thickness_mm=None if thickness is None else float(thickness), notes=list(notes))
    for b in budgets:
        for prof in [None] + list(profile_methods):
            cfg.methods_at(b, profile=prof)  # rejects cycles early
    return cfg


def _parse_methods(path: str, raw: Any, budgets: Sequence[Budget], method_defs: Dict[str, Any], where: str,
                   every_budget: bool) -> Dict[Budget, List[str]]:
    """A list (every budget runs it) or ``{"<budget>": [names]}``; ``every_budget``: each budget must be listed."""
    if isinstance(raw, dict):
        budget_methods = {}
        for key, lst in raw.items():
            b = _budget_key(path, key, budgets)
            if not isinstance(lst, list) or not all(isinstance(m, str) for m in lst):
                raise _err(path, f"{where} for budget {key!r} must be a list of method names")
            budget_methods[b] = list(lst)
        missing = [b for b in budgets if b not in budget_methods]
        if missing and every_budget:
            raise _err(path, f"{where} lists no methods for budget(s) {missing}; give each budget a list "
                             f"(or remove the budget)")
    elif isinstance(raw, list) and raw:
        budget_methods = {b: list(raw) for b in budgets}
    else:
        raise _err(path, f"{where} must be a non-empty list of names from {sorted(method_defs)}, or an object "
                         f"{{\"<budget>\": [names]}}")
    for b, lst in budget_methods.items():
        if not lst:
            raise _err(path, f"{where} for budget {b} must be a non-empty list of method names")
        if len(set(lst)) != len(lst):
            raise _err(path, f"{where} lists a method twice at budget {b}: {lst}")
        for m in lst:
            if m not in method_defs:
                raise _err(path, f"unknown method {m!r} in {where}; known: {sorted(method_defs)} "
                                 f"(or define it under \"method_defs\")")
    return budget_methods
