"""nnU-Net's own console commands find and run our trainers after the README set-up."""
import os

import tskd_nnunet_autoregister as autoreg
from conftest import BIN, PHANTOM_ID, REPO, run_cmd, train_env


def test_register_appends_once_and_can_be_disabled():
    env = {"nnUNet_extTrainer": "/somewhere/else"}
    assert autoreg.register(env)
    folders = env["nnUNet_extTrainer"].split(os.pathsep)
    assert folders[0] == "/somewhere/else" and folders[1].endswith(os.path.join("tskd_nnunet", "nnunet_ext"))
    assert not autoreg.register(env)  # idempotent
    assert env["nnUNet_extTrainer"].count("nnunet_ext") == 1
    off = {"TSKD_NO_AUTOREGISTER": "1"}
    assert not autoreg.register(off) and "nnUNet_extTrainer" not in off


def test_startup_hook_is_installed_in_this_environment(nnunet_env):
    """A fresh interpreter of the venv has nnUNet_extTrainer pointing at our folder (the .pth ran)."""
    env = dict(nnunet_env)
    env.pop("nnUNet_extTrainer", None)
    proc = run_cmd([os.path.join(BIN, "python"), "-c", "import os; print(os.environ['nnUNet_extTrainer'])"], env)
    assert proc.stdout.strip().endswith(os.path.join("tskd_nnunet", "nnunet_ext"))


def test_nnunet_train_and_predict_find_our_trainer(nnunet_env, results_dir, tmp_path):
    env = train_env(nnunet_env, results_dir)
    env.pop("nnUNet_extTrainer", None)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "TSKDPlainTrainer_test",
                    "-device", "cpu"], env)
    assert "Using trainer 'TSKDPlainTrainer_test'" in proc.stdout
    fold = os.path.join(results_dir, "Dataset990_Phantom", "TSKDPlainTrainer_test__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))

    out = str(tmp_path / "pred")
    images = os.path.join(nnunet_env["nnUNet_raw"], "Dataset990_Phantom", "imagesTs")
    run_cmd([os.path.join(BIN, "nnUNetv2_predict"), "-i", images, "-o", out, "-d", str(PHANTOM_ID), "-c", "2d",
             "-tr", "TSKDPlainTrainer_test", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(
        f.replace("_0000", "") for f in os.listdir(images))


def test_without_setup_nnunet_says_trainer_not_found(nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_NO_AUTOREGISTER": "1"})
    env.pop("nnUNet_extTrainer", None)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "TSKDPlainTrainer_test",
                    "-device", "cpu"], env, expect_ok=False)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer TSKDPlainTrainer_test" in proc.stderr
