"""Console commands of a federated teacher, one per role (documentation/federated.md):

- ``tskd_fed_server``: the coordinating site. Starts Flower's SuperLink (TLS, SuperNode authentication, state in
  a SQLite file of the work folder), registers the sites' public keys, submits the federation (``flwr run`` of a
  Flower App whose ServerApp/ClientApp are this package's) and waits for it; stops the SuperLink at the end.
- ``tskd_fed_client``: a hospital. Starts Flower's SuperNode with this site's nnU-Net folders (the environment:
  ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``), its private key and the federation's CA
  certificate; stops it when the federation has installed the global teacher here.
- ``tskd_fed_credentials``: a CA and the SuperLink's TLS certificate (``ca``), or a site's key pair (``node``).

Every Flower process is started with telemetry and update checks off (``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``): a hospital's machines talk to the SuperLink and nothing else.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tskd_nnunet.atomic_io import atomic_write_text, read_json

# GRPC_ENABLE_FORK_SUPPORT=0: a ClientApp process holds gRPC threads while nnU-Net starts worker processes
# (fingerprint, preprocessing, unpacking); gRPC's fork handlers then deadlocked the fork (seen with grpcio 1.85)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "GRPC_ENABLE_FORK_SUPPORT": "0"}
CONNECTION = "tskd"  # the name of the SuperLink connection in the server's Flower configuration


class FedCommandError(RuntimeError):
    """A one-line error of a federation command (printed without traceback)."""


def _bin(name: str) -> str:
    """A console script of this environment (beside the running Python first, then PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FedCommandError(f"{name} not found. Fix: pip install -c constraints.txt '.[federated]'")
    return found


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name from PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def wait_for_port(host: str, port: int, timeout: float, proc: Optional[subprocess.Popen] = None,
                  log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise FedCommandError(f"the process for {host}:{port} exited with {proc.returncode}:\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FedCommandError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop(proc: Optional[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM to ``proc``, SIGKILL after ``grace`` s. Our Flower children stay in this command's process group,
    so that a kill of the command's group (a crash, a test) takes them along; Flower's own helpers
    (SuperExec, ServerApp/ClientApp processes) watch their parent's pid and end with it."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tls_args(ca: Optional[str], cert: Optional[str], key: Optional[str], insecure: bool) -> List[str]:
    if insecure:
        return ["--insecure"]
    missing = [n for n, v in (("--ssl-ca-certfile", ca), ("--ssl-certfile", cert), ("--ssl-keyfile", key)) if not v]
    if missing:
        raise FedCommandError(f"TLS needs {', '.join(missing)}. Fix: tskd_fed_credentials ca --out certs "
                              f"--server-name HOST (see documentation/federated.md), or --insecure on a test machine")
    for p in (ca, cert, key):
        if not Path(p).is_file():  # type: ignore[arg-type]
            raise FedCommandError(f"{p} does not exist. Fix: give the file made by tskd_fed_credentials ca")
    return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]


# ------------------------------------------------------------------------------------------------------ server
APP_TOML = """# written by tskd_fed_server: the Flower App of this federation (components come from tskd-nnunet)
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tskd-federated-teacher"
version = "1.0.0"
description = "Federated LoRA teacher of tskd-nnunet"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tskd-nnunet"

[tool.flwr.app.components]
serverapp = "tskd_nnunet.federated.server_app:app"
clientapp = "tskd_nnunet.federated.client_app:app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v: object) -> str:
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_app(folder: Path, run_config: Dict[str, object]) -> Path:
    """The Flower App folder that ``flwr run`` bundles: a pyproject.toml naming our ServerApp/ClientApp, with
    the federation's settings as its run config (the sites receive them in every message)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items())
    atomic_write_text(folder / "pyproject.toml", APP_TOML.format(config=body))
    return folder


def write_flower_config(home: Path, control: str, ca: Optional[str], insecure: bool) -> None:
    """The Flower CLI's configuration (FLWR_HOME/config.toml): one connection to our SuperLink's Control API."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{control}"']
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(Path(ca).resolve()))}")
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")


def _exit_with(prog: str, run: Callable[[argparse.Namespace], int], a: argparse.Namespace) -> None:
    """Run a command and exit with its status; a FedCommandError is one line on stderr and exit status 2."""
    try:
        sys.exit(run(a))
    except FedCommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def server_main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_fed_server", description="Coordinate a federated TS-KD teacher "
                                "(Flower SuperLink + the federation's ServerApp). documentation/federated.md")
    p.add_argument("-d", dest="dataset", type=int, required=True, help="dataset id, the same at every site")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration (2d)")
    p.add_argument("-f", dest="fold", type=int, default=0, help="fold each site trains (its own nnU-Net split; 0)")
    p.add_argument("-tr", dest="trainer", default="LiteMedSAMTeacherTrainer", help="LoRA teacher trainer class")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    p.add_argument("-pl", dest="planner", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    p.add_argument("--plan-cpu", nargs=2, type=int, metavar=("SIZE", "BATCH"), default=None,
                   help="every site adds configuration -c as tskd_plan_cpu -s SIZE -b BATCH does (e.g. -c 2d_128 "
                        "--plan-cpu 128 8: the benchmark's CPU plans)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1, help="nnU-Net epochs per site per round (E)")
    p.add_argument("--num-sites", type=int, default=2, help="sites that must join before planning")
    p.add_argument("--min-sites", type=int, default=None,
                   help="acceptable updates needed to aggregate a round (default: --num-sites)")
    p.add_argument("--max-update-ratio", type=float, default=1.0,
                   help="refuse an update with ||w_site - w_global|| > RATIO * max(||w_global||, 1) (1.0)")
    p.add_argument("--round-timeout", type=float, default=7200.0, help="seconds to wait for the sites' replies")
    p.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for sites to connect")
    p.add_argument("--work-dir", required=True, help="the server's folder: round checkpoints, logs, SuperLink state")
    p.add_argument("--address", default="0.0.0.0", help="where the sites reach the Fleet API (0.0.0.0)")
    p.add_argument("--fleet-port", type=int, default=9092)
    p.add_argument("--control-port", type=int, default=9093, help="Control API, on 127.0.0.1 only")
    p.add_argument("--serverappio-port", type=int, default=9091, help="ServerAppIo API, on 127.0.0.1 only")
    p.add_argument("--ssl-ca-certfile")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--node-key", action="append", default=[],
                   help="a site's public key (.pub); repeat per site. Given: only these sites may connect")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (loopback tests only)")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    _exit_with(p.prog, run_server, p.parse_args(argv))


def run_server(a: argparse.Namespace) -> int:
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tls = tls_args(a.ssl_ca_certfile, a.ssl_certfile, a.ssl_keyfile, a.insecure)
    if a.node_key and a.insecure:
        raise FedCommandError("--node-key needs TLS (Flower refuses SuperNode authentication without it). Fix: "
                              "give --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile instead of --insecure")
    if a.plan_cpu:  # refused before any process starts, by the rule every site applies
        from tskd_nnunet.plans_variant import PlansVariantError, check_size_and_batch
        try:
            check_size_and_batch(*a.plan_cpu)
            if a.configuration in ("2d", "3d_fullres", "3d_lowres"):
                raise PlansVariantError(f"-c {a.configuration} is nnU-Net's own; -c must name the new configuration")
        except PlansVariantError as e:
            raise FedCommandError(f"--plan-cpu {a.plan_cpu[0]} {a.plan_cpu[1]} with -c {a.configuration}: {e}. Fix: "
                                  f"e.g. -c 2d_128 --plan-cpu 128 8") from None
    for k in a.node_key:
        if not Path(k).is_file():
            raise FedCommandError(f"{k} does not exist. Fix: copy the site's public key made by tskd_fed_credentials node")
    run_config = {"work-dir": str(work), "dataset": a.dataset, "configuration": a.configuration, "fold": a.fold,
                  "trainer": a.trainer, "plans": a.plans, "planner": a.planner, "rounds": a.rounds,
                  "cpu-plan-size": a.plan_cpu[0] if a.plan_cpu else 0, "cpu-plan-batch": a.plan_cpu[1] if a.plan_cpu else 0,
                  "local-epochs": a.local_epochs, "num-sites": a.num_sites,
                  "min-sites": a.min_sites if a.min_sites is not None else a.num_sites,
                  "join-timeout": float(a.join_timeout), "round-timeout": float(a.round_timeout),
                  "max-update-ratio": float(a.max_update_ratio)}
    app = write_app(work / "flower_app", run_config)
    home = work / "flwr_home"
    control = f"127.0.0.1:{a.control_port}"
    write_flower_config(home, control, a.ssl_ca_certfile, a.insecure)
    env = _env({"FLWR_HOME": str(home)})
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    result = work / "federation.json"
    if result.exists():  # a finished/failed earlier run; a resumed one writes it again at its end
        result.unlink()
    log = work / "superlink.log"
    cmd = [_bin("flower-superlink"), *tls, "--database", str(work / "superlink.db"),
           "--fleet-api-address", f"{a.address}:{a.fleet_port}", "--control-api-address", control,
           "--serverappio-api-address", f"127.0.0.1:{a.serverappio_port}"]
    if a.node_key:
        cmd.append("--enable-supernode-auth")
    superlink = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        wait_for_port("127.0.0.1", a.control_port, 600, superlink, log)
        for key in a.node_key:
            _register(key, env, work)
        run_id = _submit(app, env, work)
        last_check = time.monotonic()
        while True:
            status = read_json(result, default={}).get("status")
            if status in ("finished", "failed"):
                break
            if superlink.poll() is not None:
                raise FedCommandError(f"the SuperLink exited with {superlink.returncode}; see {log}")
            if deadline is not None and time.monotonic() > deadline:
                raise FedCommandError(f"the federation did not finish within --timeout {a.timeout:.0f} s; "
                                      f"see {work / 'server.log'}; start the same command again to resume")
            if time.monotonic() - last_check > 60:  # Flower's view of the run: a ServerApp that died writes nothing
                flower_status = _run_status(app, run_id, env, work)
                if flower_status.startswith("finished"):
                    time.sleep(10)
                    status = read_json(result, default={}).get("status")
                    if status in ("finished", "failed"):
                        break
                    raise FedCommandError(f"Flower ended run {run_id} ({flower_status}) without a result from the "
                                          f"ServerApp; see {work / 'server.log'} and {log}")
                last_check = time.monotonic()
            time.sleep(1.0)
        print(f"tskd_fed_server: federation {status}; summary {result}, log {work / 'server.log'}")
        return 0 if status == "finished" else 1
    finally:
        stop(superlink)


def _flwr(args: List[str], env: Dict[str, str], work: Path) -> str:
    """A Flower CLI command against our SuperLink; its output (the command's log gets a copy)."""
    proc = subprocess.run([_bin("flwr"), *args], env=env, cwd=work, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    with open(work / "flwr_cli.log", "a", encoding="utf-8") as f:
        f.write(f"$ flwr {' '.join(args)}\n{out}\n")
    if proc.returncode != 0:
        raise FedCommandError(f"flwr {' '.join(args[:2])} failed ({proc.returncode}): {out.strip()[-800:]}")
    return out


def _submit(app: Path, env: Dict[str, str], work: Path) -> str:
    """``flwr run`` of the federation's app; the run id."""
    out = _flwr(["run", str(app), CONNECTION, "--format", "json"], env, work)
    m = re.search(r'"run-id":\s*"(\d+)"', out)
    if not m:
        raise FedCommandError(f"flwr run gave no run id: {out.strip()[-800:]}")
    print(f"tskd_fed_server: federation submitted as Flower run {m.group(1)}", flush=True)
    return m.group(1)


def _run_status(app: Path, run_id: str, env: Dict[str, str], work: Path) -> str:
    """Flower's status of the run ("pending", "running", "finished:completed", "finished:failed", ...)."""
    try:
        out = _flwr(["ls", str(app), CONNECTION, "--run-id", run_id, "--format", "json"], env, work)
    except (FedCommandError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r'"status":\s*"([^"]+)"', out)
    return m.group(1) if m else "unknown"


def _register(public_key: str, env: Dict[str, str], work: Path) -> None:
    """Register a site's public key with the SuperLink (a key registered by an earlier start is fine)."""
    proc = subprocess.run([_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), CONNECTION],
                          env=env, cwd=work, capture_output=True, text=True, timeout=600)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "already" not in out.lower():
        raise FedCommandError(f"registering {public_key} failed: {out[-800:]}")
    print(f"tskd_fed_server: {public_key}: {out.splitlines()[-1] if out else 'registered'}")


# ------------------------------------------------------------------------------------------------------ client
def client_main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_fed_client", description="Join a federated TS-KD teacher as a site "
                                "(Flower SuperNode with this site's nnU-Net folders). documentation/federated.md")
    p.add_argument("-d", dest="dataset", type=int, required=True,
                   help="dataset id (checked against the federation's; data stays in this site's nnUNet_raw)")
    p.add_argument("--site", required=True, help="this site's name in the server's log")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Fleet API")
    p.add_argument("--root-certificates", help="the federation's CA certificate (ca.crt)")
    p.add_argument("--auth-key", help="this site's private key (tskd_fed_credentials node)")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    p.add_argument("-device", dest="device", default="cuda", help="cuda (default), cpu or mps")
    p.add_argument("--work-dir", required=True, help="this site's federation folder (logs, status)")
    p.add_argument("--clientappio-port", type=int, default=9094, help="local ClientAppIo API port (127.0.0.1)")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--max-wait-time", type=float, default=600.0,
                   help="seconds the SuperNode keeps trying to (re)connect to the SuperLink (600)")
    _exit_with(p.prog, run_client, p.parse_args(argv))


def run_client(a: argparse.Namespace) -> int:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise FedCommandError(f"{var} is not set. Fix: export this site's nnU-Net folders (nnU-Net's own variables)")
    if a.insecure == bool(a.root_certificates):
        raise FedCommandError("give --root-certificates ca.crt (TLS) or --insecure (loopback tests only), not both")
    for f in (a.root_certificates, a.auth_key):
        if f and not Path(f).is_file():
            raise FedCommandError(f"{f} does not exist. Fix: copy it from the federation's coordinator "
                                  f"(ca.crt) or make it with tskd_fed_credentials node (the key)")
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    status_file = work / "status.json"
    if read_json(status_file, default={}).get("phase") == "finished":
        status_file.unlink()  # an earlier federation's; this one writes its own
    node_config = f'site="{a.site}" device="{a.device}" status-file="{status_file}" dataset={a.dataset}'
    cmd = [_bin("flower-supernode"), "--superlink", a.superlink, "--node-config", node_config,
           "--clientappio-api-address", f"127.0.0.1:{a.clientappio_port}", "--max-wait-time", str(a.max_wait_time)]
    cmd += ["--insecure"] if a.insecure else ["--root-certificates", str(Path(a.root_certificates).resolve())]
    if a.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(a.auth_key).resolve())]
    log = work / "supernode.log"
    start = time.monotonic()
    deadline = None if a.timeout is None else start + a.timeout
    supernode = _start_supernode(cmd, log)
    try:
        while True:
            if read_json(status_file, default={}).get("phase") == "finished":
                # the ClientApp writes "finished" before its reply is sent: stopping the SuperNode now would
                # lose the reply (the server then reports the site down); wait until the ClientApp has exited
                _wait_for_clientapps(supernode.pid, FINISH_GRACE_S)
                print(f"tskd_fed_client: federated teacher installed: {read_json(status_file)['model_folder']}")
                return 0
            if supernode.poll() is not None:
                text = log.read_text(errors="replace")
                if UNREGISTERED in text[-4000:]:
                    # Flower's SuperNode gives up when the SuperLink does not know its key; the coordinator may
                    # register it later (or the SuperLink is restarting), so try again until --max-wait-time
                    if time.monotonic() - start > a.max_wait_time:
                        raise FedCommandError(f"the SuperLink refused this site's key for {a.max_wait_time:.0f} s "
                                              f"({UNREGISTERED}). Fix: send the site's .pub file to the coordinator "
                                              f"(tskd_fed_server --node-key)")
                    print("tskd_fed_client: the SuperLink does not know this site's key (yet); retrying in 5 s",
                          flush=True)
                    time.sleep(5)
                    supernode = _start_supernode(cmd, log)
                    continue
                raise FedCommandError(f"the SuperNode exited with {supernode.returncode} (see {log}):\n{text[-2000:]}")
            if deadline is not None and time.monotonic() > deadline:
                raise FedCommandError(f"no finished federation within --timeout {a.timeout:.0f} s; see {log}")
            time.sleep(1.0)
    finally:
        stop(supernode)


