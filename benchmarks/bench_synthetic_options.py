"""Speed vs quality of synthetic-image options at the task's working resolution (documentation/synthetic.md).

For each generator architecture (``--archs``) the fold's diffusion model is trained with ``tskd_train_diffusion``'s
own code (``train_diffusion``; resumable, its own ``nnUNet_results`` under ``--work``), then every sampler setting
(``--samplers`` as ``name:steps``) generates ``--images`` images with the sampling command's own generator class:

* speed: images/s of the measured generation (batch ``--batch-size``) and the minutes 1,000 images take at that
  rate; the generator's training minutes are a separate column;
* quality: Fréchet distance (FD) and KID between the synthetic images and **held-out real images** (patch-size
  crops of the fold's validation cases, which no generator saw) in the feature space of the packaged LiteMedSAM
  encoder. The row ``real (train crops)`` is the floor: real training crops against the same held-out crops.

``--generator ARCH=PATH`` takes a generator trained elsewhere as ``ARCH``'s instead of training one, e.g. the
benchmark runner's diffusion stage (run with the runner's preprocessed root, so the split and the generator's
training cases are the same; its architecture and provenance are checked).

``--speed-only`` skips the quality half: each architecture trains only ``--train-steps`` steps (e.g. 6, into
``--work``/speed) to time a training step, then samples with those near-random weights — sampling cost does not
depend on the weights — so the speed table is measured in minutes where the quality run takes hours on 2 cores.

One JSON per (arch, sampler) lands in the output folder as soon as it is measured (a re-run skips it), plus
``report.md`` and ``grid.png`` (one row of samples per option, the real rows first). Run on a quiet machine: the
timings are wall-clock.

    python benchmarks/bench_synthetic_options.py -d 501 -c 2d_128 -f 0 --train-steps 2000 \\
        --archs base lean --samplers ddim:50 ddim:20 dpm:10 unipc:10 unipc:5 -o documentation/benchmarks/synthetic_hc18
    python benchmarks/bench_synthetic_options.py -d 501 -c 2d_128 -f 0 --speed-only --train-steps 6 --images 64 \
        --archs base lean tiny -o documentation/benchmarks/synthetic_hc18
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tskd_nnunet.atomic_io import atomic_path, atomic_write_text, read_json  # noqa: E402
from tskd_nnunet.data.extension import dataset_name  # noqa: E402
from tskd_nnunet.synthetic import cases as fold_cases  # noqa: E402
from tskd_nnunet.synthetic.quality import LiteMedSAMFeatures, features, frechet_distance, kid, real_crops  # noqa: E402
from tskd_nnunet.synthetic.model import load_checkpoint  # noqa: E402
from tskd_nnunet.synthetic.sample import SyntheticGenerator, check_generator_provenance  # noqa: E402
from tskd_nnunet.synthetic.train import DiffusionTrainSettings, save_grid_png, train_diffusion  # noqa: E402

FLOOR = "real_floor.json"
LAYOUTS = ("channels_last", "contiguous", "compiled")
# generator architectures (UNet2DModel block widths, attention at the lowest level)
ARCHS: Dict[str, Dict] = {
    "base": {"block_out_channels": (32, 64, 64), "attention": True},      # the default generator
    "lean": {"block_out_channels": (16, 32, 64, 64), "attention": False},  # a level deeper, half the width at 1/1
    "tiny": {"block_out_channels": (16, 32, 32), "attention": False},
}


def cached(path: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, kept in ``path`` (.npy, written atomically) and read from there next time."""
    if os.path.isfile(path):
        return np.load(path)
    value = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, value)
    return value


