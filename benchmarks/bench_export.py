"""Deployable student: PyTorch fp32 vs ONNX fp32 vs ONNX int8 on one trained model folder (CPU).

    .venv/bin/python benchmarks/bench_export.py -m $nnUNet_results/Dataset990_Phantom/DistillTrainer__nnUNetPlans__2d \
        -i $nnUNet_raw/Dataset990_Phantom/imagesTs [-f 0] [--threads 1] [--repeats 5] [--tag NAME]

The model folder is exported once (``export_model_folder``, int8 static unless ``--int8_method dynamic``;
calibration reads nnUNet_preprocessed). Each variant then runs in its own subprocess, so its peak RSS
(VmHWM of /proc/self/status, else ``resource.getrusage``; the whole process: Python, torch, onnxruntime, nnU-Net, model, one case) is its own.
Every case goes through nnU-Net's whole per-case path (``predict_single_npy_array``: preprocessing, sliding
window, Gaussian weighting, mirroring unless ``--disable_tta``, resampling); latency per case is the median
of ``--repeats`` runs after one warm-up, then the median over cases. Probabilities and segmentations are
compared with PyTorch's: max |difference of probabilities| (must be <= 1e-3 for ONNX fp32) and mean
foreground Dice of the segmentation vs PyTorch's. Writes benchmarks/results/bench_export_<tag>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
VARIANTS = ("pytorch_fp32", "onnx_fp32", "onnx_int8")
FP32_LIMIT = 1e-3


# ----------------------------------------------------------------------------- one variant (subprocess)
def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, reset at exec). ``ru_maxrss`` would also do, but on Linux it
    carries the forking parent's peak over exec, and the parent here holds a model of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    rss_start = peak_rss_mb()
    if args.variant == "pytorch_fp32":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        p = nnUNetPredictor(use_mirroring=not args.disable_tta, perform_everything_on_device=False,
                            device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder(args.model_folder, (args.fold,), args.chk)
        params = sum(x.numel() for x in p.network.parameters())
        model_file = os.path.join(args.model_folder, f"fold_{args.fold}", args.chk)
    else:
        from tskd_nnunet.export.onnx_predictor import OnnxPredictor

        p = OnnxPredictor(use_mirroring=not args.disable_tta, allow_tqdm=False, threads=args.threads)
        p.initialize_from_exported_folder(args.export, int8=args.variant == "onnx_int8")
        model_file = p.onnx_path
        params = None
    files = create_lists_from_splitted_dataset_folder(args.images, p.dataset_json["file_ending"])
    rw = p.plans_manager.image_reader_writer_class()
    out: Dict[str, np.ndarray] = {}
    lat: List[float] = []
    for i, case in enumerate(files):
        img, props = rw.read_images(case)
        if i == 0:
            p.predict_single_npy_array(img, props, None, None, True)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            seg, prob = p.predict_single_npy_array(img, props, None, None, True)
            times.append(time.perf_counter() - t)
        lat.append(float(np.median(times)))
        name = os.path.basename(case[0])
        out[f"seg/{name}"], out[f"prob/{name}"] = seg, prob.astype(np.float32)
    np.savez(args.out + ".npz", **out)
    stats = {"variant": args.variant, "file": model_file, "file_mb": os.path.getsize(model_file) / 1e6,
             "parameters": params, "latency_s": lat, "cases": len(files),
             "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": rss_start}
    with open(args.out + ".json", "w") as f:
        json.dump(stats, f)


# ----------------------------------------------------------------------------- comparison
def dice_vs(ref: np.ndarray, seg: np.ndarray) -> float:
    """Mean over foreground labels present in either; 1.0 when neither has foreground."""
    labels = [int(l) for l in np.union1d(np.unique(ref), np.unique(seg)) if l != 0]
    if not labels:
        return 1.0
    d = []
    for l in labels:
        a, b = ref == l, seg == l
        d.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model_folder", required=True, help="trained <trainer>__<plans>__<configuration> folder")
    ap.add_argument("-i", "--images", required=True, help="folder of test images (nnU-Net naming)")
    ap.add_argument("-f", "--fold", default="0")
    ap.add_argument("-chk", default="checkpoint_final.pth")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (same for all). Default 1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--disable_tta", action="store_true")
    ap.add_argument("--int8_method", choices=("static", "dynamic"), default="static")
    ap.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed/DatasetXXX for int8 calibration")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--tag", default=None, help="results file name part (default: dataset_trainer)")
    ap.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
    # internal: one variant in a subprocess
    ap.add_argument("--_worker", dest="variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_export", dest="export", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--teacher_folder", default=None,
                    help="trained teacher model folder: its PyTorch latency on the same cases (speed ratio row)")
    ap.add_argument("--teacher_chk", default="checkpoint_final.pth", help="the teacher's checkpoint file")
    args = ap.parse_args()
    args.fold = args.fold if args.fold == "all" else int(args.fold)
    if args.variant:
        return worker(args)

    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from tskd_nnunet.atomic_io import atomic_write_text
    from tskd_nnunet.export.onnx_export import export_model_folder

    work = args.work or tempfile.mkdtemp(prefix="bench_export_")
    export = os.path.join(work, "exported")
    t = time.perf_counter()
    meta = export_model_folder(args.model_folder, export, args.fold, args.chk, int8=True,
                               int8_method=args.int8_method, preprocessed_dataset_folder=args.preprocessed)
    export_s = time.perf_counter() - t
    stats, arrays = {}, {}
    runs = [(v, v, args.model_folder, args.chk) for v in VARIANTS]
    if args.teacher_folder:
        runs.append(("teacher_pytorch_fp32", "pytorch_fp32", args.teacher_folder, args.teacher_chk))
    for v, worker_variant, model_folder, chk in runs:
        out = os.path.join(work, v)
        cmd = [sys.executable, os.path.abspath(__file__), "-m", model_folder, "-i", args.images, "-f",
               str(args.fold), "-chk", chk, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--_worker", worker_variant, "--_export", export, "--_out", out] + \
            (["--disable_tta"] if args.disable_tta else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{v} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out + ".json") as f:
            stats[v] = json.load(f)
        arrays[v] = dict(np.load(out + ".npz"))
        print(f"{v}: {np.median(stats[v]['latency_s']) * 1000:.1f} ms/case, peak RSS {stats[v]['peak_rss_mb']:.0f} MB",
              flush=True)

    ref = arrays["pytorch_fp32"]
    cases = sorted(k[len("seg/"):] for k in ref if k.startswith("seg/"))
    params_torch = stats["pytorch_fp32"]["parameters"]
    rows = []
    for v in VARIANTS:
        a = arrays[v]
        diff = max(float(np.abs(a[f"prob/{c}"] - ref[f"prob/{c}"]).max()) for c in cases)
        dice = float(np.mean([dice_vs(ref[f"seg/{c}"], a[f"seg/{c}"]) for c in cases]))
        s = stats[v]
        rows.append((v, os.path.basename(s["file"]), s["file_mb"], s["parameters"] or params_torch,
                     1000 * float(np.median(s["latency_s"])), s["peak_rss_mb"], diff, dice))
        s["max_abs_diff"], s["dice"] = diff, dice
    fp32_diff = stats["onnx_fp32"]["max_abs_diff"]
    head = (f"Model: `{os.path.relpath(args.model_folder, os.environ.get('nnUNet_results', '/'))}` fold {args.fold} "
            f"(`{args.chk}`, trainer {meta['trainer_name']}), patch {'x'.join(map(str, meta['patch_size']))}, "
            f"{len(cases)} test cases from `{os.path.basename(os.path.normpath(args.images))}`.\n"
            f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores visible), {args.threads} thread(s) for torch "
            f"and onnxruntime alike; mirroring {'off' if args.disable_tta else 'on (nnU-Net default)'}; "
            f"latency = nnU-Net's whole per-case path (preprocessing, sliding window, resampling), median of "
            f"{args.repeats} runs after 1 warm-up, median over cases; peak RSS of the variant's own process "
            f"(Python + torch + nnU-Net (+ onnxruntime) + model; "
            f"{stats['pytorch_fp32']['rss_after_imports_mb']:.0f} MB after importing torch and nnU-Net). int8: onnxruntime "
            f"{meta['onnxruntime']} {meta['int8']['method']} quantization"
            f"{', calibrated on %d training cases' % meta['int8']['calibration_cases'] if meta['int8']['calibration_cases'] else ''}"
            f". Export took {export_s:.1f} s. torch {meta['torch']}.\n")
    table = ["| variant | file | file size (MB) | parameters | latency / case (ms) | peak RSS (MB) | "
             "max abs Δ prob vs PyTorch | Dice vs PyTorch seg |", "|---|---|---|---|---|---|---|---|"]
    for v, name, mb, par, ms, rss, diff, dice in rows:
        table.append(f"| {v} | `{name}` | {mb:.2f} | {par:,} | {ms:.1f} | {rss:.0f} | {diff:.1e} | {dice:.4f} |")
    if "teacher_pytorch_fp32" in stats:
        t = stats["teacher_pytorch_fp32"]
        t_ms = 1000 * float(np.median(t["latency_s"]))
        table.append(f"| teacher (PyTorch fp32) | `{os.path.basename(t['file'])}` | {t['file_mb']:.2f} | "
                     f"{t['parameters']:,} | {t_ms:.1f} | {t['peak_rss_mb']:.0f} | - | - |")
        speed = {v: t_ms / ms for v, _, _, _, ms, _, _, _ in rows}
        table.append("")
        table.append(f"Teacher `{os.path.basename(os.path.normpath(args.teacher_folder)).split('__')[0]}` / student "
                     "latency per case: " + ", ".join(f"{v} {r:.1f}x" for v, r in speed.items()) + ".")
    notes = [
        "",
        f"ONNX fp32 max abs difference of probabilities {fp32_diff:.1e} "
        f"({'<=' if fp32_diff <= FP32_LIMIT else 'EXCEEDS'} {FP32_LIMIT:g}).",
        "PyTorch file = the nnU-Net checkpoint (weights + optimizer state + logging); ONNX files = the network only. "
        "Parameters of ONNX variants: those of the PyTorch network they were exported from.",
    ]
    text = head + "\n" + "\n".join(table) + "\n" + "\n".join(notes) + "\n"
    tag = args.tag or "_".join([os.path.basename(os.path.dirname(os.path.abspath(args.model_folder))),
                                os.path.basename(os.path.normpath(args.model_folder)).split("__")[0]])
    path = os.path.join(args.results_dir, f"bench_export_{tag}.md")
    atomic_write_text(path, text)
    print(text)
    print(f"written to {path}")
    if fp32_diff > FP32_LIMIT:
        sys.exit(f"ONNX fp32 differs from PyTorch by {fp32_diff:.1e} > {FP32_LIMIT:g}")


if __name__ == "__main__":
    main()
