#!/usr/bin/env bash
# Stop the local single-node SLURM started by start.sh (slurmd, slurmctld,
# slurmdbd, the private MariaDB, munged). Safe when nothing is running.
# State and the accounting database are kept; start.sh reuses them.
#   SLURM_ELS_KEEP_MUNGE=1 stop.sh   # leave munged running
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=templates/els.env
. "$HERE/templates/els.env"

log() { echo "[slurm-els stop] $*"; }

pid_of() {  # pid_of PIDFILE NAME: print the pid if alive and named NAME
  local pid comm
  [ -s "$1" ] || return 1
  pid="$(tr -dc '0-9' 2>/dev/null < "$1")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # a zombie (not yet reaped by the container's init) counts as stopped
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [ "$comm" = "$2" ] && echo "$pid"
}

stop_daemon() {  # stop_daemon PIDFILE NAME [TIMEOUT_S]
  local pf="$1" name="$2" timeout="${3:-30}" pid i
  if ! pid="$(pid_of "$pf" "$name")"; then
    log "$name: not running"; rm -f "$pf"; return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 5; i++)); do
    pid_of "$pf" "$name" >/dev/null || { log "$name: stopped (pid $pid)"; rm -f "$pf"; return 0; }
    sleep 0.2
  done
  log "$name: did not exit in ${timeout}s, killing pid $pid"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pf"
}

# Cancel jobs still in the queue so that no slurmstepd outlives slurmd.
if pid_of "$ELS_RUN/slurmctld.pid" slurmctld >/dev/null && [ -f "$SLURM_CONF" ]; then
  jobs="$(timeout 10 squeue -h -o %i 2>/dev/null | xargs)"
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

stop_daemon "$ELS_RUN/slurmd.pid" slurmd
stop_daemon "$ELS_RUN/slurmctld.pid" slurmctld
stop_daemon "$ELS_RUN/slurmdbd.pid" slurmdbd
stop_daemon "$ELS_RUN/mariadbd.pid" mariadbd 60
rm -f "$ELS_DBSOCK"
if [ "${SLURM_ELS_KEEP_MUNGE:-0}" != 1 ]; then
  stop_daemon "$MUNGE_PID" munged
fi
exit 0
