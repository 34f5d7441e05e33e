"""Reliability, round two (issue #32): training, target cache, settings and export.

Non-finite values stop caching and training with one line naming the file; bad settings and bad command-line
input are one line, never a traceback; a failed (re-)export or cache call leaves nothing behind and never
replaces a good export. ``pytest -k reliability`` selects these tests (documentation/reliability.md, "Round two").

Teachers and trained models are written by hand (nnU-Net rebuilds a model from plans.json + the checkpoint's
``network_weights``, ``trainer_name`` and ``init_args``), so only two tests start an nnU-Net command in a
subprocess (to see what the user sees on stderr); the rest run in-process.
"""
import glob
import json
import os
import re
import shutil
from typing import Dict

import numpy as np
import pytest
import torch

from conftest import BIN, PHANTOM_ID, run_cmd, train_env
from test_distill_transfer_set import DATASET, make_distill_dataset

GOOD = "TSKDPlainTrainer_test"  # a teacher / model folder with finite random weights
NAN_TEACHER = "TSKDPlainTrainer"  # the same network with NaN weights (a diverged teacher)
STUDENT = "DistillTrainer_test"


# ---- fixtures ------------------------------------------------------------------------------------------------
def write_model_folder(results: str, folder_trainer: str, plans: dict, dataset_json: dict, poison: bool = False,
                       checkpoint: str = "checkpoint_final.pth", seed: int = 0) -> str:
    """A trained-looking nnU-Net model folder (fold 0) of the plans' U-Net with random weights (NaN in the first
    weight tensor with ``poison``), as nnUNetv2_predict and our teacher loader read it. Returns the checkpoint."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tskd_nnunet.trainers.base import TSKDPlainTrainer

    folder = os.path.join(results, DATASET, f"{folder_trainer}__nnUNetPlans__2d")
    os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    torch.manual_seed(seed)
    pm = PlansManager(plans)
    net = TSKDPlainTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2,
                                                       enable_deep_supervision=False)
    weights = net.state_dict()
    if poison:
        key = next(k for k, v in weights.items() if v.is_floating_point())
        weights[key] = torch.full_like(weights[key], float("nan"))
    path = os.path.join(folder, "fold_0", checkpoint)
    torch.save({"network_weights": weights, "trainer_name": GOOD, "init_args": {"configuration": "2d", "fold": 0},
                "inference_allowed_mirroring_axes": (0, 1)}, path)
    return path


def _plans_and_dataset_json(env: Dict[str, str]):
    pre = os.path.join(env["nnUNet_preprocessed"], DATASET)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def private_env(nnunet_env: Dict[str, str], root: str) -> Dict[str, str]:
    """A copy of the phantom with a label budget (test_distill_transfer_set) and a results folder holding the good
    teacher and the NaN teacher."""
    env = make_distill_dataset(nnunet_env, root)
    results = os.path.join(root, "nnUNet_results")
    os.makedirs(results)
    plans, dataset_json = _plans_and_dataset_json(env)
    write_model_folder(results, GOOD, plans, dataset_json)
    write_model_folder(results, NAN_TEACHER, plans, dataset_json, poison=True)
    return train_env(env, results)


@pytest.fixture(scope="module")
def rel_env(nnunet_env, tmp_path_factory):
    return private_env(nnunet_env, str(tmp_path_factory.mktemp("reliability")))


@pytest.fixture
def in_env(rel_env, monkeypatch):
    """rel_env as this process's environment, without TSKD_* settings (tskd_cache_targets' main sets two of them:
    monkeypatch puts them back)."""
    for k in [k for k in os.environ if k.startswith("TSKD_")]:
        monkeypatch.delenv(k)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(k, rel_env[k])
    monkeypatch.setenv("TSKD_KD_MODE", "cached")
    monkeypatch.setenv("TSKD_TEACHER_TRAINER", GOOD)
    return rel_env


def _tree(folder: str) -> list:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, ds, fs in os.walk(folder) for n in ds + fs)


def _one_line(text: str) -> str:
    """The one line of ``text`` (stderr), leaving out Python warnings that libraries print on import (e.g. torch's
    FutureWarning and the ``warnings.warn(`` line under it)."""
    lines = [line for line in text.strip().splitlines()
             if line.strip() and not re.search(r"\w+Warning: ", line) and line.strip() != "warnings.warn("]
    assert len(lines) == 1, text
    return lines[0]


def _ckpt(env: Dict[str, str], trainer: str) -> str:
    return os.path.join(env["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")


def _targets(env: Dict[str, str]) -> list:
    return glob.glob(os.path.join(env["nnUNet_preprocessed"], DATASET, "tskd_targets", "**", "*.npy"), recursive=True)


# ---- 1. non-finite teacher outputs and cached targets -----------------------------------------------------------
def test_reliability_nan_teacher_weights_stop_target_caching_and_leave_nothing(in_env, capsys):
    """The issue's worst case: a teacher with NaN weights made every cached target NaN, exit 0."""
    from tskd_nnunet.distill.cache_cli import main

    before = _tree(in_env["nnUNet_results"])
    with pytest.raises(SystemExit) as e:
        main([str(PHANTOM_ID), "2d", "0", "-tr", STUDENT, "-t", NAN_TEACHER])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("tskd_cache_targets: error: ") and _ckpt(in_env, NAN_TEACHER) in line
    assert "NaN" in line and "Fix:" in line
    assert not _targets(in_env)
    assert _tree(in_env["nnUNet_results"]) == before  # no student folder, no log


def test_reliability_nan_teacher_outputs_stop_target_caching(in_env, tmp_path):
    """Finite weights, non-finite outputs (an overflow): the case and the teacher checkpoint are named, nothing is
    written; so are NaN probabilities from the teacher's own predictions (--from_predictions)."""
    import pickle

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from tskd_nnunet.distill.target_cache import build_cache, probabilities_from_prediction
    from tskd_nnunet.distill.teacher_io import TeacherError, load_teacher_for_cache

    plans, dataset_json = _plans_and_dataset_json(in_env)
    t = load_teacher_for_cache(in_env["nnUNet_results"], plans, "2d", dataset_json, 0, GOOD)
    main_folder = os.path.join(in_env["nnUNet_preprocessed"], DATASET, "nnUNetPlans_2d")
    ids = ["phantom_tr000", "phantom_tr001"]
    ds = nnUNetDatasetBlosc2(main_folder, ids)
    folder = str(tmp_path / "cache")
    for bad in (float("nan"), float("inf")):  # nnU-Net's predictor passes NaN on, stops on Inf with a RuntimeError
        hook = t.network.register_forward_hook(lambda m, i, o: o + bad)
        with pytest.raises(TeacherError) as e:
            build_cache(folder, [t], ds.load_case, ids, torch.device("cpu"), use_mirroring=False, log=lambda m: None)
        hook.remove()
        msg = str(e.value)
        assert t.checkpoint in msg and "phantom_tr000" in msg and "NaN/Inf" in msg and "\n" not in msg
        assert not glob.glob(os.path.join(folder, "*.npy"))

    npz = str(tmp_path / "phantom_tr000.npz")
    np.savez(npz, probabilities=np.full((2, 1, 64, 64), np.nan, np.float32))
    with open(npz[:-4] + ".pkl", "wb") as f:
        pickle.dump({"bbox_used_for_cropping": [[0, 1], [0, 64], [0, 64]], "spacing": [999.0, 1.0, 1.0]}, f)
    with pytest.raises(TeacherError, match=r"phantom_tr000\.npz.*NaN"):
        probabilities_from_prediction(npz, (1, 64, 64), t.plans_manager, t.configuration_manager)


def test_reliability_online_teacher_with_nan_weights_or_outputs_stops_distillation(in_env, monkeypatch):
    from tskd_nnunet.distill.teacher_io import TeacherError
    from tskd_nnunet.trainers.distill import DistillTrainer_test

    plans, dataset_json = _plans_and_dataset_json(in_env)
    monkeypatch.setenv("nnUNet_results", str(os.path.join(os.path.dirname(in_env["nnUNet_results"]), "online")))
    shutil.copytree(in_env["nnUNet_results"], os.environ["nnUNet_results"], dirs_exist_ok=True)
    monkeypatch.setenv("TSKD_KD_MODE", "online")

    def trainer(teacher):
        monkeypatch.setenv("TSKD_TEACHER_TRAINER", teacher)
        return DistillTrainer_test(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))
    with pytest.raises(TeacherError) as e:
        trainer(NAN_TEACHER).load_teacher()
    assert _ckpt(dict(in_env, nnUNet_results=os.environ["nnUNet_results"]), NAN_TEACHER) in str(e.value)
    assert "NaN" in str(e.value)

    t = trainer(GOOD)
    t.load_teacher().register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(TeacherError, match=r"checkpoint_final\.pth gives NaN/Inf outputs"):
        t.teacher_outputs(torch.zeros((2, 1, 64, 64)))


