"""Distillation cost, measured in one run on the phantom dataset (CPU by default).

Rows: plain nnUNetTrainer; DistillTrainer in online and cached KD mode with a LiteMedSAM LoRA teacher,
a plain nnU-Net teacher and a ViT-Tiny LoRA teacher; feature KD; slimmer presets. Columns: time per
training iteration (train_step on prefetched batches, data loading excluded) and its ratio to the plain
iteration (goals: <= 1.5x online, <= 1.1x cached), the one-off cache time per 100 cases and disk per case,
student / teacher parameters, network latency per 2D case (one 64x64 patch, no mirroring), and
peak RSS of the measuring process. Every row runs in its own subprocess so peak RSS is its own.

    .venv/bin/python benchmarks/bench_distill.py [--root DIR] [--iters 10] [--device cpu]

The teachers are trained for one tiny epoch (weights do not change the cost); the ViT teacher is
vit_tiny with random weights (TSKD_ALLOW_RANDOM_TEACHER=1), i.e. the paper's small-teacher setting.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DATASET_ID, DATASET = 990, "Dataset990_Phantom"
VIT_ENV = {"TSKD_TEACHER_BACKBONE": "vit_tiny", "TSKD_ALLOW_RANDOM_TEACHER": "1"}
ONLINE, CACHED = {"TSKD_KD_MODE": "online"}, {"TSKD_KD_MODE": "cached"}
ROWS = [  # label, trainer, teacher trainer, extra environment
    ("nnUNetTrainer (plain)", "nnUNetTrainer", None, {}),
    ("DistillTrainer online, LiteMedSAM LoRA teacher", "DistillTrainer", "LiteMedSAMTeacherTrainer_test", ONLINE),
    ("DistillTrainer cached, LiteMedSAM LoRA teacher", "DistillTrainer", "LiteMedSAMTeacherTrainer_test", CACHED),
    ("DistillTrainer online, plain nnU-Net teacher", "DistillTrainer", "TSKDPlainTrainer_test", ONLINE),
    ("DistillTrainer cached, plain nnU-Net teacher", "DistillTrainer", "TSKDPlainTrainer_test", CACHED),
    ("DistillTrainer online, ViT-Tiny LoRA teacher", "DistillTrainer", "ViTLoRATeacherTrainer_test", ONLINE),
    ("DistillTrainer cached, ViT-Tiny LoRA teacher", "DistillTrainer", "ViTLoRATeacherTrainer_test", CACHED),
    ("DistillTrainer_feat (online), ViT-Tiny teacher", "DistillTrainer_feat", "ViTLoRATeacherTrainer_test", {}),
    ("DistillTrainer_small cached, ViT-Tiny teacher", "DistillTrainer_small", "ViTLoRATeacherTrainer_test", CACHED),
    ("DistillTrainer_tiny cached, ViT-Tiny teacher", "DistillTrainer_tiny", "ViTLoRATeacherTrainer_test", CACHED),
]


def _env(root: str, extra: Dict[str, str] | None = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({k: os.path.join(root, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", nnUNet_compile="0")
    env.pop("TSKD_SCHEDULE", None)
    env.update(extra or {})
    return env


def _run(args: List[str], env: Dict[str, str]) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(root: str) -> None:
    """Phantom dataset (planned, preprocessed) and the two teachers, unless already there."""
    from tskd_nnunet.demo.phantom import write_phantom_dataset
    if not os.path.isdir(os.path.join(root, "nnUNet_preprocessed", DATASET)):
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.makedirs(os.path.join(root, k), exist_ok=True)
        write_phantom_dataset(os.path.join(root, "nnUNet_raw"), DATASET_ID, num_train=12, num_test=3, size=64, seed=0)
        env = _env(root)
        env.pop("nnUNet_n_proc_DA")
        print("planning and preprocessing the phantom dataset ...", flush=True)
        _run([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env)
    for teacher, extra in (("TSKDPlainTrainer_test", {}), ("ViTLoRATeacherTrainer_test", VIT_ENV),
                           ("LiteMedSAMTeacherTrainer_test", {})):
        if not os.path.isfile(os.path.join(root, "nnUNet_results", DATASET, f"{teacher}__nnUNetPlans__2d", "fold_0",
                                           "checkpoint_final.pth")):
            print(f"training teacher {teacher} (1 tiny epoch) ...", flush=True)
            _run([os.path.join(BIN, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", teacher, "-device", "cpu"],
                 _env(root, extra))


def _latency_ms(network, device, runs: int = 20) -> float:
    import torch
    network.eval()
    x = torch.randn(1, 1, 64, 64, device=device)
    with torch.no_grad():
        for _ in range(3):
            network(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            network(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def measure(trainer_name: str, iters: int, device_name: str) -> dict:
    """In this process: one trainer, its real dataloader, timed train_step calls."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from tskd_nnunet.models.students import count_parameters

    base = os.path.join(os.fspath(nnUNet_preprocessed), DATASET)
    plans = load_json(os.path.join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False
    device = torch.device(device_name)
    trainer = recursive_find_trainer_class_by_name(trainer_name)(plans, "2d", 0, load_json(
        os.path.join(base, "dataset.json")), device)
    cache = {}
    if hasattr(trainer, "prepare_target_cache"):  # time the one-off teacher pass of cached KD
        import shutil
        build = trainer.prepare_target_cache

        def timed(identifiers, load_case):
            from tskd_nnunet.distill.target_cache import disk_bytes
            t = time.perf_counter()
            folder = build(identifiers, load_case)
            cache.update(seconds=time.perf_counter() - t, cases=len(identifiers),
                         bytes_per_case=disk_bytes(folder)["bytes_per_case"])
            return folder
        trainer.prepare_target_cache = timed
        shutil.rmtree(os.path.join(base, "tskd_targets"), ignore_errors=True)  # every row pays its own cache
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    warm = 2
    batches = [next(trainer.dataloader_train) for _ in range(warm + iters)]
    for b in batches[:warm]:
        trainer.train_step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[warm:]:
        trainer.train_step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    iter_s = (time.perf_counter() - t0) / iters
    trainer.set_deep_supervision_enabled(False)
    teacher = getattr(trainer, "teacher", None)
    out = {"iter_s": iter_s, "student_params": count_parameters(trainer.network),
           "student_ms": _latency_ms(trainer.network, device),
           "teacher_params": count_parameters(teacher) if teacher is not None else None,
           "teacher_ms": _latency_ms(teacher, device) if teacher is not None else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "cache_s_per_100": 100 * cache["seconds"] / cache["cases"] if cache else None,
           "cache_kb_per_case": cache["bytes_per_case"] / 1024 if cache else None}
    trainer.on_train_end = lambda: None  # nothing to save
    return out


def interleaved(rows: List[tuple], iters: int, device_name: str) -> Dict[str, float]:
    """All rows' trainers in this one process, their timed steps alternating (A B C A B C ...), so load that
    changes over time (another job on the machine) hits every row alike. Median seconds per step."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    base = os.path.join(os.fspath(nnUNet_preprocessed), DATASET)
    plans, dataset_json = load_json(os.path.join(base, "nnUNetPlans.json")), load_json(os.path.join(base, "dataset.json"))
    trainers, batches = {}, {}
    for label, trainer_name, teacher, mode in rows:
        for k in ("TSKD_TEACHER_TRAINER", "TSKD_KD_MODE"):
            os.environ.pop(k, None)
        os.environ.update(dict(mode, **({"TSKD_TEACHER_TRAINER": teacher} if teacher else {})))
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
        t = trainer_class(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device(device_name))
        t.on_train_start()
        t.on_train_epoch_start()
        trainers[label] = t
        batches[label] = [next(t.dataloader_train) for _ in range(iters + 2)]
        for b in batches[label][:2]:
            t.train_step(b)
    times: Dict[str, List[float]] = {label: [] for label in trainers}
    for i in range(2, iters + 2):
        for label, t in trainers.items():
            t0 = time.perf_counter()
            t.train_step(batches[label][i])
            times[label].append(time.perf_counter() - t0)
    return {label: float(sorted(v)[len(v) // 2]) for label, v in times.items()}


INTERLEAVED_ROWS = [ROWS[0], ROWS[2], ROWS[8], ROWS[9]]  # plain, cached (LiteMedSAM teacher), cached _small, _tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="work folder (kept; default: a new temporary folder)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--interleave", action="store_true",
                   help="plain vs cached KD in one process, steps alternating (robust to other load on the machine)")
    args = p.parse_args()
    if args.interleave and args.root and os.environ.get("nnUNet_preprocessed"):
        res = interleaved(INTERLEAVED_ROWS, args.iters, args.device)
        plain = res[INTERLEAVED_ROWS[0][0]]
        print(f"\nInterleaved in one process, {args.iters} alternating steps per row after 2 warm-up, median s/step\n")
        print("| setting | s/iter | ratio vs plain |\n|---|---|---|")
        for label, v in res.items():
            print(f"| {label} | {v:.3f} | {v / plain:.2f}x |")
        return
    if args.interleave:
        root = args.root or tempfile.mkdtemp(prefix="bench_distill_")
        prepare(root)
        # the cached rows need their caches: one ordinary measurement each builds it
        for label, trainer, teacher, mode in INTERLEAVED_ROWS[1:2]:
            _run([sys.executable, os.path.abspath(__file__), "--measure", trainer, "--iters", "1", "--device",
                  args.device], _env(root, dict(mode, TSKD_TEACHER_TRAINER=teacher)))
        print(_run([sys.executable, os.path.abspath(__file__), "--interleave", "--root", root, "--iters",
                    str(args.iters), "--device", args.device], _env(root)))
        return
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.iters, args.device)))
        return
    root = args.root or tempfile.mkdtemp(prefix="bench_distill_")
    prepare(root)
    results = []
    for label, trainer, teacher, mode in ROWS:
        print(f"measuring {label} ...", flush=True)
        extra = dict(mode, **({"TSKD_TEACHER_TRAINER": teacher} if teacher else {}))
        out = _run([sys.executable, os.path.abspath(__file__), "--measure", trainer, "--iters", str(args.iters),
                    "--device", args.device], _env(root, extra))
        results.append((label, json.loads(out.split("RESULT ", 1)[1].splitlines()[0])))
    plain = results[0][1]["iter_s"]
    print(f"\nDevice {args.device}, {args.iters} iterations after 2 warm-up, batch size from the plans, patch 64x64\n")
    print("| setting | s/iter | ratio vs plain | student params | teacher params | student ms/case | "
          "teacher ms/case | peak RSS MB | cache s / 100 cases | cache KB / case |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results:
        tp = f"{r['teacher_params']:,}" if r["teacher_params"] else "-"
        tm = f"{r['teacher_ms']:.1f}" if r["teacher_ms"] else "-"
        cs = f"{r['cache_s_per_100']:.1f}" if r.get("cache_s_per_100") else "-"
        ck = f"{r['cache_kb_per_case']:.1f}" if r.get("cache_kb_per_case") else "-"
        print(f"| {label} | {r['iter_s']:.3f} | {r['iter_s'] / plain:.2f}x | {r['student_params']:,} | {tp} | "
              f"{r['student_ms']:.1f} | {tm} | {r['peak_rss_mb']:.0f} | {cs} | {ck} |")


if __name__ == "__main__":
    main()
