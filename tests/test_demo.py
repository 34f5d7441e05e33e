"""The README's main command: bad input gives one line naming the fix; --fast runs end to end (slow)."""
import os

import pytest

from conftest import BIN, REPO, run_cmd, subprocess_env


def test_demo_refuses_unwritable_workdir_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cmd([os.path.join(BIN, "tskd_demo"), "--workdir", str(blocker / "work")], subprocess_env(),
                   expect_ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Fix: pass a writable folder with --workdir" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_without_nnunet_raw_or_with_unknown_dataset_says_the_fix(tmp_path):
    env = subprocess_env()
    env.pop("nnUNet_raw", None)
    proc = run_cmd([os.path.join(BIN, "tskd_label_budget"), "-d", "501", "--n-labeled", "20"], env, expect_ok=False)
    assert proc.returncode == 2 and "nnUNet_raw" in proc.stderr and "Traceback" not in proc.stderr
    env["nnUNet_raw"] = str(tmp_path)
    env["nnUNet_preprocessed"] = str(tmp_path / "pre")
    proc = run_cmd([os.path.join(BIN, "tskd_label_budget"), "-d", "777", "--n-labeled", "20"], env, expect_ok=False)
    assert proc.returncode == 2 and "777" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_fast_runs_end_to_end(tmp_path):
    work = tmp_path / "demo"
    proc = run_cmd([os.path.join(BIN, "tskd_demo"), "--fast", "--workdir", str(work)], subprocess_env(), timeout=1800)
    assert "Report:" in proc.stdout
    report = (work / "report.md").read_text()
    for trainer in ("LiteMedSAMTeacherTrainer_test", "DistillTrainer_test", "TSKDPlainTrainer_test"):
        assert trainer in report
    assert (work / "report_overlays.png").stat().st_size > 10_000
