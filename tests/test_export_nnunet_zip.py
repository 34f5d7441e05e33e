"""tskd_export_nnunet: a student as a standard nnU-Net model zip (issue #31).

Fast tests export model folders written here (a network built by the trainer class, a realistic nnU-Net
checkpoint with optimizer state): zip layout, checkpoint contents, the plans entry of a width preset,
provenance, refusals and one-line errors. The slow test is the must-show: students trained through
nnU-Net's commands, exported, installed into a virtualenv that holds only nnunetv2 and torch
(scripts/vanilla_nnunet_env.sh) and predicted there with plain nnUNetv2_predict.
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import BIN, PHANTOM_ID, REPO, run_cmd

DATASET = f"Dataset{PHANTOM_ID}_Phantom"
TEACHER = "TSKDPlainTrainer_test"
COUNTS = {"labeled": 4, "pool": 5, "synthetic": 1, "unlabeled": 1}
SLOW = 3600  # seconds per command of the slow test (a shared 2-core machine; CI needs a fraction)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_model_folder(env, results, trainer, cache_manifest=True, plans_update=None):
    """``results/Dataset990_Phantom/<trainer>__nnUNetPlans__2d`` as nnUNetv2_train leaves it after training fold 0:
    plans (with the trainer's settings record), dataset files, a checkpoint with optimizer state and KD heads,
    progress.png, validation/summary.json and debug.json (transfer-set counts, target cache with its manifest)."""
    from PIL import Image
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.trainers import distill

    cls = getattr(distill, trainer)
    pre = os.path.join(env["nnUNet_preprocessed"], DATASET)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    plans.update(plans_update or {})
    settings = {"TSKD_SCHEDULE": "1,2,1", "TSKD_KD_MODE": "cached" if cache_manifest else "online",
                "TSKD_TEACHER_TRAINER": TEACHER, "TSKD_TEACHER_PLANS": "nnUNetPlans",
                "TSKD_TEACHER_CHECKPOINT": "checkpoint_final.pth", "kd_weight": 1.0, "kd_temperature": 2.0,
                "student_width": getattr(cls, "student_width", 1.0)}
    plans["tskd_settings"] = settings
    folder = os.path.join(results, DATASET, f"{trainer}__nnUNetPlans__2d")
    fold = os.path.join(folder, "fold_0")
    os.makedirs(os.path.join(fold, "validation"))
    json.dump(plans, open(os.path.join(folder, "plans.json"), "w"))
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(os.path.join(pre, name), os.path.join(folder, name))
    torch.manual_seed(0)
    pm = PlansManager(plans)
    net = cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, enable_deep_supervision=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)
    out = net(torch.randn(2, 1, 64, 64))
    (out[0] if isinstance(out, (list, tuple)) else out).mean().backward()
    opt.step()  # momentum buffers: the optimizer state that doubles nnU-Net's checkpoints
    torch.save({"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
                "logging": {"train_losses": [0.5]}, "_best_ema": None, "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "2d", "fold": 0, "dataset_json": {}},
                "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1),
                "tskd_kd_heads": {"feature.proj.weight": torch.zeros(8, 8)}},
               os.path.join(fold, "checkpoint_final.pth"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(fold, "progress.png"))
    json.dump({"foreground_mean": {"Dice": 0.5}}, open(os.path.join(fold, "validation", "summary.json"), "w"))
    # the teacher's checkpoint by nnU-Net's folder convention (only its bytes matter here)
    teacher_ckpt = os.path.join(results, DATASET, f"{TEACHER}__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")
    os.makedirs(os.path.dirname(teacher_ckpt), exist_ok=True)
    with open(teacher_ckpt, "wb") as f:
        f.write(b"teacher weights of " + trainer.encode())
    debug = {"transfer_set_counts": str(COUNTS), "target_cache_folder": "None"}
    if cache_manifest:
        cache = os.path.join(results, "cache_" + trainer)
        os.makedirs(cache)
        json.dump({"teachers": [{"trainer": TEACHER, "checkpoint": teacher_ckpt, "sha256": "ab" * 32}]},
                  open(os.path.join(cache, "manifest.json"), "w"))
        debug["target_cache_folder"] = cache
    json.dump(debug, open(os.path.join(fold, "debug.json"), "w"))
    return folder, net, teacher_ckpt


def _zip_checkpoint(zip_path, member):
    with zipfile.ZipFile(zip_path) as z:
        return torch.load(io.BytesIO(z.read(member)), map_location="cpu", weights_only=True)


def test_small_student_zip_layout_checkpoint_and_plans(use_nnunet_env, tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.model_sharing.model_import import install_model_from_zip_file
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.export.nnunet_zip import export_model_zip

    folder, net, _ = write_model_folder(use_nnunet_env, str(tmp_path / "results"), "DistillTrainer_small")
    out = str(tmp_path / "out" / "student.zip")
    prov = export_model_zip(folder, out, [0], verbose=False)

    model = f"{DATASET}/nnUNetTrainer__nnUNetPlans_DistillTrainer_small__2d"
    with zipfile.ZipFile(out) as z:
        names = sorted(z.namelist())
        zplans = json.loads(z.read(f"{model}/plans.json"))
        zprov = json.loads(z.read(f"{model}/tskd_provenance.json"))
        assert z.read(f"{model}/dataset.json") == open(os.path.join(folder, "dataset.json"), "rb").read()
    assert names == sorted(f"{model}/{n}" for n in (
        "plans.json", "dataset.json", "dataset_fingerprint.json", "tskd_provenance.json", "fold_0/checkpoint_final.pth",
        "fold_0/progress.png", "fold_0/validation/summary.json"))  # nnU-Net's layout; no debug.json
    assert os.listdir(tmp_path / "out") == ["student.zip"]  # no temporary file left beside it
    assert zprov["exported_as"]["plans"] == "nnUNetPlans_DistillTrainer_small" and zprov["student"]["width"] == 0.5

    # the checkpoint: plain types only (weights_only), nnU-Net's trainer, no optimizer / KD heads
    ckpt = _zip_checkpoint(out, f"{model}/fold_0/checkpoint_final.pth")
    assert set(ckpt) == {"network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes"}
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["inference_allowed_mirroring_axes"] == (0, 1)
    assert ckpt["init_args"]["configuration"] == "2d" and ckpt["init_args"]["plans"] == zplans
    assert all(v.dtype == torch.float32 for v in ckpt["network_weights"].values() if v.is_floating_point())
    src_size = os.path.getsize(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    assert prov["sizes"]["0"]["exported_checkpoint_bytes"] < 0.55 * src_size  # the optimizer state is gone

    # the plans entry: one configuration, half the planned features, nnU-Net's builder makes the student
    planned = json.load(open(os.path.join(folder, "plans.json")))
    arch = zplans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    planned_arch = planned["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert list(zplans["configurations"]) == ["2d"] and zplans["plans_name"] == "nnUNetPlans_DistillTrainer_small"
    assert arch["features_per_stage"] == [max(4, round(f / 2)) for f in planned_arch["features_per_stage"]]
    assert {k: v for k, v in arch.items() if k != "features_per_stage"} == \
           {k: v for k, v in planned_arch.items() if k != "features_per_stage"}
    assert not any(k.startswith("tskd_") for k in zplans)
    pm = PlansManager(zplans)
    rebuilt = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, True)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rebuilt.load_state_dict(ckpt["network_weights"], strict=True)

    # installed by nnU-Net's own installer, loaded by its predictor: the student's logits, exactly
    installed = tmp_path / "recipient_results"
    installed.mkdir()
    monkeypatch.setenv("nnUNet_results", str(installed))
    install_model_from_zip_file(out)
    p = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(installed / model), (0,))
    x = torch.randn(1, 1, 64, 64)
    net.eval(), p.network.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(p.network(x), net(x))
    assert p.trainer_name == "nnUNetTrainer" and prov["checks"]["max_abs_logit_diff_vs_source"] == 0.0


def test_fp16_halves_the_checkpoint(use_nnunet_env, tmp_path):
    from tskd_nnunet.export.nnunet_zip import export_model_zip

    folder, _, _ = write_model_folder(use_nnunet_env, str(tmp_path / "results"), "DistillTrainer")
    fp32 = export_model_zip(folder, str(tmp_path / "fp32.zip"), [0], verbose=False)
    fp16 = export_model_zip(folder, str(tmp_path / "fp16.zip"), [0], fp16=True, verbose=False)
    model = f"{DATASET}/nnUNetTrainer__nnUNetPlans_DistillTrainer__2d"
    ckpt = _zip_checkpoint(str(tmp_path / "fp16.zip"), f"{model}/fold_0/checkpoint_final.pth")
    assert {v.dtype for v in ckpt["network_weights"].values() if v.is_floating_point()} == {torch.float16}
    ratio = fp16["sizes"]["0"]["exported_checkpoint_bytes"] / fp32["sizes"]["0"]["exported_checkpoint_bytes"]
    assert 0.45 < ratio < 0.55 and fp16["zip_bytes"] < 0.55 * fp32["zip_bytes"]
    assert fp16["exported_as"]["weights_dtype"] == "float16"
    # fp16-rounded weights computed in fp32: a small, nonzero change of the probabilities
    assert 0 < fp16["checks"]["max_abs_prob_diff_vs_source"] < 1e-2
    # the default student keeps nnU-Net's planned architecture
    zplans = json.loads(zipfile.ZipFile(str(tmp_path / "fp32.zip")).read(f"{model}/plans.json"))
    planned = json.load(open(os.path.join(folder, "plans.json")))
    assert zplans["configurations"]["2d"]["architecture"] == planned["configurations"]["2d"]["architecture"]


def test_provenance_records_teacher_transfer_set_and_settings(use_nnunet_env, tmp_path):
    from tskd_nnunet import __version__
    from tskd_nnunet.export.nnunet_zip import export_model_zip

    # cached KD: the teacher's sha256 as the target cache recorded it
    folder, _, teacher_ckpt = write_model_folder(use_nnunet_env, str(tmp_path / "a"), "DistillTrainer_small")
    prov = export_model_zip(folder, str(tmp_path / "a.zip"), [0], verbose=False)
    fold = prov["folds"]["0"]
    rel = f"{DATASET}/{TEACHER}__nnUNetPlans__2d/fold_0/checkpoint_final.pth"  # no local folder names
    assert fold["teachers"] == [{"trainer": TEACHER, "checkpoint": rel, "sha256": "ab" * 32,
                                 "sha256_from": "the target cache the student was trained on (manifest.json)"}]
    assert fold["transfer_set_counts"] == COUNTS and fold["kd_mode"] == "cached"
    assert fold["training_settings"]["kd_temperature"] == 2.0 and fold["training_settings"]["student_width"] == 0.5
    assert fold["source_checkpoint_sha256"] == _sha(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    assert fold["validation_foreground_mean"] == {"Dice": 0.5}
    assert prov["versions"]["tskd_nnunet"] == __version__ and prov["versions"]["nnunetv2"].startswith("2.8")
    assert prov["student"]["trainer"] == "DistillTrainer_small" and prov["student"]["network"] == "PlainConvUNet"

    # online KD records no hash: the teacher's checkpoint in nnUNet_results is hashed at export, and said so
    folder, _, teacher_ckpt = write_model_folder(use_nnunet_env, str(tmp_path / "b"), "DistillTrainer",
                                                 cache_manifest=False)
    prov_b = export_model_zip(folder, str(tmp_path / "b.zip"), [0], verbose=False)
    teacher, = prov_b["folds"]["0"]["teachers"]
    assert teacher["sha256"] == _sha(teacher_ckpt) and "at export time" in teacher["sha256_from"]
    assert teacher["checkpoint"] == rel and all(str(tmp_path) not in json.dumps(p) for p in (prov, prov_b))
    assert "warning" in teacher  # written after the student's checkpoint here: flagged as possibly retrained


def test_width_of_each_trainer():
    from tskd_nnunet.export.nnunet_zip import planned_width
    from tskd_nnunet.trainers import base, distill, distill_synthetic, teacher

    assert planned_width(distill.DistillTrainer) == 1.0 and planned_width(distill.DistillTrainer_small) == 0.5
    assert planned_width(distill.DistillTrainer_tiny) == 0.25 and planned_width(base.TSKDPlainTrainer) == 1.0
    assert planned_width(distill_synthetic.DistillTrainer_syn) == 1.0
    assert planned_width(distill.DistillTrainer_vittiny) is None
    assert planned_width(teacher.ViTLoRATeacherTrainer) is None


def _cli(argv, capsys):
    from tskd_nnunet.export.nnunet_zip import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_vit_student_is_refused_naming_onnx_export(use_nnunet_env, tmp_path, monkeypatch, capsys):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.trainers import distill

    pre = os.path.join(use_nnunet_env["nnUNet_preprocessed"], DATASET)
    cm = PlansManager(os.path.join(pre, "nnUNetPlans.json")).get_configuration("2d")
    monkeypatch.setenv("TSKD_STUDENT_ARCH_OVERRIDES", '{"depth": 2, "embed_dim": 64, "num_heads": 2}')
    spec = distill.DistillTrainer_vittiny.student_spec_from_env(cm.patch_size).to_dict()
    monkeypatch.delenv("TSKD_STUDENT_ARCH_OVERRIDES")
    results = str(tmp_path / "results")
    write_model_folder(use_nnunet_env, results, "DistillTrainer_vittiny",
                       plans_update={distill.STUDENT_PLANS_KEY: spec})
    monkeypatch.setenv("nnUNet_results", results)
    out = tmp_path / "vit.zip"
    code, err = _cli(["-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-tr", "DistillTrainer_vittiny", "-o", str(out)],
                     capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("tskd_export_nnunet: error: DistillTrainer_vittiny builds a network that nnU-Net")
    assert "tskd_export -d Dataset990_Phantom -c 2d -f 0 -tr DistillTrainer_vittiny" in err[0]
    assert not out.exists() and os.listdir(tmp_path) == ["results"]


def test_bad_output_and_missing_fold_are_one_line_errors(use_nnunet_env, tmp_path, monkeypatch, capsys):
    results = str(tmp_path / "results")
    write_model_folder(use_nnunet_env, results, "DistillTrainer_small")
    monkeypatch.setenv("nnUNet_results", results)
    common = ["-d", str(PHANTOM_ID), "-c", "2d", "-tr", "DistillTrainer_small"]

    (tmp_path / "adir").mkdir()
    code, err = _cli(common + ["-f", "0", "-o", str(tmp_path / "adir")], capsys)
    assert code == 1 and len(err) == 1 and "is a folder" in err[0] and os.path.join("adir", "student.zip") in err[0]
    assert os.listdir(tmp_path / "adir") == []

    (tmp_path / "afile").write_text("x")
    code, err = _cli(common + ["-f", "0", "-o", str(tmp_path / "afile" / "sub" / "s.zip")], capsys)
    assert code == 1 and len(err) == 1 and f"{tmp_path / 'afile'} is a file" in err[0]

    code, err = _cli(common + ["-o", str(tmp_path / "s.zip")], capsys)  # default: folds 0-4, only 0 trained
    assert code == 1 and len(err) == 1 and "fold_1 not found (folds trained: 0). Fix: -f 0" in err[0]

    code, err = _cli(common + ["-f", "0", "-chk", "checkpoint_best.pth", "-o", str(tmp_path / "s.zip")], capsys)
    assert code == 1 and len(err) == 1 and "checkpoint_best.pth" in err[0] and "checkpoint_final.pth" in err[0]

    os.remove(os.path.join(results, DATASET, "DistillTrainer_small__nnUNetPlans__2d", "fold_0", "progress.png"))
    code, err = _cli(common + ["-f", "0", "-o", str(tmp_path / "s.zip")], capsys)
    assert code == 1 and len(err) == 1 and "progress.png not found" in err[0] and "--c" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile", "results"]  # nothing written anywhere


# ----------------------------------------------------------------------------- must-show: plain nnU-Net
def _vanilla_python() -> str:
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "vanilla_nnunet_env.sh")], capture_output=True,
                          text=True, timeout=3600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def _vanilla_env(vanilla_bin: str, results: str, plugin_env: dict) -> dict:
    """What a recipient has: nnU-Net's commands of the vanilla venv and an nnUNet_results folder, nothing else
    (no nnUNet_raw/preprocessed, no nnUNet_extTrainer, no PYTHONPATH, no user site-packages). Thread settings as
    the plugin's run: nnU-Net sets torch's threads from nnUNet_def_n_proc, and another thread count changes the
    last bits of the logits, which nnU-Net's fp16 sum of the tiles turns into up to ~3e-4 of probability."""
    env = {"PATH": os.pathsep.join([vanilla_bin, "/usr/bin", "/bin"]), "HOME": os.environ.get("HOME", "/tmp"),
           "nnUNet_results": results, "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
    env.update({k: plugin_env[k] for k in ("nnUNet_def_n_proc", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if k in plugin_env})
    return env


def _vanilla(args, env, cwd, expect_ok=True):
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=SLOW)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _read_png(path):
    from PIL import Image
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def distilled(nnunet_env, tmp_path_factory):
    from conftest import train_env
    from test_distill_transfer_set import make_distill_dataset

    root = str(tmp_path_factory.mktemp("zip_distill"))  # as test_distill_transfer_set.distill_env_with_teacher
    env = make_distill_dataset(nnunet_env, root)
    os.makedirs(os.path.join(root, "nnUNet_results"))
    env = train_env(env, os.path.join(root, "nnUNet_results"))
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", TEACHER, "-device", "cpu"], env,
            timeout=SLOW)
    # teacher targets without mirroring: 4x fewer teacher passes, and the export does not depend on them
    return dict(env, TSKD_TEACHER_TRAINER=TEACHER, TSKD_SCHEDULE="1,2,1", TSKD_TEACHER_TTA="0")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["DistillTrainer", "DistillTrainer_small"])
