"""Federated commands without a federation: the Flower App they write builds with Flower's own bundler, the
credentials are what Flower reads, the run config reaches the ServerApp's settings, bad input is one line."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from tskd_nnunet.federated.cli import make_ca_and_server_cert, make_node_keys, write_app, write_flower_config
from tskd_nnunet.federated.server_app import ServerSettings

RUN_CONFIG = {"work-dir": "/srv/fed", "dataset": 501, "configuration": "2d", "fold": 0,
              "trainer": "LiteMedSAMTeacherTrainer", "plans": "nnUNetPlans", "planner": "ExperimentPlanner",
              "rounds": 3, "local-epochs": 2, "num-sites": 3, "min-sites": 2, "join-timeout": 60.0,
              "round-timeout": 600.0, "max-update-ratio": 0.5, "cpu-plan-size": 128, "cpu-plan-batch": 8}


def test_the_flower_app_builds_and_its_config_reaches_the_server_settings(tmp_path):
    import tomli
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fab_config

    app = write_app(tmp_path / "app", RUN_CONFIG)
    fab = build_fab_from_disk(app)
    config = get_fab_config(fab)
    comps = config["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "tskd_nnunet.federated.server_app:app",
                     "clientapp": "tskd_nnunet.federated.client_app:app"}
    s = ServerSettings.from_run_config(config["tool"]["flwr"]["app"]["config"])
    assert (s.work_dir, s.dataset, s.rounds, s.local_epochs, s.num_sites, s.min_sites, s.max_update_ratio) == \
        ("/srv/fed", 501, 3, 2, 3, 2, 0.5)
    assert (s.cpu_plan_size, s.cpu_plan_batch) == (128, 8)
    assert s.task()["total_epochs"] == 6  # the learning-rate schedule spans rounds x local epochs
    write_flower_config(tmp_path / "home", "127.0.0.1:9093", str(tmp_path / "ca.crt"), insecure=False)
    conf = tomli.loads((tmp_path / "home" / "config.toml").read_text())
    assert conf["superlink"]["default"] == "tskd"
    assert conf["superlink"]["tskd"]["address"] == "127.0.0.1:9093"
    assert conf["superlink"]["tskd"]["root-certificates"] == str((tmp_path / "ca.crt").resolve())


def test_credentials_are_what_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    make_ca_and_server_cert(tmp_path / "certs", ["fl.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]  # the local Control API
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    assert cert.issuer == ca.subject
    assert oct(os.stat(tmp_path / "certs" / "server.key").st_mode & 0o777) == "0o600"
    make_node_keys(tmp_path / "keys", "hospital_b")
    assert try_load_public_key(tmp_path / "keys" / "hospital_b.pub")  # what `flwr supernode register` accepts
    key = load_ssh_private_key((tmp_path / "keys" / "hospital_b").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # what `flower-supernode --auth-supernode-private-key` reads
    assert oct(os.stat(tmp_path / "keys" / "hospital_b").st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("args, env_drop, phrase", [
    (["--site", "A", "--superlink", "127.0.0.1:1", "--insecure"], "nnUNet_raw", "nnUNet_raw is not set"),
    (["--site", "A", "--superlink", "127.0.0.1:1"], None, "give --root-certificates ca.crt (TLS) or --insecure"),
    (["--site", "A", "--superlink", "127.0.0.1:1", "--root-certificates", "/nonexistent/ca.crt"], None,
     "/nonexistent/ca.crt does not exist"),
])
def test_client_refuses_bad_input_in_one_line(tmp_path, args, env_drop, phrase):
    env = {**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path),
           "nnUNet_results": str(tmp_path)}
    if env_drop:
        env.pop(env_drop)
    p = subprocess.run([sys.executable, "-c", "from tskd_nnunet.federated.cli import client_main; client_main()",
                        "-d", "501", "--work-dir", str(tmp_path / "w"), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and phrase in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args, phrase", [
    (["--node-key", "a.pub"], "--node-key needs TLS"),
    (["-c", "2d", "--plan-cpu", "128", "8"], "-c must name the new configuration"),
    (["-c", "2d_128", "--plan-cpu", "128", "0"], "the batch >= 1"),
])
def test_server_refuses_bad_input_in_one_line(tmp_path, args, phrase):
    p = subprocess.run([sys.executable, "-c", "from tskd_nnunet.federated.cli import server_main; server_main()",
                        "-d", "501", "--work-dir", str(tmp_path), "--insecure", *args],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2 and phrase in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_the_site_waits_for_its_clientapp_to_reply_before_stopping_the_supernode():
    """tskd_fed_client stops its SuperNode only after the ClientApp that wrote "finished" has exited (its reply
    sent), and never waits longer than the grace period."""
    import time

    from tskd_nnunet.federated.cli import _wait_for_clientapps

    def tree(seconds: int) -> subprocess.Popen:  # a SuperNode stand-in with a ClientApp-named grandchild
        proc = subprocess.Popen(["bash", "-c", f"(exec -a flwr-clientapp sleep {seconds}) & wait"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(f"flwr-clientapp\0{seconds}".encode() in _cmdline(p)
                                                      for p in os.listdir("/proc") if p.isdigit()):
            time.sleep(0.1)
        return proc

    root = tree(3)
    t0 = time.monotonic()
    _wait_for_clientapps(root.pid, 30)
    waited = time.monotonic() - t0
    root.wait(timeout=10)
    assert 1.0 <= waited < 15
    root = tree(60)
    t0 = time.monotonic()
    _wait_for_clientapps(root.pid, 2)
    waited = time.monotonic() - t0
    root.kill()
    subprocess.run(["pkill", "-f", "^flwr-clientapp 60"], check=False)
    root.wait(timeout=10)
    assert 1.5 <= waited < 10
