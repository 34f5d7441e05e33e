"""Throughput of MAE and MoCo v3 pretraining steps (images/s, forward + backward + AdamW step, augmentation
included) for ViT-Tiny/Small at 128^2 and 224^2, and a loss curve of a short MAE run on a preprocessed
dataset.

    python benchmarks/bench_pretrain.py [--device cpu] [--batch-size 8] [--steps 3] \
        [--curve-dataset 990 --curve-steps 200 --out documentation/figures]

Inputs are random tensors for the throughput table (reading the corpus is not what is measured); all
configurations run in one process, one after the other, so their ratios are comparable. MoCo v3 uses the
paper's heads (4096 hidden, 256 out); MAE the default light decoder (256 dim, 4 blocks).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from tskd_nnunet.pretrain.mae import MAE
from tskd_nnunet.pretrain.moco import ViTMoCoV3
from tskd_nnunet.pretrain.vit import create_vit


def throughput(kind: str, arch: str, res: int, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    enc = create_vit(arch, res, 3)
    obj = MAE(enc, arch, res, 3) if kind == "mae" else ViTMoCoV3(enc, arch, res, 3)
    obj.to(device).train()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, res, res, device=device)
    def step():
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            with torch.autocast("cuda"):
                loss = obj(x)
        else:
            loss = obj(x)
        loss.backward()
        opt.step()
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=["vit_tiny", "vit_small"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[128, 224])
    ap.add_argument("--curve-dataset", default=None, help="dataset id for the loss-curve run (needs nnUNet_* env)")
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 on a shared, oversubscribed machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} timed steps")
    print("| objective | arch | resolution | images/s |\n|---|---|---|---|")
    for kind in ("mae", "moco_v3"):
        for arch in args.archs:
            for res in args.resolutions:
                ips = throughput(kind, arch, res, args.batch_size, args.steps, device)
                print(f"| {kind} | {arch} | {res} | {ips:.2f} |", flush=True)
    if args.curve_dataset:
        from tskd_nnunet.pretrain.corpus import PretrainCorpus
        from tskd_nnunet.pretrain.loop import LoopConfig, run_pretraining
        os.makedirs(args.out, exist_ok=True)
        corpus = PretrainCorpus([args.curve_dataset], resolution=64)
        obj = MAE(create_vit("vit_tiny", 64, 3), "vit_tiny", 64, 3)
        out = os.path.join(args.out, "mae_vit_tiny_64.pth")
        hist = run_pretraining(obj, corpus, out, LoopConfig(steps=args.curve_steps, batch_size=args.batch_size, lr=1.5e-3,
                                                            overwrite=True, progress=False, save_every=10 ** 6,
                                                            signature={"objective": "mae vit_tiny 64px"}), device)
        losses = [h["loss"] for h in hist]
        k = max(1, len(losses) // 10)
        print(f"MAE loss curve ({args.curve_dataset}, vit_tiny, 64px, batch {args.batch_size}): first {k} steps "
              f"{np.mean(losses[:k]):.3f} -> last {k} steps {np.mean(losses[-k:]):.3f}; "
              f"{out[:-4]}_loss.png")


if __name__ == "__main__":
    main()
