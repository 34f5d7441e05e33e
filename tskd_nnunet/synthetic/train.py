"""``tskd_train_diffusion``: train an unconditional diffusion model on one fold's training cases.

    tskd_train_diffusion DATASET CONFIGURATION FOLD [-p PLANS] [--steps N] [--resolution R] ...

Data: the fold's training cases only (see :mod:`tskd_nnunet.synthetic.cases`), read from nnU-Net's
preprocessed folder, i.e. in nnU-Net's normalised space, all image channels jointly. Each 2D slice
is scaled so that the configuration's patch size becomes ``resolution`` on its longer side; the
model learns random crops of that (scaled patch) size. The default ``resolution`` is the patch size's
longest side (the working resolution): no scaling, and sampling writes the model's output as is
(centre-cropped when a side was rounded up). A smaller ``--resolution`` trains faster; sampling then
upsamples back to the patch size.

Output: ``$nnUNet_results/DatasetXXX/tskd_diffusion__<plans>__<configuration>/fold_<k>/`` with
``checkpoint_latest.pth`` (every ``--checkpoint-every`` steps, atomic; model, EMA, optimizer, step,
RNG states, the exact case ids used), ``checkpoint_final.pth`` and ``progress_grid.png``. Running the
command again resumes from ``checkpoint_latest.pth`` (a larger ``--steps`` continues training).
"""
from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tskd_nnunet.data.extension import ExtensionError, dataset_name
from tskd_nnunet.models.util import backward_and_step
from tskd_nnunet.synthetic import cases as fold_cases
from tskd_nnunet.synthetic.model import (DEFAULT_BLOCK_OUT_CHANNELS, DiffusionCheckpointError, IntensityMap,
                                         NormalisedImagePipeline, build_sampling_scheduler, build_train_scheduler,
                                         build_unet, image_generators, load_checkpoint, save_atomic)

CHECKPOINT_LATEST = "checkpoint_latest.pth"
CHECKPOINT_FINAL = "checkpoint_final.pth"
PROGRESS_GRID = "progress_grid.png"


@dataclass
class DiffusionTrainSettings:
    steps: int = 20000
    resolution: Optional[int] = None   # None: the configuration's patch size (longest side), no resampling
    batch_size: int = 16
    learning_rate: float = 2e-4
    checkpoint_every: int = 1000
    grid_every: int = 1000
    grid_images: int = 16
    grid_inference_steps: int = 25
    block_out_channels: Tuple[int, ...] = DEFAULT_BLOCK_OUT_CHANNELS
    layers_per_block: int = 1
    attention: bool = True
    ema_decay: float = 0.999
    include_unlabeled_pool: bool = True
    seed: int = 0
    # settings that must match when resuming (the rest may change between runs)
    ARCH_KEYS: Tuple[str, ...] = field(default=("resolution", "block_out_channels", "layers_per_block", "attention",
                                                "include_unlabeled_pool"), repr=False)


def working_resolution(patch_size: Sequence[int], resolution: Optional[int] = None) -> int:
    """The model resolution (longer side): ``resolution`` if given, else the patch size's longest side
    (the task's working resolution: the model learns and samples patches as nnU-Net uses them)."""
    return int(max(patch_size)) if resolution is None else int(resolution)


def diffusion_output_folder(dataset_name_or_id: Union[int, str], plans: str, configuration: str, fold: int) -> str:
    results = os.environ.get("nnUNet_results")
    if not results:
        raise ExtensionError("nnUNet_results is not set. Fix: export nnUNet_results=/path/to/nnUNet_results")
    return os.path.join(results, dataset_name(dataset_name_or_id), f"tskd_diffusion__{plans}__{configuration}",
                        f"fold_{int(fold)}")


def _settings_dict(s: DiffusionTrainSettings) -> dict:
    d = asdict(s)
    d.pop("ARCH_KEYS")
    d["block_out_channels"] = list(d["block_out_channels"])
    return d


