"""Speed of the synthetic transfer set's default diffusion model (documentation/synthetic.md).

Measures, for the default UNet2DModel (block_out_channels 32,64,64, one layer per block, attention
at the lowest level) at each resolution:

* training step time (batch of ``--batch-size``, forward + backward + AdamW + EMA), mean of
  ``--train-steps`` steps after one warm-up step;
* sampling throughput (DDIM, ``--inference-steps`` steps) from one measured batch of ``--images``
  images, and the wall time for 1,000 images *extrapolated* from it (sampling cost is linear in the
  number of batches; the writer adds ~ms per case).

    python benchmarks/bench_synthetic.py [--device cpu] [--threads 1] [--resolutions 64 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers.training_utils import EMAModel  # noqa: E402

from tskd_nnunet.models.util import backward_and_step  # noqa: E402
from tskd_nnunet.synthetic.model import (DEFAULT_BLOCK_OUT_CHANNELS, NormalisedImagePipeline,  # noqa: E402
                                         build_sampling_scheduler, build_train_scheduler, build_unet, image_generators)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_resolution(res: int, device: torch.device, batch_size: int, train_steps: int, images: int,
                     inference_steps: int, channels: int = 1) -> dict:
    torch.manual_seed(0)
    unet = build_unet(channels, (res, res), DEFAULT_BLOCK_OUT_CHANNELS).to(device)
    sched = build_train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    ema.to(device)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x0 = torch.rand(batch_size, channels, res, res, device=device) * 2 - 1

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        with torch.autocast(device.type, enabled=amp):
            loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample.float(), noise)
        opt.zero_grad(set_to_none=True)
        backward_and_step(loss, opt, scaler)
        ema.step(unet.parameters())

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(train_steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - t0) / train_steps

    unet.eval()
    pipe = NormalisedImagePipeline(unet=unet, scheduler=build_sampling_scheduler("ddim", dict(sched.config)))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=1, generator=image_generators(0, [0]), num_inference_steps=2)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    pipe(batch_size=images, generator=image_generators(0, range(images)), num_inference_steps=inference_steps)
    _sync(device)
    sample_s = time.perf_counter() - t0
    return {"resolution": res, "parameters": sum(p.numel() for p in unet.parameters()),
            "train_batch_size": batch_size, "train_step_s": step_s,
            "measured_images": images, "inference_steps": inference_steps, "measured_sampling_s": sample_s,
            "images_per_s": images / sample_s, "extrapolated_1000_images_s": 1000 * sample_s / images}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="images in the measured sampling batch")
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows = [bench_resolution(r, device, a.batch_size, a.train_steps, a.images, a.inference_steps)
            for r in a.resolutions]
    meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}
    print(json.dumps(meta))
    print("| resolution | params | train step (bs %d) | sampling img/s (DDIM %d) | 1,000 images (extrapolated from %d) |"
          % (a.batch_size, a.inference_steps, a.images))
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']}² | {r['parameters'] / 1e6:.2f} M | {r['train_step_s']:.2f} s | "
              f"{r['images_per_s']:.3f} | {r['extrapolated_1000_images_s'] / 60:.1f} min |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