def train_arch(arch: str, a: argparse.Namespace) -> str:
    """Train (or resume) ``arch``'s generator into its own results root; the final checkpoint's path."""
    os.environ["nnUNet_results"] = os.path.join(a.work, "speed", arch) if a.speed_only else os.path.join(a.work, arch)
    os.makedirs(os.environ["nnUNet_results"], exist_ok=True)
    every = 1 if a.speed_only else max(1, a.train_steps // 10)  # the log's timestamps time the steps
    settings = DiffusionTrainSettings(steps=a.train_steps, batch_size=a.train_batch_size, seed=0,
                                      checkpoint_every=every, grid_every=a.train_steps,
                                      grid_images=1 if a.speed_only else 16, **ARCHS[arch])
    return train_diffusion(a.dataset, a.configuration, a.fold, a.plans, settings, device=a.device)


def given_generator(arch: str, path: str, a: argparse.Namespace) -> str:
    """A generator trained elsewhere (e.g. the benchmark runner's diffusion stage) as ``arch``'s: its architecture
    must be ``arch``'s and its training cases outside the current split's held-out cases."""
    ckpt = load_checkpoint(path)
    have = {"block_out_channels": tuple(ckpt["settings"]["block_out_channels"]),
            "attention": bool(ckpt["settings"]["attention"])}
    want = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in ARCHS[arch].items()}
    if have != want:
        raise SystemExit(f"bench_synthetic_options: error: --generator {arch}={path} has {have}, {arch} is {want}. "
                         f"Fix: name the architecture it was trained with")
    check_generator_provenance(dataset_name(a.dataset), a.fold, path, ckpt["case_ids"])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", dest="dataset", required=True)
    p.add_argument("-c", dest="configuration", required=True)
    p.add_argument("-f", dest="fold", type=int, default=0)
    p.add_argument("-p", dest="plans", default="nnUNetPlans")
    p.add_argument("-device", dest="device", default="cpu")
    p.add_argument("--archs", nargs="+", default=["base", "lean"], choices=list(ARCHS))
    p.add_argument("--samplers", nargs="+", default=["ddim:50", "ddim:20", "dpm:10", "unipc:10", "unipc:5"])
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="synthetic images per option (speed and quality)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("-o", dest="out", required=True)
    p.add_argument("--work", default="/tmp/tskd_synthetic_options", help="generators' results roots")
    p.add_argument("--generator", nargs="+", default=[], metavar="ARCH=PATH",
                   help="a trained checkpoint to use as ARCH's generator instead of training one (e.g. the "
                        "benchmark runner's diffusion stage, trained on the same cases)")
    p.add_argument("--layout", choices=LAYOUTS, default="channels_last",
                   help="sampling layout on CPU: channels_last (the pipeline's default), contiguous (to measure "
                        "channels-last's gain), compiled (channels-last + torch.compile of the UNet; one warm-up "
                        "batch compiles it and is timed apart)")
    p.add_argument("--speed-only", action="store_true",
                   help="time training steps and sampling only (no quality: weights barely trained)")
    a = p.parse_args()
    given = dict(g.split("=", 1) for g in a.generator if "=" in g)
    bad = [g for g in a.generator if "=" not in g] + [f"{k}=... (not in --archs)" for k in given if k not in a.archs]
    if bad:
        p.error(f"--generator {' '.join(bad)}: give ARCH=PATH with ARCH one of --archs ({' '.join(a.archs)})")
    os.makedirs(a.out, exist_ok=True)
    name = dataset_name(a.dataset)
    _, val_ids, _ = fold_cases.read_fold_split(name, a.fold)
    pool = fold_cases.fold_case_ids(name, a.plans, a.configuration, a.fold, True)["used"]
    device = torch.device(a.device)
    feat = None if a.speed_only else LiteMedSAMFeatures().to(device)
    grid_rows: List[torch.Tensor] = []
    held_f = None
    for arch in a.archs:
        ckpt_path = given_generator(arch, given[arch], a) if arch in given else train_arch(arch, a)
        for spec in a.samplers:
            sampler, steps = spec.split(":")
            g = SyntheticGenerator(ckpt_path, sampler, int(steps), a.device)
            g.channels_last = a.layout != "contiguous"
            if held_f is None and not a.speed_only:  # held-out real crops and the real-vs-real floor, once
                held_out = real_crops(name, a.plans, a.configuration, val_ids, g.patch_size, a.images, seed=1)
                # the encoder's features of the same crops are kept in --work: a re-run (a missing row) skips them
                key = hashlib.sha256(held_out.tobytes()).hexdigest()[:16]
                held_f = cached(os.path.join(a.work, "features", f"held_out_{key}.npy"),
                                lambda: features(feat, held_out, device=device))
                grid_rows.append(g.imap.to_model(torch.from_numpy(held_out[:8])))
                if read_json(os.path.join(a.out, FLOOR), {}).get("images") != a.images:
                    train_f = features(feat, real_crops(name, a.plans, a.configuration, pool, g.patch_size,
                                                        a.images, seed=2), device=device)
                    atomic_write_text(os.path.join(a.out, FLOOR), json.dumps(
                        {"fd": frechet_distance(train_f, held_f), "kid": kid(train_f, held_f)[0], "images": a.images},
                        indent=1))
            layout = "" if a.layout == "channels_last" else f"_{a.layout}"
            target = os.path.join(a.out, f"{'speed_' if a.speed_only else ''}{arch}_{sampler}{steps}{layout}.json")
            if os.path.isfile(target):
                print(f"[{arch} {spec}] done before: {target}")
                if not a.speed_only:
                    grid_rows.append(g.imap.to_model(torch.from_numpy(g.generate(0, range(8)))))
                continue
            warm_up_s = None
            if a.layout == "compiled":  # compilation happens on the first call: timed apart, images discarded
                g.unet = torch.compile(g.unet)
                t0 = time.perf_counter()
                g.generate(1, range(a.batch_size))
                warm_up_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            imgs = np.concatenate([g.generate(0, range(i, min(i + a.batch_size, a.images)))
                                   for i in range(0, a.images, a.batch_size)])
            sec = time.perf_counter() - t0
            f = None if a.speed_only else features(feat, imgs, device=device)
            log = g.ckpt.get("log", [])  # [step, loss, seconds since the invocation started], one per checkpoint
            step_s = (log[-1][2] - log[0][2]) / (log[-1][0] - log[0][0]) if len(log) > 1 else None
            row = {"arch": arch, "block_out_channels": list(ARCHS[arch]["block_out_channels"]),
                   "attention": ARCHS[arch]["attention"], "parameters": sum(x.numel() for x in g.unet.parameters()),
                   "sampler": sampler, "steps": int(steps), "layout": a.layout, "compile_s": warm_up_s,
                   "images": a.images, "resolution": list(g.patch_size),
                   "images_per_s": a.images / sec, "minutes_per_1000": 1000 * sec / a.images / 60,
                   "train_steps": int(g.ckpt["step"]), "train_batch_size": int(g.ckpt["settings"]["batch_size"]),
                   "generator": os.path.abspath(ckpt_path),
                   "train_minutes_total": float(g.ckpt.get("train_seconds", 0.0)) / 60 or None,
                   "train_s_per_step": step_s, "speed_only": a.speed_only,
                   "fd": None if f is None else frechet_distance(f, held_f),
                   "kid": None if f is None else kid(f, held_f)[0],
                   "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
                   "held_out_cases": len(val_ids), "generator_training_cases": len(pool)}
            atomic_write_text(target, json.dumps(row, indent=1))
            print(f"[{arch} {spec}] {row['minutes_per_1000']:.1f} min/1000"
                  + ("" if f is None else f", FD {row['fd']:.3f}"), flush=True)
            if not a.speed_only:
                grid_rows.append(g.imap.to_model(torch.from_numpy(imgs[:8])))
    write_report(a.out)
    if grid_rows and not a.speed_only:
        with atomic_path(os.path.join(a.out, "grid.png")) as tmp:
            save_grid_png(torch.cat(grid_rows), tmp, columns=8)