def save_grid_png(images: torch.Tensor, path: str, columns: int = 8, labels: Optional[Sequence[str]] = None) -> None:
    """Grid PNG of model-space images ``(n, c, h, w)`` in [-1, 1]; each image's channels side by side.
    Written atomically (temp file + os.replace)."""
    from PIL import Image
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = imgs.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    pad = 2
    cell_w = c * w + (c - 1)
    canvas = np.full((rows * (h + pad) + pad, columns * (cell_w + pad) + pad), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y0, x0 = pad + r * (h + pad), pad + col * (cell_w + pad)
        for ch in range(c):
            canvas[y0:y0 + h, x0 + ch * (w + 1):x0 + ch * (w + 1) + w] = imgs[i, ch]
    tmp = os.path.join(os.path.dirname(path), ".tmp_" + os.path.basename(path))
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_model_space(unet, scheduler_config: dict, n: int, seed: int, inference_steps: int, sampler: str = "ddim",
                       device: torch.device = torch.device("cpu"), start_index: int = 0) -> torch.Tensor:
    """``n`` samples in model space with one seeded generator per image (see image_generators)."""
    pipe = NormalisedImagePipeline(unet=unet, scheduler=build_sampling_scheduler(sampler, scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe(batch_size=n, generator=image_generators(seed, range(start_index, start_index + n)),
                num_inference_steps=inference_steps)


def _rng_state(np_rng: np.random.Generator, noise_gen: torch.Generator) -> dict:
    return {"numpy": np_rng.bit_generator.state, "torch_noise": noise_gen.get_state()}


def train_diffusion(dataset_name_or_id: Union[int, str], configuration: str, fold: int,
                    plans: str = "nnUNetPlans", settings: Optional[DiffusionTrainSettings] = None,
                    device: Union[str, torch.device] = "cpu", progress: bool = True) -> str:
    """Train (or resume) the fold's diffusion model; returns the path of ``checkpoint_final.pth``."""
    from diffusers.training_utils import EMAModel

    s = settings or DiffusionTrainSettings()
    device = torch.device(device)
    name = dataset_name(dataset_name_or_id)
    out = diffusion_output_folder(name, plans, configuration, fold)
    latest = os.path.join(out, CHECKPOINT_LATEST)

    ids = fold_cases.fold_case_ids(name, plans, configuration, fold, s.include_unlabeled_pool)
    case_ids = ids["used"]
    if not case_ids:
        raise ExtensionError(f"fold {fold} of {name} has no training cases. Fix: check splits_final.json")

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(os.path.join(os.environ["nnUNet_preprocessed"], name, plans + ".json"))
    patch_size = tuple(int(p) for p in pm.get_configuration(configuration).patch_size)
    s = replace(s, resolution=working_resolution(patch_size, s.resolution))

    resume = load_checkpoint(latest) if os.path.isfile(latest) else None
    if resume is not None:
        old = resume["settings"]
        for k in s.ARCH_KEYS:
            new = list(getattr(s, k)) if k == "block_out_channels" else getattr(s, k)
            if old[k] != new:
                raise DiffusionCheckpointError(
                    f"{latest} was trained with {k}={old[k]}, not {new}. Fix: pass the same setting to resume, "
                    f"or delete {out} to start over")
        if resume["case_ids"] != case_ids:
            raise DiffusionCheckpointError(
                f"the fold's training cases changed since {latest} was written (splits_final.json or "
                f"tskd_unlabeled_pool.json edited). Fix: delete {out} to retrain on the new split")
        if resume["step"] >= s.steps:
            print(f"{latest} is already at step {resume['step']} >= --steps {s.steps}; nothing to train.")
            final = os.path.join(out, CHECKPOINT_FINAL)
            if not os.path.isfile(final):
                save_atomic(resume, final)
            return final

    multiple = 2 ** (len(s.block_out_channels) - 1)
    sample_shape, scale = fold_cases.scaled_shape(patch_size, s.resolution, multiple)

    print(f"Diffusion model for {name} {configuration} fold {fold}: {len(ids['train'])} labeled training cases"
          f" + {len(ids['pool'])} unlabeled-pool cases (validation cases excluded: {len(ids['val'])}); "
          f"model resolution {sample_shape} for patch size {patch_size}")
    volumes = fold_cases.load_cases(name, plans, configuration, case_ids)
    if resume is not None:
        imap = IntensityMap(**resume["intensity_map"])
    else:
        rng_fit = np.random.default_rng(s.seed)
        per_channel = []
        for c in range(volumes[0].shape[0]):
            v = np.concatenate([vol[c].ravel() for vol in volumes])
            per_channel.append(v if v.size <= 2_000_000 else rng_fit.choice(v, 2_000_000, replace=False))
        imap = IntensityMap.fit(per_channel)
    slices = [imap.to_model(t) for t in fold_cases.to_slices(volumes, scale)]
    sampler = fold_cases.SliceSampler(slices, sample_shape)

    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG untouched
        torch.manual_seed(s.seed)
        unet = build_unet(volumes[0].shape[0], sample_shape, s.block_out_channels, s.layers_per_block, s.attention)
    noise_scheduler = build_train_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.learning_rate, weight_decay=1e-2)
    np_rng = np.random.default_rng(s.seed)
    noise_gen = torch.Generator("cpu").manual_seed(s.seed)
    start, log = 0, []
    if resume is not None:
        unet.load_state_dict(resume["unet"])
    unet.to(device)
    ema = EMAModel(unet.parameters(), decay=s.ema_decay, use_ema_warmup=True, power=3 / 4)
    if resume is not None:
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        for g in optimizer.param_groups:
            g["lr"] = s.learning_rate
        np_rng.bit_generator.state = resume["rng"]["numpy"]
        noise_gen.set_state(resume["rng"]["torch_noise"])
        start, log = int(resume["step"]), list(resume.get("log", []))
        print(f"Resuming from {latest} at step {start}")
    seconds_before = float(resume.get("train_seconds", 0.0)) if resume is not None else 0.0
    ema.to(device)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if resume is not None and scaler is not None and resume.get("grad_scaler"):
        scaler.load_state_dict(resume["grad_scaler"])

    def checkpoint(step: int) -> dict:
        return {"unet_config": dict(unet.config), "unet": {k: v.cpu() for k, v in unet.state_dict().items()},
                "ema": {k: ([p.cpu() for p in v] if k == "shadow_params" else v) for k, v in ema.state_dict().items()},
                "optimizer": optimizer.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None,
                "step": step, "rng": _rng_state(np_rng, noise_gen), "log": log,
                "train_scheduler_config": dict(noise_scheduler.config), "intensity_map": imap.state_dict(),
                "sample_shape": list(sample_shape), "patch_size": list(patch_size), "scale": scale,
                "dataset": name, "plans": plans, "configuration": configuration, "fold": int(fold),
                "case_ids": case_ids, "labeled_case_ids": ids["train"], "pool_case_ids": ids["pool"],
                "val_case_ids": ids["val"], "settings": _settings_dict(s),
                "train_seconds": seconds_before + time.time() - t0}  # all invocations together

    def write_grid(step: int) -> None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        unet.eval()
        try:
            fake = sample_model_space(unet, dict(noise_scheduler.config), s.grid_images, seed=1234,
                                      inference_steps=s.grid_inference_steps, device=device)
        finally:
            ema.restore(unet.parameters())
            unet.train()
        save_grid_png(fake, os.path.join(out, PROGRESS_GRID))
        tqdm.write(f"step {step}: sample grid -> {os.path.join(out, PROGRESS_GRID)}")

    os.makedirs(out, exist_ok=True)
    unet.train()
    bar = tqdm(total=s.steps, initial=start, desc="diffusion", disable=not progress, dynamic_ncols=True)
    running, t0 = [], time.time()
    for step in range(start + 1, s.steps + 1):
        x0 = sampler.batch(s.batch_size, np_rng)
        noise = torch.randn(x0.shape, generator=noise_gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=noise_gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        xt, noise, t = xt.to(device, non_blocking=True), noise.to(device, non_blocking=True), t.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=True) if use_amp else nullcontext():
            loss = F.mse_loss(unet(xt, t).sample.float(), noise)
        backward_and_step(loss, optimizer, scaler, unet.parameters(), 1.0)
        ema.step(unet.parameters())
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
        if step % s.checkpoint_every == 0 or step == s.steps:
            log.append([step, float(np.mean(running)), time.time() - t0])
            running = []
            save_atomic(checkpoint(step), latest)
        if step % s.grid_every == 0 or step == s.steps:
            write_grid(step)
    bar.close()
    final = os.path.join(out, CHECKPOINT_FINAL)
    save_atomic(checkpoint(s.steps), final)
    print(f"Diffusion training done: {final}")
    return final


def _channels(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers, e.g. 32,64,64")
    return values


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[List[str]] = None) -> None:
    d = DiffusionTrainSettings()
    p = argparse.ArgumentParser(prog="tskd_train_diffusion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration", help="a 2d configuration of the plans, e.g. 2d")
    p.add_argument("fold", type=int)
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimisation steps (a larger value resumes)")
    p.add_argument("--resolution", type=int, default=None,
                   help="model resolution of the patch's longer side (default: the configuration's patch size, "
                        "i.e. the working resolution with no resampling); a smaller value trains faster and "
                        "sampling then upsamples bilinearly to the patch size")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--grid-every", type=int, default=d.grid_every)
    p.add_argument("--block-out-channels", type=_channels, default=d.block_out_channels)
    p.add_argument("--layers-per-block", type=int, default=d.layers_per_block)
    p.add_argument("--no-attention", action="store_true", help="no self-attention at the lowest resolution")
    p.add_argument("--no-unlabeled-pool", action="store_true",
                   help="train only on the fold's labeled training cases, not on tskd_unlabeled_pool.json's")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("-device", "--device", default=default_device(), choices=("cpu", "cuda", "mps"))
    a = p.parse_args(argv)
    for k in ("steps", "resolution", "batch_size", "checkpoint_every", "grid_every", "layers_per_block"):
        if getattr(a, k) is not None and getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    s = DiffusionTrainSettings(steps=a.steps, resolution=a.resolution, batch_size=a.batch_size, learning_rate=a.lr,
                               checkpoint_every=a.checkpoint_every, grid_every=a.grid_every,
                               block_out_channels=a.block_out_channels, layers_per_block=a.layers_per_block,
                               attention=not a.no_attention, include_unlabeled_pool=not a.no_unlabeled_pool,
                               seed=a.seed)
    try:
        train_diffusion(a.dataset_name_or_id, a.configuration, a.fold, a.plans, s, a.device)
    except (ExtensionError, DiffusionCheckpointError) as e:
        raise SystemExit(f"tskd_train_diffusion: {e}") from None


if __name__ == "__main__":
    main()
