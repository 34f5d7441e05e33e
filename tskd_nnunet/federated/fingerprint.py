"""Federated planning: every site's nnU-Net fingerprint (no image), merged on the server, planned at every site.

Site side (:func:`site_fingerprint`, :func:`plan_with_merged`): nnU-Net's own ``DatasetFingerprintExtractor``
and ``ExperimentPlanner`` / ``preprocess_dataset``; nothing of either is reimplemented. The site keeps its own
fingerprint as ``dataset_fingerprint_local.json`` and writes the merged one as nnU-Net's
``dataset_fingerprint.json``, which the planner reads.

Server side (:func:`merge_fingerprints`), FednnU-Net's rule, each site weighted by its number of cases n_k:

- ``spacings`` and ``shapes_after_crop``: the per-case lists pooled (so medians, target spacing and patch size
  are those of the union of the cases);
- intensity ``mean``, ``median``, ``percentile_00_5``, ``percentile_99_5``: case-weighted means of the sites'
  values (a site sends statistics, never voxels, so pooled percentiles are approximated);
- ``std``: the pooled standard deviation (law of total variance over the sites' means and stds, case-weighted);
- ``min`` / ``max``: the smallest / largest over the sites;
- ``median_relative_size_after_cropping``: case-weighted mean.

The planner also reads ``numTraining`` from dataset.json (for the batch-size cap); the site plans with the
federation's total so that every site computes the same plans. The sites must share the dataset id and name,
channels, labels and file ending (checked before merging; the error names the site and the field).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

MERGED_KEYS = ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
               "median_relative_size_after_cropping")
# dataset.json fields every site must share (their plans would differ otherwise)
SHARED_DATASET_FIELDS = ("channel_names", "labels", "file_ending")


class FederatedPlanningError(ValueError):
    """Sites whose datasets cannot share one plans file; the message names the site, the field and the fix."""


def plans_sha256(plans: dict) -> str:
    """The identity of a plans dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


def check_compatible(sites: Sequence[Tuple[str, dict]]) -> None:
    """``sites``: (site name, {"dataset_name":..., "dataset_json": {...}}); raise if they cannot share plans."""
    ref_site, ref = sites[0]
    for site, info in sites[1:]:
        if info["dataset_name"] != ref["dataset_name"]:
            raise FederatedPlanningError(
                f"site {site} has dataset {info['dataset_name']}, site {ref_site} {ref['dataset_name']}. Fix: convert "
                f"the data under the same dataset id and name at every site")
        for f in SHARED_DATASET_FIELDS:
            if info["dataset_json"].get(f) != ref["dataset_json"].get(f):
                raise FederatedPlanningError(
                    f"site {site}: dataset.json field {f!r} is {info['dataset_json'].get(f)!r}, at site {ref_site} "
                    f"{ref['dataset_json'].get(f)!r}. Fix: use the same {f} in every site's dataset.json")