UNREGISTERED = "No SuperNode found with the given public key"
FINISH_GRACE_S = 120.0


def _wait_for_clientapps(root_pid: int, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until no ``flwr-clientapp`` process runs below ``root_pid`` (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parents: Dict[int, int] = {}
        names: Dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    names[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid

        def below(pid: int) -> bool:
            while pid > 1:
                pid = parents.get(pid, 0)
                if pid == root_pid:
                    return True
            return False
        if not any("flwr-clientapp" in cmd and below(pid) for pid, cmd in names.items()):
            return
        time.sleep(1.0)


def _start_supernode(cmd: List[str], log: Path) -> subprocess.Popen:
    # FLWR_HOME in the site's work folder: the federation's app bundle is installed there, not in ~/.flwr
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=_env({"FLWR_HOME": str(log.parent / "flwr_home")}), cwd=log.parent)


# ------------------------------------------------------------------------------------------------- credentials
def credentials_main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_fed_credentials", description="TLS certificates and SuperNode keys for "
                                "a federation (documentation/federated.md; openssl/ssh-keygen work as well)")
    sub = p.add_subparsers(dest="what", required=True)
    ca = sub.add_parser("ca", help="a CA (ca.crt, ca.key) and the SuperLink's certificate (server.pem, server.key)")
    ca.add_argument("--out", required=True)
    ca.add_argument("--server-name", action="append", required=True,
                    help="DNS name or IP address the sites use to reach the SuperLink (repeatable)")
    ca.add_argument("--days", type=int, default=365)
    node = sub.add_parser("node", help="a site's key pair: SITE (private, stays at the site) and SITE.pub (to the "
                                       "coordinator)")
    node.add_argument("--out", required=True)
    node.add_argument("--site", required=True)
    a = p.parse_args(argv)
    if a.what == "ca":
        paths = make_ca_and_server_cert(Path(a.out), a.server_name, a.days)
    else:
        paths = make_node_keys(Path(a.out), a.site)
    for path in paths:
        print(path)


def make_ca_and_server_cert(out: Path, names: Sequence[str], days: int = 365) -> List[Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tskd-nnunet federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans: List[x509.GeneralName] = []
    # the coordinator's own Flower CLI reaches the SuperLink's Control API on the loopback address
    for n in [*names, *[x for x in ("127.0.0.1", "localhost") if x not in names]]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem_key = serialization.PrivateFormat.TraditionalOpenSSL
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": ca_key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption()),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption()),
    }
    return [_write_secret(out / n, b, private=n.endswith(".key")) for n, b in files.items()]


def make_node_keys(out: Path, site: str) -> List[Path]:
    """An EC P-384 key pair in OpenSSH format (what Flower's SuperNode authentication reads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [_write_secret(out / site, private, private=True), _write_secret(out / f"{site}.pub", public + b"\n")]


def _write_secret(path: Path, data: bytes, private: bool = False) -> Path:
    tmp = path.with_name(f".tmp_{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
