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