def test_reliability_nan_cached_target_refused_through_nnunetv2_train(nnunet_env, tmp_path, monkeypatch):
    """A cached target holding NaN (e.g. written by a NaN teacher before this check) is refused when DistillTrainer
    starts, naming the file, as one line on stderr (no traceback); a 0-byte or truncated target likewise
    (EOFError / ValueError before)."""
    from tskd_nnunet.distill.cache_cli import main
    from tskd_nnunet.distill.target_cache import TeacherError, verify_targets

    env = private_env(nnunet_env, str(tmp_path))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("TSKD_KD_MODE", "cached")
    monkeypatch.setenv("TSKD_TEACHER_TRAINER", GOOD)
    monkeypatch.setenv("TSKD_TEACHER_TTA", "0")  # half the teacher passes (the training below uses the same key)
    main([str(PHANTOM_ID), "2d", "0", "-tr", STUDENT])
    targets = sorted(_targets(env))
    assert len(targets) == 11
    bad = targets[3]
    clean = np.load(bad)
    with open(bad, "wb") as f:  # same shape, NaN in one pixel
        poisoned = clean.copy()
        poisoned[0, 0, 5, 5] = np.nan
        np.save(f, poisoned)
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", STUDENT, "-device", "cpu"],
                   dict(env, TSKD_TEACHER_TRAINER=GOOD, TSKD_TEACHER_TTA="0"), expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert bad in line and "NaN" in line and "Fix: delete" in line
    assert not glob.glob(os.path.join(env["nnUNet_results"], DATASET, f"{STUDENT}__*", "fold_0", "*.pth"))

    folder = os.path.dirname(bad)
    ids = [os.path.basename(p)[:-4] for p in targets]
    for content in (b"", open(targets[0], "rb").read()[:100]):
        with open(bad, "wb") as f:
            f.write(content)
        with pytest.raises(TeacherError) as e:
            verify_targets(folder, ids)
        assert bad in str(e.value) and "Fix: delete" in str(e.value) and "\n" not in str(e.value)


