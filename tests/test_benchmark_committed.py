"""Committed benchmark results: a run finished on one machine is done on any other, and the report is rebuilt
from the committed folder alone.

tskd_benchmark runs through its engine (Snakemake, a job per step) on the phantom with nnU-Net's training,
prediction and latency measurement replaced by fakes inside those jobs (tests/bench_fakes: a checkpoint of random
bytes, predictions that are the reference or empty by design, fixed numbers), so every Dice value is known: the gap
closed must come out as exactly 0.5. Planning the labeled-only dataset is faked too (the real planning:
test_labeled_only_planned_by_nnunet); the evaluation is real. The real configs are loaded and dry-run.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import PHANTOM_ID, REPO
from tskd_nnunet.benchmark.committed import CommittedStore, write_committed_report
from tskd_nnunet.benchmark.config import load_config
from tskd_nnunet.benchmark.data_roots import ensure_converted, ensure_planned, prepare_labeled_only
from tskd_nnunet.benchmark.report_cli import main as report_main
from tskd_nnunet.benchmark.runner import BenchmarkRunner, committed_root

CONFIG = {
    "name": "phantom_committed", "dataset": {"id": PHANTOM_ID, "convert": None}, "configuration": "2d",
    "budgets": [4, "all"], "folds": [0], "num_folds": 3, "batch_size": 2,
    "methods": {"4": ["nnUNetTrainer", "tskd", "plain_labeled_only"], "all": ["nnUNetTrainer"]},
    # the teacher is a plain nnU-Net here: training is faked, only names and files matter
    "method_defs": {"teacher": {"trainer": "TSKDPlainTrainer_test"},
                    "tskd": {"env": {"TSKD_TEACHER_TRAINER": "TSKDPlainTrainer_test"}}},
    "profiles": {"cpu": {"schedule": "1,2,1", "params": {"latency_cases": 1, "preprocess_processes": 1}}},
    "committed": "{config_dir}/committed/{name}_{profile}",
    "notes": ["phantom, fake training"],
}
# test cases predicted perfectly (the rest empty: Dice 0): plain@4 1/3, tskd@4 2/3, plain@all 1 -> gap closed 0.5
PERFECT = {"nnUNetTrainer_b4": 1, "tskd_b4": 2, "plain_labeled_only_b4": 0, "teacher_b4": 3, "nnUNetTrainer_ball": 3}
FAKES = os.path.join(REPO, "tests", "bench_fakes")


class FakeBench:
    """tskd_benchmark with the fakes of tests/bench_fakes in every process it starts; ``log()``: what they did."""

    def __init__(self, nnunet_env, root, **spec):
        self.log_path = str(root / "fakes.jsonl")
        spec_file = root / "fakes.json"
        spec_file.write_text(json.dumps({"log": self.log_path, "base_pp": nnunet_env["nnUNet_preprocessed"],
                                         "perfect": PERFECT, **spec}))
        self.env = {k: v for k, v in nnunet_env.items() if k != "nnUNet_results"}
        self.env["PYTHONPATH"] = os.pathsep.join([FAKES, nnunet_env["PYTHONPATH"]])
        self.env["TSKD_BENCH_FAKES"] = str(spec_file)

    def __call__(self, *args, timeout=900):
        proc = subprocess.run([sys.executable, "-m", "tskd_nnunet.benchmark.cli", *map(str, args)], env=self.env,
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        m = re.search(r"(\d+) runs done, (\d+) failed", proc.stdout)
        proc.counts = {"done": int(m.group(1)), "failed": int(m.group(2))} if m else None
        return proc

    def log(self, key):
        if not os.path.exists(self.log_path):
            return []
        return [e[key] for e in map(json.loads, open(self.log_path)) if key in e]


@pytest.fixture(scope="module")
def committed(nnunet_env, tmp_path_factory):
    """One full matrix run (workdir 1), then a second tskd_benchmark on an empty workdir (2)."""
    root = tmp_path_factory.mktemp("committed")
    cfg_file = root / "phantom.json"
    cfg_file.write_text(json.dumps(CONFIG))
    bench = FakeBench(nnunet_env, root)
    first = bench(cfg_file, "--workdir", root / "work1")
    trained1 = bench.log("trained")
    shutil.rmtree(root / "work1")
    second = bench(cfg_file, "--workdir", root / "work2")
    trained2 = bench.log("trained")[len(trained1):]
    cfg = load_config(str(cfg_file))
    return {"root": root, "cfg": cfg, "cfg_file": cfg_file, "store": committed_root(cfg, "cpu", None, False),
            "first": first, "second": second, "trained1": trained1, "trained2": trained2, "bench": bench,
            "planned": bench.log("planned")}


def test_finished_runs_are_committed_with_their_settings(committed):
    first = committed["first"]
    assert first.counts == {"done": 5, "failed": 0}, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.returncode == 0
    store = CommittedStore(committed["store"])
    assert committed["store"] == str(committed["root"] / "committed" / "phantom_committed_cpu")
    names = sorted(os.listdir(os.path.join(committed["store"], "runs")))
    assert names == ["nnUNetTrainer_b4_f0", "nnUNetTrainer_ball_f0", "plain_labeled_only_b4_f0", "teacher_b4_f0",
                     "tskd_b4_f0"]
    for n in names:
        for f in ("cases.csv", "settings.json", "overlays.npz"):
            assert os.path.getsize(os.path.join(committed["store"], "runs", n, f)) > 0, (n, f)
    teacher, tskd = store.settings("teacher", 4, 0), store.settings("tskd", 4, 0)
    assert tskd["trainer"] == "DistillTrainer_hard" and tskd["schedule"] == "1,2,1" and tskd["configuration"] == "2d"
    # "drawn": None: the faked training writes no trainer log to read the drawn transfer set from
    assert tskd["transfer_set"] == {"labeled": 4, "validation": 4, "pool": 4, "synthetic": 0, "drawn": None}
    assert tskd["teacher"]["checkpoint_sha256"] == teacher["checkpoint_sha256"]
    assert tskd["teacher"]["same_as_committed"] is True and len(teacher["checkpoint_sha256"]) == 64
    assert tskd["params"] == 1234 and tskd["latency_ms"] == 5.0 and "train" in tskd["minutes"]
    assert store.settings("nnUNetTrainer", "all", 0)["transfer_set"]["labeled"] == 8
    # labeled-only reference: its own dataset of the 4 labeled cases, planned by nnU-Net (its own batch)
    lo = store.settings("plain_labeled_only", 4, 0)
    assert lo["plan_on"] == "labeled" and lo["plans_configuration"]["batch_size"] == 3
    assert lo["labeled_cases"] == tskd["labeled_cases"]
    assert committed["planned"] == [[c + ".png" for c in tskd["labeled_cases"]]]
    cases = pd.read_csv(os.path.join(committed["store"], "runs", "tskd_b4_f0", "cases.csv"))
    assert sorted(cases["dice"]) == [0.0, 1.0, 1.0] and {"nsd", "hd95", "case", "class"} <= set(cases.columns)
    # each step was a Snakemake job; the teacher trained before its student
    assert "rule train:" in first.stdout + first.stderr or "localrule train:" in first.stdout + first.stderr
    methods = [t[0] for t in committed["trained1"]]
    assert methods.index("teacher") < methods.index("tskd") and len(methods) == 5


def test_committed_run_is_done_on_a_fresh_workdir(committed):
    second = committed["second"]
    assert second.counts == {"done": 5, "failed": 0} and second.returncode == 0, second.stdout[-3000:]
    assert committed["trained2"] == []  # nothing trained, predicted or even planned
    assert "Nothing to be done" in second.stdout + second.stderr
    assert not os.path.exists(committed["root"] / "work2" / "runs")


def test_committed_with_other_settings_is_refused(committed, tmp_path):
    d = json.loads(committed["cfg_file"].read_text())
    d["profiles"]["cpu"]["schedule"] = "2,2,1"
    d["committed"] = committed["store"]
    (tmp_path / "c.json").write_text(json.dumps(d))
    proc = committed["bench"](tmp_path / "c.json", "--workdir", tmp_path / "w")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(r"schedule '1,2,1'.*delete that folder", proc.stderr)


def test_student_retrains_a_committed_teacher_missing_here(committed, tmp_path):
    store = CommittedStore(committed["store"])
    teacher_sha = store.settings("teacher", 4, 0)["checkpoint_sha256"]
    saved = tmp_path / "tskd_saved"
    shutil.copytree(store.run_dir("tskd", 4, 0), saved)
    shutil.rmtree(store.run_dir("tskd", 4, 0))
    bench = committed["bench"]
    n0 = len(bench.log("trained"))
    try:
        proc = bench(committed["cfg_file"], "--workdir", tmp_path / "w", "--only", "tskd")
    finally:
        redone = store.settings("tskd", 4, 0)
        shutil.rmtree(store.run_dir("tskd", 4, 0), ignore_errors=True)
        shutil.copytree(saved, store.run_dir("tskd", 4, 0))  # the other tests see the first run's files
    assert proc.counts == {"done": 2, "failed": 0}, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert bench.log("trained")[n0:] == [["teacher", "b4", "TSKDPlainTrainer_test"],
                                         ["tskd", "b4", "DistillTrainer_hard"]]
    assert store.settings("teacher", 4, 0)["checkpoint_sha256"] == teacher_sha  # committed teacher untouched
    assert redone["teacher"]["committed_checkpoint_sha256"] == teacher_sha
    assert redone["teacher"]["same_as_committed"] is False
    assert os.path.isfile(tmp_path / "w" / "runs" / "b4" / "teacher" / "fold_0" / "retrained.json")


def test_report_from_committed_folder_alone(committed, tmp_path):
    out = tmp_path / "report"
    shutil.rmtree(committed["root"] / "work2", ignore_errors=True)
    assert report_main(["--from-committed", committed["store"], "-o", str(out), "--resamples", "200"]) == 0
    for name in ("report.md", "summary.csv", "gap_closed.csv", "per_class.csv", "wilcoxon.csv",
                 "label_efficiency_dice.png", "overlays_Dataset990_Phantom.png"):
        assert os.path.getsize(out / name) > 0, name
    gap = pd.read_csv(out / "gap_closed.csv")
    row = gap[(gap.method == "tskd") & (gap.metric == "dice")].iloc[0]
    assert row.baseline_mean == pytest.approx(1 / 3) and row.reference_mean == pytest.approx(1.0)
    assert row.method_mean == pytest.approx(2 / 3) and row.gap_closed == pytest.approx(0.5)
    lo = gap[(gap.method == "plain_labeled_only") & (gap.metric == "dice")].iloc[0]
    assert lo.gap_closed == pytest.approx(-0.5)
    md = (out / "report.md").read_text()
    assert "## Gap closed" in md and "0.50 [" in md and "## Run settings" in md and "phantom, fake training" in md
    # paired contrasts: student − teacher = 2/3 − 1 on the same test cases (the other default pairs are absent)
    con = pd.read_csv(out / "contrasts.csv")
    assert con[["method", "minus"]].drop_duplicates().values.tolist() == [["tskd", "teacher"]]
    assert con.set_index("metric").loc["dice", "mean_diff"] == pytest.approx(-1 / 3)
    assert "## Paired contrasts" in md and "tskd − teacher" in md
    pc = pd.read_csv(out / "per_class.csv")
    assert {"dice_ci_lo", "dice_ci_hi", "hd95_ci_lo"} <= set(pc.columns)
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["status"]) == {"done"} and len(runs) == 5
    # tskd_benchmark writes the same report into the committed folder
    assert f"Report: {os.path.join(committed['store'], 'report.md')}" in committed["first"].stdout


def test_missing_and_failed_runs_from_matrix(tmp_path):
    """matrix.json lists runs not committed yet: MISSING, or FAILED with the recorded error."""
    store = CommittedStore(str(tmp_path / "c"))
    cases = pd.DataFrame({"case": ["a", "b"], "class": ["x", "x"], "dice": [0.5, 0.7], "nsd": [0.4, 0.6],
                          "hd95": [3.0, 2.0]})
    store.write_run("nnUNetTrainer", 5, 0, cases, {"method": "nnUNetTrainer", "budget": 5, "fold": 0,
                                                  "dataset": "DatasetX"})
    store.write_failure("tskd", 5, 0, {"error": "nnUNetv2_train exited 1: boom"})
    store.write_matrix({"dataset": "DatasetX", "runs": [{"method": m, "budget": 5, "fold": 0}
                                                        for m in ("nnUNetTrainer", "tskd", "teacher")]})
    written = write_committed_report(store.root, n_resamples=100)
    runs = pd.read_csv(written["runs.csv"])
    assert dict(zip(runs.method, runs.status)) == {"nnUNetTrainer": "done", "tskd": "failed", "teacher": "missing"}
    assert "boom" in written["report.md"].read_text()


def test_committed_report_lists_methods_in_config_order(tmp_path):
    """Run folders are read alphabetically; the report follows the matrix (config) order instead."""
    store = CommittedStore(str(tmp_path / "c"))
    cases = pd.DataFrame({"case": ["a", "b"], "class": ["x", "x"], "dice": [0.5, 0.7], "nsd": [0.4, 0.6],
                          "hd95": [3.0, 2.0]})
    order = ["nnUNetTrainer", "tskd", "mae_ft", "teacher"]
    for m in order:
        store.write_run(m, 5, 0, cases, {"method": m, "budget": 5, "fold": 0, "dataset": "DatasetX"})
    store.write_matrix({"dataset": "DatasetX", "runs": [{"method": m, "budget": 5, "fold": 0} for m in order]})
    written = write_committed_report(store.root, n_resamples=100)
    assert pd.read_csv(written["summary.csv"])["method"].tolist() == order


def test_real_configs_load_and_dry_run(tmp_path):
    for name, budgets, small in (("hc18_cpu", [10, 20, "all"], 10), ("chaos_t2_cpu", [20, 80, "all"], 20)):
        path = os.path.join(REPO, "benchmarks", "configs", f"{name}.json")
        cfg = load_config(path)
        assert cfg.budgets == budgets and cfg.configuration == "2d_128" and cfg.batch_size == 8
        assert cfg.profiles["cpu"]["schedule"] == "25,50,5"
        assert cfg.profiles["cpu"]["params"]["teacher_trainer"] == "LiteMedSAMTeacherTrainer_last"
        issue_arms = ["nnUNetTrainer", "teacher", "tskd", "tskd_syn", "task_agnostic", "mae_ft", "moco_ft",
                      "plain_labeled_only"]  # extra arms: HC18 tskd_syn_cap, CHAOS tskd_dice (session 9)
        extra = {"hc18_cpu": ["tskd_syn_cap"], "chaos_t2_cpu": ["tskd_dice"]}[name]
        assert [m for m in cfg.methods_at(small) if m not in extra] == issue_arms
        assert set(extra) <= set(cfg.methods_at(small))
        assert cfg.methods_at(budgets[1]) == ["nnUNetTrainer", "teacher", "tskd"]
        assert cfg.methods_at("all") == ["nnUNetTrainer"]
        # the equal-schedule matrix (issue #28) is the cpu profile's own; cpu_short keeps the list above
        equal = ["nnUNetTrainer", "teacher", "tskd", "self_train", "tskd_ens"]
        for b in budgets[:-1] if name == "chaos_t2_cpu" else budgets[:1]:
            assert cfg.methods_at(b, profile="cpu") == equal == cfg.methods_at(b, profile="cpu_cuda")
        assert cfg.methods_at("all", profile="cpu") == ["nnUNetTrainer"]
        assert cfg.methods_at(budgets[1], profile="cpu_short") == cfg.methods_at(budgets[1])
        curve = {"hc18_cpu": 10, "chaos_t2_cpu": 80}[name]  # plain at twice the profile's length
        assert cfg.methods_at(curve, profile="cpu_long") == ["nnUNetTrainer"]
        assert cfg.profiles["cpu_long"]["schedule"] == "50,50,5" and cfg.profiles["cpu_cuda"]["device"] == "cuda"
        # paths relative to the config file, whatever the current folder
        assert committed_root(cfg, "cpu", None, False) == os.path.join(
            REPO, "documentation", "benchmarks", f"{cfg.name}_cpu")
        data = os.path.normpath(os.path.join(REPO, "..", "shared", "datasets"))
        conv = [os.path.normpath(a.format(config_dir=cfg.config_dir)) for a in cfg.convert if "config_dir" in a]
        assert conv and all(c.startswith(data) for c in conv)
        if cfg.hc18_csv:
            assert os.path.normpath(cfg.hc18_csv.format(config_dir=cfg.config_dir)).startswith(data)
        assert any("-b" in c and "{plan_batch}" in c for c in cfg.plan_commands)
    assert load_config(os.path.join(REPO, "benchmarks", "configs", "chaos_t2_cpu.json")).spread is True
    proc = subprocess.run([sys.executable, "-m", "tskd_nnunet.benchmark.cli",
                           os.path.join(REPO, "benchmarks", "configs", "hc18_cpu.json"), "--workdir",
                           str(tmp_path / "w"), "--committed", str(tmp_path / "c"), "--dry-run", "--profile",
                           "cpu_short"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "runs (13):" in proc.stdout and "-b 8 -c 2d_128" in proc.stdout and "TSKD_SCHEDULE=20,15,4" in proc.stdout
    assert "TSKD_SYNTHETIC_FRACTION=0.2" in proc.stdout  # the capped arm's share reaches its training command
    assert "plain_labeled_only [pending]" in proc.stdout and "budget  all fold 0 nnUNetTrainer" in proc.stdout
    assert not (tmp_path / "w").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow  # about 70 s on 2 busy cores: nnU-Net plans and preprocesses twice
def test_labeled_only_planned_by_nnunet(nnunet_env, tmp_path):
    """The real plan commands of the configs (fingerprint, tskd_plan_cpu, preprocess) on a copy of the phantom: the
    shared plans get the config's batch, the labeled-only dataset nnU-Net's own (at most 5% of the dataset)."""
    raw, pp = tmp_path / "raw", tmp_path / "pp"
    shutil.copytree(os.path.join(nnunet_env["nnUNet_raw"], "Dataset990_Phantom"), raw / "Dataset990_Phantom")
    pp.mkdir()
    real = json.loads(open(os.path.join(REPO, "benchmarks", "configs", "hc18_cpu.json")).read())["plan_commands"]
    d = {**CONFIG, "dataset": {"id": PHANTOM_ID, "convert": None, "raw_root": str(raw), "preprocessed_root": str(pp)},
         "configuration": "2d_32", "batch_size": 3,
         "plan_commands": [[a.replace("128", "32") for a in c] for c in real], "committed": None}
    (tmp_path / "c.json").write_text(json.dumps(d))
    runner = BenchmarkRunner(load_config(str(tmp_path / "c.json")), "cpu", str(tmp_path / "w"))
    ensure_converted(runner)
    ensure_planned(runner)
    lo_root = prepare_labeled_only(runner, 4, 0)
    assert runner.plans_configuration()["batch_size"] == 3
    lo = runner.plans_configuration(lo_root)
    assert lo["batch_size"] == 2  # nnU-Net's rule on 4 small images: its minimum
    assert lo["patch_size"] == runner.plans_configuration()["patch_size"]
    labeled = sorted(runner.splits()[4][0][0]["train"])
    assert sorted(f[:-4] for f in os.listdir(os.path.join(lo_root, "Dataset990_Phantom", "gt_segmentations"))) == labeled


def test_volume_errors_sum_slices_per_patient(tmp_path):
    """CHAOS-style 2D slices: a patient's organ volume is the sum over its slices; HC error is a case endpoint."""
    from tskd_nnunet.benchmark.report import write_report

    rows = []
    for method, extra in (("nnUNetTrainer", 2.0), ("tskd", 0.5)):
        for patient in ("p1", "p2"):
            for sl in range(3):
                rows.append({"dataset": "D", "method": method, "budget": 20, "fold": 0, "case": f"{patient}_s{sl}",
                             "patient": patient, "class": "liver", "dice": 0.8, "nsd": 0.7, "hd95": 3.0,
                             "ref_volume_ml": 10.0, "pred_volume_ml": 10.0 + extra * (1 if patient == "p1" else -1),
                             "hc_abs_diff_mm": extra})
    written = write_report(pd.DataFrame(rows), None, tmp_path, n_resamples=100)
    per_patient = pd.read_csv(written["organ_volume_per_patient.csv"])
    p1 = per_patient[(per_patient.method == "tskd") & (per_patient.patient == "p1")].iloc[0]
    assert p1.ref_volume_ml == pytest.approx(30.0) and p1.pred_volume_ml == pytest.approx(31.5)
    vol = pd.read_csv(written["organ_volume_error.csv"]).set_index("method")
    assert vol.loc["nnUNetTrainer", "abs_err_ml_mean"] == pytest.approx(6.0)
    assert vol.loc["tskd", "abs_err_ml_mean"] == pytest.approx(1.5) and vol.loc["tskd", "signed_err_ml_mean"] == 0
    assert vol.loc["tskd", "n_patients"] == 2
    summary = pd.read_csv(written["summary.csv"]).set_index("method")
    assert summary.loc["tskd", "hc_abs_diff_mm_mean"] == pytest.approx(0.5)
    assert "ref_volume_ml_mean" not in summary.columns  # volumes are not per-case endpoints
    md = written["report.md"].read_text()
    assert "## Organ volume error (ml)" in md and "1.5 [" in md


