"""LoRA vs full fine-tuning of the ViT teacher: trainable fraction, step time, peak memory, checkpoint size.

Each (backbone, mode) runs in its own subprocess so that peak memory is that configuration's alone
(CPU: ``resource.getrusage`` max RSS; CUDA: ``torch.cuda.max_memory_allocated``). A step is what
nnU-Net's train_step does: forward with deep supervision, Dice+CE through nnU-Net's deep-supervision
loss wrapper, backward, grad clipping, AdamW step (autocast + GradScaler on CUDA). Random backbone
weights (through the public path with allow_random_init) are fine for speed and memory. Ratios are
measured within one invocation.

    python benchmarks/bench_teacher_lora.py --device cpu --batch 2 --steps 3
    python benchmarks/bench_teacher_lora.py --device cuda --batch 8 --steps 20
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args: argparse.Namespace) -> Dict[str, float]:
    import resource

    import numpy as np
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import dummy_context

    from tskd_nnunet.models.lora import LoraSettings
    from tskd_nnunet.models.util import backward_and_step
    from tskd_nnunet.models.teacher_net import (adamw_param_groups, build_teacher_network, deep_supervision_scales,
                                                resolve_teacher_spec)

    torch.manual_seed(0)
    device = torch.device(args.device)
    img = args.img
    lora = LoraSettings(r=args.rank, alpha=2.0 * args.rank) if args.mode == "lora" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = resolve_teacher_spec(args.backbone, None, True, {}, (img, img), (img, img), lora, args.decoder_channels)
        pools = [[1, 1]] + [[2, 2]] * 5  # nnU-Net's 2d plan for a 256^2 patch
        ds = deep_supervision_scales(pools)
        net = build_teacher_network(spec, 1, 2, ds, enable_deep_supervision=True).to(device)
    # with a real checkpoint file a LoRA teacher saves adapters only; random weights would force the base in
    net.stores_base = spec.full_finetune
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    bb_total = sum(p.numel() for p in net.backbone.parameters())
    bb_trainable = sum(p.numel() for p in net.backbone.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(adamw_param_groups(net, 1e-2), lr=1e-4)
    weights = np.array([1 / 2 ** i for i in range(len(ds))])
    weights[-1] = 0
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    x = torch.randn(args.batch, 1, img, img, device=device)
    targets = [torch.randint(0, 2, (args.batch, 1, round(img * s[0]), round(img * s[1])), device=device).float()
               for s in ds]
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=True) if cuda else dummy_context():
            loss = loss_fn(net(x), targets)
        backward_and_step(loss, opt, scaler, net.parameters(), 12)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    buf = io.BytesIO()  # what nnU-Net's save_checkpoint writes: network_weights + optimizer_state
    torch.save({"network_weights": net.state_dict(), "optimizer_state": opt.state_dict()}, buf)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total,
            "backbone_trainable_fraction": bb_trainable / bb_total,
            "step_s": float(np.median(times)), "peak_mb": peak_mb, "rss_after_build_mb": rss_before_kb / 1024,
            "checkpoint_mb": buf.getbuffer().nbytes / 2 ** 20}


def _run_config(args: argparse.Namespace, backbone: str, mode: str) -> Dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--backbone", backbone, "--mode", mode,
           "--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--img", str(args.img), "--rank", str(args.rank), "--decoder-channels",
           str(args.decoder_channels)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{backbone}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(rows: List[dict], args: argparse.Namespace, device_name: str) -> str:
    mem = "peak GPU memory allocated" if args.device == "cuda" else "peak process RSS"
    lines = [f"Device: {device_name}; input {args.img}x{args.img}, batch {args.batch}, median of {args.steps} steps "
             f"after {args.warmup} warm-up; LoRA rank {args.rank} on qkv+proj; decoder channels "
             f"{args.decoder_channels}; random weights.", "",
             f"| backbone | mode | params (M) | trainable (M) | trainable % | backbone trainable % | step (s) "
             f"| {mem} (MB) | checkpoint (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['mode']} | {r['total_params'] / 1e6:.1f} | {r['trainable_params'] / 1e6:.2f} "
                     f"| {100 * r['trainable_fraction']:.2f} | {100 * r['backbone_trainable_fraction']:.2f} | {r['step_s']:.3f} | {r['peak_mb']:.0f} "
                     f"| {r['checkpoint_mb']:.1f} |")
    lines += ["", "| backbone | step time LoRA / full | peak memory LoRA / full | checkpoint LoRA / full |",
              "|---|---|---|---|"]
    for bb in dict.fromkeys(r["backbone"] for r in rows):
        lo = next(r for r in rows if r["backbone"] == bb and r["mode"] == "lora")
        fu = next(r for r in rows if r["backbone"] == bb and r["mode"] == "full")
        lines.append(f"| {bb} | {lo['step_s'] / fu['step_s']:.2f} | {lo['peak_mb'] / fu['peak_mb']:.2f} "
                     f"| {lo['checkpoint_mb'] / fu['checkpoint_mb']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backbones", nargs="+", default=["vit_small", "sam_vit_b"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--img", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--decoder-channels", type=int, default=32)
    p.add_argument("--markdown", default=None, help="write the table here (default benchmarks/results/...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    import platform

    import torch
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for bb in args.backbones:
        for mode in ("lora", "full"):
            print(f"[{len(rows) + 1}/{2 * len(args.backbones)}] {bb} {mode} ...", flush=True)
            rows.append(dict(_run_config(args, bb, mode), backbone=bb, mode=mode))
    md = _markdown(rows, args, device_name)
    print(md)
    out = args.markdown or os.path.join(REPO, "benchmarks", "results", f"bench_teacher_lora_{args.device}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, out)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
