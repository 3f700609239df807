#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and demos (Debian's slurm 22.05, MULTIPLE_SLURMD).
#   bash scripts/slurm/local_cluster.sh start    # install (root, apt) when missing, write slurm.conf, start daemons
#   bash scripts/slurm/local_cluster.sh status   # daemons and nodes; prints the SLURM_CONF line to export
#   bash scripts/slurm/local_cluster.sh stop     # cancel our jobs, stop exactly the daemons this script started
# Nodes node1 and node2 (2 CPUs each, both on 127.0.0.1), partitions `debug` (default, preemptible: requeue)
# and `high` (PriorityTier 10: a job there preempts debug jobs). Everything lives under $KD_SLURM_DIR
# (default /var/tmp/kd_engine_slurm): slurm.conf, state, spool, logs and the PIDs of the daemons we started.
# Clients need `export SLURM_CONF=$KD_SLURM_DIR/slurm.conf` (also linked to /etc/slurm/slurm.conf when that
# file does not exist). Exit codes: 0 ok, 1 a daemon failed (log tail printed), 3 cannot run here (not root /
# no apt and slurm missing) -- the test fixture skips on 3.
set -euo pipefail
DIR=${KD_SLURM_DIR:-/var/tmp/kd_engine_slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
NODES=(node1 node2)
say() { echo "local_cluster: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_missing() {
  local need=0
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || need=1; done
  [ "$need" = 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "cannot run: SLURM is not installed and installing it needs root and apt-get"; exit 3
  fi
  say "installing slurmctld slurmd slurm-client munge (apt, ~15 s)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) \
    >"${TMPDIR:-/tmp}/kd_slurm_apt.log" 2>&1 || { say "apt-get failed: $(tail -3 "${TMPDIR:-/tmp}/kd_slurm_apt.log")"; exit 3; }
}

write_conf() {
  local host; host=$(hostname)
  mkdir -p "$DIR"/{state,spool,log,run}
  for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
  cat >"$CONF.tmp" <<EOF
# written by kd_engine scripts/slurm/local_cluster.sh -- two nodes on one machine
ClusterName=kdlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high  Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  mv "$CONF.tmp" "$CONF"
  if [ ! -e "$ETC_CONF" ] && [ -d /etc/slurm ]; then ln -s "$CONF" "$ETC_CONF"; fi
}

idle_nodes() { SLURM_CONF=$CONF sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l; }

start() {
  install_if_missing
  if alive "$DIR/run/slurmctld.pid"; then
    say "already running (slurmctld pid $(cat "$DIR/run/slurmctld.pid"))"; status; return 0
  fi
  [ "$(id -u)" = 0 ] || { say "cannot run: starting the daemons needs root"; exit 3; }
  write_conf
  export SLURM_CONF=$CONF
  # munge: reuse a running munged (not ours, left alone at stop); otherwise start one and remember its PID
  if [ ! -S /run/munge/munge.socket.2 ] || ! munge -n </dev/null >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
      mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/run/munged.ours.pid"
  fi
  /usr/sbin/slurmctld -i || { say "slurmctld failed:"; tail -5 "$DIR/log/slurmctld.log" >&2; exit 1; }
  for n in "${NODES[@]}"; do
    /usr/sbin/slurmd -N "$n" || { say "slurmd $n failed:"; tail -5 "$DIR/log/slurmd-$n.log" >&2; exit 1; }
  done
  for _ in $(seq 300); do
    [ "$(idle_nodes)" = 2 ] && { say "up: 2 nodes idle; export SLURM_CONF=$CONF"; return 0; }
    sleep 0.1
  done
  say "nodes did not become idle in 30 s:"; SLURM_CONF=$CONF sinfo -N >&2 || true
  tail -5 "$DIR/log/slurmctld.log" >&2; exit 1
}

stop() {
  export SLURM_CONF=$CONF
  if alive "$DIR/run/slurmctld.pid"; then  # our cluster, our jobs: cancel them so a restart does not rerun them
    scancel --full --quiet --partition debug,high 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local pids=()
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.ours.pid"; do
    alive "$f" && { pids+=("$(cat "$f")"); kill "$(cat "$f")"; }
  done
  for p in "${pids[@]}"; do for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
  rm -f "$DIR/run/munged.ours.pid"
  [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ] && rm -f "$ETC_CONF"
  say "stopped ${#pids[@]} daemon(s)"
}

status() {
  local up=0
  for f in "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid "$DIR/run/munged.ours.pid"; do
    alive "$f" && { echo "$(basename "$f" .pid) pid $(cat "$f") running"; up=1; }
  done
  [ "$up" = 1 ] || { echo "not running"; return 1; }
  SLURM_CONF=$CONF sinfo -N -o "%N %P %T" || true
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
