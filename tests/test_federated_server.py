"""The ServerApp's federation loop on Flower's real Message/RecordDict types, with the network replaced by an
in-memory Grid whose sites answer like the ClientApp does (their training is a fixed step on toy tensors): update
checks name the site, dead sites are left out, --min-sites repeats a round, checkpoints resume after a "kill"."""
from __future__ import annotations

import json
from typing import Callable, Dict, Iterable, List, Optional

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from tskd_nnunet.federated.checkpoint import latest_round
from tskd_nnunet.federated.server_app import Federation, FederationError, ServerSettings

FP = {"spacings": [[1.0, 1.0, 1.0]], "shapes_after_crop": [[1, 8, 8]], "median_relative_size_after_cropping": 1.0,
      "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0,
                                                            "median": 0.0, "percentile_00_5": -1.0,
                                                            "percentile_99_5": 1.0}}}
DJ = {"channel_names": {"0": "x"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".png"}


class Site:
    """Answers the federation's messages like tskd_nnunet.federated.client_app, without nnU-Net."""

    def __init__(self, name: str, n: int, step: float, fault: Optional[Callable[[int], bool]] = None,
                 silent_from: Optional[int] = None):
        self.name, self.n, self.step, self.fault = name, n, step, fault or (lambda r: False)
        self.silent_from = silent_from  # from this round on the site never answers (it went down mid-round)
        self.round = 0
        self.sent: Dict[int, Dict[str, torch.Tensor]] = {}
        self.installed: Optional[Dict[str, torch.Tensor]] = None
        self.alive = True

    def __call__(self, msg: Message) -> Optional[Message]:
        if not self.alive:
            return None
        t = msg.metadata.message_type
        if t == "train":
            self.round = int(msg.content["round"]["round"])
        if self.silent_from is not None and self.round >= self.silent_from:
            return None
        info: Dict[str, object] = {"site": self.name}
        arrays = None
        if t == "query.fingerprint":
            fp = dict(FP, spacings=FP["spacings"] * self.n, shapes_after_crop=FP["shapes_after_crop"] * self.n)
            info.update(num_cases=self.n, dataset_name="Dataset990_Phantom", fingerprint=json.dumps(fp),
                        dataset_json=json.dumps(DJ))
        elif t == "query.plan":
            info.update(plans="nnUNetPlans", plans_sha256="same-plans-everywhere")
        elif t == "query.init":
            arrays = {"lora_A": torch.ones(2, 3), "head.w": torch.full((4,), 2.0)}
        elif t == "train":
            rnd = int(msg.content["round"]["round"])
            g = msg.content["arrays"].to_torch_state_dict()
            arrays = {k: v + self.step for k, v in g.items()}
            if self.fault(rnd):
                arrays = {k: torch.full_like(v, float("nan")) for k, v in arrays.items()}
            self.sent[rnd] = arrays
            info.update(num_cases=self.n, metrics=json.dumps({"num_train": self.n, "num_val": 1,
                                                              "global_pseudo_dice": 0.5, "local_pseudo_dice": 0.6}))
        elif t == "query.finish":
            self.installed = dict(msg.content["arrays"].to_torch_state_dict())
            info.update(model_folder=f"/{self.name}/fold_0", metrics=json.dumps({"global_pseudo_dice": 0.7}))
        content = RecordDict({"info": ConfigRecord(info)})
        if arrays is not None:
            content["arrays"] = ArrayRecord(arrays)
        return Message(content=content, reply_to=msg)


class MemoryGrid(Grid):
    def __init__(self, sites: Dict[int, Site]):
        self.sites = sites
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, s in self.sites.items() if s.alive]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> List[Message]:
        replies = []
        for m in messages:
            r = self.sites[m.metadata.dst_node_id](m)
            if r is not None:
                replies.append(r)
        return replies


def _settings(tmp_path, **kw) -> ServerSettings:
    base = dict(work_dir=str(tmp_path), dataset=990, rounds=2, local_epochs=1, num_sites=2, min_sites=1,
                join_timeout=0.0, round_retries=1)
    base.update(kw)
    return ServerSettings(**base)


def test_rounds_average_by_cases_refuse_nan_naming_the_site_and_install_everywhere(tmp_path):
    a, b = Site("A", 3, 0.1), Site("B", 1, 0.5, fault=lambda r: r == 2)
    Federation(MemoryGrid({11: a, 22: b}), _settings(tmp_path)).run()
    ck = latest_round(str(tmp_path))
    r1, r2 = ck.history
    assert r1["aggregated"] == ["A", "B"] and r2["aggregated"] == ["A"]
    assert r2["sites"]["B"]["accepted"] is False and "non-finite" in r2["sites"]["B"]["reason"]
    g0 = {"lora_A": torch.ones(2, 3), "head.w": torch.full((4,), 2.0)}
    g1 = {k: (3 * (v + 0.1) + 1 * (v + 0.5)) / 4 for k, v in g0.items()}  # 3:1 by cases
    for k in g0:
        torch.testing.assert_close(ck.state[k], g1[k] + 0.1)  # round 2: A alone
    assert a.installed is not None and b.installed is not None
    torch.testing.assert_close(b.installed["head.w"], ck.state["head.w"])
    log = (tmp_path / "server.log").read_text()
    assert "round 2: site B (node 22): n=1" in log and "REJECTED: non-finite values" in log
    assert json.loads((tmp_path / "federation.json").read_text())["status"] == "finished"


def test_a_site_that_dies_mid_federation_is_left_out(tmp_path):
    a, b = Site("A", 2, 0.1), Site("B", 2, 0.3, silent_from=2)
    Federation(MemoryGrid({1: a, 2: b}), _settings(tmp_path)).run()
    ck = latest_round(str(tmp_path))
    assert ck.round == 2 and ck.history[-1]["aggregated"] == ["A"]
    assert "train: B (node 2): no reply within" in (tmp_path / "server.log").read_text()
    summary = json.loads((tmp_path / "federation.json").read_text())
    assert summary["status"] == "finished" and list(summary["installed"]) == ["A"]
    assert "B (node 2)" in summary["not_installed"]


def test_too_few_acceptable_updates_repeat_the_round_then_stop_with_the_checkpoint_kept(tmp_path):
    a, b = Site("A", 2, 0.1, fault=lambda r: r == 2), Site("B", 2, 0.1, fault=lambda r: r == 2)
    with pytest.raises(FederationError, match="round 2 got fewer than 2 acceptable updates in 2 attempts"):
        Federation(MemoryGrid({1: a, 2: b}), _settings(tmp_path, min_sites=2)).run()
    assert latest_round(str(tmp_path)).round == 1
    assert (tmp_path / "server.log").read_text().count("round repeated with the same global weights") == 2


def test_a_restarted_server_resumes_after_its_last_round(tmp_path):
    a, b = Site("A", 2, 0.1), Site("B", 2, 0.1)
    Federation(MemoryGrid({1: a, 2: b}), _settings(tmp_path, rounds=1)).run()  # "killed" after round 1
    first = latest_round(str(tmp_path))
    a2, b2 = Site("A", 2, 0.1), Site("B", 2, 0.1)
    Federation(MemoryGrid({1: a2, 2: b2}), _settings(tmp_path, rounds=2)).run()
    assert sorted(a2.sent) == [2]  # round 1 was not trained again
    torch.testing.assert_close(a2.installed["lora_A"], first.state["lora_A"] + 0.1)
    log = (tmp_path / "server.log").read_text()
    assert "resuming after round 1" in log and log.count("round 0: initial weights") == 1
