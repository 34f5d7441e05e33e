"""Open Kidney Ultrasound data set (Singla et al. 2022) → nnU-Net Dataset505_KidneyUS_<task>_r<rater>.

    python -m dataset_conversion.Dataset505_KidneyUS --images KIDNEYUS_IMAGES --labels kidneyUS/labels \
        [--task capsule|regions] [--rater 1|2] [--channels gray|rgb]

Inputs: the image PNGs as released to registered users (``--images``, ``*.png``) and the ``labels/`` tree of
the data set's repository: ``reviewed_masks_<rater>/<task>/<image name>.png`` and ``reviewed_labels_<rater>.csv``.
Labels: capsule 0 background / 1 capsule; regions 0 background, 1 central echo complex, 2 medulla, 3 cortex.
No pixel spacing is published, so cases stay ``.png``.

Patients: one frame per individual, but 10 images were annotated three times (same ``IM-xxxx-yyyy`` part under
different leading numbers) and some leading numbers hold two frames. Cases connected by a shared leading number
or a shared image part form one patient group, so copies never straddle a split.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import SimpleITK as sitk

from dataset_conversion.common import (CaseSource, ConversionError, add_common_args, converter_parser, read_2d_array,
                                       read_2d_mask, remap_labels, run_cli, sanitize_case_id, write_dataset_from_args)

TASK_LABELS = {
    "capsule": {"background": 0, "capsule": 1},
    "regions": {"background": 0, "central_echo_complex": 1, "medulla": 2, "cortex": 3},
}


def patient_groups(names: Sequence[str]) -> Dict[str, str]:
    """File name → patient id: connected components of 'same leading number' or 'same image part'."""
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_by_key: Dict[str, str] = {}
    for n in names:
        stem = n[:-4] if n.lower().endswith(".png") else n
        lead, _, rest = stem.partition("_")
        for key in (f"lead:{lead}", f"image:{rest or stem}"):
            if key in first_by_key:
                parent[find(n)] = find(first_by_key[key])
            else:
                first_by_key[key] = n
    groups: Dict[str, List[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    out = {}
    for members in groups.values():
        pid = "kus_" + sanitize_case_id(min(members, key=lambda m: (len(m), m))[:-4])
        for m in members:
            out[m] = pid
    return out


def csv_file_names(csv_path: Path) -> set:
    if not csv_path.is_file():
        raise ConversionError(f"missing file {csv_path}: the KidneyUS labels/ tree holds reviewed_labels_<rater>.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise ConversionError(f"{csv_path} has no 'filename' column: use the VIA export of the KidneyUS labels")
        return {row["filename"] for row in reader}


def build_cases(images: Path, labels: Path, task: str, rater: int, channels: str) -> List[CaseSource]:
    mask_dir = labels / f"reviewed_masks_{rater}" / task
    if not mask_dir.is_dir():
        raise ConversionError(f"missing folder {mask_dir}: pass the KidneyUS labels/ folder with --labels")
    if not images.is_dir():
        raise ConversionError(f"images folder {images} does not exist: pass the released KidneyUS images")
    listed = csv_file_names(labels / f"reviewed_labels_{rater}.csv")
    masks = {p.name: p for p in sorted(mask_dir.glob("*.png"))}
    imgs = {p.name: p for p in sorted(images.glob("*.png"))}
    for name, p in masks.items():
        if name not in imgs:
            raise ConversionError(f"missing image {images / name} for mask {p}: add the image or pass the "
                                  f"complete KidneyUS image folder")
        if name not in listed:
            raise ConversionError(f"mask {p} is not in reviewed_labels_{rater}.csv: use an unmodified labels/ tree")
    for name, p in imgs.items():
        if name not in masks:
            raise ConversionError(f"missing mask {mask_dir / name} for image {p}: remove the image or restore "
                                  f"the mask")
    groups = patient_groups(sorted(masks))
    value_map = {v: v for v in TASK_LABELS[task].values()}
    cases = []
    for name in sorted(masks):
        img_p, mask_p = imgs[name], masks[name]

        def load(i=img_p, m=mask_p):
            chans = read_2d_array(i, channels)
            lab = remap_labels(read_2d_mask(m), value_map, m, f"expected the KidneyUS {task} values")
            return [sitk.GetImageFromArray(c) for c in chans], sitk.GetImageFromArray(lab)
        cases.append(CaseSource(sanitize_case_id(name[:-4]), groups[name], [str(img_p)], str(mask_p), load))
    return cases


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_kidneyus", __doc__)
    p.add_argument("--images", required=True, type=Path, help="folder of the released KidneyUS image PNGs")
    p.add_argument("--labels", required=True, type=Path, help="the labels/ folder of the kidneyUS repository")
    p.add_argument("--task", choices=("capsule", "regions"), default="capsule")
    p.add_argument("--rater", type=int, choices=(1, 2), default=1, help="sonographer whose masks are used")
    p.add_argument("--channels", choices=("gray", "rgb"), default="gray",
                   help="gray: one channel (R=G=B kept losslessly, colour → luminance); rgb: three channels")
    add_common_args(p, 505, None, name_help="dataset name (default KidneyUS_<task>_r<rater>)")
    a = p.parse_args(argv)
    channel_names = {0: "US"} if a.channels == "gray" else {0: "R", 1: "G", 2: "B"}
    write_dataset_from_args(a, lambda: build_cases(a.images, a.labels, a.task, a.rater, a.channels),
                            channel_names=channel_names, labels=TASK_LABELS[a.task], file_ending=".png",
                            licence="CC BY-NC-SA 4.0",
                            reference="Singla et al., The Open Kidney Ultrasound Data Set, arXiv:2206.06657",
                            dataset_name=a.name or f"KidneyUS_{a.task}_r{a.rater}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