# ---- 2. a loss that turns non-finite -----------------------------------------------------------------------------
def _poisoned_trainer(poison):
    """A TSKDPlainTrainer whose training batches become NaN where ``poison(trainer, step)`` says so."""
    from tskd_nnunet.trainers.base import TSKDPlainTrainer

    class Poisoned(TSKDPlainTrainer):
        steps = 0

        def train_step(self, batch):
            Poisoned.steps += 1
            if poison(self, Poisoned.steps):
                batch = dict(batch, data=torch.full_like(batch["data"], float("nan")))
            return super().train_step(batch)
    return Poisoned


def _train_in_process(env, monkeypatch, tmp_path, cls, schedule):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("TSKD_SCHEDULE", schedule)
    plans, dataset_json = _plans_and_dataset_json(env)
    return cls(dict(plans, continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_reliability_nonfinite_loss_stops_after_k_steps_and_keeps_the_last_good_checkpoint(
        use_nnunet_env, tmp_path, monkeypatch):
    from tskd_nnunet.trainers.base import NonFiniteError, ScheduledTrainer

    k = ScheduledTrainer.max_nonfinite_steps
    assert k == 5
    trainer = _train_in_process(use_nnunet_env, monkeypatch, tmp_path,
                                _poisoned_trainer(lambda t, step: t.current_epoch >= 1), f"3,{k},1")
    with pytest.raises(NonFiniteError) as e:
        trainer.run_training()
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    msg = str(e.value)
    assert "\n" not in msg and f"{k} consecutive" in msg and latest in msg and "--c" in msg
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 1 and _finite(saved["network_weights"])
    for name, value in trainer.network.state_dict().items():  # the skipped steps left the weights alone
        assert torch.equal(value, saved["network_weights"][name]), name
    assert not os.path.exists(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def test_reliability_isolated_nonfinite_steps_are_skipped_not_trained(use_nnunet_env, tmp_path, monkeypatch):
    trainer = _train_in_process(use_nnunet_env, monkeypatch, tmp_path,
                                _poisoned_trainer(lambda t, step: step % 2 == 0), "1,6,1")
    trainer.run_training()
    final = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu",
                       weights_only=False)
    assert _finite(final["network_weights"])
    with open(trainer.log_file) as f:
        log = f.read()
    assert log.count("step skipped") == 3 and "(1 of 5 in a row)" in log


def test_reliability_nonfinite_weights_are_never_saved(tmp_path, monkeypatch):
    """Whatever made them NaN (e.g. a normalisation buffer), a checkpoint with non-finite weights never replaces
    the previous good file."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from tskd_nnunet.trainers.base import NonFiniteError, ScheduledTrainer

    t = object.__new__(ScheduledTrainer)
    t.output_folder, t.current_epoch, t.local_rank, t.num_epochs = str(tmp_path), 2, 0, 3
    t.is_ddp, t.network = False, torch.nn.Linear(2, 2)
    t.print_to_log_file = lambda *a, **k: None
    with torch.no_grad():
        t.network.bias[0] = float("nan")
    monkeypatch.setattr(nnUNetTrainer, "save_checkpoint", lambda self, f: torch.save(
        {"network_weights": self.network.state_dict()}, f))
    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"the previous good checkpoint")
    with pytest.raises(NonFiniteError, match=r"bias.*checkpoint_latest\.pth"):
        t.save_checkpoint(str(target))
    assert target.read_bytes() == b"the previous good checkpoint" and list(tmp_path.iterdir()) == [target]


# ---- 3. settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, read", [
    ("TSKD_TEACHER_TTA", lambda c: c.teacher_tta_from_env()),
    ("TSKD_ALLOW_RANDOM_TEACHER", lambda c: c.teacher_allow_random()),
    ("TSKD_NO_AUTOREGISTER", lambda c: c.no_autoregister()),
    ("TSKD_KD_MODE", lambda c: c.kd_mode_from_env("cpu")),
])
def test_reliability_flag_and_enum_settings_outside_their_set_are_refused(name, read, monkeypatch):
    from tskd_nnunet import config

    for bad in ("maybe", "2", "ye s"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(config.TSKDConfigError) as e:
            read(config)
        assert f"{name}={bad!r}" in str(e.value) and "Fix: export" in str(e.value)
        with pytest.raises(config.TSKDConfigError):
            config.check_environment()
    if name == "TSKD_KD_MODE":
        return
    for value, expected in (("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False),
                            ("false", False), ("No", False), ("off", False)):
        monkeypatch.setenv(name, value)
        assert read(config) is expected
        config.check_environment()
    monkeypatch.delenv(name)
    assert read(config) is (name == "TSKD_TEACHER_TTA")  # the documented defaults


def test_reliability_bad_setting_under_nnunetv2_train_is_one_line(nnunet_env, results_dir):
    """TSKD_TEACHER_TTA=maybe was taken as on; a bad value is now the one line on stderr, no traceback."""
    env = train_env(nnunet_env, results_dir, {"TSKD_TEACHER_TTA": "maybe", "TSKD_SCHEDULE": "1,1,1"})
    proc = run_cmd([os.path.join(BIN, "nnUNetv2_train"), str(PHANTOM_ID), "2d", "0", "-tr", STUDENT, "-device", "cpu"],
                   env, expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("tskd_nnunet.config.TSKDConfigError: TSKD_TEACHER_TTA='maybe'") and "Fix:" in line


# ---- 4. tskd_cache_targets: bad folds ----------------------------------------------------------------------------
@pytest.mark.parametrize("fold, expected", [("x", "fold 'x' is not a fold number"), ("7", "fold 7 does not exist")])
def test_reliability_cache_targets_bad_fold_is_one_line_and_leaves_nothing(in_env, capsys, fold, expected):
    from tskd_nnunet.distill.cache_cli import main

    before = _tree(in_env["nnUNet_results"])
    with pytest.raises(SystemExit) as e:
        main([str(PHANTOM_ID), "2d", fold, "-tr", STUDENT])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("tskd_cache_targets: error: ") and expected in line and "Fix:" in line
    assert _tree(in_env["nnUNet_results"]) == before  # no fold_7/ folder, no log


# ---- 5. export: one line, and a failed re-export never touches the good one -----------------------------------
def _model_folder(env):
    return os.path.join(env["nnUNet_results"], DATASET, f"{GOOD}__nnUNetPlans__2d")


def _export_args(out, *extra):
    return ["-d", str(PHANTOM_ID), "-c", "2d", "-f", "0", "-tr", GOOD, "-o", str(out), *extra]


def test_reliability_export_to_a_file_or_at_too_low_an_opset_is_one_line(in_env, tmp_path, capsys):
    from tskd_nnunet.export.cli import export_main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert export_main(_export_args(a_file)) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(a_file) in line and "is a file" in line and "Fix:" in line and a_file.read_text() == "mine"

    for opset in ("1", "99"):
        out = tmp_path / f"opset{opset}"
        assert export_main(_export_args(out, "--opset", opset)) == 1
        line = _one_line(capsys.readouterr().err)
        assert f"--opset {opset}" in line and "Fix: --opset 17" in line, line
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.fixture(scope="module")
def exported(rel_env, tmp_path_factory):
    from tskd_nnunet.export.onnx_export import export_model_folder

    out = str(tmp_path_factory.mktemp("rel_export") / "model")
    export_model_folder(_model_folder(rel_env), out, 0, int8=True, verbose=False,
                        preprocessed_dataset_folder=os.path.join(rel_env["nnUNet_preprocessed"], DATASET))
    return out


def _contents(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_reliability_failed_reexport_keeps_the_good_export_and_int8_never_goes_stale(rel_env, exported, tmp_path):
    from tskd_nnunet.export.onnx_export import ExportError, export_model_folder

    out = str(tmp_path / "model")
    shutil.copytree(exported, out)
    good = _contents(out)
    assert set(good) == {"dataset.json", "model.onnx", "model_int8.onnx", "plans.json", "tskd_export.json"}
    plans, dataset_json = _plans_and_dataset_json(rel_env)
    model = str(tmp_path / "results")
    write_model_folder(model, GOOD, plans, dataset_json, seed=0)
    write_model_folder(model, GOOD, plans, dataset_json, checkpoint="checkpoint_other.pth", seed=1)
    model = os.path.join(model, DATASET, f"{GOOD}__nnUNetPlans__2d")
    # int8 calibration fails after model.onnx of the other checkpoint was written (before: a mixed folder)
    with pytest.raises(ExportError, match="int8 calibration"):
        export_model_folder(model, out, 0, "checkpoint_other.pth", int8=True, verbose=False,
                            preprocessed_dataset_folder=str(tmp_path / "nope"))
    assert _contents(out) == good
    assert sorted(os.listdir(tmp_path)) == ["model", "results"]  # no temporary or parked folder left

    meta = export_model_folder(model, out, 0, "checkpoint_other.pth", verbose=False)  # no --int8
    now = _contents(out)
    assert "model_int8.onnx" not in now and meta["checkpoint"].endswith("checkpoint_other.pth")
    assert now["model.onnx"] != good["model.onnx"] and json.loads(now["tskd_export.json"]) == meta
    assert sorted(os.listdir(tmp_path)) == ["model", "results"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.docx").write_text("not an export")
    with pytest.raises(ExportError, match=r"mine .*not a tskd_export folder.*report\.docx"):
        export_model_folder(model, str(mine), 0, verbose=False)
    assert sorted(os.listdir(mine)) == ["report.docx"]


def test_reliability_predict_onnx_input_checks_are_one_line(in_env, exported, tmp_path, capsys):
    from tskd_nnunet.export.cli import predict_main

    ts = os.path.join(in_env["nnUNet_raw"], DATASET, "imagesTs")
    image = os.path.join(ts, "phantom_ts000_0000.png")
    no_suffix, two_channels = tmp_path / "no_suffix", tmp_path / "two_channels"
    no_suffix.mkdir()
    two_channels.mkdir()
    shutil.copyfile(image, no_suffix / "case_a.png")
    shutil.copyfile(image, two_channels / "case_a_0000.png")
    shutil.copyfile(image, two_channels / "case_a_0001.png")
    other_format = tmp_path / "other_format"
    other_format.mkdir()
    (other_format / "case_a_0000.nii.gz").write_bytes(b"")
    cases = [(["-i", str(other_format)], ["holds no .png images"]),
             (["-i", str(no_suffix)], ["case_a.png", "_0000"]),
             (["-i", str(two_channels)], ["case_a", "2 channel", "1"]),
             (["-i", ts, "-step_size", "0"], ["-step_size 0", "0 < "]),
             (["-i", ts, "-step_size", "1.5"], ["-step_size 1.5"])]
    for args, expected in cases:
        out = tmp_path / "pred"
        assert predict_main([*args, "-o", str(out), "-m", exported, "-npp", "1", "-nps", "1",
                             "--disable_progress_bar"]) == 1, args
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("tskd_predict_onnx: error: ") and all(x in line for x in expected), line
        assert "Fix:" in line and not out.exists()
    a_file = tmp_path / "pred.txt"
    a_file.write_text("mine")
    assert predict_main(["-i", ts, "-o", str(a_file), "-m", exported]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"-o {a_file} is a file" in line and "Fix:" in line and a_file.read_text() == "mine"