def _option(r: dict) -> str:
    layout = r.get("layout", "channels_last")  # rows from before the option: channels-last
    return (f"{r['arch']} {tuple(r['block_out_channels'])}{' +attn' if r['attention'] else ''}"
            + ("" if layout == "channels_last" else f", {layout}"))


def write_report(out: str) -> None:
    """report.md from the option JSONs alone: the quality table (if any) and the speed-only table (if any)."""
    rows = [read_json(os.path.join(out, f)) for f in sorted(os.listdir(out))
            if f.endswith(".json") and f != FLOOR]
    quality = [r for r in rows if not r.get("speed_only")]
    speed = [r for r in rows if r.get("speed_only")]
    lines = ["# Synthetic images: speed vs quality", ""]
    if quality:
        floor = read_json(os.path.join(out, FLOOR))
        lines += ["FD / KID: LiteMedSAM-encoder features of the option's images vs patch crops of the fold's "
                  "validation cases (held out from every generator). Lower is better; the first row is the floor "
                  "(real training crops vs the same held-out crops).", "",
                  "| option | params | sampler | steps | min / 1,000 images | generator training min | FD | KID |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| real (train crops) | - | - | - | - | - | {floor['fd']:.3f} | {floor['kid']:.4f} |"]
        for r in sorted(quality, key=lambda r: (r["arch"], r["minutes_per_1000"])):
            tm = f"{r['train_minutes_total']:.0f}" if r.get("train_minutes_total") else "-"
            lines.append(f"| {_option(r)} | {r['parameters'] / 1e6:.2f} M | {r['sampler']} | {r['steps']} | "
                         f"{r['minutes_per_1000']:.1f} | {tm} ({r['train_steps']} steps) | {r['fd']:.3f} | "
                         f"{r['kid']:.4f} |")
        grid = ("; grid.png: held-out real rows, then one row per option" if os.path.isfile(os.path.join(out, "grid.png"))
                else "")
        lines += ["", f"Resolution {quality[0]['resolution']}, {quality[0]['images']} images per option, "
                      f"{quality[0]['torch_threads']} torch threads{grid}.", ""]
    if speed:
        r0 = speed[0]
        lines += ["## Speed only (`--speed-only`: weights barely trained; sampling cost does not depend on them)", "",
                  f"Resolution {r0['resolution']}, {r0['images']} images per option in batches, "
                  f"{r0['torch_threads']} torch threads, 1-min load average at the end of each row in the last "
                  f"column. Training step: batch {r0['train_batch_size']}, forward + backward + AdamW + EMA, "
                  "mean over the steps after the first.", "",
                  "| option | params | s / training step | sampler | steps | images / s | min / 1,000 images | "
                  "load |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: (r["arch"], r["minutes_per_1000"])):
            ts = f"{r['train_s_per_step']:.2f}" if r.get("train_s_per_step") else "-"
            lines.append(f"| {_option(r)} | {r['parameters'] / 1e6:.2f} M | {ts} | {r['sampler']} | {r['steps']} | "
                         f"{r['images_per_s']:.2f} | {r['minutes_per_1000']:.1f} | {r['load_average_1min']:.1f} |")
    compiled = [r for r in rows if r.get("compile_s")]
    lines += ["", "Sampling layout: channels-last unless the option names another (`--layout`)."] + [
        f"- {_option(r)} {r['sampler']} {r['steps']}{' (speed only)' if r.get('speed_only') else ''}: the first "
        f"batch (torch.compile's compilation) took {r['compile_s']:.0f} s, not in its rate" for r in compiled]
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
