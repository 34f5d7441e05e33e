"""Report from a small synthetic results table: files written, FAILED run shown, stats consistent."""
import numpy as np
import pandas as pd
import pytest

from tskd_nnunet.benchmark.plots import OverlayItem, select_worst_median_best
from tskd_nnunet.benchmark.report_cli import main as report_main
from tskd_nnunet.benchmark.report import write_report
from tskd_nnunet.evaluation.stats import paired_wilcoxon

METHODS = {"nnUNetTrainer": 0.0, "DistillTrainer": 0.05, "ViTTeacherTrainer": None}
ERROR = "RuntimeError: CUDA out of memory | while building teacher"


def synthetic():
    rng = np.random.default_rng(0)
    res, runs = [], []
    for budget in (5, 20):
        for method, gain in METHODS.items():
            for seed in (0, 1):
                failed = gain is None and budget == 5
                runs.append({"dataset": "Dataset901_HC18", "method": method, "budget": budget, "seed": seed,
                             "status": "failed" if failed else "done", "params": 3.1e6 if gain is None else 1.2e6,
                             "latency_ms": 12.5, "error": ERROR if failed else ""})
                if failed:
                    continue
                for i in range(10):
                    d = float(np.clip(0.7 + 0.01 * budget + (gain or 0.02) + 0.01 * i + rng.normal(0, 0.01), 0, 1))
                    for cls in ("head", "brain"):
                        res.append({"dataset": "Dataset901_HC18", "method": method, "budget": budget, "seed": seed,
                                    "case": f"c{i:02d}", "class": cls, "dice": d, "nsd": d - 0.05,
                                    "hd95": 10 * (1 - d), "hc_abs_diff_mm": 20 * (1 - d)})
    # a run still to come
    runs.append({"dataset": "Dataset901_HC18", "method": "DistillTrainer", "budget": 50, "seed": 0,
                 "status": "missing", "params": np.nan, "latency_ms": np.nan, "error": ""})
    return pd.DataFrame(res), pd.DataFrame(runs)


