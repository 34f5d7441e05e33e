"""Student as a plain nnU-Net model zip: sizes (checkpoint vs zip, fp32 vs fp16) and what fp16 weights change.

    .venv/bin/python benchmarks/bench_export_zip.py -m $nnUNet_results/Dataset502_X/DistillTrainer_hard__nnUNetPlans__2d_128 \
        [-m ANOTHER_STUDENT_FOLDER ...] -i $nnUNet_raw/Dataset502_X/imagesTs [-f 0] [--n-cases 40] [--tag NAME]

Per student model folder: ``tskd_export_nnunet`` writes an fp32 and an fp16 zip; each is installed with nnU-Net's
``nnUNetv2_install_pretrained_model_from_zip`` into its own nnUNet_results and predicted with ``nnUNetv2_predict
-tr nnUNetTrainer --save_probabilities`` on the first ``--n-cases`` images, as a recipient would; the trained
folder itself is predicted with the plugin (``-tr <student trainer>``). Reported: the trained checkpoint
(weights + optimizer state), the exported checkpoint, the zip, and the largest |probability difference| and
the share of changed voxels of fp16 and fp32 zips vs the plugin's prediction. Writes
benchmarks/results/bench_export_zip_<tag>.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MB = 1024 ** 2


def run(cmd: List[str], env: Dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")


def predict(env: Dict[str, str], results: str, images: str, out: str, dataset: str, configuration: str,
            trainer: str, plans: str, fold: str) -> None:
    run([os.path.join(BIN, "nnUNetv2_predict"), "-i", images, "-o", out, "-d", dataset, "-c", configuration,
         "-tr", trainer, "-p", plans, "-f", fold, "--save_probabilities", "-npp", "1", "-nps", "1",
         "-device", "cpu"], {**env, "nnUNet_results": results})


def compare(reference: str, other: str) -> Tuple[float, float]:
    """Largest |probability difference| and the share of voxels whose label differs, over all cases."""
    worst, changed, total = 0.0, 0, 0
    for npz in sorted(glob.glob(os.path.join(reference, "*.npz"))):
        a = np.load(npz)["probabilities"].astype(np.float64)
        b = np.load(os.path.join(other, os.path.basename(npz)))["probabilities"].astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max()))
        la, lb = a.argmax(0), b.argmax(0)
        changed += int((la != lb).sum())
        total += la.size
    return worst, changed / max(total, 1)


def bench_one(model_folder: str, images: str, fold: str, work: str, env: Dict[str, str]) -> Dict[str, object]:
    dataset = os.path.basename(os.path.dirname(model_folder))
    trainer, plans, configuration = os.path.basename(model_folder).split("__")
    source_results = os.path.dirname(os.path.dirname(model_folder))
    row: Dict[str, object] = {"student": trainer, "configuration": configuration,
                              "checkpoint_mb": os.path.getsize(os.path.join(model_folder, f"fold_{fold}",
                                                                            "checkpoint_final.pth")) / MB}
    ref = os.path.join(work, f"{trainer}_plugin")
    predict(env, source_results, images, ref, dataset, configuration, trainer, plans, fold)
    for precision in ("fp32", "fp16"):
        zip_path = os.path.join(work, f"{trainer}_{precision}.zip")
        run([os.path.join(BIN, "tskd_export_nnunet"), "-d", dataset, "-c", configuration, "-f", fold, "-tr", trainer,
             "-p", plans, "-o", zip_path] + (["--fp16"] if precision == "fp16" else []),
            {**env, "nnUNet_results": source_results})
        results = os.path.join(work, f"results_{trainer}_{precision}")
        os.makedirs(results)
        run([os.path.join(BIN, "nnUNetv2_install_pretrained_model_from_zip"), zip_path],
            {**env, "nnUNet_results": results})
        exported = glob.glob(os.path.join(results, dataset, f"nnUNetTrainer__*__{configuration}"))[0]
        zip_plans = os.path.basename(exported).split("__")[1]
        out = os.path.join(work, f"{trainer}_{precision}_pred")
        predict(env, results, images, out, dataset, configuration, "nnUNetTrainer", zip_plans, fold)
        worst, changed = compare(ref, out)
        row.update({f"{precision}_checkpoint_mb": os.path.getsize(os.path.join(exported, f"fold_{fold}",
                                                                                "checkpoint_final.pth")) / MB,
                    f"{precision}_zip_mb": os.path.getsize(zip_path) / MB,
                    f"{precision}_max_prob_diff": worst, f"{precision}_changed_voxels": changed})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", action="append", required=True, help="trained student model folder (repeatable)")
    ap.add_argument("-i", required=True, help="images to predict (nnU-Net raw naming, _0000)")
    ap.add_argument("-f", default="0", help="fold (default 0)")
    ap.add_argument("--n-cases", type=int, default=40, help="first N cases of -i (default 40)")
    ap.add_argument("--tag", default=None, help="results file name (default: the first folder's dataset)")
    a = ap.parse_args()
    env = dict(os.environ)
    cases = sorted({os.path.basename(p)[:-len("_0000.nii.gz")]
                    for p in glob.glob(os.path.join(a.i, "*_0000.nii.gz"))})[:a.n_cases]
    if not cases:
        sys.exit(f"{a.i}: no *_0000.nii.gz images. Fix: give an imagesTs folder in nnU-Net's raw naming")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_export_zip_") as work:
        images = os.path.join(work, "images")
        os.makedirs(images)
        for c in cases:
            for p in glob.glob(os.path.join(a.i, f"{c}_*.nii.gz")):
                os.symlink(os.path.abspath(p), os.path.join(images, os.path.basename(p)))
        for folder in a.m:
            print(f"[bench_export_zip] {folder}", flush=True)
            rows.append(bench_one(os.path.abspath(folder.rstrip("/")), images, a.f, work, env))
    tag = a.tag or os.path.basename(os.path.dirname(os.path.abspath(a.m[0].rstrip("/"))))
    lines = [f"# Student as an nnU-Net model zip: sizes and fp16 ({tag})", "",
             f"`benchmarks/bench_export_zip.py`; {len(cases)} cases of `{a.i}`, fold {a.f}; {platform.processor() or platform.machine()}, "
             f"torch threads as nnU-Net sets them. Checkpoint = the trained `checkpoint_final.pth` (weights + optimizer "
             f"state); exported = the weights-only checkpoint inside the zip. Differences are vs the plugin's own "
             f"`nnUNetv2_predict -tr <student>` of the trained folder (softmax probabilities; changed voxels = argmax "
             f"differs).", "",
             "| student | config | checkpoint (MB) | zip fp32 (MB) | exported ckpt fp32 (MB) | zip fp16 (MB) | "
             "exported ckpt fp16 (MB) | fp32: max abs Δ prob | fp16: max abs Δ prob | fp16: changed voxels |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['configuration']} | {r['checkpoint_mb']:.1f} | {r['fp32_zip_mb']:.1f} | "
                     f"{r['fp32_checkpoint_mb']:.1f} | {r['fp16_zip_mb']:.1f} | {r['fp16_checkpoint_mb']:.1f} | "
                     f"{r['fp32_max_prob_diff']:.2g} | {r['fp16_max_prob_diff']:.2g} | "
                     f"{100 * r['fp16_changed_voxels']:.4f} % |")
    out = os.path.join(REPO, "benchmarks", "results", f"bench_export_zip_{tag}.md")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
