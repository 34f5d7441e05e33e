"""LiteMedSAM teacher options on CPU: seconds per training step and peak memory, in one run (ratios comparable).

Each option (head x adaptation x working size) is built exactly as the trainers build it
(``resolve_teacher_spec`` + ``build_teacher_network`` with the packaged checkpoint) and trained for a few
AdamW steps on random batches with nnU-Net's deep-supervision outputs; each runs in its own subprocess so
its peak RSS is its own. Forward-only inference time per image is reported too.

    python benchmarks/bench_litemedsam_cpu.py [--batch 8] [--steps 3] [--sizes 128 256] [--threads 2]

The table is printed and written to benchmarks/results/bench_litemedsam_cpu.md (``--markdown`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from tskd_nnunet.atomic_io import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {  # name: (head, LoRA stages or None for all / "frozen" / "full")
    "sam_lora_all": ("sam", None),
    "sam_lora_last (stages 2-3)": ("sam", (2, 3)),
    "sam_frozen": ("sam", "frozen"),
    "unetr_lora_all": ("unetr", None),
    "unetr_lora_last (stages 2-3)": ("unetr", (2, 3)),
    "unetr_frozen": ("unetr", "frozen"),
    "sam_full_ft": ("sam", "full"),
}


def measure(name: str, size: int, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from tskd_nnunet.models.lora import LoraSettings
    from tskd_nnunet.models.teacher_net import build_teacher_network, resolve_teacher_spec

    head, adapt = OPTIONS[name]
    lora = None if adapt in ("frozen", "full") else LoraSettings(stages=adapt)
    spec = resolve_teacher_spec("litemedsam", None, False, {}, None, (size, size), lora, 32, head, adapt == "frozen")
    net = build_teacher_network(spec, 1, 2, [[1, 1], [0.5, 0.5], [0.25, 0.25]], True).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 2, (batch, size, size))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        out = net(x)
        loss = sum(F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:])[:, 0].long()) for o in out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        t = time.perf_counter()
        net(x[:1])
        infer = time.perf_counter() - t
    return {"step_s": sorted(times)[len(times) // 2], "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in net.parameters()), "infer_s": infer,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--markdown", default=os.path.join(REPO, "benchmarks", "results", "bench_litemedsam_cpu.md"))
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print("RESULT " + json.dumps(measure(a._one[0], int(a._one[1]), a.batch, a.steps)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    rows = []
    for size in a.sizes:
        for name in a.options:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--batch", str(a.batch), "--steps",
                                   str(a.steps), "--_one", name, str(size)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} @ {size} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
            rows.append((size, name, r))
            print(f"{name} @ {size}: {r['step_s']:.2f} s/step", flush=True)
    lines = [f"batch {a.batch}, {a.threads} threads, median of {a.steps} steps after 1 warm-up; packaged LiteMedSAM",
             "", "| working size | option | s / training step | vs sam_lora_all | trainable / total params | "
             "inference s / image | peak RSS GB |", "|---|---|---|---|---|---|---|"]
    for size, name, r in rows:
        ref = next(x for s, n, x in rows if s == size and n == "sam_lora_all") if "sam_lora_all" in a.options else r
        lines.append(f"| {size} | {name} | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x | "
                     f"{r['trainable'] / 1e6:.2f} M / {r['total'] / 1e6:.2f} M | {r['infer_s']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} |")
    command = "python benchmarks/bench_litemedsam_cpu.py " + " ".join(sys.argv[1:])
    text = f"# LiteMedSAM teacher options on CPU\n\n`{command}`\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    atomic_write_text(a.markdown, text)


if __name__ == "__main__":
    main()
