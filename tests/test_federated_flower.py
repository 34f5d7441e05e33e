"""A real federation on 127.0.0.1: Flower's SuperLink (TLS + SuperNode authentication) started by
tskd_fed_server, two sites' SuperNodes started by tskd_fed_client, each with its own nnU-Net folders and phantom
dataset, the LiteMedSAM teacher at the test schedule, 2 rounds of 1 local epoch.

Scenario (one federation, several tests read it):
- a third SuperNode with a key the server never registered is refused;
- site B sends a NaN update in round 2 (TSKD_FED_FAULT=nan@2): refused and named, round 2 aggregates site A;
- the server (tskd_fed_server and its SuperLink) is killed with SIGKILL once round 1 is checkpointed, started
  again with the same command, and resumes after round 1;
- both sites end with the global teacher as their nnU-Net model folder.
Every process is started here and ended here (bounded waits; no stray process is left).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from conftest import BIN, PHANTOM_ID, REPO, predict_test_images, subprocess_env

pytestmark = pytest.mark.slow  # about 8 min on 2 shared CPU cores

SITES = {"A": (8, 1), "B": (6, 2)}  # name: (training cases, phantom seed)
TRAINER = "LiteMedSAMTeacherTrainer_test"
DATASET = f"Dataset{PHANTOM_ID}_Phantom"


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(args: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    # own process group: the test can kill a role with everything it started
    return subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _wait(pred, timeout: float, what: str, procs: Dict[str, subprocess.Popen], logs: Dict[str, Path],
          alive: Sequence[str] = ()) -> None:
    """Poll ``pred``; fail at once (with the logs' tails) when a process named in ``alive`` has ended."""
    deadline = time.monotonic() + timeout
    ended = None
    while time.monotonic() < deadline and ended is None:
        if pred():
            return
        ended = next((k for k in alive if procs[k].poll() is not None), None)
        time.sleep(2)
    tails = "\n".join(f"--- {k}\n{logs[k].read_text(errors='replace')[-3000:]}" for k in logs if logs[k].exists())
    why = f"{ended} exited ({procs[ended].returncode})" if ended else f"timed out after {timeout:.0f} s"
    raise AssertionError(f"{why} waiting for {what}\n{tails}")


def _processes_mentioning(text: str) -> List[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and "pytest" not in cmd:
                found.append(f"{pid}: {cmd[:200]}")
    return found


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from tskd_nnunet.demo.phantom import write_phantom_dataset
    from tskd_nnunet.federated.cli import make_ca_and_server_cert, make_node_keys

    root = tmp_path_factory.mktemp("federation")
    certs = root / "certs"
    make_ca_and_server_cert(certs, ["127.0.0.1"])
    for name in ("A", "B", "intruder"):
        make_node_keys(root / "keys", name)
    fleet, control, sapio, *appio = _free_ports(6)
    server_work = root / "server"
    server_args = [os.path.join(BIN, "tskd_fed_server"), "-d", str(PHANTOM_ID), "-tr", TRAINER, "--rounds", "2",
                   "--local-epochs", "1", "--num-sites", "2", "--min-sites", "1", "--work-dir", str(server_work),
                   "--address", "127.0.0.1", "--fleet-port", str(fleet), "--control-port", str(control),
                   "--serverappio-port", str(sapio), "--ssl-ca-certfile", str(certs / "ca.crt"),
                   "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                   "--node-key", str(root / "keys" / "A.pub"), "--node-key", str(root / "keys" / "B.pub"),
                   "--round-timeout", "1800", "--join-timeout", "900", "--timeout", "3000"]
    base = subprocess_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    site_env: Dict[str, Dict[str, str]] = {}
    for name, (n, seed) in SITES.items():
        paths = {k: str(root / f"site_{name}" / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for p in paths.values():
            os.makedirs(p)
        write_phantom_dataset(paths["nnUNet_raw"], PHANTOM_ID, num_train=n, num_test=1, size=64, seed=seed)
        site_env[name] = {**base, **paths, "nnUNet_n_proc_DA": "0"}
    site_env["B"]["TSKD_FED_FAULT"] = "nan@2"
    site_env["intruder"] = dict(site_env["A"])

    logs = {k: root / f"{k}.log" for k in ("server", "server2", "A", "B", "intruder")}
    procs: Dict[str, subprocess.Popen] = {}
    results: Dict[str, object] = {"root": root, "server_work": server_work, "site_env": site_env, "logs": logs}
    try:
        procs["server"] = _start(server_args, base, logs["server"])
        for i, name in enumerate(("A", "B", "intruder")):
            timeout = ["--timeout", "600", "--max-wait-time", "30"] if name == "intruder" else ["--timeout", "3000"]
            procs[name] = _start([os.path.join(BIN, "tskd_fed_client"), "-d", str(PHANTOM_ID), "--site", name,
                                  "--superlink", f"127.0.0.1:{fleet}", "--root-certificates", str(certs / "ca.crt"),
                                  "--auth-key", str(root / "keys" / name), "-device", "cpu",
                                  "--work-dir", str(root / f"client_{name}"), "--clientappio-port", str(appio[i]),
                                  *timeout], site_env[name], logs[name])
        round1 = server_work / "rounds" / "round_0001.pt"
        _wait(round1.exists, 2400, "round 1's checkpoint", procs, logs, alive=("server",))
        results["round1_mtime"] = round1.stat().st_mtime_ns
        _kill(procs["server"])  # the coordinating site crashes: tskd_fed_server, SuperLink, ServerApp
        results["killed_returncode"] = procs["server"].returncode
        procs["server2"] = _start(server_args, base, logs["server2"])
        for name in ("server2", "A", "B", "intruder"):
            # the sites end with the federation; after a failed one, do not wait their whole --timeout
            try:
                procs[name].wait(timeout=3000 if name == "server2" or results["server2_returncode"] == 0 else 120)
            except subprocess.TimeoutExpired:
                pass
            results[f"{name}_returncode"] = procs[name].poll()
        yield results
    finally:
        for p in procs.values():
            _kill(p)
        stray = _processes_mentioning(str(root))
        for line in stray:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        assert not stray, f"processes left running: {stray}"


def _sent(results, site: str, rnd: int) -> Dict[str, torch.Tensor]:
    env = results["site_env"][site]
    folder = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    return torch.load(folder / "federated_sent" / f"round_{rnd:04d}.pt", weights_only=True)


def _round(results, rnd: int) -> dict:
    return torch.load(Path(results["server_work"]) / "rounds" / f"round_{rnd:04d}.pt", weights_only=True)


def test_federation_finishes_at_every_site(federation):
    logs = federation["logs"]
    assert federation["server2_returncode"] == 0, logs["server2"].read_text()[-3000:]
    assert federation["A_returncode"] == 0 and federation["B_returncode"] == 0
    summary = json.loads((Path(federation["server_work"]) / "federation.json").read_text())
    assert summary["status"] == "finished" and summary["rounds"] == 2
    assert sorted(summary["installed"]) == ["A", "B"]


def test_all_sites_plan_identically_on_the_merged_fingerprint(federation):
    pre = {s: Path(federation["site_env"][s]["nnUNet_preprocessed"]) / DATASET for s in SITES}
    plans = {s: json.loads((pre[s] / "nnUNetPlans.json").read_text()) for s in SITES}
    assert plans["A"] == plans["B"]
    merged = {s: json.loads((pre[s] / "dataset_fingerprint.json").read_text()) for s in SITES}
    local = {s: json.loads((pre[s] / "dataset_fingerprint_local.json").read_text()) for s in SITES}
    assert merged["A"] == merged["B"] and local["A"] != local["B"]
    assert len(merged["A"]["spacings"]) == sum(n for n, _ in SITES.values())  # the cases of both sites, pooled


def test_global_weights_are_the_case_weighted_mean_of_the_site_updates(federation):
    r1 = _round(federation, 1)
    entry = r1["history"][-1]
    assert entry["round"] == 1 and sorted(entry["aggregated"]) == ["A", "B"]
    n = {s: entry["sites"][s]["num_train"] for s in SITES}
    a, b = _sent(federation, "A", 1), _sent(federation, "B", 1)
    assert set(r1["state"]) == set(a) == set(b)
    for k, g in r1["state"].items():
        expect = (n["A"] * a[k].double() + n["B"] * b[k].double()) / (n["A"] + n["B"])
        torch.testing.assert_close(g.double(), expect, rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the sites really trained on different data


def test_a_nan_update_is_rejected_and_its_site_named(federation):
    r2 = _round(federation, 2)
    entry = r2["history"][-1]
    assert entry["round"] == 2 and entry["aggregated"] == ["A"]
    assert entry["sites"]["B"]["accepted"] is False and "non-finite" in entry["sites"]["B"]["reason"]
    log = (Path(federation["server_work"]) / "server.log").read_text()
    assert "round 2: site B (node" in log and "REJECTED: non-finite values (NaN/Inf)" in log
    a = _sent(federation, "A", 2)
    for k, g in r2["state"].items():  # the mean of the one accepted update
        torch.testing.assert_close(g, a[k], rtol=0, atol=1e-6)


def test_an_unregistered_node_is_refused(federation):
    assert federation["intruder_returncode"] != 0
    assert "No SuperNode found with the given public key" in (federation["root"] / "client_intruder" / "supernode.log").read_text()
    assert "the SuperLink refused this site's key" in federation["logs"]["intruder"].read_text()
    summary = json.loads((Path(federation["server_work"]) / "federation.json").read_text())
    assert "intruder" not in summary["installed"]
    assert all("intruder" not in h["sites"] for h in summary["history"])
    assert "intruder" not in (Path(federation["server_work"]) / "server.log").read_text()


def test_the_server_resumes_from_its_round_checkpoint_after_a_kill(federation):
    assert federation["killed_returncode"] == -signal.SIGKILL
    log = (Path(federation["server_work"]) / "server.log").read_text()
    assert "resuming after round 1" in log
    # round 1 was not trained again: its checkpoint is the one written before the kill
    assert (Path(federation["server_work"]) / "rounds" / "round_0001.pt").stat().st_mtime_ns == federation["round1_mtime"]
    assert log.count("round 0: initial weights") == 1


def test_the_global_teacher_is_an_ordinary_nnunet_model_at_each_site(federation, tmp_path):
    final = _round(federation, 2)["state"]
    for site in SITES:
        env = federation["site_env"][site]
        folder = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
        weights = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
        for k, g in final.items():
            torch.testing.assert_close(weights[k], g, rtol=0, atol=0)
        prov = json.loads((folder / "federated.json").read_text())
        assert prov["rounds"] == 2 and prov["sites"] == ["A", "B"]
    env = dict(federation["site_env"]["A"])
    env.pop("TSKD_FED_FAULT", None)
    predict_test_images(env, TRAINER, str(tmp_path / "pred"))
