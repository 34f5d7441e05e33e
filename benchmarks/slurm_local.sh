#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm, slurmdbd, munge, mariadb-server), and the phantom
# benchmark run on it through Snakemake's SLURM executor plugin: every step a SLURM job, shown by sacct.
# Recipe, what it measured and what a real multi-node cluster adds: documentation/benchmarking.md
# ("A one-node SLURM cluster").
#
#   sudo bash benchmarks/slurm_local.sh [start|run|stop|status|all]      (default: all = start, run, stop)
#
#   start   write the configs under $TSKD_SLURM_DIR and start munged, mariadbd, slurmdbd, slurmctld, slurmd
#           (the node at 127.0.0.1, state and logs in that folder); add cluster, account and user with sacctmgr; wait
#           until sinfo shows the node idle. Idempotent: a running cluster of that folder is left as it is.
#   run     write the phantom config into $TSKD_SLURM_DIR/work, run tskd_benchmark --engine snakemake
#           --executor slurm, then write its summary and sacct's table of the run's jobs to $TSKD_SLURM_LOG.
#           Exit 1 unless every run is done and every job COMPLETED.
#   stop    cancel the cluster's jobs and stop every daemon started from that folder (TERM, then KILL after
#           $TSKD_SLURM_STOP_WAIT seconds each).
#   status  the pid of each daemon of that folder, or "not running".
#
# Environment (defaults in brackets):
#   TSKD_SLURM_DIR   state, configs, daemon logs and the benchmark's work folder [/tmp/tskd_slurm_local]
#   TSKD_SLURM_LOG   the run's log [documentation/benchmarks/slurm_local/slurm_run.log]
#   TSKD_SLURM_PORT  first of four ports: slurmctld, slurmd, slurmdbd, mariadb [16817]
#   PYTHON           a Python with tskd-nnunet[slurm] installed [.venv/bin/python]
#   TSKD_SLURM_JOBS  jobs submitted at once [2]
#   TSKD_SLURM_STOP_WAIT  seconds from TERM to KILL, per daemon [20]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${TSKD_SLURM_DIR:-/tmp/tskd_slurm_local}
LOG=${TSKD_SLURM_LOG:-$REPO/documentation/benchmarks/slurm_local/slurm_run.log}
PORT=${TSKD_SLURM_PORT:-16817}
PY=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${TSKD_SLURM_JOBS:-2}
STOP_WAIT=${TSKD_SLURM_STOP_WAIT:-20}
CLUSTER=tskdlocal
PARTITION=local
ACCOUNT=tskd
NODE=$(hostname -s)

case $PORT in
  ''|*[!0-9]*) echo "slurm_local.sh: error: TSKD_SLURM_PORT=$PORT is not a port number. Fix: e.g. 16817" >&2
               exit 2;;
esac
ETC=$STATE/etc RUN=$STATE/run LOGS=$STATE/log SPOOL=$STATE/spool DB=$STATE/mysql WORK=$STATE/work
export SLURM_CONF=$ETC/slurm.conf
CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) MYSQL_PORT=$((PORT + 3))
MUNGE_SOCKET=$RUN/munge.socket

die() { echo "slurm_local.sh: error: $*" >&2; exit 2; }
say() { echo "[slurm_local $(date -u +%H:%M:%S)] $*"; }

preflight() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts munged, slurmdbd, slurmctld and slurmd as root). Fix: use sudo"
  local b missing=()
  for b in munged mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacct sacctmgr sinfo scancel; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}. Fix: apt-get install -y slurm-wlm slurmdbd munge mariadb-server"
  [ "$PORT" -ge 1024 ] && [ "$PORT" -le 65000 ] || die "TSKD_SLURM_PORT=$PORT is out of range. Fix: 1024..65000"
}

# A pid from a pid file, if that process is alive and runs the expected program (a stale file or a reused pid is
# not ours).
live_pid() {  # NAME PIDFILE
  local pid
  [ -s "$2" ] || return 1
  pid=$(tr -dc 0-9 < "$2")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$1" || return 1
  echo "$pid"
}

wait_for() {  # SECONDS WHAT COMMAND...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "slurm_local.sh: error: $what did not come up in ${t}s; see $LOGS/" >&2; return 1; }
    sleep 1
  done
}

write_atomic() {  # FILE MODE (content on stdin)
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  chmod "$2" "$tmp"
  mv -f "$tmp" "$1"
}

