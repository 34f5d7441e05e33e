"""The benchmark's method table: every TS-KD arm distils over labeled + the unlabeled pool, the synthetic arm
adds synthetic cases on top of exactly that (so tskd_syn - tskd is the synthetic images' effect), and the
teacher is the packaged LiteMedSAM unless a profile says otherwise."""
import json

from tskd_nnunet.benchmark.config import DATA_SCOPES, load_config


def test_tskd_arms_see_the_pool_and_differ_from_tskd_syn_only_by_synthetic_cases(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"dataset": {"id": 990}, "budgets": [4], "methods": ["tskd", "tskd_syn"]}))
    cfg = load_config(str(cfg_file))
    tskd, syn = cfg.method_defs["tskd"], cfg.method_defs["tskd_syn"]
    assert DATA_SCOPES[tskd["data"]] == {"pool": True, "synthetic": False}
    assert DATA_SCOPES[syn["data"]] == {"pool": True, "synthetic": True}
    assert tskd["needs"] == syn["needs"] == ["teacher"]
    assert tskd["env"]["TSKD_TEACHER_TRAINER"] == syn["env"]["TSKD_TEACHER_TRAINER"]
    # task-agnostic KD distils over the same unlabeled pool as TS-KD
    assert DATA_SCOPES[cfg.method_defs["task_agnostic"]["data"]]["pool"]
    assert cfg.method_closure(["tskd"]) == ["teacher", "tskd"]
    assert cfg.profiles["cpu"]["params"]["teacher_trainer"].startswith("LiteMedSAMTeacherTrainer")


def test_budget_roots_share_one_teacher_target_cache(tmp_path):
    """tskd_syn reads the real cases' targets tskd computed (one cache per work dir, keys separate teachers); an
    older per-root cache moves into it (re-sampled synthetic cases: target_cache.missing_cases finds them stale)."""
    import os

    import numpy as np

    from tskd_nnunet.benchmark.data_roots import prepare_budget_root
    from tskd_nnunet.benchmark.runner import BenchmarkRunner
    from tskd_nnunet.data.preprocessed_files import TARGETS_DIR

    name = "Dataset990_Phantom"
    (tmp_path / "raw" / name).mkdir(parents=True)
    (tmp_path / "pp" / name).mkdir(parents=True)
    (tmp_path / "pp" / name / "case_0.npz").write_bytes(b"x")
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"dataset": {"id": 990, "convert": None, "raw_root": str(tmp_path / "raw"),
                                                "preprocessed_root": str(tmp_path / "pp")},
                                    "budgets": [4], "methods": ["tskd", "tskd_syn"]}))
    runner = BenchmarkRunner(load_config(str(cfg_file)), "cpu", str(tmp_path / "work"), committed=None)
    runner._splits = {4: ([{"train": ["case_0"], "val": ["case_1"]}], [["case_2"]])}
    key_dir = os.path.join(TARGETS_DIR, "nnUNetPlans_2d", "fold_0", "k1")
    # a cache from before the shared layout: a real folder inside the pool root
    old = os.path.join(runner.budget_root(4, "pool"), name, key_dir)
    os.makedirs(old)
    np.save(os.path.join(old, "case_0.npy"), np.ones(2))

    pool = os.path.join(prepare_budget_root(runner, 4, "pool"), name)
    syn = os.path.join(prepare_budget_root(runner, 4, "pool_synthetic"), name)
    for root in (pool, syn):
        assert os.path.realpath(os.path.join(root, TARGETS_DIR)) == os.path.realpath(runner.targets_root)
        assert np.load(os.path.join(root, key_dir, "case_0.npy")).sum() == 2
    assert os.path.islink(os.path.join(syn, "case_0.npz"))  # the cases themselves: links to the same files


def test_tskd_syn_trainer_draws_labeled_pool_and_synthetic(tmp_path):
    """The trainer behind tskd_syn keeps tskd's whole transfer set (labeled + pool) and adds the synthetic cases;
    without synthetic cases it refuses to start (it would silently be tskd)."""
    import types

    import pytest

    from tskd_nnunet.data.transfer_set import TransferSet, TransferSetError
    from tskd_nnunet.trainers import distill_synthetic

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"dataset": {"id": 990}, "budgets": [4], "methods": ["tskd", "tskd_syn"]}))
    cls = getattr(distill_synthetic, load_config(str(cfg_file)).method_defs["tskd_syn"]["trainer"])
    trainer = object.__new__(cls)  # select_training_cases needs no initialised trainer
    trainer.plans_manager, trainer.configuration_name, trainer.fold = types.SimpleNamespace(plans_name="P"), "2d", 0
    ts = TransferSet("main", ["a", "b"], ["p1", "p2", "p3"],
                     {"synthetic": ("syn_dir", ["syn_s0_00000"]), "unlabeled": ("unl_dir", ["unl_x"])})
    assert cls.select_training_cases(trainer, ts).counts() == {"labeled": 2, "pool": 3, "synthetic": 1,
                                                               "real-unlabeled": 0}
    with pytest.raises(TransferSetError, match="needs synthetic cases"):
        cls.select_training_cases(trainer, TransferSet("main", ["a"], ["p1"]))


def test_committed_settings_show_what_the_trainer_drew(tmp_path):
    from tskd_nnunet.benchmark.committed import settings_table
    from tskd_nnunet.benchmark.provenance import drawn_transfer_set
    from tskd_nnunet.data.transfer_set import format_counts

    log = tmp_path / "train.log"  # the line as the distillation trainer writes it
    line = format_counts({"labeled": 10, "pool": 0, "synthetic": 1000, "real-unlabeled": 0})
    log.write_text(f"x\n2026-11-28 22:16:56.410233: {line}; validation: 64 cases (never drawn for training)\n")
    drawn = drawn_transfer_set(str(log))
    assert drawn == {"labeled": 10, "pool": 0, "synthetic": 1000, "real_unlabeled": 0}
    assert drawn_transfer_set(str(tmp_path / "none.log")) is None
    # the settings table reports the drawn counts over what the data scope offered (pool 246)
    table = settings_table([{"method": "tskd_syn", "budget": 10, "fold": 0,
                             "transfer_set": {"labeled": 10, "pool": 246, "synthetic": 1000, "drawn": drawn}}])
    assert "| 10 / 0 / 1000 |" in table
