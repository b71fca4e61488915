#!/usr/bin/env bash
# Start a one-node SLURM cluster on this (Debian) machine, for the `slurm` tests and for trying
# `moebench run --cluster slurm` without a real cluster.
#
# Why: the SLURM path (job arrays, preemption -> requeue -> resume) can only be tested against a real
# slurmctld/slurmd pair. This script installs them if missing, writes a munge key and a slurm.conf
# with this host as the only node (its real CPU count and memory, from `slurmd -C`), starts munged,
# slurmctld and slurmd, and waits until `sinfo` shows the node up.
#
# Idempotent: safe to rerun. If the daemons already run with the same slurm.conf it only checks the
# node; if the config changed, it restarts them. Exits non-zero with the reason when it cannot start.
# Needs root (apt-get, daemons running as root: SlurmUser=root).
#
# Usage: local-slurm.sh [start]        start (or check) the cluster, as above
#        local-slurm.sh stop [--force]  stop slurmd and slurmctld; refuses while jobs are queued or
#                                       running (they may be someone else's) unless --force, which
#                                       cancels them first. munged stays up (other programs may use it).
#        local-slurm.sh status          the daemons and the node, without changing anything
#
# Environment: SLURM_CONF_DIR (default /etc/slurm), LOCAL_SLURM_WAIT_S (default 60),
#              LOCAL_SLURM_PARTITION (default debug).
set -uo pipefail
# The daemons live in /usr/sbin, which a non-login PATH (e.g. PATH=/usr/bin:/bin) lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
CONF="$CONF_DIR/slurm.conf"
WAIT_S="${LOCAL_SLURM_WAIT_S:-60}"
PARTITION="${LOCAL_SLURM_PARTITION:-debug}"
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm-local

say() { echo "local-slurm: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# a daemon is running if its pid file names a live process with the expected name (pids get reused)
running() {
  local pidfile="$1" name="$2" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}
stop() {  # stop the daemon of a pid file (only if it is that daemon), waiting for it to go
  local pidfile="$1" name="$2" pid
  running "$pidfile" "$name" || return 0
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
}

usage() { sed -n 's/^# Usage: //p; s/^#        \(local-slurm\)/\1/p' "$0" >&2; }
cmd="${1:-start}"
case "$cmd" in
  start|stop|status) ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage; die "unknown command '$cmd' (start, stop [--force] or status)" ;;
esac

if [ "$cmd" = status ]; then
  for pair in slurmctld slurmd; do
    if running "$RUN_DIR/$pair.pid" "$pair"; then say "$pair running (pid $(cat "$RUN_DIR/$pair.pid"))"
    else say "$pair not running"; fi
  done
  command -v sinfo >/dev/null && sinfo -h -N -o '%N %P %T' 2>/dev/null | sed 's/^/local-slurm: node /' >&2
  exit 0
fi

if [ "$cmd" = stop ]; then
  force="${2:-}"
  [ -z "$force" ] || [ "$force" = --force ] || { usage; die "stop takes only --force, got '$force'"; }
  if ! running "$RUN_DIR/slurmctld.pid" slurmctld && ! running "$RUN_DIR/slurmd.pid" slurmd; then
    say "not running (no live slurmctld / slurmd from $RUN_DIR); nothing to stop"
    exit 0
  fi
  [ "$(id -u)" = 0 ] || die "must run as root to stop the daemons (they run as SlurmUser=root)"
  jobs="$(squeue -h -o '%i %u %T %j' 2>/dev/null)"
  if [ -n "$jobs" ]; then
    if [ "$force" != --force ]; then
      die "jobs are still queued or running (they may be another user's):
$jobs
wait for them, cancel yours with scancel, or rerun with: $0 stop --force (cancels all of them)"
    fi
    say "cancelling $(wc -l <<<"$jobs") job(s)"
    squeue -h -o '%i' 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 1 90); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  say "stopping slurmd and slurmctld"
  stop "$RUN_DIR/slurmd.pid" slurmd
  stop "$RUN_DIR/slurmctld.pid" slurmctld
  if running "$RUN_DIR/slurmd.pid" slurmd || running "$RUN_DIR/slurmctld.pid" slurmctld; then
    die "a daemon survived SIGTERM and SIGKILL; see $LOG_DIR"
  fi
  rm -f "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"
  say "stopped (munged left running; $0 starts the cluster again)"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons as SlurmUser=root)"