def _store_with(root, means, n=30, seed=0):
    """A committed folder whose arms at budget 10 have per-case Dice ``mean + noise`` (own noise per arm)."""
    store = CommittedStore(str(root))
    rng = np.random.default_rng(seed)
    for method, mean in means.items():
        noise = rng.normal(0, 0.01, n)
        cases = pd.DataFrame({"case": [f"c{i}" for i in range(n)], "class": "x", "dice": mean + noise,
                              "nsd": mean + noise, "hd95": 10 - 5 * mean + noise})
        store.write_run(method, 10, 0, cases, {"method": method, "budget": 10, "fold": 0, "dataset": "D"})
    return store.root


def test_compare_profiles_order_and_verdicts(tmp_path):
    """--compare-profiles: the same order and verdicts agree; a swapped pair or a verdict flip does not."""
    short = _store_with(tmp_path / "s", {"nnUNetTrainer": 0.80, "teacher": 0.90, "tskd": 0.85})
    same = _store_with(tmp_path / "l1", {"nnUNetTrainer": 0.70, "teacher": 0.95, "tskd": 0.75}, seed=1)
    swapped = _store_with(tmp_path / "l2", {"nnUNetTrainer": 0.80, "teacher": 0.84, "tskd": 0.86}, seed=1)
    flipped = _store_with(tmp_path / "l3", {"nnUNetTrainer": 0.80, "teacher": 0.90, "tskd": 0.801}, seed=1)
    from tskd_nnunet.benchmark.profile_agreement import compare_profiles

    arms, budgets = compare_profiles(short, same, n_resamples=200)
    assert budgets.iloc[0][["n_arms", "same_order", "same_verdicts", "agree"]].tolist() == [3, True, True, True]
    assert budgets.iloc[0]["kendall_tau"] == pytest.approx(1.0)
    a = arms.set_index("method")
    assert a.loc["teacher", ["rank_short", "rank_long"]].tolist() == [1, 1]
    assert a.loc["tskd", "verdict_long"] == "better" and a.loc["tskd", "diff_long"] == pytest.approx(0.05, abs=0.01)
    _, b2 = compare_profiles(short, swapped, n_resamples=200)
    assert not b2.iloc[0]["same_order"] and b2.iloc[0]["same_verdicts"] and not b2.iloc[0]["agree"]
    _, b3 = compare_profiles(short, flipped, n_resamples=200)
    assert b3.iloc[0]["same_order"] and not b3.iloc[0]["same_verdicts"]
    # HD95: lower is better, so the best arm by Dice is also rank 1 there
    arms_hd, _ = compare_profiles(short, same, metric="hd95", n_resamples=200)
    assert arms_hd.set_index("method").loc["teacher", "rank_short"] == 1
    # the CLI writes the Markdown and CSVs into the short folder; a missing folder is one line, exit 2
    assert report_main(["--compare-profiles", short, same, "--resamples", "100"]) == 0
    md = open(os.path.join(short, "profile_agreement.md")).read()
    assert "| D | 10 | 3 |" in md and "**yes**" in md
    assert report_main(["--compare-profiles", short, str(tmp_path / "nope")]) == 2
