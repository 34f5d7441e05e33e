"""The Flower ServerApp of a federated TS-KD teacher (run by the SuperLink that ``tskd_fed_server`` starts).

One federation, in order (documentation/federated.md):

1. wait until ``num-sites`` SuperNodes are connected (at most ``join-timeout`` s);
2. planning: every site's fingerprint -> merged (case-weighted) -> every site plans and preprocesses with nnU-Net
   on it; the plans sha256 of all sites must be equal (else the federation stops, naming the sites);
3. round 0: one site (the first by name) builds the teacher; its trainable tensors are the initial global weights;
4. rounds 1..R: every connected site trains E local epochs from the global tensors; each reply is checked
   (:func:`tskd_nnunet.federated.updates.check_update`), a refused one is named with its site and reason; the
   accepted ones are averaged weighted by labeled cases. Fewer than ``min-sites`` accepted updates: the round is
   tried again (at most ``round-retries`` times) with the global weights unchanged. Each finished round is
   checkpointed atomically (``WORK/rounds/round_RRRR.pt``); a server started again resumes after the last one;
5. finish: every site installs the global teacher as its nnU-Net model folder.

The server's log (``WORK/server.log``) has one line per site per round: its pseudo-Dice (nnU-Net's validation:
the global model at the start of the round and the local model after its epochs), its weight, and whether its
update was used, plus the case-weighted global pseudo-Dice. ``WORK/federation.json`` is the summary.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from tskd_nnunet.atomic_io import atomic_write_json
from tskd_nnunet.federated import fingerprint as fpr
from tskd_nnunet.federated.checkpoint import RoundCheckpoint, latest_round, round_path, save_round
from tskd_nnunet.federated.updates import State, check_update, summarise, weighted_mean

app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot go on; the message says why and what to do."""


@dataclass
class ServerSettings:
    work_dir: str
    dataset: int
    configuration: str = "2d"
    fold: int = 0
    trainer: str = "LiteMedSAMTeacherTrainer"
    plans: str = "nnUNetPlans"
    planner: str = "ExperimentPlanner"
    cpu_plan_size: int = 0   # > 0: the configuration is tskd_plan_cpu's (-s size -b batch) at every site
    cpu_plan_batch: int = 0
    rounds: int = 5
    local_epochs: int = 1
    num_sites: int = 2
    min_sites: int = 2
    join_timeout: float = 600.0
    round_timeout: float = 7200.0
    round_retries: int = 2
    max_update_ratio: float = 1.0

    @classmethod
    def from_run_config(cls, cfg: Dict[str, Any]) -> "ServerSettings":
        kwargs = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key in cfg:
                kwargs[name] = {"int": int, "float": float, "str": str}[str(f.type)](cfg[key])  # annotations are strings
        return cls(**kwargs)

    def task(self) -> Dict[str, Any]:
        return {"dataset": self.dataset, "configuration": self.configuration, "fold": self.fold,
                "trainer": self.trainer, "plans": self.plans, "total_epochs": self.rounds * self.local_epochs,
                "local_epochs": self.local_epochs}


