"""Where everything of one benchmark lives: the work directory's folders, the raw dataset, the committed folder
(tree and decisions: documentation/benchmarking.md, "Layout of a work directory")."""
from __future__ import annotations

import os
from typing import List, Optional

from tskd_nnunet.atomic_io import read_json
from tskd_nnunet.benchmark.commands import BenchmarkError, fill
from tskd_nnunet.benchmark.committed import CommittedStore
from tskd_nnunet.benchmark.committed_model import PARTIAL
from tskd_nnunet.benchmark.config import Budget, BenchmarkConfig, budget_tag
from tskd_nnunet.data.preprocessed_files import TARGETS_DIR

STATE = "state.json"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's


class WorkdirLayout:
    """The paths of one config, profile and work directory; nothing is created here."""

    def __init__(self, cfg: BenchmarkConfig, profile: str, workdir: str, committed: Optional[str] = None):
        self.cfg = cfg
        self.profile_name = profile
        self.profile = cfg.profile(profile)
        self.workdir = os.path.abspath(workdir)
        if cfg.convert is not None:  # the benchmark converts: it owns these two roots
            self.raw_root = os.path.join(self.workdir, "nnUNet_raw")
            self.base_pp_root = os.path.join(self.workdir, "nnUNet_preprocessed")
        else:
            self.raw_root = self._root_from(cfg.raw_root, "nnUNet_raw")
            self.base_pp_root = self._root_from(cfg.preprocessed_root, "nnUNet_preprocessed")
        # committed results: one folder per finished run, done on any machine (tskd_nnunet.benchmark.committed)
        self.store = CommittedStore(committed) if committed else None
        self.dataset_name = self.find_dataset_name()

    def _root_from(self, configured: Optional[str], var: str) -> str:
        value = configured or os.environ.get(var)
        if not value:
            raise BenchmarkError(f"{var} is not set and the config has \"convert\": null. Fix: export {var}=... "
                                 f"or give \"dataset\": {{\"{var.split('_')[1]}_root\": ...}} in {self.cfg.path}")
        return os.path.abspath(fill(value, {"config_dir": self.cfg.config_dir}, self.cfg.path))

    def find_dataset_name(self) -> str:
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

    # ---------------------------------------------------------------- the raw dataset (test set: imagesTs/labelsTs)
    @property
    def raw_dataset(self) -> str:
        return os.path.join(self.raw_root, self.dataset_name)

    def file_ending(self) -> str:
        dj = read_json(os.path.join(self.raw_dataset, "dataset.json"), None)
        if not dj or "file_ending" not in dj:
            raise BenchmarkError(f"{self.raw_dataset}/dataset.json is missing or has no file_ending")
        return dj["file_ending"]

    def test_cases(self) -> List[str]:
        fe = self.file_ending()
        return sorted(f[: -len(fe)] for f in os.listdir(os.path.join(self.raw_dataset, "labelsTs")) if f.endswith(fe))

    def predictions_complete(self, folder: str) -> bool:
        if not os.path.isdir(folder):
            return False
        have = set(os.listdir(folder))
        return all(c + self.file_ending() in have for c in self.test_cases())

    # ---------------------------------------------------------------- the work directory
    def marker(self, name: str) -> str:
        """Done-file of a dataset stage (convert, plan_and_preprocess)."""
        return os.path.join(self.workdir, "stages", f"{name}.json")

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

    def run_state(self, budget: Budget, method: str, fold: int) -> dict:
        return read_json(os.path.join(self.run_dir(budget, method, fold), STATE), {}) or {}

    def stage_dir(self, stage: str, fold: int) -> str:
        return os.path.join(self.workdir, "stages", stage, f"fold_{fold}")

    def partial_dir(self, budget: Budget, method: str, fold: int) -> str:
        """Where ``--park`` leaves an unfinished training's checkpoint (committed folder)."""
        assert self.store is not None
        return os.path.join(self.store.root, PARTIAL, os.path.basename(self.store.run_dir(method, budget, fold)))
