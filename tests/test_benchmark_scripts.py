"""Reports of the benchmark scripts are rebuilt from their committed files alone (no training here).

* the teacher study's report pairs every arm with plain nnU-Net over the common test cases and, for a
  multi-class task, reports Dice on the cases that show a class and the false-positive rate on those that do not;
* the synthetic options' report keeps speed-only rows (no quality measured) apart from quality rows.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_arm(out: str, arm: str, dice_by_case: dict, classes=("liver", "spleen")) -> None:
    """One arm's JSON and per-case CSV; spleen is absent from case c0 and predicted there by 'noisy'."""
    with open(os.path.join(out, f"{arm}_cases.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class", "dice", "nsd", "hd95", "ref_voxels", "pred_voxels"])
        for case, d in dice_by_case.items():
            for c in classes:
                absent = c == "spleen" and case == "c0"
                pred = 5 if (absent and arm == "noisy") else (0 if absent else 10)
                w.writerow([case, c, 0.0 if absent and pred else (1.0 if absent else d), 0, 0, 0 if absent else 10,
                            pred])
    means = [float(np.mean([d] * len(classes))) for d in dice_by_case.values()]
    with open(os.path.join(out, f"{arm}.json"), "w") as f:
        json.dump(dict(arm=arm, trainer="T", what=arm, schedule="1,1,1", fold=0, configuration="2d", dataset="D",
                       device="cpu", train_minutes=1.0, train_peak_gb=1.0, dice=float(np.mean(means)),
                       dice_median=float(np.median(means)), n_cases=len(means)), f)