write_configs() {
  mkdir -p "$ETC" "$RUN" "$LOGS" "$SPOOL/ctld" "$SPOOL/d" "$WORK"
  chmod 0755 "$STATE" "$ETC" "$RUN" "$LOGS"
  if [ ! -s "$ETC/munge.key" ]; then  # a key of this cluster alone (the system's /etc/munge is not touched)
    head -c 1024 /dev/urandom | write_atomic "$ETC/munge.key" 0600
  fi
  if [ ! -s "$ETC/db.pass" ]; then
    head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 | write_atomic "$ETC/db.pass" 0600
  fi
  local node_line mem
  node_line=$(slurmd -C | head -n1)  # NodeName=... CPUs=... Boards=... RealMemory=... as slurmd will see it
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node_line")
  write_atomic "$ETC/slurm.conf" 0644 <<EOF
# written by benchmarks/slurm_local.sh: one node at 127.0.0.1, everything under $STATE
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
CommunicationParameters=NoInAddrAny
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  write_atomic "$ETC/slurmdbd.conf" 0600 <<EOF
# written by benchmarks/slurm_local.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=tskd_slurm_acct
EOF
  # Snakemake's jobstep plugin runs each job as `srun ...` after dropping every SLURM_* variable, SLURM_CONF too; a
  # real cluster's srun finds /etc/slurm/slurm.conf (or its configless copy), ours lives here: this srun, first on
  # the PATH of the run, puts SLURM_CONF back (/etc is not touched)
  mkdir -p "$STATE/bin"
  printf '#!/bin/sh\n# written by benchmarks/slurm_local.sh: srun of the cluster in %s\nSLURM_CONF=%s exec %s "$@"\n' \
    "$STATE" "$ETC/slurm.conf" "$(PATH=/usr/local/bin:/usr/bin:/bin type -P srun)" | write_atomic "$STATE/bin/srun" 0755
  [ -n "$mem" ] || die "slurmd -C reported no RealMemory ($node_line). Fix: check that slurmd runs on this machine"
}

start_munge() {
  live_pid munged "$RUN/munged.pid" >/dev/null && return 0
  say "munged (socket $MUNGE_SOCKET)"
  munged --force --socket="$MUNGE_SOCKET" --key-file="$ETC/munge.key" --pid-file="$RUN/munged.pid" \
    --log-file="$LOGS/munged.log" --seed-file="$RUN/munged.seed"
  wait_for 20 munged munge --socket="$MUNGE_SOCKET" -n
}

mysql_sock() { mariadb --no-defaults --socket="$RUN/mysql.sock" -uroot "$@"; }

start_mariadb() {
  if ! live_pid mariadbd "$RUN/mariadbd.pid" >/dev/null; then
    if [ ! -d "$DB/mysql" ]; then
      say "mariadb-install-db ($DB)"
      mariadb-install-db --no-defaults --datadir="$DB" --user=root --auth-root-authentication-method=socket \
        --skip-test-db > "$LOGS/mariadb-install-db.log" 2>&1 \
        || die "mariadb-install-db failed; see $LOGS/mariadb-install-db.log"
    fi
    say "mariadbd (127.0.0.1:$MYSQL_PORT)"
    setsid mariadbd --no-defaults --datadir="$DB" --user=root --bind-address=127.0.0.1 --port="$MYSQL_PORT" \
      --socket="$RUN/mysql.sock" --pid-file="$RUN/mariadbd.pid" --log-error="$LOGS/mariadbd.log" \
      --skip-name-resolve --innodb-buffer-pool-size=128M < /dev/null > /dev/null 2>&1 &
    wait_for 60 mariadbd mysql_sock -e "select 1"
  fi
  local pass
  pass=$(cat "$ETC/db.pass")
  mysql_sock -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
                 ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
                 GRANT ALL ON tskd_slurm_acct.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
  live_pid slurmdbd "$RUN/slurmdbd.pid" >/dev/null && return 0
  say "slurmdbd (port $DBD_PORT)"
  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
}

