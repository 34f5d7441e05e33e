"""A smaller 2D configuration for CPU benchmarks, added to nnU-Net's own plans file.

``tskd_plan_cpu -d 501 -s 128 -b 8`` adds configuration ``2d_128`` to
``nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json`` (nnU-Net's documented way to vary a plan: a new entry
under "configurations"), planned by nnU-Net's own ``ExperimentPlanner.get_plans_for_configuration`` at a
spacing coarsened so that the median image's longest side is ``-s`` pixels; patch size, network topology
and normalisation are nnU-Net's choice for that spacing. The batch size is fixed (``-b``) instead of
nnU-Net's "5% of the dataset" cap, so every benchmark arm trains with the same batch whatever its
transfer set (``-b auto`` keeps nnU-Net's own batch, e.g. for a dataset of the labeled images alone).
Then ``nnUNetv2_preprocess -d 501 -c 2d_128`` and ``nnUNetv2_train 501 2d_128 ...``.
Predictions are exported at the original spacing, so metrics stay in the images' own millimetres.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

from tskd_nnunet.atomic_io import atomic_write_text


class PlansVariantError(ValueError):
    """The plans file is missing or lacks the source configuration (one line with the fix)."""


def check_size_and_batch(size: int, batch_size: Optional[int]) -> None:
    """PlansVariantError unless the size is >= 16 pixels and a given batch >= 1."""
    if size < 16 or (batch_size is not None and batch_size < 1):
        raise PlansVariantError(f"-s {size} / -b {batch_size}: the size must be >= 16 pixels and the batch >= 1")


def add_cpu_configuration(dataset: str, size: int, batch_size: Optional[int], name: Optional[str] = None,
                          plans_name: str = "nnUNetPlans", source: str = "2d") -> dict:
    """Plan ``name`` (default ``2d_<size>``) and write it into the plans file; returns its configuration.

    ``batch_size`` None keeps the batch nnU-Net's planner chose (its memory estimate, capped at 5% of the
    dataset's voxels)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = name or f"{source}_{size}"
    check_size_and_batch(size, batch_size)
    dataset_name = maybe_convert_to_dataset_name(dataset)
    plans_file = os.path.join(nnUNet_preprocessed, dataset_name, f"{plans_name}.json")
    if not os.path.isfile(plans_file):
        raise PlansVariantError(f"{plans_file} not found. Fix: run nnUNetv2_plan_and_preprocess -d {dataset} "
                                f"(or nnUNetv2_plan_experiment) first.")
    with open(plans_file) as f:
        plans = json.load(f)
    src = plans["configurations"].get(source)
    if src is None or len(src.get("spacing", [])) != 2:
        raise PlansVariantError(f"{plans_file} has no 2D configuration {source!r}. Fix: plan with -c 2d first.")
    spacing = np.array(src["spacing"], dtype=float)
    median = np.array(src["median_image_size_in_voxels"], dtype=float)
    factor = max(1.0, float(median.max()) / size)  # never finer than nnU-Net's own 2d spacing
    new_spacing, new_median = spacing * factor, np.round(median / factor)
    planner = ExperimentPlanner(dataset_name, plans_name=plans_name)
    n_voxels = float(np.prod(new_median) * planner.dataset_json["numTraining"])
    config = planner.get_plans_for_configuration(new_spacing, new_median, f"{plans_name}_{name}", n_voxels, {})
    if batch_size is not None:
        config["batch_size"] = int(batch_size)
    config["batch_dice"] = src.get("batch_dice", True)
    plans["configurations"][name] = json.loads(json.dumps(config, default=_jsonable))
    atomic_write_text(plans_file, json.dumps(plans, indent=4, sort_keys=False))
    return plans["configurations"][name]


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _batch_arg(value: str) -> Optional[int]:
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name (as nnUNetv2_plan_and_preprocess -d)")
    p.add_argument("-s", dest="size", type=int, default=128, help="longest side of the median image, pixels (128)")
    p.add_argument("-b", dest="batch_size", type=_batch_arg, default=8,
                   help="fixed batch size (8), or 'auto' for nnU-Net's own (at most 5%% of the dataset)")
    p.add_argument("-c", dest="name", default=None, help="name of the new configuration (default 2d_<size>)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    a = p.parse_args(argv)
    try:
        cfg = add_cpu_configuration(a.dataset, a.size, a.batch_size, a.name, a.plans)
    except PlansVariantError as e:
        print(f"tskd_plan_cpu: error: {e}", file=sys.stderr)
        sys.exit(2)
    name = a.name or f"2d_{a.size}"
    print(f"added configuration {name}: spacing {cfg['spacing']}, patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"median image {cfg['median_image_size_in_voxels']}.\nNext: nnUNetv2_preprocess -d {a.dataset} -c {name} "
          f"-plans_name {a.plans}")


if __name__ == "__main__":
    main()
