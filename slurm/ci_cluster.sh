#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for CI and for trying the Slurm path by hand.
#
#   bash slurm/ci_cluster.sh install   # apt-get install slurm-wlm munge libpmix-dev (Debian/Ubuntu, root)
#   bash slurm/ci_cluster.sh start     # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd; wait for idle
#   bash slurm/ci_cluster.sh status    # sinfo
#   bash slurm/ci_cluster.sh stop      # cancel jobs, stop the three daemons by their pids
#
# No systemd here (containers, CI): the daemons are started directly and their pids kept in
# $STATE, so `stop` ends exactly the processes `start` made.
set -euo pipefail

STATE=${KVRELAY_SLURM_STATE:-/run/kvrelay-slurm}
CONF=/etc/slurm/slurm.conf
PARTITION=ci

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
  # 4-task submitit job fit on a 2-core CI runner; the ranks oversubscribe the cores as they
  # do under `mpiexec` there.
  cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))
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
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
  sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -1
}

start() {
  if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "ci_cluster: already running ($(node_state))"
    return 0
  fi
  mkdir -p "$STATE" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- /usr/sbin/mungekey --create
  write_conf
  # The package may have started munged already; start ours only when none answers.
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
  fi
  slurmctld
  slurmd
  local state=""
  for _ in $(seq 120); do
    state=$(node_state || true)
    case "$state" in
      idle) echo "ci_cluster: node $(hostname -s) idle in partition $PARTITION"; return 0 ;;
      down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "ci_cluster: the node did not become idle (state: ${state:-none}); logs in $STATE" >&2
  tail -n 20 "$STATE"/*.log >&2 || true
  return 1
}

stop() {
  scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
  local name pid
  for name in slurmd slurmctld munged; do
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
