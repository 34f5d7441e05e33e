"""Feature-KD projection heads under DDP (nnU-Net's ``-num_gpus``), on CPU with the gloo backend.

nnU-Net wraps ``self.network`` in DistributedDataParallel after ``configure_optimizers``; our trainers
attach the projection heads to the network there (models/util.attach_training_module), so DDP
broadcasts and all-reduces them with the student. Two processes, different data on each: the heads'
gradients and parameters must be the same on both ranks after a step. Heads kept beside the wrapped
network (the old way) drift apart, which the test shows as well.
"""
import os
import socket
from datetime import timedelta

import torch

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn
    return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), 1, 2, 1, True, nn.InstanceNorm2d,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def _step(rank: int, port: int, out_dir: str) -> None:
    """One training step per way of holding the heads; saves their gradients and parameters."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tskd_nnunet.distill.losses import FeatureKD, feature_tap_for, through_every_parameter
    from tskd_nnunet.models.util import attach_training_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        result = {}
        for attached in (False, True):  # the last, attached, is used below
            torch.manual_seed(rank)  # different initial weights on each rank: DDP must broadcast rank 0's
            student = _tiny_unet()
            tap = feature_tap_for(student)
            heads = nn.ModuleDict({"feature": FeatureKD(16, 5, 2, "mse")})
            if attached:
                attach_training_module(student, "tskd_kd_heads", heads)  # what DistillTrainer.configure_optimizers does
            network = DDP(student)  # what nnU-Net's initialize does (CPU: no device_ids)
            params = list(network.parameters()) + ([] if attached else list(heads.parameters()))
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
            data = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            x, teacher = torch.randn(2, 1, 16, 16, generator=data), torch.randn(2, 5, 4, 4, generator=data)
            outputs = network(x)
            loss = sum(o.float().square().mean() for o in outputs) + heads["feature"](tap.pop(), teacher)
            loss.backward()
            grads = [p.grad.clone() for p in heads.parameters()]
            optimizer.step()
            result[attached] = {"grads": grads, "params": [p.detach().clone() for p in heads.parameters()]}
        # a step whose loss leaves the heads and the lower outputs out (a phase of the two-phase trainers), then a
        # full one: with every parameter reached (DistillTrainer does this under DDP), DDP does not stop at the
        # second forward for parameters that got no gradient in the first
        for full in (False, True):
            outputs = network(x)
            terms = {"sup": outputs[0].float().square().mean()}
            if full:
                terms["feat"] = heads["feature"](tap.pop(), teacher)
            sum(through_every_parameter(terms, outputs, list(heads.parameters())).values()).backward()
        result["phases"] = [p.grad.clone() for p in heads.parameters()]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))


def test_kd_heads_in_the_network_are_synchronised_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_step, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert _same(r0[True]["grads"], r1[True]["grads"]) and _same(r0[True]["params"], r1[True]["params"])
    assert _same(r0["phases"], r1["phases"])
    # the old way, heads beside the DDP-wrapped network: each rank trains its own
    assert not _same(r0[False]["grads"], r1[False]["grads"]) and not _same(r0[False]["params"], r1[False]["params"])


def test_attached_heads_stay_out_of_the_network_weights():
    """nnU-Net saves network.state_dict() as network_weights and loads it strictly: the attached heads are
    neither saved there nor required when loading; their values survive a load."""
    from torch import nn

    from tskd_nnunet.models.util import attach_training_module
    student = _tiny_unet()
    plain = {k: v.clone() for k, v in student.state_dict().items()}
    heads = nn.ModuleDict({"feature": nn.Conv2d(16, 5, 1)})
    attach_training_module(student, "tskd_kd_heads", heads)
    assert set(student.state_dict()) == set(plain)
    assert {n for n, _ in student.named_parameters()} >= {f"tskd_kd_heads.{n}" for n, _ in heads.named_parameters()}
    before = heads["feature"].weight.detach().clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.load_state_dict(plain)  # strict, as nnU-Net loads checkpoints
    assert all(torch.equal(v, plain[k]) for k, v in student.state_dict().items())
    assert torch.equal(heads["feature"].weight, before + 1.0)  # kept: heads are loaded from their own key
    assert set(heads.state_dict()) == {"feature.weight", "feature.bias"}


def test_supervised_loss_without_labeled_cases_gives_every_output_a_gradient():
    """With no labeled case in a rank's batch the supervised loss is 0, but still reaches every deep-supervision
    output, so DDP (find_unused_parameters off) sees a gradient for each segmentation layer."""
    from tskd_nnunet.distill.losses import masked_supervised_loss
    student = _tiny_unet()
    outputs = student(torch.randn(2, 1, 16, 16))
    targets = [torch.zeros(2, 1, *o.shape[2:]) for o in outputs]

    def top_only(o, t):
        return o[0].float().mean()
    loss = masked_supervised_loss(top_only, outputs, targets, torch.tensor([False, False]))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in student.decoder.seg_layers.parameters())