def test_plain_nnunet_installs_and_predicts_the_student_zip(trainer, distilled, tmp_path):
    vanilla_python = _vanilla_python()
    vanilla_bin = os.path.dirname(vanilla_python)
    env = distilled
    run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", trainer, "-device", "cpu"], env,
            timeout=SLOW)
    images = os.path.join(env["nnUNet_raw"], DATASET, "imagesTs")
    common = ["-i", images, "-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
              "--save_probabilities"]
    ref = str(tmp_path / "with_plugin")
    run_cmd([os.path.join(BIN, "nnUNetv2_predict"), *common, "-o", ref, "-tr", trainer], env, timeout=SLOW)
    source_ckpt = os.path.join(env["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d", "fold_0",
                               "checkpoint_final.pth")

    for precision in ("fp32", "fp16"):
        zip_path = str(tmp_path / f"{trainer}_{precision}.zip")
        run_cmd([sys.executable, "-m", "tskd_nnunet.export.nnunet_zip", "-d", str(PHANTOM_ID), "-c", "2d", "-f", "0",
                 "-tr", trainer, "-o", zip_path] + (["--fp16"] if precision == "fp16" else []), env, timeout=SLOW)

        # the recipient: a venv with only nnunetv2 + torch, run from a folder outside this checkout
        recipient = tmp_path / f"recipient_{precision}"
        (recipient / "nnUNet_results").mkdir(parents=True)
        venv = _vanilla_env(vanilla_bin, str(recipient / "nnUNet_results"), env)
        assert _vanilla([vanilla_python, "-c", "import tskd_nnunet"], venv, str(recipient), False).returncode != 0
        lookup = _vanilla([vanilla_python, "-c", "import os; assert 'nnUNet_extTrainer' not in os.environ; "
                           "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
                           f"f('{trainer}')"], venv, str(recipient), False)
        assert lookup.returncode != 0 and "Could not find requested nnunet trainer" in lookup.stderr, lookup.stderr
        _vanilla([os.path.join(vanilla_bin, "nnUNetv2_install_pretrained_model_from_zip"), zip_path], venv,
                 str(recipient))
        out = str(recipient / "pred")
        _vanilla([os.path.join(vanilla_bin, "nnUNetv2_predict"), *common, "-o", out, "-tr", "nnUNetTrainer",
                  "-p", f"nnUNetPlans_{trainer}"], venv, str(recipient))

        worst = 0.0
        cases = sorted(f[:-len("_0000.png")] for f in os.listdir(images))
        assert len(cases) == 3
        for case in cases:
            seg_ref, seg = _read_png(os.path.join(ref, case + ".png")), _read_png(os.path.join(out, case + ".png"))
            p_ref = np.load(os.path.join(ref, case + ".npz"))["probabilities"]
            p = np.load(os.path.join(out, case + ".npz"))["probabilities"]
            worst = max(worst, float(np.abs(p - p_ref).max()))
            if precision == "fp32":
                assert np.array_equal(seg, seg_ref)
            else:  # fp16 weights: a pixel may flip only where the two classes are within the difference
                margin = np.abs(p_ref[1] - p_ref[0])[0]
                assert (seg == seg_ref)[margin > 2 * worst + 1e-6].all()
        assert worst <= (1e-5 if precision == "fp32" else 1e-2), (precision, worst)
        zip_mb = os.path.getsize(zip_path) / 2 ** 20
        print(f"\n[{trainer} {precision}] checkpoint {os.path.getsize(source_ckpt) / 2 ** 20:.2f} MB, zip "
              f"{zip_mb:.2f} MB, max |prob - plugin prob| {worst:.3g}")
