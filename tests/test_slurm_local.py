"""benchmarks/slurm_local.sh on a real one-node SLURM cluster (issue #29): the phantom benchmark through Snakemake's
SLURM executor plugin, every training run a SLURM job that sacct shows COMPLETED, and no daemon left behind.

Needs root and Debian's slurm-wlm, slurmdbd, munge and mariadb-server; slow (13-20 minutes on 2 busy cores) and
not in CI. Its own state folder and ports (TSKD_SLURM_PORT), so a cluster started by hand beside it is not touched."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "slurm_local.sh")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
METHODS = ("nnUNetTrainer", "teacher", "tskd")


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (starts munged, mariadbd, slurmdbd, slurmctld, slurmd)"
    gone = [b for b in DAEMONS + ("mariadb-install-db", "sbatch", "sacct", "sacctmgr") if not shutil.which(b)]
    if gone:
        return f"not installed: {' '.join(gone)} (apt-get install slurm-wlm slurmdbd munge mariadb-server)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm not installed (pip install -c constraints.txt '.[slurm]')"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")]


def _ours(state: str):
    """Processes of this cluster still alive: the state folder on their command line (munged, mariadbd) or its
    slurm.conf in their environment (slurmdbd, slurmctld, slurmd, slurmstepd and the jobs)."""
    conf = f"SLURM_CONF={os.path.join(state, 'etc', 'slurm.conf')}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if state.encode() in cmd or conf in env:
            found.append(f"{pid}: {cmd.replace(bytes(1), b' ').decode(errors='replace')[:120]}")
    return found


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_local")
    state, log = str(root / "state"), str(root / "slurm_run.log")
    env = dict(os.environ, TSKD_SLURM_DIR=state, TSKD_SLURM_LOG=log, TSKD_SLURM_PORT="26817",
               TSKD_SLURM_STOP_WAIT="15", PYTHON=sys.executable)
    env.pop("SLURM_CONF", None)
    try:
        proc = subprocess.run(["bash", SCRIPT, "all"], env=env, capture_output=True, text=True, timeout=3000)
    finally:  # whatever happened (a timeout too): the daemons go, in bounded time
        stop = subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=300)
    return {"proc": proc, "stop": stop, "state": state, "log": log}


def test_every_job_completed_on_slurm(cluster_run):
    proc = cluster_run["proc"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    text = open(cluster_run["log"]).read()
    m = re.search(r"^sacct: (\d+) jobs, states: (.*)$", text, re.M)
    assert m and m.group(2) == f"COMPLETED {m.group(1)}", text[-4000:]
    n = int(m.group(1))
    assert re.search(rf"^Snakemake: {n} jobs submitted to SLURM$", text, re.M), text[-4000:]
    table = text.split("== sacct -X", 1)[1].splitlines()[3:]
    rows = [r for r in table if re.match(r"^\d+ ", r)]
    assert len(rows) == n and all(" COMPLETED " in r for r in rows), "\n".join(table)
    # each training run of the matrix is a SLURM job of its own
    # (the plugin's comment: rule_train_wildcards_4_teacher_0, rule_train_wildcards_nnUNetTrainer_4_0, ...)
    for method in METHODS:
        assert any(re.search(rf"\brule_train_wildcards_(\S+_)?{method}_", r) for r in rows), \
            f"no train job for {method}:\n" + "\n".join(table)
    summary = text.split("== tskd_benchmark summary", 1)[1].split("==", 2)[1]
    for method in METHODS:
        assert re.search(rf"^\s*{method}\s.*\bdone\b", summary, re.M), summary


def test_daemons_stopped_afterwards(cluster_run):
    state = cluster_run["state"]
    assert cluster_run["stop"].returncode == 0, cluster_run["stop"].stderr
    for d in DAEMONS:
        pidfile = os.path.join(state, "run", f"{d}.pid")
        if os.path.exists(pidfile):
            pid = open(pidfile).read().strip()
            assert not pid or not os.path.exists(f"/proc/{pid}") or d.encode() not in open(
                f"/proc/{pid}/cmdline", "rb").read(), f"{d} ({pid}) still runs"
    assert _ours(state) == []
