"""nnU-Net's own console commands find and run our trainers after the README set-up."""
import os

import tskd_nnunet_autoregister as autoreg
from conftest import BIN, PHANTOM_ID, predict_test_images, run_cmd, train_env


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

    predict_test_images(env, "TSKDPlainTrainer_test", str(tmp_path / "pred"))


def test_without_setup_nnunet_says_trainer_not_found(nnunet_env, results_dir):
    env = train_env(nnunet_env, results_dir, {"TSKD_NO_AUTOREGISTER": "1"})
    env.pop("nnUNet_extTrainer", None)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", "TSKDPlainTrainer_test",
                    "-device", "cpu"], env, expect_ok=False)
    assert proc.returncode != 0
    assert "Could not find requested nnunet trainer TSKDPlainTrainer_test" in proc.stderr


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_trainer_class_is_exported_with_its_identity_and_no_list():
    """tskd_trainers.py keeps no list: every nnUNetTrainer subclass defined in a tskd_nnunet.trainers module is
    exported, as the class itself; nnU-Net's own search finds one that was never listed by hand."""
    import importlib
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    import tskd_nnunet.trainers
    from tskd_nnunet.discovery import TRAINER_DIR, trainer_classes
    from tskd_nnunet.nnunet_ext import tskd_trainers
    from tskd_nnunet.trainers.distill import PhasedDistillTrainer
    for info in pkgutil.iter_modules(tskd_nnunet.trainers.__path__):
        importlib.import_module(f"tskd_nnunet.trainers.{info.name}")
    ours = {c.__name__: c for c in _subclasses(nnUNetTrainer) if c.__module__.startswith("tskd_nnunet.trainers.")}
    assert len(ours) > 30 and trainer_classes() == ours
    assert all(getattr(tskd_trainers, name) is cls for name, cls in ours.items())
    with open(tskd_trainers.__file__) as f:
        assert "DistillTrainer" not in f.read()
    found = recursive_find_python_class(TRAINER_DIR, "PhasedDistillTrainer", None, base_folder=TRAINER_DIR,
                                        cleanup_imports_from_base_folder=True)
    assert found is PhasedDistillTrainer
