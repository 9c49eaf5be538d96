#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for CI and for trying the Slurm path by hand.
#
#   bash slurm/ci_cluster.sh install   # apt-get install slurm-wlm munge libpmix-dev (Debian/Ubuntu, root)
#   bash slurm/ci_cluster.sh start     # write /etc/slurm/slurm.conf, start munged, slurmctld, two slurmd; wait for idle
#   bash slurm/ci_cluster.sh status    # sinfo
#   bash slurm/ci_cluster.sh stop      # cancel jobs, stop the daemons by their pids
#
# The two nodes, n1 and n2, are this one host: Debian's slurmd runs one daemon per node name
# (`slurmd -N n1`, each on its own port), so multi-node jobs run for real. Both share one kernel,
# so MPI between them may still use shared memory.
#
# No systemd here (containers, CI): the daemons are started directly and their pids kept in
# $STATE, so `stop` ends exactly the processes `start` made.
set -euo pipefail

STATE=${KVRELAY_SLURM_STATE:-/run/kvrelay-slurm}
CONF=/etc/slurm/slurm.conf
PARTITION=ci
NODES=(n1 n2)

install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "ci_cluster: installing Slurm needs root and apt-get" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge libpmix-dev >/dev/null
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  # NOTE: more CPUs than the machine has (with config_overrides) so that a 4-rank demo job and a
  # 4-task submitit job fit on each node of a 2-core CI runner; the ranks oversubscribe the cores
  # as they do under `mpiexec` there.
  cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 / ${#NODES[@]} ))
  mkdir -p /etc/slurm
  cat >"$CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# A requeued job that becomes eligible again waits for the next backfill pass (30 s by default).
SchedulerParameters=bf_interval=5
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
ReturnToService=2
# A requeued job waits cred_expire seconds (default 120) before it may start again; the requeue
# tests wait that long, and on one host no slow prolog needs the default's margin.
AuthInfo=cred_expire=30
# Slurm's defaults, written out because the time-limit test relies on them: at the limit the job
# gets TERM, then KILL KillWait seconds later; OverTimeLimit adds no grace minutes.
KillWait=30
OverTimeLimit=0
EOF
  local i
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$host Port=$((17001 + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

node_states() {  # the nodes' states, e.g. "idle idle"
  sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | paste -sd ' '
}

start() {
  if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "ci_cluster: already running ($(node_states))"
    return 0
  fi
  mkdir -p "$STATE" /var/spool/slurmctld /run/munge /var/log/munge /var/lib/munge "${NODES[@]/#//var/spool/slurmd/}"
  chown munge: /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
  write_conf
  # The package may have started munged already; start ours only when none answers.
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
  fi
  slurmctld
  local node states="" idle
  for node in "${NODES[@]}"; do
    slurmd -N "$node"
  done
  idle=$(printf 'idle\n%.0s' "${NODES[@]}" | paste -sd ' ')
  for _ in $(seq 120); do
    states=$(node_states || true)
    [ "$states" = "$idle" ] && { echo "ci_cluster: nodes ${NODES[*]} idle in partition $PARTITION"; return 0; }
    case "$states" in
      *down*|*drain*) scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "ci_cluster: the nodes did not become idle (states: ${states:-none}); logs in $STATE" >&2
  tail -n 20 "$STATE"/*.log >&2 || true
  return 1
}

stop() {
  scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
  local name pid
  for name in "${NODES[@]/#/slurmd-}" slurmctld munged; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$STATE/$name.pid"
  done
  echo "ci_cluster: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: bash slurm/ci_cluster.sh install|start|stop|status" >&2; exit 2 ;;
esac
