"""The LiteMedSAM teacher's fast CPU path (documentation/teacher.md, "CPU speed") computes what the vendored
modules compute: outputs in train and eval mode and the gradients of what trains agree within float tolerance, at
a working size whose windows are zero-padded (64) and one whose windows tile exactly (56); a checkpoint written
on the old path loads into the fast one and predicts the same; glibc keeps freed memory once told to."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

ATOL_LOGITS = 1e-4  # measured: 3e-5 at 64x64 (logits of magnitude ~10); float32 summation order only
RTOL_GRAD = 1e-3    # measured: 2e-5 relative to each parameter's largest gradient
ATOL_GRAD = 1e-5    # relative to the largest gradient of all: k-projection biases get a gradient that is
#                     exactly zero in exact arithmetic (softmax ignores a shift shared by all keys), ~1e-7 in float


def _network(size: int, n_classes: int = 3):
    from tskd_nnunet.models.lora import LoraSettings
    from tskd_nnunet.models.teacher_net import build_teacher_network, resolve_teacher_spec

    torch.manual_seed(0)
    spec = resolve_teacher_spec("litemedsam", None, False, {}, None, (size, size), LoraSettings(stages=(2, 3)), 8,
                                "sam")
    net = build_teacher_network(spec, 1, n_classes, [[1, 1], [0.5, 0.5], [0.25, 0.25]], True).train()
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module", params=[64, 56], ids=["padded_windows", "exact_windows"])
def net_and_batch(request):
    size = request.param
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, size, size, generator=g)
    y = torch.randint(0, 3, (2, size, size), generator=g)
    return _network(size), x, y


def _step(net, x, y, fast: bool):
    from tskd_nnunet.models.litemedsam import set_fast_path
    set_fast_path(net, fast)
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = sum(F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:])[:, 0].long()) for o in out)
    loss.backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same_gradients(ref: dict, fast: dict) -> None:
    assert ref.keys() == fast.keys() and ref
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        torch.testing.assert_close(fast[name], g, rtol=0, atol=ATOL_GRAD * scale + RTOL_GRAD * g.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_fast_path_matches_the_vendored_forward_in_train_mode_with_the_same_gradients(net_and_batch):
    net, x, y = net_and_batch
    ref_out, ref_grad = _step(net, x, y, fast=False)
    fast_out, fast_grad = _step(net, x, y, fast=True)
    assert len(ref_out) == len(fast_out) == 3
    for r, f in zip(ref_out, fast_out):
        torch.testing.assert_close(f, r, rtol=0, atol=ATOL_LOGITS)
    # every trainable parameter after the frozen stages (the input adapter sits before them: no gradient either way)
    trained = {n for n, p in net.named_parameters() if p.requires_grad and not n.startswith("adapter.")}
    assert ref_grad.keys() == trained and any("lora_A" in n for n in trained) and any("decoder." in n for n in trained)
    _assert_same_gradients(ref_grad, fast_grad)


def test_fast_path_matches_in_eval_mode_and_without_autograd(net_and_batch):
    from tskd_nnunet.models.litemedsam import set_fast_path
    net, x, _ = net_and_batch
    net.eval()
    try:
        with torch.no_grad():
            ref = set_fast_path(net, False)(x)
            fast = set_fast_path(net, True)(x)
    finally:
        net.train()
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, rtol=0, atol=ATOL_LOGITS)


def test_fused_conv_bn_passes_gradients_to_trained_base_weights(net_and_batch):
    """Full fine-tuning: the fused convolution is built per call, so conv weights and BatchNorm affine parameters
    get the gradients the separate conv + BN would give them."""
    net, x, y = net_and_batch
    trainable = {n: p.requires_grad for n, p in net.named_parameters()}
    net.requires_grad_(True)
    try:
        _, ref_grad = _step(net, x, y, fast=False)
        _, fast_grad = _step(net, x, y, fast=True)
    finally:
        for n, p in net.named_parameters():
            p.requires_grad_(trainable[n])
    assert any(".bn.weight" in n for n in ref_grad) and any(".c.weight" in n for n in ref_grad)
    _assert_same_gradients(ref_grad, fast_grad)


def test_a_checkpoint_of_the_old_path_loads_into_the_fast_path_and_predicts_the_same(tmp_path):
    from tskd_nnunet.models.litemedsam import set_fast_path
    old = set_fast_path(_network(64), False)
    opt = torch.optim.AdamW([p for p in old.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for _ in range(2):
        loss = sum(F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:])[:, 0].long()) for o in old(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path / "network_weights.pth")
    torch.save(old.state_dict(), path)
    new = _network(64)  # the fast path is the default of a freshly built teacher
    new.load_state_dict(torch.load(path, weights_only=True))  # strict: the format is unchanged
    assert new.state_dict().keys() == old.state_dict().keys()
    assert not [k for k in new.state_dict() if k.startswith("backbone.") and "lora_" not in k]  # adapter-only
    old.eval(), new.eval()
    with torch.no_grad():
        for r, f in zip(old(x), new(x)):
            torch.testing.assert_close(f, r, rtol=0, atol=ATOL_LOGITS)


def test_keep_freed_memory_stops_page_faults_of_repeated_steps():
    """In fresh processes (the setting is process-wide): "steps" that each hold a few large tensors (252 MB, all
    above glibc's largest mmap threshold of 32 MB) and free them fault every page in again at every step by default;
    after keep_freed_memory() the heap settles within a few steps (1-7 measured) and a step faults nothing in."""
    code = """
import resource, sys, torch
from tskd_nnunet.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    alive = [torch.ones(n * 2 ** 18) for n in (64, 40, 100, 48)]  # MB
    del alive
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(16)])
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    faults = {mode: [int(n) for n in subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True,
                                                    text=True, check=True).stdout.split()]
              for mode in ("default", "keep")}
    pages = 252 * 2 ** 20 // 4096
    assert min(faults["default"]) > 0.9 * pages
    assert faults["keep"][-1] < 0.01 * pages