start_slurm() {
  # accounting first: the cluster, an account and root in it (sacctmgr -i: no prompt; "already exists" is fine)
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="tskd-nnunet benchmark" organization=local \
    >/dev/null 2>&1 || true
  sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -n -P list assoc cluster="$CLUSTER" user=root format=account | grep -qx "$ACCOUNT" \
    || die "sacctmgr could not add user root to account $ACCOUNT; see $LOGS/slurmdbd.log"
  if ! live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
    say "slurmctld (port $CTLD_PORT)"
    slurmctld
  fi
  if ! live_pid slurmd "$RUN/slurmd.pid" >/dev/null; then
    say "slurmd (node $NODE, 127.0.0.1:$SLURMD_PORT)"
    slurmd
  fi
  wait_for 90 "node $NODE idle" node_idle
  say "cluster $CLUSTER up: $(sinfo -h -N -o '%N %t cpus=%c mem=%mMB partition=%P')"
}

node_idle() { sinfo -h -N -n "$NODE" -o %t | grep -qx idle; }

cmd_start() {
  preflight
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
}

stop_one() {  # NAME PIDFILE
  local pid end
  pid=$(live_pid "$1" "$2") || return 0
  say "stop $1 ($pid)"
  kill -TERM "$pid" 2>/dev/null || true
  end=$((SECONDS + STOP_WAIT))
  while [ -e "/proc/$pid" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
  if [ -e "/proc/$pid" ]; then
    say "$1 ($pid) still running after ${STOP_WAIT}s: KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

# slurmstepd processes of this cluster: they carry this cluster's SLURM_CONF in their environment (from slurmd).
our_stepds() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "${p#/proc/}"
  done
  return 0
}

cmd_stop() {
  [ "$(id -u)" = 0 ] || die "needs root (the daemons run as root). Fix: run it with sudo"
  [ -d "$STATE" ] || { say "nothing to stop ($STATE does not exist)"; return 0; }
  if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
    timeout 20 scancel --cluster="$CLUSTER" --user=root >/dev/null 2>&1 || true
  fi
  stop_one slurmd "$RUN/slurmd.pid"
  local p
  for p in $(our_stepds); do say "stop slurmstepd ($p)"; kill -KILL "$p" 2>/dev/null || true; done
  stop_one slurmctld "$RUN/slurmctld.pid"
  stop_one slurmdbd "$RUN/slurmdbd.pid"
  stop_one mariadbd "$RUN/mariadbd.pid"
  stop_one munged "$RUN/munged.pid"
  say "stopped (state kept in $STATE)"
}

cmd_status() {
  local d
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    printf '%-10s %s\n' "$d" "$(live_pid "$d" "$RUN/$d.pid" || echo 'not running')"
  done
}

# ------------------------------------------------------------------------------------------------ the benchmark
cmd_run() {
  preflight
  { live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null && node_idle; } \
    || die "node $NODE of cluster $CLUSTER is not idle (is it started?). Fix: bash $0 start (TSKD_SLURM_DIR=$STATE)"
  [ -x "$PY" ] || die "no Python at $PY. Fix: bash scripts/setup_env.sh &&" \
                      ".venv/bin/pip install -c constraints.txt '.[slurm]' (or set PYTHON)"
  "$PY" -c "import snakemake_executor_plugin_slurm, tskd_nnunet" 2>/dev/null \
    || die "$PY lacks snakemake-executor-plugin-slurm or tskd-nnunet." \
           "Fix: $PY -m pip install -c constraints.txt '.[slurm]'"
  local bench=$WORK/bench cfg=$WORK/phantom_slurm.json out=$WORK/tskd_benchmark.out
  rm -rf "$bench" "$WORK/committed"  # a fresh run: every step is a job of this run
  mkdir -p "$bench" "$(dirname "$LOG")"
  # the phantom (tskd_phantom, its convert step), planned by nnU-Net; plain nnU-Net, the LiteMedSAM teacher and
  # the TS-KD student at 4 labels, fold 0, the tests' tiny schedule (1 epoch of 2 iterations)
  write_atomic "$cfg" 0644 <<EOF
{
  "name": "phantom_slurm",
  "dataset": {"id": 990, "convert": ["{bin}/tskd_phantom", "-d", "{dataset_id}",
                      "--num-train", "12", "--num-test", "3", "-o", "{raw}"]},
  "configuration": "2d", "budgets": [4], "folds": [0], "num_folds": 3,
  "methods": ["nnUNetTrainer", "teacher", "tskd"],
  "profiles": {"cpu": {"schedule": "1,2,1", "params": {"latency_cases": 1, "preprocess_processes": 1}}},
  "notes": ["benchmarks/slurm_local.sh: the phantom on a one-node SLURM cluster, every step a SLURM job"]
}
EOF
  local t0 start rc
  start=$(date +%Y-%m-%dT%H:%M:%S)
  t0=$SECONDS
  say "tskd_benchmark --engine snakemake --executor slurm (jobs submitted at once: $JOBS); output: $out"
  set +e
  (cd "$WORK" && PATH="$STATE/bin:$PATH" "$PY" -m tskd_nnunet.benchmark.cli "$cfg" --engine snakemake \
     --executor slurm --jobs "$JOBS" \
     --workdir "$bench" --committed "$WORK/committed" \
     --workflow-profile "$REPO/benchmarks/snakemake/slurm_local" > "$out" 2>&1)
  rc=$?
  set -e
  local wall=$((SECONDS - t0))
  sleep 2  # let slurmctld hand the last job's end to slurmdbd
  write_log "$start" "$rc" "$wall" "$out"
}

write_log() {  # START RC WALL OUT
  local start=$1 rc=$2 wall=$3 out=$4 sacct_out n states submitted tmp ok=1
  sacct_out=$(sacct --cluster="$CLUSTER" -X -S "$start" -E now \
              --format=JobID,JobName%36,Comment%58,Partition,State,Elapsed,AllocCPUS,ExitCode)
  n=$(sacct --cluster="$CLUSTER" -X -n -P -S "$start" -E now --format=JobID | grep -c . || true)
  states=$(sacct --cluster="$CLUSTER" -X -n -P -S "$start" -E now --format=State | sort | uniq -c \
           | awk '{printf "%s%s %s", sep, $2, $1; sep=", "}')
  submitted=$(grep -c "Job .* has been submitted with SLURM jobid" "$out" || true)
  [ "$rc" = 0 ] && [ "$n" -gt 0 ] && [ "$states" = "COMPLETED $n" ] || ok=0
  tmp=$(mktemp "$LOG.XXXXXX")
  {
    echo "# benchmarks/slurm_local.sh run: the phantom benchmark on a one-node SLURM cluster"
    echo "# date (UTC):        $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine:           $(nproc) CPUs, $(free -g | awk '/^Mem:/{print $2}') GiB," \
         "$(. /etc/os-release; echo "$PRETTY_NAME")"
    echo "# slurm:             $(sinfo -V) (Debian slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null))"
    echo "# snakemake:         $("$PY" -m snakemake --version)"
    echo "# slurm plugin:      snakemake-executor-plugin-slurm" \
         "$("$PY" -c 'import importlib.metadata as m; print(m.version("snakemake-executor-plugin-slurm"))')"
    echo "# command:           tskd_benchmark phantom_slurm.json --engine snakemake --executor slurm --jobs $JOBS" \
         "--workflow-profile benchmarks/snakemake/slurm_local"
    echo "# config:"
    sed 's/^/#   /' "$WORK/phantom_slurm.json"
    echo
    echo "tskd_benchmark exit status $rc, wall time ${wall} s"
    echo "Snakemake: $submitted jobs submitted to SLURM"
    echo "sacct: $n jobs, states: $states"
    echo
    echo "== tskd_benchmark summary (committed summary.csv) =="
    if [ -f "$WORK/committed/summary.csv" ]; then
      "$PY" - "$WORK/committed/summary.csv" <<'PYEOF'
import sys
import pandas as pd
s = pd.read_csv(sys.argv[1])
cols = [c for c in ("method", "budget", "fold", "status", "n_cases", "dice_mean", "trainer") if c in s.columns]
print(s[cols].to_string(index=False))
PYEOF
    else
      echo "(no summary.csv)"
    fi
    echo
    echo "== tskd_benchmark output (last 15 lines) =="
    tail -n 15 "$out"
    echo
    echo "== sacct -X (one line per job; Comment: the Snakemake rule and wildcards) =="
    echo "$sacct_out"
  } > "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$LOG"
  say "log: $LOG"
  say "$submitted jobs submitted, sacct: $n jobs, states: $states; tskd_benchmark exit $rc, ${wall} s"
  [ $ok = 1 ] || { echo "slurm_local.sh: error: not every run done / job COMPLETED; see $LOG and $out" >&2; return 1; }
}

case ${1:-all} in
  start) cmd_start ;;
  run) cmd_run ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  all)
    preflight
    trap cmd_stop EXIT  # the daemons stop however start or run ends
    cmd_start
    cmd_run
    ;;
  *) die "unknown command '$1'. Fix: one of start, run, stop, status, all" ;;
esac