def merge_fingerprints(fingerprints: Sequence[dict], num_cases: Sequence[int]) -> dict:
    """One nnU-Net fingerprint for the union of the sites' cases (rule in the module docstring)."""
    if not fingerprints or len(fingerprints) != len(num_cases) or min(num_cases) < 1:
        raise ValueError(f"need one positive case count per fingerprint, got {list(num_cases)}")
    for i, (fp, n) in enumerate(zip(fingerprints, num_cases)):
        missing = [k for k in MERGED_KEYS if k not in fp]
        if missing:
            raise ValueError(f"fingerprint {i} lacks {missing}: not an nnU-Net dataset_fingerprint.json")
        if len(fp["spacings"]) != n or len(fp["shapes_after_crop"]) != n:
            raise ValueError(f"fingerprint {i} describes {len(fp['spacings'])} cases, its site reports {n}")
    total = float(sum(num_cases))
    w = [n / total for n in num_cases]
    channels = list(fingerprints[0]["foreground_intensity_properties_per_channel"])
    intensities: Dict[str, Dict[str, float]] = {}
    for c in channels:
        stats = [fp["foreground_intensity_properties_per_channel"][c] for fp in fingerprints]
        mean = sum(wk * s["mean"] for wk, s in zip(w, stats))
        var = sum(wk * (s["std"] ** 2 + (s["mean"] - mean) ** 2) for wk, s in zip(w, stats))
        intensities[c] = {
            "mean": float(mean),
            "median": float(sum(wk * s["median"] for wk, s in zip(w, stats))),
            "std": float(math.sqrt(max(var, 0.0))),
            "min": float(min(s["min"] for s in stats)),
            "max": float(max(s["max"] for s in stats)),
            "percentile_99_5": float(sum(wk * s["percentile_99_5"] for wk, s in zip(w, stats))),
            "percentile_00_5": float(sum(wk * s["percentile_00_5"] for wk, s in zip(w, stats))),
        }
    rel = [fp["median_relative_size_after_cropping"] for fp in fingerprints]
    return {
        "spacings": [s for fp in fingerprints for s in fp["spacings"]],
        "shapes_after_crop": [s for fp in fingerprints for s in fp["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": intensities,
        "median_relative_size_after_cropping": float(sum(wk * float(r) for wk, r in zip(w, rel))),
    }


# ---------------------------------------------------------------------------------------------------- site side
def site_fingerprint(dataset_id: int, num_processes: int = 1) -> Dict[str, Any]:
    """nnU-Net's fingerprint of this site's nnUNet_raw dataset (integrity verified first), with what the server
    needs to merge and check it: dataset name, case count and the dataset.json fields sites must share."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from tskd_nnunet.atomic_io import atomic_write_json

    name = convert_id_to_dataset_name(dataset_id)
    fp = extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                     clean=True, verbose=False, show_progress_bar=False)
    fp = json.loads(json.dumps(fp, default=_json_number))  # numpy -> JSON types, as nnU-Net's save_json wrote it
    atomic_write_json(join(nnUNet_preprocessed, name, "dataset_fingerprint_local.json"), fp)
    dataset_json = load_json(join(nnUNet_raw, name, "dataset.json"))
    return {"dataset_name": name, "num_cases": len(fp["spacings"]), "fingerprint": fp,
            "dataset_json": {k: dataset_json.get(k) for k in SHARED_DATASET_FIELDS}}


def _json_number(o: Any) -> Any:
    import numpy as np
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def plan_with_merged(dataset_id: int, merged: dict, total_cases: int, configurations: Sequence[str] = ("2d",),
                     planner: str = "ExperimentPlanner", plans_name: Optional[str] = None,
                     num_processes: int = 1, cpu_plan: Optional[Tuple[int, int]] = None) -> Tuple[str, str]:
    """Write ``merged`` as this site's dataset_fingerprint.json, plan with nnU-Net's ``planner`` (seeing the
    federation's ``total_cases``) and preprocess ``configurations``. Returns (plans identifier, plans sha256).
    ``cpu_plan`` = (size, batch): each configuration is added as ``tskd_plan_cpu -s size -b batch`` would add it
    (a fixed batch, so that no site's own case count reaches it). Skips planning and preprocessing when they were
    already done with this fingerprint (a resumed federation)."""
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from tskd_nnunet.atomic_io import atomic_write_json, read_json

    name = convert_id_to_dataset_name(dataset_id)
    folder = join(nnUNet_preprocessed, name)
    fp_file, stamp_file = join(folder, "dataset_fingerprint.json"), join(folder, "federated_plans.json")
    fp_hash = plans_sha256(merged)
    stamp = read_json(stamp_file, default={})
    if stamp.get("fingerprint_sha256") == fp_hash and os.path.isfile(join(folder, stamp.get("plans", "") + ".json")):
        plans = load_json(join(folder, stamp["plans"] + ".json"))
        if plans_sha256(plans) == stamp.get("plans_sha256") and all(
                os.path.isdir(join(folder, plans["configurations"][c]["data_identifier"])) for c in configurations):
            return stamp["plans"], stamp["plans_sha256"]
    atomic_write_json(fp_file, merged)
    cls = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), planner,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise FederatedPlanningError(f"nnU-Net has no experiment planner {planner!r}. Fix: name one of nnU-Net's "
                                     f"planners (ExperimentPlanner, nnUNetPlannerResEncM, ...)")
    kwargs = {"plans_name": plans_name} if plans_name else {}
    p = cls(dataset_id, **kwargs)
    p.dataset_json["numTraining"] = int(total_cases)  # the batch-size cap sees the federation, not this site
    # nnUNet_n_proc_DA=0 (set for training on small machines) reaches torch.set_num_threads(0) in the planner
    n_proc_da = os.environ.pop("nnUNet_n_proc_DA", None) if os.environ.get("nnUNet_n_proc_DA") == "0" else None
    try:
        p.plan_experiment()
        if cpu_plan is not None:  # builds a planner too
            from tskd_nnunet.plans_variant import add_cpu_configuration
            for c in configurations:
                add_cpu_configuration(name, int(cpu_plan[0]), int(cpu_plan[1]), name=c, plans_name=p.plans_identifier)
    finally:
        if n_proc_da is not None:
            os.environ["nnUNet_n_proc_DA"] = n_proc_da
    preprocess_dataset(dataset_id, p.plans_identifier, list(configurations), [num_processes] * len(configurations),
                       verbose=False, show_progress_bar=False)
    plans = load_json(join(folder, p.plans_identifier + ".json"))
    digest = plans_sha256(plans)
    atomic_write_json(stamp_file, {"fingerprint_sha256": fp_hash, "plans": p.plans_identifier, "plans_sha256": digest,
                                   "total_cases": int(total_cases)})
    return p.plans_identifier, digest
