"""Model size and inference latency of one trained nnU-Net model folder (run by the benchmark runner).

    python -m tskd_nnunet.benchmark.measure MODEL_DIR FOLD IMAGES_DIR -o out.json [-n 3] [-device cpu]

* ``params``: parameters of the network nnU-Net's predictor builds for inference (the trainer's own
  ``build_network_architecture`` with the checkpoint loaded), i.e. everything a deployed model runs:
  for the LoRA teacher the frozen ViT backbone + adapters + decoder. ``params_checkpoint``: elements
  of the checkpoint's ``network_weights`` (what the file stores; smaller when a trainer saves
  adapters only).
* ``latency_ms``: median wall time per test case of ``nnUNetPredictor.predict_single_npy_array``
  (nnU-Net's preprocessing, sliding window with its default mirroring, resampling back) on images
  already read into memory, after one warm-up case; file reading/writing is excluded.

Runs in its own process so that the device, thread count and memory of the measurement are its own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from tskd_nnunet.atomic_io import atomic_write_json


def measure_model(model_dir: str, fold: int, images_dir: str, file_ending: str, n_cases: int = 3,
                  device: str = "cpu", checkpoint: str = "checkpoint_final.pth") -> Dict[str, object]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(fold,), checkpoint_name=checkpoint)
    params = sum(p.numel() for p in predictor.network.parameters())
    weights = predictor.list_of_parameters[0]
    # a state dict can hold one tensor under several keys (nnU-Net's decoder keeps a reference to the
    # encoder), so count each storage once
    seen, params_ckpt = set(), 0
    for v in weights.values():
        if hasattr(v, "numel"):
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key not in seen:
                seen.add(key)
                params_ckpt += v.numel()

    suffix = "_0000" + file_ending
    cases = sorted(f[: -len(suffix)] for f in os.listdir(images_dir) if f.endswith(suffix))
    if not cases:
        raise FileNotFoundError(f"no *{suffix} images in {images_dir}")
    n_channels = len(predictor.dataset_json["channel_names"])
    rw = predictor.plans_manager.image_reader_writer_class()
    chosen = cases[: n_cases + 1]  # the first is the warm-up
    times: List[float] = []
    for i, case in enumerate(chosen):
        files = [os.path.join(images_dir, f"{case}_{c:04d}{file_ending}") for c in range(n_channels)]
        img, props = rw.read_images(files)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        predictor.predict_single_npy_array(img, props, None, None, False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0 or len(chosen) == 1:
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"params": int(params), "params_checkpoint": int(params_ckpt), "latency_ms": statistics.median(times),
            "latency_cases": len(times), "device": device, "torch_threads": torch.get_num_threads()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tskd_nnunet.benchmark.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>")
    p.add_argument("fold", type=int)
    p.add_argument("images_dir", help="folder of test images (e.g. imagesTs)")
    p.add_argument("-o", "--output", required=True, help="JSON file to write (atomically)")
    p.add_argument("--file-ending", required=True)
    p.add_argument("-n", "--num-cases", type=int, default=3)
    p.add_argument("-device", "--device", default="cpu")
    a = p.parse_args(argv)
    try:
        out = measure_model(a.model_dir, a.fold, a.images_dir, a.file_ending, a.num_cases, a.device)
    except (FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"measure: error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(a.output, out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
