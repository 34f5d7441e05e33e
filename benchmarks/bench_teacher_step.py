"""LiteMedSAMTeacherTrainer_last's training step on CPU before and after the fast path, measured in one run.

Each path runs in its own subprocess, alternating (before, after, before, after, ... ``--rounds`` times), because
the allocator setting is process-wide. A subprocess builds the trainer as ``nnUNetv2_train`` does (the class
itself on nnU-Net plans, ``initialize()``: its network, AdamW and nnU-Net's deep-supervised Dice+CE loss) and times
nnU-Net's own ``train_step`` on the same batches from the same seed; the first step of a subprocess warms up and
is not counted. The per-part times are taken inside that same ``train_step`` by hooks: forward pre-hooks on the
first module each part calls (the same modules on both paths), the loss module, optimizer step hooks.

* before: the code path before this change: the vendored LiteMedSAM forwards (``litemedsam.set_fast_path(net,
  False)``) and glibc's default allocator behaviour (``keep_freed_memory_on_cpu = False``).
* after: what the trainer does now (documentation/teacher.md, "CPU speed").

It also shows that both paths learn the same: the max |after - before| of the loss at every step and of the
eval-mode logits on a fixed batch, before training and after the steps.

Without ``-d`` the batches are random images with random 5-class label maps on in-memory plans (2d, 128x128,
batch 8, nnU-Net's 6-stage 2D strides: 5 deep-supervision outputs, as the benchmark's ``2d_128`` plans). With
``-d DATASET -c CONFIGURATION`` (``nnUNet_preprocessed`` set, a ``splits_final.json`` there) the plans and batches
are that dataset's, drawn by nnU-Net's own loader with ``nnUNet_n_proc_DA=0`` (in the main process, as on CPU),
and the data-loading time is a row of the table.

    python benchmarks/bench_teacher_step.py [--steps 4] [--rounds 2] [--threads 2] [-d 502 -c 2d_128]

Prints the table and writes benchmarks/results/bench_teacher_step_cpu.md (``--markdown`` elsewhere). A run takes
about (1 + steps) x rounds x 2 steps plus 2 x rounds network builds: ~4 minutes with the defaults on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's tskd_nnunet, also in the subprocesses (PYTHONPATH)
TRAINER = "LiteMedSAMTeacherTrainer_last"
N_CLASSES = 5
CPU_PROFILE_SCHEDULE = "25,50,5"  # the benchmark's cpu profile: its first-epoch learning rate (warm-up) applies
# the parts of a step, in order; each forward part starts at a pre-hook on the first module it calls (both paths)
PARTS = ["data loading (nnU-Net, n_proc_DA=0)", "adapter", "stem + stage 0 (frozen)", "stage 1 (frozen)",
         "stage 2 (LoRA)", "stage 3 (LoRA)", "neck", "head (SAM mask decoder)", "loss (Dice+CE, 5 scales)",
         "backward + grad clipping + finite check", "optimizer (AdamW)"]


def synthetic_plans(patch: int, batch: int) -> dict:
    """nnU-Net plans with one 2d configuration (what the teacher reads of them: patch, batch, strides, batch dice)."""
    stages = 6
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": stages, "features_per_stage": [32, 64, 128, 256, 512, 512][:stages],
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * stages,
                            "strides": [[1, 1]] + [[2, 2]] * (stages - 1), "n_conv_per_stage": [2] * stages,
                            "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch,
              "patch_size": [patch, patch], "median_image_size_in_voxels": [patch, patch], "spacing": [1.0, 1.0],
              "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": dict(resampling, is_seg=True),
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": resampling, "architecture": arch, "batch_dice": True}
    return {"dataset_name": "Dataset999_TeacherStepBench", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
            "original_median_shape_after_transp": [1, patch, patch], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0,
                                                                  "min": -1.0, "percentile_00_5": -1.0,
                                                                  "percentile_99_5": 1.0, "std": 1.0}}}


def synthetic_dataset_json() -> dict:
    labels = {"background": 0, **{f"class{i}": i for i in range(1, N_CLASSES)}}
    return {"channel_names": {"0": "image"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


# ------------------------------------------------------------------------------------------------ one subprocess
class PartClock:
    """Timestamps from hooks; ``parts()`` gives seconds per part of the last step."""

    def __init__(self):
        self.marks: List[tuple] = []

    def mark(self, name: str):
        def hook(*_args, **_kwargs):
            self.marks.append((name, time.perf_counter()))
        return hook

    def parts(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for (name, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            if name != "end":
                out[name] = out.get(name, 0.0) + t1 - t0
        return out


def attach_clock(trainer, clock: PartClock) -> None:
    net = trainer.network
    enc = net.backbone.model
    first_norm = [enc.layers[i].blocks[0].attn.norm for i in (1, 2, 3)]
    net.register_forward_pre_hook(clock.mark("adapter"))
    net.adapter.register_forward_hook(clock.mark("stem + stage 0 (frozen)"))  # the encoder starts as it returns
    for i, name in zip((1, 2, 3), ("stage 1 (frozen)", "stage 2 (LoRA)", "stage 3 (LoRA)")):
        first_norm[i - 1].register_forward_pre_hook(clock.mark(name))
    enc.neck[0].register_forward_pre_hook(clock.mark("neck"))
    net.decoder.register_forward_pre_hook(clock.mark("head (SAM mask decoder)"))
    trainer.loss.register_forward_pre_hook(clock.mark("loss (Dice+CE, 5 scales)"))
    trainer.loss.register_forward_hook(clock.mark(PARTS[-2]))
    trainer.optimizer.register_step_pre_hook(clock.mark("optimizer (AdamW)"))
    trainer.optimizer.register_step_post_hook(clock.mark("end"))


def random_batch(rng: np.random.Generator, batch: int, patch: int, scales: List[List[float]]) -> dict:
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(rng.standard_normal((batch, 1, patch, patch), dtype=np.float32))
    seg = torch.from_numpy(rng.integers(0, N_CLASSES, (batch, 1, patch, patch)).astype(np.float32))
    target = [F.interpolate(seg, scale_factor=s, mode="nearest-exact") if s != [1.0, 1.0] else seg
              for s in (list(map(float, s)) for s in scales)]
    return {"data": x, "target": target}


def run_path(path: str, steps: int, threads: int, dataset: Optional[str], configuration: str, plans_name: str,
             patch: int, batch: int, out_dir: str, round_index: int) -> dict:
    """One subprocess: build the trainer, train ``steps + 1`` steps, return times and what it learned."""
    import resource
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from tskd_nnunet.models import litemedsam
    from tskd_nnunet.trainers import teacher

    torch.set_num_threads(threads)
    cls = getattr(teacher, TRAINER)
    if path == "before":
        cls.keep_freed_memory_on_cpu = False
    if dataset is None:
        plans, dataset_json = synthetic_plans(patch, batch), synthetic_dataset_json()
        pre = os.path.join(os.environ["nnUNet_preprocessed"], plans["dataset_name"], "nnUNetPlans_2d")
        os.makedirs(pre, exist_ok=True)
        open(os.path.join(pre, "placeholder.b2nd"), "w").close()  # nnU-Net infers its dataset class from the files
        configuration = "2d"
    else:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        folder = os.path.join(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset))
        plans, dataset_json = load_json(os.path.join(folder, plans_name + ".json")), load_json(
            os.path.join(folder, "dataset.json"))
    torch.manual_seed(0)
    np.random.seed(0)
    import random
    random.seed(0)
    plans["continue_training"] = False  # what nnU-Net's run_training adds before it builds a trainer
    trainer = cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
    t = time.perf_counter()
    trainer.initialize()
    build_s = time.perf_counter() - t
    litemedsam.set_fast_path(trainer.network, path == "after")
    scales = trainer._get_deep_supervision_scales()
    rng = np.random.default_rng(1)
    fixed = random_batch(np.random.default_rng(2), 2, int(trainer.configuration_manager.patch_size[0]), scales)["data"]
    loader = None
    if dataset is not None:
        loader, _ = trainer.get_dataloaders()

    def eval_logits() -> np.ndarray:
        trainer.network.eval()
        with torch.no_grad():
            out = trainer.network(fixed)
        trainer.network.train()
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    logits0 = eval_logits()
    clock = PartClock()
    attach_clock(trainer, clock)
    rows, losses = [], []
    for i in range(steps + 1):
        t = time.perf_counter()
        b = next(loader) if loader is not None else random_batch(rng, trainer.batch_size,
                                                                  int(trainer.configuration_manager.patch_size[0]),
                                                                  scales)
        data_s = time.perf_counter() - t
        clock.marks.clear()
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = trainer.train_step(b)["loss"]
        wall = time.perf_counter() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        losses.append(float(np.mean(loss)))
        if i == 0:
            continue  # warm-up
        parts = clock.parts()
        if dataset is not None:
            parts[PARTS[0]] = data_s
        rows.append({"wall": wall, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                     "sys": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt, "parts": parts})
    logits1 = eval_logits()
    prefix = os.path.join(out_dir, f"{path}_{round_index}")
    np.save(prefix + "_logits0.npy", logits0)
    np.save(prefix + "_logits1.npy", logits1)
    return {"path": path, "round": round_index, "build_s": build_s, "steps": rows, "losses": losses,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "prefix": prefix,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------ the report
def median(xs: List[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def summarize(results: List[dict], args: argparse.Namespace, load: List[float], minutes: float) -> str:
    by = {p: [r for r in results if r["path"] == p] for p in ("before", "after")}
    steps = {p: [s for r in rs for s in r["steps"]] for p, rs in by.items()}
    med = {p: {k: median([s[k] for s in st]) for k in ("wall", "cpu", "sys", "faults")} for p, st in steps.items()}
    parts = {p: {n: median([s["parts"].get(n, 0.0) for s in st]) for n in PARTS} for p, st in steps.items()}
    ratio = med["before"]["wall"] / med["after"]["wall"]
    # learns the same: every subprocess of a path saw the same batches from the same seed
    b0, a0 = by["before"][0], by["after"][0]
    loss_diff = max(abs(x - y) for x, y in zip(b0["losses"], a0["losses"]))
    logit_diff = {k: float(np.abs(np.load(b0["prefix"] + f"_{k}.npy") - np.load(a0["prefix"] + f"_{k}.npy")).max())
                  for k in ("logits0", "logits1")}
    repeat = max(abs(x - y) for r in by["after"][1:] for x, y in zip(r["losses"], a0["losses"])) \
        if len(by["after"]) > 1 else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    data = f"dataset {args.dataset} {args.configuration}" if args.dataset else \
        f"random {args.patch}x{args.patch} images, {N_CLASSES} classes, in-memory 2d plans"
    lines = [
        f"{TRAINER}, nnU-Net's train_step, batch {args.batch if not args.dataset else 'from plans'}, {data}; "
        f"{args.threads} threads (torch {a0['torch']}), {cpu}; median over {args.rounds} alternating rounds x "
        f"{args.steps} steps per path (each subprocess's first step warms up); 1-min load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end; {minutes:.1f} min in all.", "",
        f"**Step time: before {med['before']['wall']:.2f} s, after {med['after']['wall']:.2f} s: "
        f"{ratio:.2f}x faster.**", "",
        "| part | before s | after s | before / after |", "|---|---|---|---|"]
    for n in PARTS:
        bv, av = parts["before"][n], parts["after"][n]
        if n == PARTS[0] and not args.dataset:
            continue
        lines.append(f"| {n} | {bv:.3f} | {av:.3f} | {bv / av if av > 0 else float('nan'):.2f}x |")
    lines += [f"| **train step (wall)** | **{med['before']['wall']:.3f}** | **{med['after']['wall']:.3f}** | "
              f"**{ratio:.2f}x** |",
              f"| CPU time of the step (user + sys, all threads) | {med['before']['cpu']:.2f} | "
              f"{med['after']['cpu']:.2f} | {med['before']['cpu'] / med['after']['cpu']:.2f}x |",
              f"| of which kernel (sys) | {med['before']['sys']:.2f} | {med['after']['sys']:.2f} | |",
              f"| page faults per step | {med['before']['faults']:.0f} | {med['after']['faults']:.0f} | |",
              f"| peak RSS GB | {max(r['peak_rss_gb'] for r in by['before']):.2f} | "
              f"{max(r['peak_rss_gb'] for r in by['after']):.2f} | |",
              f"| network build + initialize s | {median([r['build_s'] for r in by['before']]):.1f} | "
              f"{median([r['build_s'] for r in by['after']]):.1f} | |", "",
              "Same learning (same seed, same batches): max |after - before| of",
              f"- the loss over the {args.steps + 1} steps: {loss_diff:.2e} (loss ~{abs(b0['losses'][-1]):.2f}; "
              f"two runs of the same path: {repeat:.1e})",
              f"- the eval-mode logits of a fixed batch before training: {logit_diff['logits0']:.2e}, after the "
              f"steps: {logit_diff['logits1']:.2e}"]
    if args.dataset:
        lines.append("")
        lines.append("Data loading is not part of the step time above; with nnUNet_n_proc_DA=0 it adds its row to "
                     "every iteration.")
    command = "python benchmarks/bench_teacher_step.py " + " ".join(sys.argv[1:])
    return f"# Teacher training step on CPU: before / after the fast path\n\n`{command}`\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per subprocess (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="alternating before/after subprocess pairs")
    p.add_argument("--threads", type=int, default=2, help="torch threads (nnU-Net uses one per CPU core)")
    p.add_argument("-d", dest="dataset", default=None, help="a preprocessed dataset (name or id) for real batches")
    p.add_argument("-c", dest="configuration", default="2d_128")
    p.add_argument("-p", dest="plans", default="nnUNetPlans")
    p.add_argument("--patch", type=int, default=128, help="without -d: the square patch size")
    p.add_argument("--batch", type=int, default=8, help="without -d: the batch size")
    p.add_argument("--markdown", default=os.path.join(REPO, "benchmarks", "results", "bench_teacher_step_cpu.md"))
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)  # path, round, output folder
    a = p.parse_args()
    if a._one:
        r = run_path(a._one[0], a.steps, a.threads, a.dataset, a.configuration, a.plans, a.patch, a.batch,
                     a._one[2], int(a._one[1]))
        print("RESULT " + json.dumps(r))
        return
    if a.dataset:
        if not os.environ.get("nnUNet_preprocessed"):
            sys.exit("-d needs nnUNet_preprocessed. Fix: export nnUNet_preprocessed=/path/to/nnUNet_preprocessed.")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        splits = os.path.join(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(a.dataset),
                              "splits_final.json")
        if not os.path.isfile(splits):  # nnU-Net would write one into the user's folder
            sys.exit(f"{splits} is missing. Fix: point nnUNet_preprocessed at a folder with a split (tskd_label_budget "
                     f"writes one), or run without -d.")
    start, load0 = time.time(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_teacher_step_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), nnUNet_n_proc_DA="0",
                   nnUNet_results=os.path.join(tmp, "results"), TSKD_SCHEDULE=CPU_PROFILE_SCHEDULE,
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        for k in [k for k in env if k.startswith("TSKD_TEACHER") or k == "TSKD_ALLOW_RANDOM_TEACHER"]:
            del env[k]  # the packaged LiteMedSAM, as LiteMedSAMTeacherTrainer_last trains by default
        if not a.dataset:
            env["nnUNet_preprocessed"] = os.path.join(tmp, "preprocessed")
        for rnd in range(a.rounds):
            for path in ("before", "after"):
                cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(a.steps), "--threads", str(a.threads),
                       "-c", a.configuration, "-p", a.plans, "--patch", str(a.patch), "--batch", str(a.batch),
                       "--_one", path, str(rnd), tmp] + (["-d", a.dataset] if a.dataset else [])
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0 or "RESULT " not in proc.stdout:
                    sys.exit(f"{path} (round {rnd}) failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
                results.append(r)
                print(f"round {rnd} {path}: " + ", ".join(f"{s['wall']:.2f}" for s in r["steps"]) + " s/step",
                      flush=True)
        text = summarize(results, a, [load0, os.getloadavg()[0]], (time.time() - start) / 60)
    print("\n" + text)
    from tskd_nnunet.atomic_io import atomic_write_text
    atomic_write_text(a.markdown, text)


if __name__ == "__main__":
    main()