# -- 1. packages -----------------------------------------------------------------------------------
missing=()
for pair in slurmctld:/usr/sbin/slurmctld slurmd:/usr/sbin/slurmd slurm-client:/usr/bin/sinfo munge:/usr/sbin/munged; do
  pkg="${pair%%:*}" bin="${pair#*:}"
  [ -x "$bin" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand (Debian/Ubuntu packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt_log="$(mktemp /tmp/local-slurm-apt.XXXXXX)"
  apt-get update -qq >"$apt_log" 2>&1 || say "apt-get update failed; trying the install anyway"
  apt-get install -y -qq "${missing[@]}" >>"$apt_log" 2>&1 \
    || die "apt-get install ${missing[*]} failed: $(tail -n 5 "$apt_log")"
  for pair in slurmctld:/usr/sbin/slurmctld slurmd:/usr/sbin/slurmd slurm-client:/usr/bin/sinfo munge:/usr/sbin/munged; do
    [ -x "${pair#*:}" ] || die "${pair%%:*} installed but ${pair#*:} is missing"
  done
fi

# -- 2. munge --------------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "user 'munge' does not exist (the munge package creates it); reinstall munge"
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || die "cannot write /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  stop /run/munge/munged.pid munged
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force 2>/dev/null \
    || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip (see /var/log/munge/munged.log)"
fi

# -- 3. slurm.conf ---------------------------------------------------------------------------------
host="$(hostname -s)"
[ -n "$host" ] || die "hostname -s is empty; set a hostname"
getent hosts "$host" >/dev/null 2>&1 || die "host name '$host' does not resolve; add it to /etc/hosts"
node_line="$(slurmd -C 2>/dev/null | head -n 1)"
case "$node_line" in
  NodeName=*) ;;
  *) die "slurmd -C did not describe this node (got: '$node_line')" ;;
esac
mem_mb="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
[ -n "$mem_mb" ] && [ -n "$cpus" ] || die "cannot read CPUs / RealMemory from: $node_line"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd "$RUN_DIR"
new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by moebench scripts/local-slurm.sh: a one-node cluster for tests. Rerun the script to refresh.
ClusterName=moebench-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups (containers / gVisor have none usable): track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
# preempted / timed-out jobs may requeue themselves (submitit does), and a rebooted node comes back
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
MinJobAge=300
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
sed -i 's/ UpTime=[^ ]*//' "$new_conf"

changed=0
if ! cmp -s "$new_conf" "$CONF"; then
  changed=1
  install -m 0644 "$new_conf" "$CONF" || die "cannot write $CONF"
  say "wrote $CONF ($host: $cpus CPUs, $mem_mb MB)"
fi
[ -f "$CONF_DIR/cgroup.conf" ] || echo "CgroupPlugin=autodetect" >"$CONF_DIR/cgroup.conf"

if [ "$changed" = 1 ]; then
  stop "$RUN_DIR/slurmd.pid" slurmd
  stop "$RUN_DIR/slurmctld.pid" slurmctld
fi

# -- 4. daemons ------------------------------------------------------------------------------------
if ! running "$RUN_DIR/slurmctld.pid" slurmctld; then
  say "starting slurmctld"
  /usr/sbin/slurmctld -f "$CONF" >>"$LOG_DIR/slurmctld.start.log" 2>&1 \
    || die "slurmctld did not start: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
for _ in $(seq 1 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
scontrol ping 2>/dev/null | grep -q UP \
  || die "slurmctld does not answer 'scontrol ping': $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
if ! running "$RUN_DIR/slurmd.pid" slurmd; then
  say "starting slurmd"
  /usr/sbin/slurmd -f "$CONF" >>"$LOG_DIR/slurmd.start.log" 2>&1 \
    || die "slurmd did not start: $(tail -n 5 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

# -- 5. wait for the node --------------------------------------------------------------------------
state=""
for i in $(seq 1 "$((WAIT_S * 2))"); do
  state="$(sinfo -h -N -n "$host" -o '%T' 2>/dev/null | head -n 1)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|drained*|fail*)
      # a node left down by an earlier run comes back with `resume`
      scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle)
    # the controller can list a node as idle before its slurmd answers: run one real job step
    out="$(timeout 60 srun -N1 -n1 -t 1 --immediate=30 -J local-slurm-check hostname 2>&1)" \
      || die "node $host looks idle but a test job failed: $out; logs in $LOG_DIR"
    say "ready: node $host idle in partition $PARTITION ($cpus CPUs, $mem_mb MB); test job ran on $out" ;;
  mixed|allocated|completing) say "ready: node $host up ($state: jobs are running) in partition $PARTITION" ;;
  *) die "node $host is '${state:-unknown}' after ${WAIT_S}s, not idle: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -n 3); logs in $LOG_DIR" ;;
esac