class ServerLog:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Federation:
    def __init__(self, grid: Grid, s: ServerSettings):
        os.makedirs(s.work_dir, exist_ok=True)
        self.grid, self.s = grid, s
        self.log = ServerLog(os.path.join(s.work_dir, "server.log"))
        self.sites: Dict[int, str] = {}  # node id -> site name (from its replies)

    # ------------------------------------------------------------------------------------------ messaging
    def wait_for_nodes(self, wanted: int, needed: int, timeout: float) -> List[int]:
        """The connected nodes, once ``wanted`` are there; after ``timeout`` s, those there if at least ``needed``."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= wanted:
                return nodes
            if time.monotonic() > deadline:
                if len(nodes) >= needed:
                    self.log(f"{len(nodes)} of {wanted} site(s) connected after {timeout:.0f} s: going on without "
                             f"the others (--min-sites {needed})")
                    return nodes
                raise FederationError(f"only {len(nodes)} of {needed} site(s) connected within {timeout:.0f} s. "
                                      f"Fix: start tskd_fed_client at the missing sites (check their certificates "
                                      f"and registered keys), or lower --num-sites / --min-sites")
            time.sleep(1.0)

    def name(self, node: int) -> str:
        return f"{self.sites[node]} (node {node})" if node in self.sites else f"node {node}"

    def ask(self, nodes: List[int], message_type: str, content: Dict[str, Any], group: str,
            timeout: float) -> Tuple[Dict[int, RecordDict], Dict[int, str]]:
        """Send one message per node; ({node: reply content}, {node: why no usable reply})."""
        messages = []
        for node in nodes:
            rd = RecordDict({"task": ConfigRecord(self.s.task())})
            for k, v in content.items():
                rd[k] = v
            messages.append(Message(rd, dst_node_id=node, message_type=message_type, group_id=group,
                                    ttl=timeout + 60))
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        ok: Dict[int, RecordDict] = {}
        failed: Dict[int, str] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                failed[node] = f"site error: {r.error.reason}"
                continue
            ok[node] = r.content
            self.sites[node] = str(r.content["info"]["site"])
        for node in nodes:
            if node not in ok and node not in failed:
                failed[node] = f"no reply within {timeout:.0f} s (site down?)"
        for node, why in failed.items():
            self.log(f"{message_type}: {self.name(node)}: {why}")
        return ok, failed

    # ------------------------------------------------------------------------------------------ phases
    def plan(self, nodes: List[int], meta: Dict[str, Any]) -> Dict[str, Any]:
        if "merged_fingerprint" not in meta:
            ok, failed = self.ask(nodes, "query.fingerprint", {}, "fingerprint", self.s.round_timeout)
            if failed:
                raise FederationError(f"planning needs every site's fingerprint; missing: "
                                      f"{', '.join(self.name(n) for n in failed)}")
            order = sorted(ok, key=lambda n: self.sites[n])
            infos = [(self.sites[n], {"dataset_name": str(ok[n]["info"]["dataset_name"]),
                                      "dataset_json": json.loads(str(ok[n]["info"]["dataset_json"]))}) for n in order]
            try:
                fpr.check_compatible(infos)
            except fpr.FederatedPlanningError as e:
                raise FederationError(str(e)) from None
            counts = [int(ok[n]["info"]["num_cases"]) for n in order]
            merged = fpr.merge_fingerprints([json.loads(str(ok[n]["info"]["fingerprint"])) for n in order], counts)
            meta = {**meta, "merged_fingerprint": merged, "total_cases": sum(counts),
                    "planning_sites": {self.sites[n]: c for n, c in zip(order, counts)}}
            self.log(f"fingerprints merged: {', '.join(f'{s} ({c} cases)' for s, c in meta['planning_sites'].items())}")
        plan = ConfigRecord({"fingerprint": json.dumps(meta["merged_fingerprint"]),
                             "total_cases": int(meta["total_cases"]), "planner": self.s.planner,
                             "cpu_plan_size": int(self.s.cpu_plan_size), "cpu_plan_batch": int(self.s.cpu_plan_batch)})
        ok, failed = self.ask(nodes, "query.plan", {"plan": plan}, "plan", self.s.round_timeout)
        if failed:
            raise FederationError(f"planning failed at {', '.join(self.name(n) for n in failed)} (see above)")
        digests = {self.sites[n]: str(ok[n]["info"]["plans_sha256"]) for n in ok}
        if len(set(digests.values())) != 1 or (meta.get("plans_sha256") not in (None, *digests.values())):
            raise FederationError(f"the sites' plans differ: {digests} (recorded: {meta.get('plans_sha256')}). Fix: use "
                                  f"the same nnU-Net version and planner at every site")
        meta["plans_sha256"] = next(iter(digests.values()))
        self.log(f"plans identical at {len(digests)} site(s): sha256 {meta['plans_sha256'][:16]}")
        return meta

    def initial(self, nodes: List[int], meta: Dict[str, Any]) -> RoundCheckpoint:
        first = sorted(nodes, key=lambda n: self.sites.get(n, str(n)))[0]
        ok, failed = self.ask([first], "query.init", {}, "init", self.s.round_timeout)
        if failed:
            raise FederationError(f"{self.name(first)} could not build the initial teacher (see above)")
        state = dict(ok[first]["arrays"].to_torch_state_dict())
        bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise FederationError(f"initial weights from {self.name(first)} hold NaN/Inf ({bad[:3]})")
        self.log(f"round 0: initial weights from {self.name(first)}: {len(state)} trainable tensors, "
                 f"{sum(t.numel() for t in state.values()) / 1e6:.2f} M values")
        ckpt = RoundCheckpoint(0, state, meta, [])
        save_round(self.s.work_dir, ckpt)
        return ckpt

    def round(self, ckpt: RoundCheckpoint) -> RoundCheckpoint:
        rnd = ckpt.round + 1
        for attempt in range(self.s.round_retries + 1):
            # a site that is down gets a short grace, not the join timeout, every round
            nodes = self.wait_for_nodes(self.s.num_sites, self.s.min_sites, min(60.0, self.s.join_timeout))
            ok, failed = self.ask(nodes, "train", {"arrays": ArrayRecord(ckpt.state),
                                                   "round": ConfigRecord({"round": rnd})},
                                  f"round-{rnd}", self.s.round_timeout)
            accepted: List[Tuple[int, State, int]] = []
            rejected: List[Tuple[str, str]] = [(self.name(n), why) for n, why in failed.items()]
            sites: Dict[str, Any] = {}
            for node in sorted(ok, key=lambda n: self.sites[n]):
                info = ok[node]["info"]
                try:
                    metrics = json.loads(str(info["metrics"]))
                    update = dict(ok[node]["arrays"].to_torch_state_dict())
                    num_cases = info["num_cases"]
                except Exception as e:  # a reply without our fields: refused like a bad update, the site named
                    rejected.append((self.name(node), f"malformed reply ({type(e).__name__}: {e})"))
                    self.log(f"round {rnd}: site {self.name(node)}: REJECTED: malformed reply ({type(e).__name__}: {e})")
                    continue
                why = check_update(update, ckpt.state, num_cases, self.s.max_update_ratio)
                sites[self.sites[node]] = {**metrics, "node": node, "accepted": why is None, "reason": why}
                self.log(f"round {rnd}: site {self.name(node)}: n={num_cases}, pseudo Dice global "
                         f"{metrics['global_pseudo_dice']:.4f} -> local {metrics['local_pseudo_dice']:.4f}: "
                         f"{'accepted' if why is None else 'REJECTED: ' + why}")
                if why is None:
                    accepted.append((node, update, int(num_cases)))
                else:
                    rejected.append((self.name(node), why))
            entry = {"round": rnd, "attempt": attempt, "sites": sites, "rejected": rejected,
                     "global_pseudo_dice": _weighted([(m["global_pseudo_dice"], m["num_val"]) for m in sites.values()]),
                     "local_pseudo_dice": _weighted([(m["local_pseudo_dice"], m["num_val"]) for m in sites.values()])}
            if len(accepted) >= self.s.min_sites:
                new = weighted_mean([u for _, u, _ in accepted], [n for _, _, n in accepted])
                self.log(f"round {rnd}: " + summarise([(self.name(n), w) for n, _, w in accepted], rejected))
                self.log(f"round {rnd}: pseudo Dice (case-weighted over sites): global model at round start "
                         f"{entry['global_pseudo_dice']:.4f}, local models {entry['local_pseudo_dice']:.4f}")
                entry["aggregated"] = [self.sites[n] for n, _, _ in accepted]
                out = RoundCheckpoint(rnd, new, ckpt.meta, ckpt.history + [entry])
                path = save_round(self.s.work_dir, out)
                self.log(f"round {rnd}: global weights saved to {path}")
                return out
            ckpt.history.append(entry)
            self.log(f"round {rnd}: only {len(accepted)} acceptable update(s), {self.s.min_sites} needed "
                     f"(--min-sites): round repeated with the same global weights "
                     f"({attempt + 1} of {self.s.round_retries + 1} attempts)")
        raise FederationError(f"round {rnd} got fewer than {self.s.min_sites} acceptable updates in "
                              f"{self.s.round_retries + 1} attempts; the global weights of round {ckpt.round} stay in "
                              f"{round_path(self.s.work_dir, ckpt.round)}. Fix: see the rejections above, then start "
                              f"tskd_fed_server again (it resumes)")

    def finish(self, ckpt: RoundCheckpoint) -> Dict[str, Any]:
        nodes = self.wait_for_nodes(self.s.num_sites, self.s.min_sites, self.s.join_timeout)
        provenance = {"rounds": ckpt.round, "local_epochs": self.s.local_epochs, "trainer": self.s.trainer,
                      "plans_sha256": ckpt.meta.get("plans_sha256"), "aggregation": "FedAvg, weights = labeled cases",
                      "global_checkpoint": str(round_path(self.s.work_dir, ckpt.round)),
                      "sites": sorted({s for h in ckpt.history for s in h.get("aggregated", [])})}
        ok, failed = self.ask(nodes, "query.finish", {"arrays": ArrayRecord(ckpt.state),
                                                      "round": ConfigRecord({"provenance": json.dumps(provenance)})},
                              "finish", self.s.round_timeout)
        final = {}
        for node, content in ok.items():
            m = json.loads(str(content["info"]["metrics"]))
            final[self.sites[node]] = {**m, "model_folder": str(content["info"]["model_folder"])}
            self.log(f"finish: {self.name(node)}: global teacher installed in {content['info']['model_folder']}, "
                     f"pseudo Dice there {m['global_pseudo_dice']:.4f}")
        return {"installed": final, "not_installed": {self.name(n): w for n, w in failed.items()}}

    def run(self) -> None:
        s = self.s
        ckpt = latest_round(s.work_dir, self.log)
        if ckpt is not None:
            self.log(f"resuming after round {ckpt.round} ({round_path(s.work_dir, ckpt.round)})")
        # planning needs every site; a resumed federation waits as long for them, then goes on with --min-sites
        nodes = self.wait_for_nodes(s.num_sites, s.num_sites if ckpt is None else s.min_sites, s.join_timeout)
        self.log(f"{len(nodes)} site(s) connected: nodes {nodes}")
        meta = self.plan(nodes, dict(ckpt.meta) if ckpt else {"settings": dict(s.__dict__)})
        if ckpt is None:
            ckpt = self.initial(nodes, meta)
        while ckpt.round < s.rounds:
            ckpt = self.round(ckpt)
        result = self.finish(ckpt)
        atomic_write_json(f"{s.work_dir}/federation.json",
                          {"status": "finished", "rounds": ckpt.round, "plans_sha256": ckpt.meta.get("plans_sha256"),
                           "global_checkpoint": str(round_path(s.work_dir, ckpt.round)), "history": ckpt.history,
                           **result})
        self.log(f"federation finished after {ckpt.round} round(s)")


def _weighted(values: List[Tuple[float, int]]) -> float:
    pairs = [(v, n) for v, n in values if v is not None and not math.isnan(v) and n > 0]
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else float("nan")


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(dict(context.run_config))
    fed = Federation(grid, settings)
    try:
        fed.run()
    except FederationError as e:
        fed.log(f"ERROR: {e}")
        atomic_write_json(f"{settings.work_dir}/federation.json", {"status": "failed", "error": str(e)})
        raise
