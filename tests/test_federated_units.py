"""Federated teacher, the pieces without Flower processes: fingerprint merge, update checks, weighted mean,
trainable state, round checkpoints and their resume (documentation/federated.md)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from tskd_nnunet.federated import fingerprint as fpr
from tskd_nnunet.federated.checkpoint import RoundCheckpoint, latest_round, round_path, save_round
from tskd_nnunet.federated.updates import (check_update, load_trainable_state, trainable_keys, trainable_state,
                                           weighted_mean)


def _fp(spacings, shapes, mean, std, lo, hi, p005, p995, median, rel=0.9):
    return {"spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": rel,
            "foreground_intensity_properties_per_channel": {"0": {
                "mean": mean, "std": std, "min": lo, "max": hi, "percentile_00_5": p005, "percentile_99_5": p995,
                "median": median}}}


# ------------------------------------------------------------------------------------------------ fingerprint
def test_merge_pools_cases_and_weights_intensities_by_case_count():
    a = _fp([[1.0, 0.5, 0.5]] * 3, [[1, 64, 60]] * 3, mean=10.0, std=2.0, lo=0.0, hi=50.0, p005=1.0, p995=40.0,
            median=9.0, rel=1.0)
    b = _fp([[1.0, 0.8, 0.8]], [[1, 40, 40]], mean=20.0, std=1.0, lo=-5.0, hi=30.0, p005=5.0, p995=28.0,
            median=21.0, rel=0.6)
    m = fpr.merge_fingerprints([a, b], [3, 1])
    assert m["spacings"] == a["spacings"] + b["spacings"] and m["shapes_after_crop"] == a["shapes_after_crop"] + b["shapes_after_crop"]
    c = m["foreground_intensity_properties_per_channel"]["0"]
    assert c["mean"] == pytest.approx(0.75 * 10 + 0.25 * 20)
    # law of total variance: within-site variances plus the spread of the site means, case-weighted
    assert c["std"] == pytest.approx(math.sqrt(0.75 * (4 + 2.5 ** 2) + 0.25 * (1 + 7.5 ** 2)))
    assert (c["min"], c["max"]) == (-5.0, 50.0)
    assert c["median"] == pytest.approx(0.75 * 9 + 0.25 * 21)
    assert c["percentile_00_5"] == pytest.approx(0.75 * 1 + 0.25 * 5)
    assert c["percentile_99_5"] == pytest.approx(0.75 * 40 + 0.25 * 28)
    assert m["median_relative_size_after_cropping"] == pytest.approx(0.9)


def test_pooled_std_equals_the_std_of_the_pooled_samples():
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(3, 2, 3000), rng.normal(-1, 0.5, 1000)
    fa = _fp([[1.0, 1.0, 1.0]] * 3, [[1, 8, 8]] * 3, xa.mean(), xa.std(), xa.min(), xa.max(), 0, 0, 0)
    fb = _fp([[1.0, 1.0, 1.0]], [[1, 8, 8]], xb.mean(), xb.std(), xb.min(), xb.max(), 0, 0, 0)
    c = fpr.merge_fingerprints([fa, fb], [3, 1])["foreground_intensity_properties_per_channel"]["0"]
    both = np.concatenate([xa, xb])  # 3:1 samples, as 3:1 cases
    assert c["mean"] == pytest.approx(both.mean()) and c["std"] == pytest.approx(both.std())


def test_merge_refuses_counts_that_do_not_match_the_fingerprint():
    a = _fp([[1.0, 1.0, 1.0]] * 2, [[1, 8, 8]] * 2, 0, 1, 0, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="describes 2 cases, its site reports 3"):
        fpr.merge_fingerprints([a], [3])


def test_sites_with_other_labels_or_dataset_names_are_named():
    ok = {"dataset_name": "Dataset990_Phantom", "dataset_json": {"channel_names": {"0": "US"}, "labels": {"background": 0, "x": 1}, "file_ending": ".png"}}
    other_labels = {"dataset_name": "Dataset990_Phantom", "dataset_json": {**ok["dataset_json"], "labels": {"background": 0, "y": 1}}}
    with pytest.raises(fpr.FederatedPlanningError, match="site B: dataset.json field 'labels'"):
        fpr.check_compatible([("A", ok), ("B", other_labels)])
    with pytest.raises(fpr.FederatedPlanningError, match="site C has dataset Dataset991_X"):
        fpr.check_compatible([("A", ok), ("C", {**ok, "dataset_name": "Dataset991_X"})])
    fpr.check_compatible([("A", ok), ("B", dict(ok))])


# ------------------------------------------------------------------------------------------------ updates
def _state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"lora_A": torch.randn(4, 8, generator=g), "head.weight": torch.randn(3, 4, generator=g),
            "head.bias": torch.randn(3, generator=g)}


def test_check_update_accepts_a_small_honest_step():
    g = _state()
    u = {k: v + 0.01 for k, v in g.items()}
    assert check_update(u, g, 5) is None


@pytest.mark.parametrize("mutate, phrase", [
    (lambda u: u.update({"head.bias": torch.tensor([1.0, float("nan"), 0.0])}), "non-finite values"),
    (lambda u: u.update({"head.bias": torch.tensor([1.0, float("inf"), 0.0])}), "non-finite values"),
    (lambda u: u.pop("head.bias"), "1 missing tensor"),
    (lambda u: u.update({"extra": torch.zeros(1)}), "1 unexpected tensor"),
    (lambda u: u.update({"head.weight": torch.zeros(4, 3)}), "head.weight has shape (4, 3)"),
    (lambda u: u.update({"head.bias": torch.zeros(3, dtype=torch.float64)}), "head.bias has dtype torch.float64"),
    (lambda u: u.update({k: v * 50 for k, v in u.items()}), "update norm"),
])
def test_check_update_rejects(mutate, phrase):
    g = _state()
    u = {k: v.clone() for k, v in g.items()}
    mutate(u)
    why = check_update(u, g, 5)
    assert why is not None and phrase in why, why


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "7"])
def test_check_update_rejects_a_weight_that_is_not_a_positive_integer(n):
    g = _state()
    assert "not a positive integer" in check_update(g, g, n)


def test_norm_rule_is_relative_to_the_global_weights_with_a_floor_of_one():
    g = {"w": torch.full((4,), 0.5)}  # ||w_g|| = 1
    assert check_update({"w": g["w"] + 0.49}, g, 1, max_update_ratio=1.0) is None   # distance 0.98
    assert check_update({"w": g["w"] + 0.51}, g, 1, max_update_ratio=1.0) is not None  # distance 1.02
    tiny = {"w": torch.zeros(4)}  # ||w_g|| = 0: the floor of 1 applies
    assert check_update({"w": torch.full((4,), 0.45)}, tiny, 1) is None


def test_weighted_mean_is_the_case_weighted_average_in_float64():
    a, b, c = _state(1), _state(2), _state(3)
    m = weighted_mean([a, b, c], [5, 2, 1])
    for k in a:
        expect = (5 * a[k].double() + 2 * b[k].double() + 1 * c[k].double()) / 8
        assert m[k].dtype == a[k].dtype
        torch.testing.assert_close(m[k].double(), expect, rtol=0, atol=1e-6)


def test_weighted_mean_passes_counters_through():
    a = {"w": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2), "n": torch.tensor(3)}
    m = weighted_mean([a, b], [1, 3])
    torch.testing.assert_close(m["w"], torch.full((2,), 0.25))
    assert int(m["n"]) == 3


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.frozen_bn = nn.BatchNorm1d(4)
        self.frozen_bn.requires_grad_(False)


def test_trainable_state_is_trainable_parameters_and_their_modules_float_buffers():
    net = _Net()
    keys = trainable_keys(net)
    assert "frozen.weight" not in keys and "frozen_bn.running_mean" not in keys
    assert {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.1.running_mean",
            "head.1.running_var"} == set(keys)  # num_batches_tracked is an integer counter: local
    state = {k: torch.full_like(v, 7.0) for k, v in trainable_state(net).items()}
    load_trainable_state(net, state)
    assert bool((net.head[0].weight == 7).all()) and not bool((net.frozen.weight == 7).any())
    state.pop("head.0.bias")
    with pytest.raises(ValueError, match="1 missing tensor"):
        load_trainable_state(net, state)


def test_trainable_state_of_the_litemedsam_teacher_is_lora_adapter_and_head():
    """The real teacher: no frozen encoder weight travels, every LoRA tensor does."""
    from tskd_nnunet.models.teacher_net import build_teacher_network, resolve_teacher_spec
    from tskd_nnunet.trainers.teacher import LiteMedSAMTeacherTrainer

    spec = resolve_teacher_spec("litemedsam", None, False, {}, None, (64, 64), LiteMedSAMTeacherTrainer.lora_settings(),
                                32, "sam", False)
    net = build_teacher_network(spec, 1, 2)
    keys = trainable_keys(net)
    lora = [k for k in keys if "lora_" in k]
    assert lora and len(lora) == sum(1 for n, _ in net.named_parameters() if "lora_" in n)
    assert not [k for k in keys if k.startswith("backbone.") and "lora_" not in k]
    assert any(k.startswith("adapter.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    assert set(keys) <= set(net.state_dict())  # what travels is a subset of the adapter-only checkpoint


# ------------------------------------------------------------------------------------------------ checkpoints
def test_round_checkpoints_resume_from_the_newest_readable(tmp_path):
    work = str(tmp_path)
    assert latest_round(work) is None
    for r in range(3):
        save_round(work, RoundCheckpoint(r, {"w": torch.full((2,), float(r))}, {"plans_sha256": "x"}, [{"round": r}]))
    assert latest_round(work).round == 2
    round_path(work, 2).write_bytes(b"half a file")  # a damaged newest checkpoint
    lines = []
    ck = latest_round(work, lines.append)
    assert ck.round == 1 and float(ck.state["w"][0]) == 1.0 and ck.meta == {"plans_sha256": "x"}
    assert "round_0002.pt is unreadable" in lines[0]
    assert not [n for n in os.listdir(tmp_path / "rounds") if n.startswith(".tmp_")]


# ------------------------------------------------------------------------------------------------ site planning
@pytest.mark.parametrize("cpu_plan", [None, (32, 3)], ids=["nnunet_2d", "plan_cpu_2d_32"])
def test_site_plans_on_the_merged_fingerprint_with_training_worker_setting(nnunet_env, tmp_path, cpu_plan):
    """A site whose environment says nnUNet_n_proc_DA=0 (for training on small machines) still plans: nnU-Net's
    planner would call torch.set_num_threads(0); the variable is back afterwards for the site's training.
    With ``cpu_plan`` the site adds and preprocesses the benchmark's CPU configuration with its fixed batch."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import PHANTOM_ID
    conf = "2d" if cpu_plan is None else f"2d_{cpu_plan[0]}"
    src = nnunet_env["nnUNet_preprocessed"]
    name = next(d for d in os.listdir(src) if d.startswith(f"Dataset{PHANTOM_ID}_"))
    pp = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(os.path.join(src, name), pp / name, ignore=shutil.ignore_patterns("nnUNetPlans_*", "tskd_*"))
    merged = json.loads((pp / name / "dataset_fingerprint.json").read_text())
    code = ("import json, os, sys; from tskd_nnunet.federated.fingerprint import plan_with_merged; "
            f"ident, digest = plan_with_merged({PHANTOM_ID}, json.load(open(sys.argv[1])), 20, [{conf!r}], "
            f"plans_name='fedPlans', cpu_plan={cpu_plan!r}); print(ident, digest, os.environ.get('nnUNet_n_proc_DA'))")
    fp = tmp_path / "merged.json"
    fp.write_text(json.dumps(merged))
    env = dict(nnunet_env, nnUNet_preprocessed=str(pp), nnUNet_n_proc_DA="0")
    proc = subprocess.run([sys.executable, "-c", code, str(fp)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ident, digest, n_proc = proc.stdout.split()[-3:]
    assert ident == "fedPlans" and n_proc == "0"
    plans = json.loads((pp / name / "fedPlans.json").read_text())
    assert fpr.plans_sha256(plans) == digest and os.path.isdir(pp / name / plans["configurations"][conf]["data_identifier"])
    if cpu_plan is not None:
        c = plans["configurations"][conf]
        assert c["batch_size"] == cpu_plan[1] and max(c["median_image_size_in_voxels"]) <= cpu_plan[0]
