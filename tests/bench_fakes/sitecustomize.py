"""Fakes for nnU-Net's training, prediction, latency measurement and the labeled-only planning, inside the
benchmark's own Snakemake jobs (tests that need known Dice values without training: test_benchmark_committed,
test_committed_model).

Python imports ``sitecustomize`` at start-up from the first folder of sys.path holding one, so a test puts this
folder first on PYTHONPATH and names a JSON file in TSKD_BENCH_FAKES; every process of the benchmark (the
tskd_benchmark command, Snakemake, each step) then runs the fakes below in place of
``tskd_nnunet.benchmark.commands.run_logged``, and what they did goes to the file's "log" (JSON lines).
Without TSKD_BENCH_FAKES nothing changes.
"""
import json
import os
import shutil

_SPEC = os.environ.get("TSKD_BENCH_FAKES")


def _record(spec, **entry):
    with open(spec["log"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def fake_run_logged(real, spec, cmd, env, log_path, step):
    """Stands in for the real command: a checkpoint of random bytes (another sha256 per training), predictions
    that are the reference for the first N test cases and empty for the rest (N per method and budget), fixed
    parameters and latency. With "teacher_dir": the teacher's 'training' copies that real model folder; with
    "interrupt_teacher": its first training leaves only checkpoint_latest.pth and fails (a session that ended)."""
    import numpy as np
    from PIL import Image

    from tskd_nnunet.benchmark.commands import StepFailed

    name = os.path.basename(cmd[0])
    if name == "nnUNetv2_plan_and_preprocess" and "labeled_only" in env["nnUNet_preprocessed"]:
        src = os.path.join(spec["base_pp"], "Dataset990_Phantom")
        dst = os.path.join(env["nnUNet_preprocessed"], "Dataset990_Phantom")
        os.makedirs(dst, exist_ok=True)
        plans = json.load(open(os.path.join(src, "nnUNetPlans.json")))
        plans["configurations"]["2d"]["batch_size"] = 3
        json.dump(plans, open(os.path.join(dst, "nnUNetPlans.json"), "w"))
        os.symlink(os.path.join(src, "nnUNetPlans_2d"), os.path.join(dst, "nnUNetPlans_2d"))
        _record(spec, planned=sorted(os.listdir(os.path.join(env["nnUNet_raw"], "Dataset990_Phantom", "labelsTr"))))
    elif name == "nnUNetv2_train":
        trainer, fold = cmd[cmd.index("-tr") + 1], cmd[3]
        parts = env["nnUNet_results"].split(os.sep)
        _record(spec, trained=[parts[-2], parts[-3], trainer], cmd=list(cmd))
        ds = "Dataset990_Phantom"
        out = os.path.join(env["nnUNet_results"], ds, f"{trainer}__{cmd[cmd.index('-p') + 1]}__{cmd[2]}",
                           f"fold_{fold}")
        teacher = spec.get("teacher_dir")
        if teacher and os.path.basename(teacher).startswith(trainer + "__"):
            marker = spec["log"] + ".interrupted"
            if spec.get("interrupt_teacher") and not os.path.exists(marker):
                open(marker, "w").close()
                os.makedirs(out, exist_ok=True)
                shutil.copyfile(os.path.join(teacher, "fold_0", "checkpoint_final.pth"),
                                os.path.join(out, "checkpoint_latest.pth"))
                raise StepFailed("killed (test)")
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
            shutil.copytree(teacher, os.path.dirname(out))
            return
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "checkpoint_final.pth"), "wb") as f:
            f.write(os.urandom(64))
    elif name == "nnUNetv2_predict":
        images, out = cmd[cmd.index("-i") + 1], cmd[cmd.index("-o") + 1]
        labels = os.path.join(os.path.dirname(images), "labelsTs")
        parts = env["nnUNet_results"].split(os.sep)
        n_perfect = spec["perfect"][f"{parts[-2]}_{parts[-3]}"]
        os.makedirs(out, exist_ok=True)
        for i, f in enumerate(sorted(os.listdir(labels))):
            ref = np.array(Image.open(os.path.join(labels, f)))
            Image.fromarray(ref if i < n_perfect else np.zeros_like(ref)).save(os.path.join(out, f))
    elif cmd[1:3] == ["-m", "tskd_nnunet.benchmark.measure"]:
        with open(cmd[cmd.index("-o") + 1], "w") as f:
            json.dump({"params": 1234, "params_checkpoint": 1234, "latency_ms": 5.0, "latency_cases": 1,
                       "torch_threads": 1}, f)
    else:
        real(cmd, env, log_path, step)


if _SPEC:
    import tskd_nnunet.benchmark.commands as _commands

    _spec = json.load(open(_SPEC))
    _real = _commands.run_logged
    _commands.run_logged = lambda cmd, env, log_path, step: fake_run_logged(_real, _spec, cmd, env, log_path, step)