def test_teacher_study_report_pairs_arms_with_plain_and_splits_classes(tmp_path):
    study = load_script("bench_teacher_study")
    rng = np.random.default_rng(0)
    base = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.7, 30))}
    write_arm(str(tmp_path), "plain", base)
    write_arm(str(tmp_path), "better", {c: v + 0.2 for c, v in base.items()})
    write_arm(str(tmp_path), "noisy", base)
    c = study.paired(str(tmp_path), "better", "plain")
    assert c["n"] == 30 and c["diff"] == pytest.approx(0.2 * 59 / 60, abs=1e-9)  # c0's absent spleen scores 1 in both
    assert c["lo"] > 0.15 and c["p"] < 1e-4 and c["r"] == pytest.approx(1.0)
    study.write_report(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    better = next(line for line in report.splitlines() if line.startswith("| better |"))
    assert "+0.197 [" in better and "r=1.00" in better
    plain = next(line for line in report.splitlines() if line.startswith("| plain |"))
    assert "| - |" in plain  # no comparison with itself
    # per class: spleen shown on 29 cases; 'noisy' predicts it on the one case without it
    assert "| liver | spleen |" in report
    noisy = [line for line in report.splitlines() if line.startswith("| noisy |")][-1]
    assert "(n=29) / 1.00" in noisy
    assert "(n=29) / 0.00" in [line for line in report.splitlines() if line.startswith("| plain |")][-1]
    assert (tmp_path / "dice_vs_minutes.png").stat().st_size > 1000


def test_synthetic_options_report_keeps_speed_only_rows_apart(tmp_path):
    pytest.importorskip("diffusers")
    options = load_script("bench_synthetic_options")
    row = dict(arch="lean", block_out_channels=[16, 32, 64, 64], attention=False, parameters=1.04e6, sampler="unipc",
               steps=10, images=16, resolution=[96, 128], images_per_s=2.0, minutes_per_1000=1000 / 2.0 / 60,
               train_steps=4, train_batch_size=16, train_minutes_total=None, train_s_per_step=3.5, speed_only=True,
               fd=None, kid=None, torch_threads=2, load_average_1min=1.1)
    (tmp_path / "speed_lean_unipc10.json").write_text(json.dumps(row))
    options.write_report(str(tmp_path))  # no quality rows, no floor file: the speed table alone
    report = (tmp_path / "report.md").read_text()
    assert "FD / KID" not in report
    assert "| lean (16, 32, 64, 64) | 1.04 M | 3.50 | unipc | 10 | 2.00 | 8.3 | 1.1 |" in report
    quality = dict(row, speed_only=False, fd=0.5, kid=0.01, train_minutes_total=60.0, train_steps=2000)
    (tmp_path / "lean_unipc10.json").write_text(json.dumps(quality))
    (tmp_path / options.FLOOR).write_text(json.dumps({"fd": 0.1, "kid": 0.001, "images": 16}))
    options.write_report(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "| real (train crops) | - | - | - | - | - | 0.100 | 0.0010 |" in report
    assert "| 8.3 | 60 (2000 steps) | 0.500 | 0.0100 |" in report
    assert "grid.png" not in report  # no grid was written: the report must not point to one
    assert report.index("FD / KID") < report.index("## Speed only")
    # other sampling layouts are options of their own; a compiled one reports its compilation apart
    for layout, rate in (("contiguous", 1.0), ("compiled", 4.0)):
        (tmp_path / f"speed_lean_unipc10_{layout}.json").write_text(json.dumps(
            dict(row, layout=layout, images_per_s=rate, minutes_per_1000=1000 / rate / 60,
                 compile_s=75.0 if layout == "compiled" else None)))
    options.write_report(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "| lean (16, 32, 64, 64), contiguous | 1.04 M | 3.50 | unipc | 10 | 1.00 | 16.7 |" in report
    assert "| lean (16, 32, 64, 64), compiled | 1.04 M | 3.50 | unipc | 10 | 4.00 | 4.2 |" in report
    assert "lean (16, 32, 64, 64), compiled unipc 10 (speed only): the first batch (torch.compile's " in report


def test_synthetic_options_given_generator_must_match_its_arch(tmp_path):
    pytest.importorskip("diffusers")
    import torch
    options = load_script("bench_synthetic_options")
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"unet_config": {}, "ema": {}, "case_ids": ["c1"],
                "settings": {"block_out_channels": [32, 64, 64], "attention": True, "batch_size": 16}}, path)
    a = types.SimpleNamespace(dataset="990", fold=0)
    with pytest.raises(SystemExit, match="--generator lean=.*is \\{'block_out_channels': \\(16, 32, 64, 64\\)"):
        options.given_generator("lean", str(path), a)


@pytest.mark.parametrize("given, says", [(["/x/checkpoint_final.pth"], "/x/checkpoint_final.pth"),
                                         (["tiny=/x/c.pth"], "tiny=... (not in --archs)")])
def test_synthetic_options_refuses_a_generator_it_would_not_use(monkeypatch, capsys, given, says):
    pytest.importorskip("diffusers")
    options = load_script("bench_synthetic_options")
    monkeypatch.setattr("sys.argv", ["bench_synthetic_options.py", "-d", "990", "-c", "2d", "-o", "out",
                                     "--archs", "base", "--generator", *given])
    with pytest.raises(SystemExit):
        options.main()
    err = capsys.readouterr().err
    assert f"--generator {says}: give ARCH=PATH with ARCH one of --archs (base)" in err


def test_synthetic_options_keeps_the_held_out_features_for_a_rerun(tmp_path):
    pytest.importorskip("diffusers")
    import numpy as np
    options = load_script("bench_synthetic_options")
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(2, 3)
    path = str(tmp_path / "features" / "held_out_x.npy")
    first = options.cached(path, compute)
    again = options.cached(path, compute)
    assert len(calls) == 1 and np.array_equal(first, again)
    assert [f for f in os.listdir(tmp_path / "features")] == ["held_out_x.npy"]  # no temp file left


@pytest.mark.parametrize("dataset,runs", [("hc18", 6), ("chaos_t2", 11)])
def test_gpu_campaign_dry_run_lists_the_equal_schedule_matrix_on_cuda(dataset, runs, tmp_path):
    """benchmarks/gpu_campaign.sh: one command for a dataset's whole equal-schedule matrix with -device cuda; its
    --dry-run prints every run's exact command and runs nothing."""
    import subprocess
    import sys
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_campaign.sh"), dataset, "--dry-run",
                           "--workdir", str(tmp_path / "w"), "--committed", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"runs ({runs}):" in out and "profile cpu_cuda (device cuda, TSKD_SCHEDULE=25,50,5)" in out
    lines = [ln for ln in out.splitlines() if "nnUNetv2_train" in ln and "fold 0" in ln]
    assert len(lines) == runs and all(ln.rstrip().endswith("-device cuda") for ln in lines)
    for arm in ("teacher", "tskd", "self_train", "tskd_ens"):
        assert f" {arm} " in out
    assert "TSKD_TEACHER_TRAINER=LiteMedSAMTeacherTrainer_last,TSKDPlainTrainer" in out  # the ensemble teacher
    assert not (tmp_path / "w").exists() and not (tmp_path / "c").exists()
    bad = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_campaign.sh"), "kits"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown dataset 'kits'. Fix: hc18 or chaos_t2" in bad.stderr


# ------------------------------------------------------------------------------------ HC18 in 3 sites (#30)
def _fed_study(tmp_path, n_cases: int = 40):
    fed = load_script("fed_hc18")
    raw = tmp_path / "work" / "converted" / fed.NAME
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for i in range(n_cases):
        (raw / "imagesTr" / f"hc18_{i:03d}_0000.nii.gz").write_bytes(b"img")
        (raw / "labelsTr" / f"hc18_{i:03d}.nii.gz").write_bytes(b"seg")
    (raw / "dataset.json").write_text(json.dumps({"numTraining": n_cases, "file_ending": ".nii.gz"}))
    return fed, fed.Study(tmp_path / "work", tmp_path / "committed", "cpu")


def test_fed_hc18_deals_disjoint_patients_to_sites_with_ten_labels_each(tmp_path):
    fed, study = _fed_study(tmp_path)
    study.prepare()
    sites = json.loads((tmp_path / "committed" / "sites.json").read_text())
    every = [c for s in sites.values() for part in s.values() for c in part]
    assert len(every) == len(set(every)) == 40  # every training patient at exactly one site, in one role
    for site, parts in sites.items():
        assert len(parts["labeled"]) == fed.LABELED_PER_SITE and len(parts["val"]) in (3, 4)
        root = study.site_root(site)
        own = sorted(p.name[:-len("_0000.nii.gz")] for p in (root / "nnUNet_raw" / fed.NAME / "imagesTr").iterdir())
        assert own == sorted(sum(parts.values(), []))  # a site's nnU-Net sees its own cases only
        pp = root / "nnUNet_preprocessed" / fed.NAME
        assert json.loads((pp / "splits_final.json").read_text()) == [{"train": parts["labeled"], "val": parts["val"]}]
        assert json.loads((pp / "tskd_unlabeled_pool.json").read_text()) == [parts["pool"]]
        assert json.loads((root / "nnUNet_raw" / fed.NAME / "dataset.json").read_text())["numTraining"] == len(own)
    study.prepare()  # again: the committed split is kept
    assert json.loads((tmp_path / "committed" / "sites.json").read_text()) == sites
    assert study.arm_env("student_b")["TSKD_TEACHER_TRAINER"] == fed.TEACHER
    assert study.arm_env("local_teacher_c")["nnUNet_results"].endswith("site_c/nnUNet_results_local")
    assert study.model_folder("fed_teacher_a") == study.model_folder("plain_a").parent.parent / \
        f"{fed.TEACHER}__{fed.PLANS}__{fed.CONFIGURATION}" / "fold_0"


def test_fed_hc18_report_has_dice_per_site_and_bytes_per_round(tmp_path):
    import torch
    fed, study = _fed_study(tmp_path)
    scores = tmp_path / "committed" / "scores"
    scores.mkdir(parents=True)
    for arm, d in (("fed_teacher_a", 0.9), ("student_b", 0.8), ("plain_b", 0.7)):
        (scores / f"{arm}.csv").write_text("case,class,dice,nsd,hd95,hc_abs_diff_mm\n"
                                           f"t1,fetal_head,{d},0.5,3,2\nt2,fetal_head,{d - 0.1},0.5,3,2\n")
    sent = study.model_folder("fed_teacher_a") / "federated_sent"
    sent.mkdir(parents=True)
    torch.save({"lora.A": torch.zeros(8, 16), "head.w": torch.zeros(10)}, sent / "round_0001.pt")
    plain = study.model_folder("plain_a")
    plain.mkdir(parents=True)
    w = torch.zeros(100, 100)  # shared, as nnU-Net's decoder.encoder.* are its encoder.* tensors
    torch.save({"network_weights": {"conv.w": w, "conv.b": torch.zeros(100), "decoder.encoder.conv.w": w}},
               plain / "checkpoint_final.pth")
    study.report()
    text = (tmp_path / "committed" / "report.md").read_text()
    row_b = next(line for line in text.splitlines() if line.startswith("| site_b |"))
    assert row_b.split(" | ")[1:] == ["not run", "0.8500", "not run", "0.7500", "0.6500 |"]
    # the student-minus-plain contrast of site_b, paired on its 2 test cases (each +0.1); no local teacher: no row
    assert "| site_b | student | plain nnU-Net | distillation | 2 | +0.1000 (+0.1000, +0.1000) |" in text
    assert "| federation |" not in text
    assert (tmp_path / "committed" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    b = json.loads((tmp_path / "committed" / "bytes.json").read_text())
    assert b["teacher_params"] == 138 and b["nnunet_params"] == 10100
    # what Flower's ArrayRecord carries: the tensors' bytes plus a small header each
    assert 138 * 4 <= b["teacher_bytes"] < 138 * 4 + 2 * 256 and 10100 * 4 <= b["nnunet_bytes"] < 10100 * 4 + 512