def loader(key):
    img = np.random.default_rng(1).normal(size=(32, 32))
    ref = np.zeros((32, 32), np.uint8)
    ref[8:24, 8:24] = 1
    return OverlayItem(img, ref, np.roll(ref, 2, axis=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res, runs = synthetic()
    written = write_report(res, runs, out, overlay_loader=loader, n_resamples=500, seed=0)
    return out, written, res


def test_files_written(report):
    out, written, _ = report
    for name in ("report.md", "summary.csv", "wilcoxon.csv", "per_class.csv", "case_values.csv", "runs.csv",
                 "label_efficiency_dice.png", "boxplot_dice.png", "boxplot_hd95.png", "overlays_Dataset901_HC18.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert name in written
    assert (out / "boxplot_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_failed_method_is_shown_as_failed(report):
    out, _, _ = report
    s = pd.read_csv(out / "summary.csv")
    row = s[(s.method == "ViTTeacherTrainer") & (s.budget == 5)].iloc[0]
    assert row.status == "FAILED" and "CUDA out of memory" in row.error
    assert np.isnan(row.dice_mean)  # not zero
    md = (out / "report.md").read_text()
    table_row = next(l for l in md.splitlines() if l.startswith("| ViTTeacherTrainer | FAILED"))
    assert "| FAILED | FAILED |" in table_row and "CUDA out of memory \\| while" in table_row
    assert "MISSING" in md  # the run still to come
    assert s[(s.method == "ViTTeacherTrainer") & (s.budget == 20)].iloc[0].status == "done"


def test_summary_and_wilcoxon_consistent(report):
    out, _, res = report
    s = pd.read_csv(out / "summary.csv").set_index(["budget", "method"])
    sub = res[(res.budget == 20) & (res.method == "DistillTrainer")]
    per_case = sub.groupby("case")["dice"].mean()
    assert s.loc[(20, "DistillTrainer"), "dice_mean"] == pytest.approx(per_case.mean())
    assert s.loc[(20, "DistillTrainer"), "dice_sd"] == pytest.approx(per_case.std(ddof=1))
    lo, hi = s.loc[(20, "DistillTrainer"), ["dice_ci_lo", "dice_ci_hi"]]
    assert lo < per_case.mean() < hi
    assert s.loc[(20, "DistillTrainer"), "params"] == 1.2e6
    assert "hc_abs_diff_mm_mean" in s.columns  # clinical column picked up
    w = pd.read_csv(out / "wilcoxon.csv")
    wr = w[(w.budget == 20) & (w.method == "DistillTrainer") & (w.metric == "dice")].iloc[0]
    base = res[(res.budget == 20) & (res.method == "nnUNetTrainer")].groupby("case")["dice"].mean()
    ref = paired_wilcoxon(per_case.to_numpy(), base.loc[per_case.index].to_numpy())
    assert wr.p_value == pytest.approx(ref.p_value) and wr.rank_biserial == pytest.approx(ref.rank_biserial)
    assert wr.rank_biserial > 0.9  # distillation is better on every case in this table
    failed = w[(w.budget == 5) & (w.method == "ViTTeacherTrainer")].iloc[0]
    assert np.isnan(failed.p_value) and "FAILED" in failed.note


def test_cli_without_status_table(tmp_path):
    res, _ = synthetic()
    res.to_csv(tmp_path / "results.csv", index=False)
    assert report_main(["-results", str(tmp_path / "results.csv"), "-o", str(tmp_path / "r"),
                        "--resamples", "200"]) == 0
    assert "FAILED" not in (tmp_path / "r" / "report.md").read_text()


def test_select_worst_median_best():
    picks = select_worst_median_best(pd.Series({"a": 0.5, "b": 0.9, "c": 0.1, "d": np.nan}))
    assert picks == [("worst", "c"), ("median", "a"), ("best", "b")]


def test_overlay_grid_reads_paths_and_3d_arrays(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    from tskd_nnunet.benchmark.plots import _to_2d, plot_overlay_grid

    seg = np.zeros((1, 1, 16, 16), np.uint8)
    seg[0, 0, 4:12, 4:12] = 1
    io = NaturalImage2DIO()
    io.write_seg(seg[0], str(tmp_path / "ref.png"), {"spacing": (999, 1, 1)})
    vol = np.zeros((5, 8, 8))
    vol[3, 2:6, 2:6] = 1
    _, ref2d, _ = _to_2d(vol, vol, vol)
    assert ref2d.sum() == 16  # slice with the largest reference area
    out = plot_overlay_grid([[OverlayItem(tmp_path / "ref.png", tmp_path / "ref.png", tmp_path / "ref.png"), None],
                             [OverlayItem(vol, vol, np.zeros_like(vol))]], ["a", "b"], tmp_path / "o.png")
    assert out.stat().st_size > 0


def test_per_class_splits_present_and_absent_cases(tmp_path):
    """Both-empty cases score Dice 1; the per-class table must also show the Dice where the class is present
    and the false-positive rate where it is absent, so 'predicts nothing' cannot pass for a good model."""
    rows = []
    for method, pred_absent, dice_present in (("nnUNetTrainer", 40, 0.6), ("DistillTrainer", 0, 0.0)):
        for i in range(6):
            present = i < 2  # kidney shown in 2 of 6 slices
            pred = (40 if present else pred_absent) if dice_present else (0 if present else pred_absent)
            d = (dice_present if present else (1.0 if pred == 0 else 0.0))
            rows.append({"dataset": "Dataset902_CHAOS", "method": method, "budget": 20, "fold": 0,
                         "case": f"s{i}", "class": "kidney", "dice": d, "nsd": d, "hd95": 0.0,
                         "ref_voxels": 50 if present else 0, "pred_voxels": pred})
    written = write_report(pd.DataFrame(rows), None, tmp_path, n_resamples=200, seed=0)
    pc = pd.read_csv(written["per_class.csv"]).set_index("method")
    # the empty predictor has the higher plain mean (4 of 6 both-empty) ...
    assert pc.loc["DistillTrainer", "dice_mean"] == pytest.approx(4 / 6)
    assert pc.loc["nnUNetTrainer", "dice_mean"] == pytest.approx(1.2 / 6)
    # ... and the split shows why
    assert pc.loc["DistillTrainer", "dice_present_mean"] == 0.0
    assert pc.loc["nnUNetTrainer", "dice_present_mean"] == pytest.approx(0.6)
    assert (pc["n_present"] == 2).all() and (pc["n_absent"] == 4).all()
    assert pc.loc["nnUNetTrainer", "fp_rate"] == 1.0 and pc.loc["DistillTrainer", "fp_rate"] == 0.0
    md = (tmp_path / "report.md").read_text()
    assert "Dice where present (n)" in md and "| 0.600 [0.600, 0.600] (2) | 1.00 (4) |" in md


def test_per_class_without_voxel_counts_keeps_plain_columns(report):
    out, written, _ = report
    pc = pd.read_csv(written["per_class.csv"])
    assert "fp_rate" not in pc.columns and "Dice where present" not in (out / "report.md").read_text()


def test_lead_kept_is_the_share_of_the_teachers_lead(tmp_path):
    """Plain 0.6, teacher 0.8 and a student at 0.75 on every case: lead kept (0.75-0.6)/(0.8-0.6) = 0.75; a student
    below plain keeps a negative lead; at a budget where the teacher does not lead it is undefined, with a note."""
    from tskd_nnunet.benchmark.report import write_report
    rows = []
    for budget, means in ((10, {"nnUNetTrainer": 0.6, "teacher": 0.8, "tskd": 0.75, "tskd_ens": 0.5}),
                          (20, {"nnUNetTrainer": 0.8, "teacher": 0.7, "tskd": 0.75})):
        for m, v in means.items():
            for i in range(12):
                rows.append({"dataset": "D", "method": m, "budget": budget, "fold": 0, "case": f"c{i}", "class": 1,
                             "dice": v + (0.01 if i % 2 else -0.01), "nsd": v, "hd95": 1.0})
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    write_report(pd.read_csv(tmp_path / "r.csv"), None, tmp_path / "out", n_resamples=200)
    lead = pd.read_csv(tmp_path / "out" / "lead_kept.csv")
    dice = lead[lead["metric"] == "dice"].set_index(["budget", "method"])
    assert dice.loc[(10, "tskd"), "lead_kept"] == pytest.approx(0.75)
    assert dice.loc[(10, "tskd_ens"), "lead_kept"] == pytest.approx(-0.5)
    assert np.isnan(dice.loc[(20, "tskd"), "lead_kept"]) and "is not better than nnUNetTrainer@20" in dice.loc[(20, "tskd"), "note"]
    assert "## Lead kept" in (tmp_path / "out" / "report.md").read_text()
